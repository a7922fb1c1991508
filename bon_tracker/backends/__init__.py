"""Tracking backends: one interface (``Backend``), one module per service, one registry.

Adding a backend touches its own module, one line of :data:`BACKENDS` and the docs.
"""

from __future__ import annotations

import importlib
from typing import Any

from bon_tracker.backends.base import (
    Backend,
    ConfigurationError,
    RejectedRecord,
    RunNotFoundError,
)

# name -> "module:Class"; imported only when used, so no service client loads at import time.
BACKENDS: dict[str, str] = {
    "local": "bon_tracker.backends.local:LocalBackend",
    "mlflow": "bon_tracker.backends.mlflow:MlflowBackend",
    "wandb": "bon_tracker.backends.wandb:WandbBackend",
    "tensorboard": "bon_tracker.backends.tensorboard:TensorBoardBackend",
    "trackio": "bon_tracker.backends.trackio:TrackioBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_backend(name: str, **options: Any) -> Backend:
    """Build a backend by name; touches nothing yet (no file, no network)."""
    return backend_class(name)(**options)


def backend_from_spec(spec: dict[str, Any]) -> Backend:
    """Rebuild a backend from its :meth:`Backend.spec`."""
    options = dict(spec)
    return make_backend(options.pop("backend"), **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "ConfigurationError",
    "RejectedRecord",
    "RunNotFoundError",
    "backend_class",
    "backend_from_spec",
    "make_backend",
]
