#!/usr/bin/env bash
# Regenerates constraints.txt: every package that `pip install -e '.[test]'` resolves to,
# pinned at the version installed in .venv now (run scripts/setup.sh first, upgrade what
# you mean to upgrade, run the tests, then this). torch stays at the 2.13.0 CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
freeze="$(mktemp)"; report="$(mktemp)"
trap 'rm -f "$freeze" "$report"' EXIT
.venv/bin/python -m pip freeze --exclude-editable | grep -v '^bon[-_]tracker' > "$freeze"
.venv/bin/python -m pip install --dry-run --ignore-installed --quiet -c "$freeze" -e '.[test]' --report "$report"
.venv/bin/python - "$report" > constraints.txt <<'PY'
import json, sys
pins = {}
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"].lower(), item["metadata"]["version"]
    if name.replace("_", "-") != "bon-tracker":
        pins[name] = "2.13.0" if name == "torch" else version
print("# The test environment, pinned: scripts/setup.sh installs with -c constraints.txt, so a new")
print("# release upstream cannot change CI overnight. The package's own requirements stay ranges")
print("# (pyproject.toml). torch is the 2.13.0 CPU wheel: unpinned, torch (or lightning/trl/ray")
print("# pulling it in) resolves to a multi-GB CUDA build. Regenerate: scripts/lock.sh")
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
PY
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins"
