#!/usr/bin/env bash
# Creates .venv (if needed) and installs bon_tracker with every extra and the test tools.
# torch is pinned to the 2.13.0 CPU wheel through constraints.txt: unpinned, torch (or a
# package that pulls it in, like lightning or trl) resolves to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
