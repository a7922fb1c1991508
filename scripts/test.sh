#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (lint, unit, doctests, real MLflow and
# W&B offline, trainer integrations). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
