"""The one interface every tracking backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from bon_tracker.record import EvalRecord


class Backend(ABC):
    """Writes eval records to one tracking service.

    Lifecycle: the tracker calls :meth:`log_eval` once per eval step (only on rank 0
    of a multi-process run) and :meth:`finish` at the end. A backend opens its run
    lazily on the first :meth:`log_eval`, so constructing one touches nothing.

    Contract:

    * ``log_eval`` may raise on a service failure; the tracker then spools the
      record and calls ``log_eval`` again with the same record later. A backend must
      therefore be idempotent per step: writing a step that is already (fully or
      partly) there must not duplicate anything.
    * every service quirk (key rules, batch limits, step handling) stays in the
      backend's own module.
    """

    name: str = "backend"

    @abstractmethod
    def log_eval(self, record: EvalRecord) -> None:
        """Write scalars, the ``bon_curves`` table rows and charts for one eval step."""

    def finish(self) -> None:  # noqa: B027 - a no-op default, as in Lightning's loggers
        """Flush and close what this backend opened (never a run it attached to)."""

    @property
    def run_id(self) -> str | None:
        """An id that lets a later process continue the same run (None before opening)."""
        return None

    def spec(self) -> dict[str, Any]:
        """JSON-able ``{"backend": name, **options}`` to rebuild this backend for a replay
        (``bon-tracker sync``), pointing at the same run."""
        return {"backend": self.name}
