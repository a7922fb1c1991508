"""The one place optional dependencies are imported, with an error naming the extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class MissingDependencyError(ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an error that tells how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module} is needed for this feature but is not installed: pip install 'bon-tracker[{extra}]'"
        ) from err


def require_installed(module: str, extra: str) -> None:
    """Raise like :func:`require` if ``module`` is not installed, without importing it
    (importing a service client can start processes and threads)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"{module} is needed for this feature but is not installed: pip install 'bon-tracker[{extra}]'"
        )
