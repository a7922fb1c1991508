"""Doctest collection: trainer integrations are only imported where their framework is
installed, so the core and tracker tests also run with no framework at all."""

import importlib.util

_FRAMEWORK_OF = {
    "_sampling": "torch",
    "_trainer": "transformers",
    "transformers": "transformers",
    "trl": "trl",
    "lightning": "lightning",
    "verl": "verl",
}
collect_ignore = [
    f"integrations/{module}.py" for module, dep in _FRAMEWORK_OF.items() if not importlib.util.find_spec(dep)
]
# verl pins an older transformers: its tests run in .venv-verl (scripts/verl_env.sh, called by scripts/test.sh)
if not importlib.util.find_spec("verl"):
    collect_ignore.append("tests/verl")
