"""The write-ahead log: every eval record is on local disk before delivery starts.

One log per tracker (``<backend>-<id>.jsonl`` in the WAL folder), written by one process:

* ``<log>.jsonl``: one line per entry, ``{"seq": 3, "record": {...}}``. A last entry
  ``{"seq": 9, "finish": true}`` says the run was finished with records still
  undelivered, so ``sync`` also ends the run once they are delivered.
* ``<log>.spec.json``: the backend's spec (:meth:`Backend.spec`), which rebuilds it in
  another process pointing at the same run; replaced whole when it changes (the run id
  becomes known once the worker opened the run).
* ``<log>.acks``: the sequence numbers delivered (or dead-lettered), one per line.
* ``<log>.dead.jsonl``: records the service rejected as invalid, each with its reason.
* ``<log>.lock``: held (``flock``) by the process writing the log, with its pid inside.

Every other file only grows by whole lines (:func:`bon_tracker.files.append_whole`): nothing is
rewritten, a torn line from a crash is cut, a refused write leaves the file as it was.
When every entry is acknowledged the log's files are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bon_tracker.files import LineFile, append_whole, atomic_write_text
from bon_tracker.record import EvalRecord

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]


def default_wal_dir() -> Path:
    """``$BON_TRACKER_SPOOL_DIR``, else ``$XDG_CACHE_HOME/bon_tracker/spool`` (``~/.cache``)."""
    if os.environ.get("BON_TRACKER_SPOOL_DIR"):
        return Path(os.environ["BON_TRACKER_SPOOL_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "bon_tracker" / "spool"


@dataclass
class Entry:
    """One line of the log: a record to deliver, or the marker that the run was finished."""

    seq: int
    record: EvalRecord | None = None
    finish: bool = False
    persisted: bool = True  # False: the disk refused it; it lives in memory only

    def to_line(self) -> bytes:
        data: dict[str, Any] = {"seq": self.seq}
        if self.record is not None:
            data["record"] = self.record.to_json()
        if self.finish:
            data["finish"] = True
        return (json.dumps(data, allow_nan=True, separators=(",", ":")) + "\n").encode("utf-8")


class WriteAheadLog:
    """The durable log of one tracker (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._spec_text: str | None = None
        self._spec_lock = threading.Lock()
        self._log = LineFile(self.path)  # appended by the training thread
        self._acks = LineFile(self.acks_path)  # appended by the delivery worker

    @classmethod
    def new(cls, backend_name: str, directory: str | os.PathLike[str] | None = None) -> WriteAheadLog:
        directory = Path(directory) if directory is not None else default_wal_dir()
        return cls(directory / f"{backend_name}-{uuid.uuid4().hex[:12]}.jsonl")

    # ---- the files ---------------------------------------------------------------------
    @property
    def acks_path(self) -> Path:
        return self.path.with_suffix(".acks")

    @property
    def dead_path(self) -> Path:
        return self.path.with_suffix(".dead.jsonl")

    @property
    def spec_path(self) -> Path:
        return self.path.with_suffix(".spec.json")

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    # ---- one writer ----------------------------------------------------------------------
    def claim(self) -> bool:
        """Take the log's lock for this process; False if another process holds it."""
        if self._lock_fd is not None or fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        with contextlib.suppress(OSError):  # the pid is only for messages; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, for messages (``pid 1234`` or ``another process``)."""
        with contextlib.suppress(OSError, ValueError):
            return f"pid {int(self.lock_path.read_text().strip())}"
        return "another process"

    def release(self) -> None:
        """Close the log and give the lock back; remove the lock file once the log is gone."""
        self.close()
        if self._lock_fd is None:
            return
        if not self.path.exists():
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
        os.close(self._lock_fd)
        self._lock_fd = None

    # ---- writing (raises OSError when the disk refuses) ----------------------------------
    def append(self, entry: Entry) -> None:
        if not self._log.is_open:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._log.append(entry.to_line())

    def write_spec(self, spec: dict[str, Any]) -> None:
        """Record the backend's spec (only when it changed; atomic)."""
        text = json.dumps(spec, sort_keys=True, default=str)
        with self._spec_lock:
            if text == self._spec_text:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.spec_path, text)
            self._spec_text = text

    def spec(self) -> dict[str, Any]:
        """The backend spec of this log (0.1 spools kept it on every line)."""
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads(self.spec_path.read_text(encoding="utf-8")))
        with contextlib.suppress(OSError, ValueError, StopIteration), open(self.path, encoding="utf-8") as f:
            return dict(json.loads(next(f)).get("spec") or {})
        return {}

    def ack(self, seqs: list[int]) -> None:
        self._acks.append("".join(f"{seq}\n" for seq in seqs).encode())

    def dead_letter(self, entry: Entry, reason: str) -> None:
        line: dict[str, Any] = {"seq": entry.seq, "reason": reason, "spec": self.spec()}
        if entry.record is not None:
            line["record"] = entry.record.to_json()
        append_whole(self.dead_path, (json.dumps(line, allow_nan=True) + "\n").encode("utf-8"))

    def close(self) -> None:
        """Close the files this writer holds open."""
        self._log.close()
        self._acks.close()

    def remove(self) -> None:
        """Delete the log and its acks (everything was delivered); dead letters stay."""
        self.close()
        for path in (self.path, self.acks_path, self.spec_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- reading -------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every entry of the log, in order (a torn last line is skipped)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a crash mid-append
                record = data.get("record")
                out.append(
                    Entry(
                        seq=int(data.get("seq", i)),  # logs of 0.1 (the spool) had no seq
                        record=None if record is None else EvalRecord.from_json(record),
                        finish=bool(data.get("finish", False)),
                    )
                )
        return out

    def acked(self) -> set[int]:
        if not self.acks_path.exists():
            return set()
        done = set()
        for line in self.acks_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                done.add(int(line))
        return done

    def pending(self) -> list[Entry]:
        """Entries not yet delivered, in order."""
        done = self.acked()
        return [e for e in self.entries() if e.seq not in done]

    def next_seq(self) -> int:
        entries = self.entries()
        return max((e.seq for e in entries), default=-1) + 1

    def dead_letters(self) -> list[dict[str, Any]]:
        if not self.dead_path.exists():
            return []
        out = []
        for line in self.dead_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def __len__(self) -> int:
        return sum(1 for e in self.pending() if e.record is not None)


def wal_files(directory: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """The logs in a WAL folder (dead-letter files excluded)."""
    directory = Path(directory) if directory is not None else default_wal_dir()
    if directory.is_dir():
        yield from sorted(p for p in directory.glob("*.jsonl") if not p.name.endswith(".dead.jsonl"))
