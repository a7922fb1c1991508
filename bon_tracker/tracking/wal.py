"""A write-ahead spool: records that a tracking service failed to take, kept on disk.

One JSONL file per tracker; each line holds the backend spec (to rebuild the
backend in another process, for ``bon-tracker sync``) and the record. Lines are
appended with one write and fsync; removal rewrites the file atomically.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bon_tracker.record import EvalRecord

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


def default_spool_dir() -> Path:
    """``$BON_TRACKER_SPOOL_DIR``, else ``$XDG_CACHE_HOME/bon_tracker/spool`` (``~/.cache``)."""
    if os.environ.get("BON_TRACKER_SPOOL_DIR"):
        return Path(os.environ["BON_TRACKER_SPOOL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bon_tracker" / "spool"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """Pending records of one tracker, in logging order.

    The process that writes a spool holds an exclusive lock on ``<spool>.lock`` while it
    lives (:meth:`claim`), so ``bon-tracker sync`` leaves the spool of a running tracker
    alone instead of racing it (POSIX ``flock``; no locking where it is missing).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def claim(self) -> bool:
        """Take the spool's lock for this process; False if another process holds it."""
        if self._lock_fd is not None or fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        """Give the lock back (and tidy the lock file away when the spool is gone)."""
        if self._lock_fd is None:
            return
        if not self.path.exists():
            self.lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    @classmethod
    def new(cls, backend_name: str, directory: Path | None = None) -> Spool:
        directory = Path(directory) if directory is not None else default_spool_dir()
        return cls(directory / f"{backend_name}-{uuid.uuid4().hex[:12]}.jsonl")

    def append(self, spec: dict[str, Any], record: EvalRecord) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"spec": spec, "record": record.to_json()}, allow_nan=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[dict[str, Any], EvalRecord]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError:  # a torn last line from a crash mid-append
                continue
            out.append((data["spec"], EvalRecord.from_json(data["record"])))
        return out

    def __len__(self) -> int:
        return len(self.entries())

    def keep_only(self, entries: list[tuple[dict[str, Any], EvalRecord]]) -> None:
        """Replace the spool's content by ``entries`` (delete the file when empty)."""
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        text = "".join(json.dumps({"spec": s, "record": r.to_json()}) + "\n" for s, r in entries)
        atomic_write_text(self.path, text)


def spool_files(directory: Path | None = None) -> Iterator[Path]:
    directory = Path(directory) if directory is not None else default_spool_dir()
    if directory.is_dir():
        yield from sorted(directory.glob("*.jsonl"))
