#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (lint, unit, doctests, real MLflow and
# W&B offline, trainer integrations, the HTML report in headless Chromium). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test needs Chromium (Debian's package); install it where it is missing and we can.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if $SUDO true 2>/dev/null; then
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null \
      || echo "scripts/test.sh: could not install chromium; the browser test will skip (or fail under CI=true)" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two workers (most of the suite waits on servers, subprocesses and browsers, so two workers
# overlap that waiting on two cores); tests/conftest.py keeps the fault tests on one worker and
# Ray's on one. BON_TRACKER_TEST_WORKERS=0 runs everything in this process (or pass -n 0).
.venv/bin/python -m pytest -n "${BON_TRACKER_TEST_WORKERS:-2}" --dist loadgroup "$@"
# The verl adapter against the real verl package, in its own environment (verl pins an older
# transformers): scripts/verl_env.sh builds .venv-verl once (about 60-75 s) and then reuses it;
# its tests take about 25 s. BON_TRACKER_SKIP_VERL=1 skips them locally; under CI=true it is refused.
if [ "${BON_TRACKER_SKIP_VERL:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "scripts/test.sh: verl tests skipped (BON_TRACKER_SKIP_VERL=1)" >&2
else
  bash scripts/verl_env.sh
  .venv-verl/bin/python -m pytest -p no:cacheprovider -W "ignore::UserWarning:verl.workers.engine" tests/verl integrations/verl.py
fi
