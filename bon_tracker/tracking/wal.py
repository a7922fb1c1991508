"""The write-ahead log: every eval record is on local disk before delivery starts.

One log per tracker (``<backend>-<id>.jsonl`` in the WAL folder), written by one process:

* ``<log>.jsonl``: one line per entry, ``{"crc32":"1a2b3c4d","entry":{"seq": 3, "record": {...},
  "curve_f64": {...}}}`` (a record's curve, then the same seq again once its statistics are
  computed: the last wins). The curve's float arrays are in ``curve_f64``, each the hex of its
  little-endian float64 bytes, not in ``record.curve``: the first line of an eval is written on the
  training thread, and formatting a float as JSON costs about 0.4 us (42 of them at a grid of 7 n);
  older lines, with the numbers in the record, are read as well;
  the checksum covers the exact bytes of the ``entry`` value, so a damaged line (flipped
  bytes, a digit changed) is found and never delivered as wrong data. A last entry
  ``{"seq": 9, "finish": true}`` says the run was finished with records still
  undelivered, so ``sync`` also ends the run once they are delivered.
* ``<log>.bad.jsonl``: the damaged lines of the log, each with its line number and what
  is wrong, set aside by :meth:`WriteAheadLog.set_aside_bad_lines` (never deleted); every
  good line is still delivered.
* ``<log>.spec.json``: the backend's spec (:meth:`Backend.spec`), which rebuilds it in
  another process pointing at the same run; replaced whole when it changes (the run id
  becomes known once the worker opened the run).
* ``<log>.acks``: the sequence numbers delivered (or dead-lettered), one per line.
* ``<log>.dead.jsonl``: records the service rejected as invalid, each with its reason.
* ``<log>.lock``: held (``flock``) by the process writing the log, with its pid inside.

Appends come from any thread (one lock per log). Every file only grows by whole lines
(:func:`bon_tracker.files.append_whole`) but the spec: nothing is rewritten, a torn line
from a crash is cut, a refused write leaves the file as it was. When every entry is
acknowledged the log's files are removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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
        body = _curve_only_body(self) if self.record is not None and not self.finish else None
        if body is None:
            body = self._body()
        return b'{"crc32":"%08x","entry":%s}\n' % (zlib.crc32(body), body)

    def _body(self) -> bytes:
        data: dict[str, Any] = {"seq": self.seq}
        if self.record is not None:
            record = data["record"] = self.record.to_json()
            curve = self.record.curve
            for name in PACKED_CURVE_FIELDS:
                del record["curve"][name]
            data["curve_f64"] = {name: _packed(getattr(curve, name)) for name in PACKED_CURVE_FIELDS}
        if self.finish:
            data["finish"] = True
        return _encode(data).encode("utf-8")


_encode = json.JSONEncoder(allow_nan=True, separators=(",", ":")).encode


_string = json.encoder.encode_basestring_ascii  # json.dumps' own (ensure_ascii, its default)


def _float(value: float) -> str:
    """A float as json.dumps writes it (allow_nan)."""
    if math.isfinite(value):
        return repr(value)
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


_grid_text: tuple[bytes, bytes, str] = (b"", b"", "")  # the last curve's n and n_prompts, formatted


def _grid_json(curve: Any) -> str:
    """``"n":[...],"n_prompts":[...]`` of ``curve``: formatted once while they stay the same
    (every eval of a run, usually), else again."""
    global _grid_text
    n, counts = curve.n.tobytes(), curve.n_prompts.tobytes()
    last = _grid_text
    if n != last[0] or counts != last[1]:
        text = (
            f'"n":[{",".join(map(str, curve.n.tolist()))}],"n_prompts":[{",".join(map(str, curve.n_prompts.tolist()))}]'
        )
        last = _grid_text = (n, counts, text)  # one tuple, replaced whole: safe from any thread
    return last[2]


def _curve_only_body(entry: Entry) -> bytes | None:
    """The ``entry`` value of a record that holds only its curve (the line the training thread
    writes), formatted directly: the same bytes as :meth:`Entry._body` (a test compares them) at
    a fraction of its cost, most of which went into the record's dict and the generic encoder.
    None for any other record."""
    record = entry.record
    assert record is not None
    if not (
        record.goodhart is None
        and record.interval is None
        and record.agreement is None
        and record.predictions is None
        and not record.alerts
        and record.alert_states is None
        and record.selection is None
        and record.hacks is None
        and type(record.timestamp) is float  # an int is written as one: the generic path
        and (record.policy is None or all(type(value) is float for value in vars(record.policy).values()))
    ):
        return None
    curve, policy = record.curve, record.policy
    packed = np.concatenate([getattr(curve, name) for name in PACKED_CURVE_FIELDS], dtype="<f8").tobytes().hex()
    width = 16 * len(curve.n)
    arrays = _PACKED_TEMPLATE % tuple(packed[i : i + width] for i in range(0, 6 * width, width))
    policy_text = (
        "null"
        if policy is None
        else f'{{"kl":{_float(policy.kl)},"true_mean":{_float(policy.true_mean)},'
        f'"proxy_mean":{_float(policy.proxy_mean)}}}'
    )
    return (
        f'{{"seq":{int(entry.seq)},"record":{{"step":{int(record.step)},"curve":{{{_grid_json(curve)},"N":{int(curve.N)},'
        f'"has_ties":{"true" if curve.has_ties else "false"}}},"goodhart":null,"policy":{policy_text},'
        f'"context":{_encode(record.context) if record.context else "{}"},'
        f'"key_prefix":{_string(record.key_prefix)},"timestamp":{_float(record.timestamp)},'
        f'"proxy_name":{_string(record.proxy_name)},"true_name":{_string(record.true_name)},'
        '"interval":null,"agreement":null,"predictions":null,"alerts":[],"alert_states":null,'
        f'"selection":null,"hacks":null}},"curve_f64":{{{arrays}}}}}'
    ).encode()


# The curve's float arrays, packed as hex in a line (see the module docstring).
PACKED_CURVE_FIELDS = ("kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se")
_PACKED_TEMPLATE = ",".join(f'"{name}":"%s"' for name in PACKED_CURVE_FIELDS)


def _packed(values: np.ndarray) -> str:
    return np.ascontiguousarray(values, dtype="<f8").tobytes().hex()


def _unpacked(packed: Any, record: Any) -> None:
    """Put a line's packed curve arrays back into its record's curve (``ValueError`` when malformed)."""
    if not isinstance(packed, dict) or not isinstance(record, dict) or not isinstance(record.get("curve"), dict):
        raise ValueError("its packed curve is not an object beside a record's curve")
    for name in PACKED_CURVE_FIELDS:
        text = packed.get(name)
        if not isinstance(text, str) or len(text) % 16:
            raise ValueError(f"its packed curve {name!r} is not the hex of float64 values")
        record["curve"][name] = np.frombuffer(bytes.fromhex(text), dtype="<f8").astype(np.float64)


@dataclass
class BadLine:
    """A line of the log that is not an entry: damaged on disk, or not written by bon_tracker."""

    number: int  # 1-based, as editors show it
    reason: str
    text: str  # the line as read (cut to a bounded length)


_CRC_HEAD = b'{"crc32":"'
_ENTRY_HEAD = b'","entry":'
MAX_BAD_TEXT = 2000  # characters of a bad line kept beside the log


def parse_line(line: bytes) -> Entry:
    """One line of the log as an :class:`Entry`; ``ValueError`` naming what is wrong."""
    if line.startswith(_CRC_HEAD):
        head = len(_CRC_HEAD) + 8
        if line[head : head + len(_ENTRY_HEAD)] != _ENTRY_HEAD or not line.endswith(b"}"):
            raise ValueError("damaged line (its checksum frame is broken)")
        body = line[head + len(_ENTRY_HEAD) : -1]
        try:
            expected = int(line[len(_CRC_HEAD) : head], 16)
        except ValueError:
            raise ValueError("damaged line (its checksum is not hexadecimal)") from None
        if zlib.crc32(body) != expected:
            raise ValueError("damaged line (checksum mismatch)")
    else:
        body = line  # a log of bon_tracker 0.1/0.2: lines without checksums
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a log entry (a JSON {type(data).__name__}, not an object)")
    seq = data.get("seq")
    if "seq" in data and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise ValueError(f"not a log entry (seq {seq!r:.40})")
    record, finish = data.get("record"), data.get("finish", False)
    if record is None and finish is not True:
        raise ValueError("not a log entry (neither a record nor a finish marker)")
    try:
        if "curve_f64" in data:
            _unpacked(data["curve_f64"], record)
        parsed = None if record is None else EvalRecord.from_json(record)
    except Exception as err:  # whatever a damaged record raises: it is this line's fault only
        raise ValueError(f"not a valid eval record ({type(err).__name__}: {err})"[:300]) from None
    return Entry(seq=-1 if seq is None else seq, record=parsed, finish=finish is True)


class WriteAheadLog:
    """The durable log of one tracker (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._spec_text: str | None = None
        self._spec_written: Any = None
        self._spec_lock = threading.Lock()
        self._log = LineFile(self.path)  # appended by the training thread(s)
        self._acks = LineFile(self.acks_path)  # appended by the delivery worker
        self._append_lock = threading.Lock()  # log_scores may be called from several threads

    @classmethod
    def new(cls, backend_name: str, directory: str | os.PathLike[str] | None = None) -> WriteAheadLog:
        directory = Path(directory) if directory is not None else default_wal_dir()
        return cls(directory / f"{backend_name}-{uuid.uuid4().hex[:12]}.jsonl")

    # ---- the files ---------------------------------------------------------------------
    @property
    def acks_path(self) -> Path:
        return self.path.with_suffix(".acks")

    @property
    def bad_path(self) -> Path:
        return self.path.with_suffix(".bad.jsonl")

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
    def append(self, entry: Entry, *, sync: bool = True) -> None:
        """Append one entry (``sync=False``: its fsync left to :meth:`sync`)."""
        line = entry.to_line()  # encoded before the lock: a bad record never holds it
        with self._append_lock:
            if not self._log.is_open:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._log.append(line, sync=sync)

    def sync(self) -> None:
        """fsync the entries appended with ``sync=False``."""
        with self._append_lock:
            self._log.sync()

    def write_spec(self, spec: dict[str, Any]) -> None:
        """Record the backend's spec (only when it changed; atomic)."""
        if spec == self._spec_written:  # every eval passes the spec: the usual case is no change
            return
        text = json.dumps(spec, sort_keys=True, default=str)
        with self._spec_lock:
            if text == self._spec_text:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.spec_path, text)
            self._spec_text = text
            self._spec_written = json.loads(text)  # a private copy: the caller may change its dict

    def spec(self) -> dict[str, Any]:
        """The backend spec of this log (0.1 spools kept it on every line)."""
        with contextlib.suppress(OSError, ValueError, TypeError):
            return dict(json.loads(self.spec_path.read_text(encoding="utf-8")))
        with (
            contextlib.suppress(OSError, ValueError, TypeError, AttributeError, StopIteration),
            open(self.path, encoding="utf-8") as f,
        ):
            return dict(json.loads(next(f)).get("spec") or {})
        return {}

    def ack(self, seqs: list[int]) -> None:
        with self._append_lock:
            self._acks.append("".join(f"{seq}\n" for seq in seqs).encode())

    def dead_letter(self, entry: Entry, reason: str) -> None:
        line: dict[str, Any] = {"seq": entry.seq, "reason": reason, "spec": self.spec()}
        if entry.record is not None:
            line["record"] = entry.record.to_json()
        append_whole(self.dead_path, (json.dumps(line, allow_nan=True) + "\n").encode("utf-8"))

    def close(self) -> None:
        """Close the files this writer holds open."""
        with self._append_lock:
            self._log.close()
            self._acks.close()

    def remove(self) -> None:
        """Delete the log and its acks (everything was delivered); dead letters stay."""
        self.close()
        for path in (self.path, self.acks_path, self.spec_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # ---- reading -------------------------------------------------------------------------
    def read(self) -> tuple[list[Entry], list[BadLine]]:
        """Every entry of the log in order, and the lines that are not entries. A later line
        with an earlier line's seq supersedes it in place (the tracker appends a record's curve
        first, then the record completed with its statistics). An unterminated last line (a
        crash in the middle of an append, never acknowledged to the caller) is neither: it is
        cut at the next append."""
        if not self.path.exists():
            return [], []
        entries: list[Entry] = []
        where: dict[int, int] = {}  # seq -> index in entries
        bad: list[BadLine] = []
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    break  # torn tail
                try:
                    entry = parse_line(line.rstrip(b"\r\n"))
                except ValueError as err:
                    text = line.decode("utf-8", errors="replace").rstrip("\n")[:MAX_BAD_TEXT]
                    bad.append(BadLine(number, str(err), text))
                    continue
                if entry.seq < 0:
                    entry.seq = number - 1  # logs of 0.1 (the spool) had no seq
                if entry.seq in where:
                    entries[where[entry.seq]] = entry  # the record completed with its statistics
                    continue
                where[entry.seq] = len(entries)
                entries.append(entry)
        return entries, bad

    def entries(self) -> list[Entry]:
        """Every good entry of the log, in order (see :meth:`read`)."""
        return self.read()[0]

    def set_aside_bad_lines(self, bad: list[BadLine]) -> None:
        """Keep the log's bad lines in ``<log>.bad.jsonl`` (replaced whole, so reading the
        same log twice writes them once); the log itself is only removed once delivered."""
        if not bad:
            return
        known = {(line.get("line"), line.get("text")) for line in self.bad_lines()}
        new = [b for b in bad if (b.number, b.text) not in known]
        if not new:
            return
        text = "".join(
            json.dumps({"line": b.number, "reason": b.reason, "text": b.text, "log": str(self.path)}) + "\n"
            for b in new
        )
        append_whole(self.bad_path, text.encode("utf-8"))

    def bad_lines(self) -> list[dict[str, Any]]:
        """What :meth:`set_aside_bad_lines` kept."""
        if not self.bad_path.exists():
            return []
        out = []
        for line in self.bad_path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    out.append(value)
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

    def pending_and_bad(self) -> tuple[list[Entry], list[BadLine]]:
        """:meth:`pending`, and the log's bad lines."""
        entries, bad = self.read()
        done = self.acked()
        return [e for e in entries if e.seq not in done], bad

    def next_seq(self) -> int:
        """A sequence number after every line's (a bad line's seq is unknown: count lines too)."""
        entries, bad = self.read()
        lines = max([len(entries) + len(bad), *(b.number for b in bad)], default=0)
        return max(max((e.seq for e in entries), default=-1) + 1, lines)

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
        yield from sorted(p for p in directory.glob("*.jsonl") if not p.name.endswith((".dead.jsonl", ".bad.jsonl")))
