#!/usr/bin/env bash
# Creates .venv-verl: the pinned verl release, bon_tracker (editable, no extras) and pytest,
# for tests/verl. A separate environment because verl pins an older transformers (<5.11)
# than the main .venv. verl's CUDA-only extras (vllm, sglang, flash-attn, megatron) are not
# installed: its trainer modules import without them. Its "verl-core" packages that those
# imports need (TransferQueue, pyzmq, msgspec, cachetools, fastapi, uvicorn) are listed below.
#
# constraints-verl.txt pins every package (a `pip freeze` of a working install, torch the
# 2.13.0 CPU wheel), so CI installs the same set each time. After changing VERL_REQUIREMENTS
# or the verl version, regenerate it with:  bash scripts/verl_env.sh --freeze
# A finished environment is reused while constraints-verl.txt, pyproject.toml and this script
# are unchanged (a stamp file holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-verl
VERL_REQUIREMENTS=(verl==0.9.1 "TransferQueue>=0.1.10" pyzmq msgspec cachetools fastapi uvicorn pytest)
STAMP="$VENV/.bon_tracker_stamp"

stamp() { cat constraints-verl.txt pyproject.toml scripts/verl_env.sh | sha256sum | cut -d' ' -f1; }

if [ "${1:-}" = "--freeze" ]; then
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c <(echo "torch==2.13.0") "${VERL_REQUIREMENTS[@]}" -e .
  {
    echo "# pip freeze of .venv-verl (bash scripts/verl_env.sh --freeze); torch is the 2.13.0 CPU wheel"
    "$VENV/bin/python" -m pip freeze --exclude-editable | sed -e 's/^torch==2\.13\.0+cpu$/torch==2.13.0/'
  } > constraints-verl.txt
  stamp > "$STAMP"
  echo "wrote constraints-verl.txt ($(grep -vc '^#' constraints-verl.txt) packages)"
  exit 0
fi

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp)" ]; then
  exit 0  # up to date
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -c constraints-verl.txt "${VERL_REQUIREMENTS[@]}" -e .
stamp > "$STAMP"
