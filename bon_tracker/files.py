"""Writing files so that a crash, a full disk or a read-only disk never leaves half a file.

Two mechanisms, used everywhere bon_tracker writes:

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: a whole file, replaced in one
  rename; the temporary file is removed when anything fails.
* :func:`append_whole` (and :class:`LineFile`, which keeps the file open for a writer
  that appends often): whole lines appended to a line file (JSONL, CSV). A torn tail
  left by a crash is cut before appending, every write is checked (short writes are
  continued, never ignored), and a failed append is truncated back, so no line is ever
  glued to the next one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

_pwrite = os.pwrite  # module-level, so a test can inject a full disk into exactly these writes
_fsync = getattr(os, "fdatasync", os.fsync)  # the data and the size; not the timestamps


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write every byte of ``data`` at ``offset``: a short write is continued, and a write
    that makes no progress is an error (``OSError``), never a silent loss."""
    view = memoryview(data)
    while view:
        written = _pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"write made no progress ({written} of {len(view)} bytes)")
        view, offset = view[written:], offset + written


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data``: afterwards it holds the old or the new content, whole;
    no temporary file is left behind, whatever fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name does not contain the target's: readers that pick files by name (TensorBoard
    # reads anything with "tfevents" in it) never see a half-written file.
    tmp = path.with_name(f".bon_tracker-{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data, 0)
            _fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def cut_torn_tail(fd: int) -> int:
    """Truncate an unterminated last line (a crash mid-append); returns the new size."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    if os.pread(fd, 1, size - 1) == b"\n":
        return size
    # Read back in blocks until the last newline: the torn line is at most one append long.
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            os.ftruncate(fd, keep)
            return keep
        end = start
    os.ftruncate(fd, 0)
    return 0


def append_whole(path: str | os.PathLike[str], data: bytes) -> None:
    """Append ``data`` (whole lines, ending in ``\\n``) to ``path``, all or nothing.

    Raises ``OSError`` when the disk refuses (full, read-only); the file is then as it
    was before the call (truncated back), so the next append starts on a line boundary.
    """
    if data and not data.endswith(b"\n"):
        raise ValueError("append_whole takes whole lines: data must end with a newline")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = cut_torn_tail(fd)
        try:
            _write_all(fd, data, size)
            _fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


class LineFile:
    """An append-only line file held open by its one writer: two system calls per append
    (write, fsync) instead of six, for the write-ahead log (the training thread may leave
    the fsync to another thread: ``append(..., sync=False)`` then :meth:`sync`).

    Same guarantees as :func:`append_whole`: whole lines or nothing, a refused append
    truncated back. The size is tracked here, so only this object may write the file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None
        self._size = 0

    def append(self, data: bytes, *, sync: bool = True) -> None:
        """Append whole lines; ``sync=False`` leaves the fsync to a later :meth:`sync` (the
        lines are then safe from a crash of this process at once, from a power loss after it)."""
        if data and not data.endswith(b"\n"):
            raise ValueError("LineFile.append takes whole lines: data must end with a newline")
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._size = cut_torn_tail(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        try:
            _write_all(self._fd, data, self._size)
            if sync:
                _fsync(self._fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)

    def sync(self) -> None:
        """fsync what was appended (a no-op when the file is not open)."""
        if self._fd is not None:
            _fsync(self._fd)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
