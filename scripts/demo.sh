#!/usr/bin/env bash
# Sets everything up, then runs the main demo on the embedded local backend (no server, no account).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/demo.py "$@"
