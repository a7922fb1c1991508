"""The one interface every tracking backend implements: a writer and a reader."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from bon_tracker.record import EvalRecord


class ConfigurationError(ValueError):
    """The backend is set up wrongly (a missing extra, an invalid setting, a run that does
    not exist, refused credentials): retrying cannot help, so it is reported, never spooled."""


class RejectedRecord(ValueError):
    """The service refused this one record as invalid: it goes to the dead-letter file and
    never blocks the records after it."""


class RunNotFoundError(LookupError):
    """No such run (or a run without bon_tracker records): raised by ``read_records``."""


class Backend(ABC):
    """Writes eval records to one tracking service, and reads them back.

    Lifecycle: the delivery worker calls :meth:`log_eval` once per eval step, in step
    order, on its own thread (never the training thread), and :meth:`finish` at the end.
    A backend opens its run lazily on the first :meth:`log_eval`, so constructing one
    touches nothing; :meth:`check` validates what can be checked without the network.

    Contract:

    * ``log_eval`` raises on failure; :meth:`classify` sorts the error into an outage
      (retried with back-off), a rejected record (dead-lettered) or a configuration error
      (reported loudly). The same record may therefore be written again: a backend must be
      idempotent per step (writing a step that is already, fully or partly, there must not
      duplicate anything).
    * every service quirk (key rules, batch limits, step handling, which errors are
      transient) stays in the backend's own module.
    * :meth:`read_records` reads back what :meth:`log_eval` wrote, so comparing runs and
      reports are dispatch over backends, not a second copy of each storage format.
    """

    name: ClassVar[str] = "backend"
    extra: ClassVar[str | None] = None  # the pip extra that installs this backend's service client

    @abstractmethod
    def log_eval(self, record: EvalRecord) -> None:
        """Write scalars, the ``bon_curves`` table rows and charts for one eval step."""

    def check(self) -> None:  # noqa: B027 - a no-op default, as in Lightning's loggers
        """Raise :class:`ConfigurationError` for a setup that cannot work; no network."""

    def bind(self) -> None:  # noqa: B027
        """Called on the training thread before each record is queued: capture context that
        lives on that thread (e.g. MLflow's active run, which is thread-local). Cheap, no I/O."""

    def refresh_views(self) -> None:  # noqa: B027
        """Redraw views over the whole run (overview charts, reports); called by the delivery
        worker when its queue is empty, so only the latest is drawn when steps come fast."""

    def finish(self) -> None:  # noqa: B027
        """Flush and close what this backend opened (never a run it attached to)."""

    def release(self) -> None:  # noqa: B027
        """Give back what this process holds (a run folder's lock, open files) without
        finishing the run: the tracker calls it when records are left for ``bon-tracker sync``,
        so that the printed sync command works at once, also in this same process."""

    def alert(self, title: str, text: str, level: str = "WARN", *, step: int | None = None) -> None:  # noqa: B027
        """Raise the service's native alert, where it has one (W&B, trackio). Called by the
        delivery worker after :meth:`log_eval` delivered the record of ``step`` that holds the
        alert's onset; a failure is logged, not retried."""

    def classify(self, error: BaseException) -> str:
        """``"config"``, ``"rejected"`` or ``"transient"`` for an error of :meth:`log_eval`.

        Backends refine this for their service's exceptions; unknown errors count as an
        outage (retried, never dropped).
        """
        return classify_common(error)

    @property
    def run_id(self) -> str | None:
        """An id that lets a later process continue the same run (None before opening)."""
        return None

    @property
    def location(self) -> str | None:
        """Where a user finds the run: a folder, a URL, or a run id and the command that
        opens it (None before the run was opened). Printed when the tracker finishes."""
        return None

    # Delivery only writes local files (no network): finish() waits until everything is
    # written, however long the charts take, as long as writes make progress.
    completes_at_finish: ClassVar[bool] = False

    def spec(self) -> dict[str, Any]:
        """JSON-able ``{"backend": name, **options}`` to rebuild this backend for a replay
        (``bon-tracker sync``), pointing at the same run."""
        return {"backend": self.name}

    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[Any, ...]:
        """``(label, records)`` of the run ``ref`` (the backend's own form of a run
        reference), records in step order; or ``(label, location, records)`` when the run's
        canonical id differs from ``ref`` (an MLflow run given by name). Raises
        :class:`RunNotFoundError` when there is no such run."""
        raise NotImplementedError(f"the {cls.name} backend cannot read runs back")

    @classmethod
    def claims(cls, ref: str) -> bool:
        """Whether ``ref`` names a run of this backend without the ``name:`` prefix (e.g. a
        local run folder); used by ``compare`` and ``report`` to dispatch bare references."""
        return False


def classify_common(error: BaseException) -> str:
    """What holds for every backend: our own typed errors, a missing extra, the network."""
    from bon_tracker.optional import MissingDependencyError

    if isinstance(error, (ConfigurationError, MissingDependencyError)):
        return "config"
    if isinstance(error, RejectedRecord):
        return "rejected"
    if isinstance(error, _RECORD_ERRORS):
        return "rejected"  # a property of the record (a value that cannot be encoded): retrying cannot help
    return "transient"


# Errors that one record causes, whatever the service's state: encoding (an int too large for
# a float, text that is not UTF-8, nesting too deep) and values the code cannot take.
_RECORD_ERRORS = (OverflowError, UnicodeError, RecursionError, TypeError, ValueError, KeyError, IndexError)
