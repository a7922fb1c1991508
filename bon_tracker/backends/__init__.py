"""Tracking backends: one interface (``Backend``), one module per service."""

from bon_tracker.backends.base import Backend

__all__ = ["Backend"]
