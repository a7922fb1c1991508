"""The layers of DESIGN.md, enforced: which bon_tracker module may import which.

Data flows one way (scores -> curves -> records -> services). Every import of every
module counts, lazy ones inside functions included, so a layer cannot reach upwards
by importing late.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bon_tracker"

# The leaves every layer may use: plain data and mechanisms that know no layer.
LEAVES = {
    "bon_tracker.core",
    "bon_tracker.record",
    "bon_tracker.texts",  # the hack table: plain data beside the record (texts never reach the core)
    "bon_tracker.files",
    "bon_tracker.optional",
    "bon_tracker.version",
}

# layer -> bon_tracker modules it may import (prefixes); anything else of bon_tracker is refused.
ALLOWED = {
    "bon_tracker.core": {"bon_tracker.core"},
    "bon_tracker.record": {"bon_tracker.core", "bon_tracker.texts"},
    "bon_tracker.texts": set(),
    "bon_tracker.files": set(),
    "bon_tracker.optional": set(),
    "bon_tracker.version": set(),
    # Backends draw with the reports' chart and HTML modules (which import no backend).
    "bon_tracker.backends": LEAVES
    | {
        "bon_tracker.backends",
        "bon_tracker.reports.charts",
        "bon_tracker.reports.html",
        "bon_tracker.reports.render",
        "bon_tracker.reports.selection_charts",
        "bon_tracker.reports.selection_tables",
        "bon_tracker.reports.texts_tables",
    },
    # Tracking knows the backend interface and registry, never a service.
    "bon_tracker.tracking": LEAVES | {"bon_tracker.tracking", "bon_tracker.backends"},
    "bon_tracker.analysis": LEAVES | {"bon_tracker.analysis"},
    "bon_tracker.reports": LEAVES | {"bon_tracker.reports", "bon_tracker.backends"},
    # The lab is a user of the tracker: it trains with it the way a user's script does.
    "bon_tracker.lab": LEAVES
    | {
        "bon_tracker.lab",
        "bon_tracker.tracking",
        "bon_tracker.backends",
        "bon_tracker.integrations",
        "bon_tracker.cli",
    },
    "bon_tracker.cli": LEAVES
    | {
        "bon_tracker.lab",
        "bon_tracker.cli",
        "bon_tracker.backends",
        "bon_tracker.tracking",
        "bon_tracker.analysis",
        "bon_tracker.reports",
    },
}
# Service clients and frameworks: only the backends (services) and integrations (frameworks) import them.
SERVICE_MODULES = {"mlflow", "wandb", "tensorboard", "trackio", "torch", "transformers", "trl", "lightning", "ray"}
NUMERIC_ONLY = {"numpy", "scipy", "threadpoolctl", "__future__"} | set(
    sys.stdlib_module_names
)  # threadpoolctl: BLAS threads


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == "bon_tracker":  # "from bon_tracker import x" imports the package root
                out += [(node.lineno, "bon_tracker")]
            elif name.startswith("bon_tracker."):  # "from bon_tracker.reports import charts": the submodule
                out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, name))
    return out


def _layer(module: str) -> str:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return module


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_what_its_layer_allows(path):
    module = _module_name(path)
    layer = _layer(module)
    assert layer in ALLOWED, f"{module} belongs to no layer of DESIGN.md; add it to a layer"
    allowed = ALLOWED[layer]
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top == "bon_tracker":
            assert name != "bon_tracker", f"{module}:{line} imports the package root (import the module itself)"
            parent = name.rsplit(".", 1)[0]  # "from pkg.mod import func" names pkg.mod.func
            assert any(n == a or n.startswith(a + ".") for n in (name, parent) for a in allowed), (
                f"{module}:{line} imports {name}: the {layer} layer may import only {sorted(allowed)}"
            )
        elif layer in ("bon_tracker.core", "bon_tracker.record", "bon_tracker.files"):
            assert top in NUMERIC_ONLY, f"{module}:{line} imports {name}: {layer} uses numpy, scipy, stdlib only"
        elif layer in ("bon_tracker.tracking", "bon_tracker.reports", "bon_tracker.cli"):
            assert top not in SERVICE_MODULES, f"{module}:{line} imports {name}: only backends talk to services"


def test_the_checker_sees_lazy_and_root_imports(tmp_path):
    probe = PACKAGE / "tracking" / "_layer_probe_tmp.py"
    probe.write_text("def f():\n    from bon_tracker import cli\n    import mlflow\n", encoding="utf-8")
    try:
        assert (2, "bon_tracker") in _imports(probe) and (3, "mlflow") in _imports(probe)
        with pytest.raises(AssertionError, match="package root"):
            test_each_module_imports_only_what_its_layer_allows(probe)
    finally:
        probe.unlink()


def test_integrations_use_the_tracker_not_services_internals():
    for path in sorted((ROOT / "integrations").glob("*.py")):
        for line, name in _imports(path):
            assert not name.startswith(("bon_tracker.reports", "bon_tracker.cli")), f"{path.name}:{line} imports {name}"


def test_import_loads_no_heavy_module():
    """``import bon_tracker`` stays light: scipy.stats (~1.5 s), service clients and matplotlib
    load only when a function needs them."""
    import subprocess
    import sys

    code = (
        "import sys, bon_tracker; heavy = ['scipy.stats', 'mlflow', 'wandb', 'matplotlib', 'torch', 'pyarrow']; "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
