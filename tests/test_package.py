"""Layering and packaging: the pure core, nothing at import time, the wheel layout."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# threadpoolctl: holds BLAS to one thread during a call (bon_tracker.core.threads); pure Python, no I/O.
ALLOWED_CORE_IMPORTS = {"numpy", "scipy", "threadpoolctl", "bon_tracker", "__future__"} | set(sys.stdlib_module_names)
FORBIDDEN_AT_IMPORT = ("wandb", "mlflow", "torch", "transformers", "trl", "lightning", "matplotlib", "yaml")


def test_core_imports_only_numpy_scipy_and_stdlib():
    for path in (ROOT / "bon_tracker" / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED_CORE_IMPORTS, f"{path.name} imports {name}"
                if top == "bon_tracker":
                    assert name.startswith("bon_tracker.core"), f"{path.name} imports {name} outside core"


def test_importing_the_package_loads_no_framework_and_writes_nothing(tmp_path):
    code = (
        "import sys, bon_tracker, bon_tracker.tracking.tracker, bon_tracker.backends.local; "
        f"bad = [m for m in {FORBIDDEN_AT_IMPORT!r} if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_integrations_import_from_the_editable_install():
    import bon_tracker.integrations

    assert Path(bon_tracker.integrations.__file__).resolve().parent == ROOT / "integrations"


@pytest.mark.slow
def test_integrations_ship_inside_the_built_wheel(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("bon_tracker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "bon_tracker/integrations/__init__.py" in names
    assert "bon_tracker/py.typed" in names
    assert "bon_tracker/core/weights.py" in names
    assert not any(n.startswith(("tests/", "integrations/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import bon_tracker.integrations, bon_tracker; print(bon_tracker.integrations.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {code}"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.stdout.strip().startswith(str(site))


def test_the_installed_version_is_the_packages_own():
    """One version: pyproject reads it from bon_tracker/version.py, as the CHANGELOG's current section names it."""
    import importlib.metadata
    import re

    import bon_tracker

    assert importlib.metadata.version("bon-tracker") == bon_tracker.__version__
    heading = re.search(r"^## (\S+)", (Path(__file__).parent.parent / "CHANGELOG.md").read_text(), re.M)
    assert heading is not None and bon_tracker.__version__.startswith(heading.group(1))
