#!/usr/bin/env bash
# Creates .venv (if needed) and installs bon_tracker with every extra and the test tools.
# torch is pinned to the 2.13.0 CPU wheel through constraints.txt: unpinned, torch (or a
# package that pulls it in, like lightning or trl) resolves to a multi-GB CUDA build.
# Nothing is reinstalled while pyproject.toml, constraints.txt and this script are unchanged
# (a stamp in .venv records their hash); FORCE_SETUP=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.bon_tracker_setup
WANT="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "${FORCE_SETUP:-0}" != 1 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
echo "$WANT" > "$STAMP"
