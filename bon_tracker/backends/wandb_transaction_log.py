"""Read what a W&B run wrote to its local transaction log, without W&B's servers.

Every run, online or offline, keeps a ``run-<id>.wandb`` file in its run folder
(``wandb/offline-run-<time>-<id>/`` in offline mode): the stream of protobuf
``Record`` messages that ``wandb sync`` uploads. The framing is LevelDB's log
format, as W&B's ``wandb-core`` writes it:

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0``;
* 32 KiB blocks counted from the start of the file (so the first block holds the
  file header and 32761 bytes of chunks); a block tail shorter than a chunk
  header is zero padding;
* chunks: ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | payload``, where
  type is FULL (1), FIRST (2), MIDDLE (3) or LAST (4) and the checksum is the
  standard (IEEE, ``zlib.crc32``) CRC of the type byte and the payload. (LevelDB
  itself uses masked crc32c; W&B does not.)

wandb 0.31 ships no Python reader for this file (the old
``wandb.sdk.internal.datastore`` is gone with the Python internal process), hence
this module. Media that history rows point to (tables, images) are files in the
run folder's ``files/``; :func:`read_table` loads a logged table.

Example:
    >>> from bon_tracker.backends.wandb_transaction_log import read_records  # doctest: +SKIP
    >>> records = read_records("wandb/offline-run-20250101_120000-abc123")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bon_tracker.optional import require
from bon_tracker.record import EvalRecord

RECORD_KEY = "eval_record"  # WandbBackend logs f"{prefix}/{RECORD_KEY}": EvalRecord.to_json() as JSON text
FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
_TYPE_CRC = {kind: zlib.crc32(bytes([kind])) for kind in (FULL, FIRST, MIDDLE, LAST)}


def find_transaction_log(path: str | Path) -> Path:
    """The ``run-*.wandb`` file of a run: ``path`` itself, the one in the run folder
    ``path``, or the only one in a folder of run folders (such as ``wandb/``)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no W&B run at {path}")
    found = sorted(path.glob("run-*.wandb"))
    if not found:  # a wandb/ folder, or the dir= given to wandb.init (holding wandb/)
        candidates = [*path.glob("*/run-*.wandb"), *path.glob("wandb/*/run-*.wandb")]
        found = sorted({p.resolve() for p in candidates})  # latest-run/ links to a real run folder
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no W&B transaction log (run-*.wandb) in {path}")
    listing = "\n  ".join(str(p.parent) for p in found)
    raise ValueError(f"{path} holds {len(found)} W&B runs; pass one run folder:\n  {listing}")


def _chunks(path: Path, first_block: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of every chunk from block ``first_block`` on, checksums verified.
    A torn last chunk (a run still writing, or killed mid-write) ends the stream quietly."""
    with path.open("rb") as f:
        head = f.read(FILE_HEADER.size)
        if len(head) < FILE_HEADER.size:
            return
        ident, magic, version = FILE_HEADER.unpack(head)
        if ident != FILE_IDENT or magic != FILE_MAGIC:
            raise ValueError(f"{path} is not a W&B transaction log (header {head!r})")
        if version != FILE_VERSION:
            raise ValueError(f"{path}: W&B transaction log version {version} is not supported (only 0)")
        block_start = first_block * BLOCK_SIZE
        if first_block == 0:  # the file header is the start of the first block
            block, pos = head + f.read(BLOCK_SIZE - FILE_HEADER.size), FILE_HEADER.size
        else:
            f.seek(block_start)
            block, pos = f.read(BLOCK_SIZE), 0
        while True:
            if pos + CHUNK_HEADER.size > len(block):  # the rest of the block is padding
                if len(block) < BLOCK_SIZE:  # the last, short block is done
                    return
                block, pos = f.read(BLOCK_SIZE), 0
                block_start += BLOCK_SIZE
                continue
            checksum, length, kind = CHUNK_HEADER.unpack_from(block, pos)
            if checksum == 0 and length == 0 and kind == 0:  # zeroed rest of the block
                pos = len(block)
                continue
            end = pos + CHUNK_HEADER.size + length
            if end > len(block):
                if len(block) < BLOCK_SIZE:
                    return  # torn tail
                raise ValueError(f"{path}: corrupt chunk at byte {block_start + pos} (overflows its block)")
            payload = block[pos + CHUNK_HEADER.size : end]
            if kind not in _TYPE_CRC or zlib.crc32(payload, _TYPE_CRC[kind]) != checksum:
                raise ValueError(f"{path}: corrupt chunk at byte {block_start + pos} (bad type or checksum)")
            yield kind, payload
            pos = end


def _records(log: Path, first_block: int = 0) -> Iterator[Any]:
    require("wandb", "wandb")
    from wandb.proto.wandb_internal_pb2 import Record

    parts: list[bytes] | None = None
    skipping = first_block > 0  # mid-file, the first chunks may end a record begun earlier
    for kind, payload in _chunks(log, first_block):
        if kind in (FULL, FIRST):
            skipping = False
            if parts is not None:
                raise ValueError(f"{log}: corrupt log (a record starts before the previous one ended)")
            if kind == FULL:
                yield Record.FromString(payload)
            else:
                parts = [payload]
        elif not skipping:
            if parts is None:
                raise ValueError(f"{log}: corrupt log (a record continues that never started)")
            parts.append(payload)
            if kind == LAST:
                yield Record.FromString(b"".join(parts))
                parts = None


def iter_records(path: str | Path) -> Iterator[Any]:
    """Every ``wandb_internal_pb2.Record`` in a run's transaction log, in order.

    ``path`` is a ``run-*.wandb`` file or a run folder (see :func:`find_transaction_log`).
    """
    return _records(find_transaction_log(path))


def is_complete(path: str | Path) -> bool:
    """Whether the run finished and W&B closed its log (its exit record is written).

    Reads only the last two blocks, so it is cheap on long runs.
    """
    log = find_transaction_log(path)
    last_block = max(log.stat().st_size - 1, 0) // BLOCK_SIZE
    return any(r.WhichOneof("record_type") == "exit" for r in _records(log, max(last_block - 1, 0)))


def wait_until_complete(path: str | Path, timeout: float = 30.0) -> bool:
    """Wait up to ``timeout`` seconds for :func:`is_complete`; returns whether it is.

    ``run.finish()`` returns before W&B's service has written the end of the log
    (wandb 0.31: the last partial 32 KiB block is written when the service closes
    the stream, a moment later), so read a run just finished in this process
    after this.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not is_complete(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
    return True


def _put(target: dict[str, Any], item: Any) -> None:
    """Set one history/summary/config item: ``key``, or a ``nested_key`` path
    (wandb-core splits dict values such as table references into leaves)."""
    path = [item.key] if item.key else list(item.nested_key)
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = json.loads(item.value_json)


def _remove(target: dict[str, Any], item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's history rows, in order, with JSON-decoded values (``_step`` included;
    a logged table or image is the dict that points to its file)."""
    rows = []
    for record in iter_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            rows.append(row)
    return rows


def _merged(run_dir: str | Path, kind: str) -> dict[str, Any]:
    """Apply the run's initial ``kind`` (summary or config) and every later update and
    removal, in log order."""
    state: dict[str, Any] = {}
    for record in iter_records(run_dir):
        which = record.WhichOneof("record_type")
        if which == "run":
            changes = getattr(record.run, kind)
        elif which == kind:
            changes = getattr(record, kind)
        else:
            continue
        for item in changes.update:
            _put(state, item)
        for item in changes.remove:
            _remove(state, item)
    return state


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run summary as of the end of the log (last history values and explicit
    ``run.summary`` updates)."""
    return _merged(run_dir, "summary")


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run config as of the end of the log (custom chart specs are under
    ``_wandb.visualize``)."""
    return _merged(run_dir, "config")


def read_table(run_dir: str | Path, ref: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (dicts by column) of a table that a history row points to, e.g.
    ``read_table(run_dir, row["bon/bon_curves"])``."""
    if not isinstance(ref, dict) or ref.get("_type") != "table-file" or "path" not in ref:
        raise ValueError(f"not a reference to a logged wandb.Table: {ref!r}")
    files_dir = find_transaction_log(run_dir).parent / "files"
    data = json.loads((files_dir / ref["path"]).read_text(encoding="utf-8"))
    return [dict(zip(data["columns"], values, strict=True)) for values in data["data"]]


def read_records(run_dir: str | Path) -> list[EvalRecord]:
    """The eval records that :class:`~bon_tracker.backends.wandb.WandbBackend` wrote to
    this run, in log order (the first copy of a step, if one was written twice)."""
    suffix = f"/{RECORD_KEY}"
    records, seen = [], set()
    for row in read_history(run_dir):
        for key, value in row.items():
            if not (key.endswith(suffix) and isinstance(value, str)):
                continue
            try:
                record = EvalRecord.from_json(json.loads(value))
            except (ValueError, KeyError, TypeError):  # a user's own text under a look-alike key
                continue
            if key != f"{record.key_prefix}{suffix}" or (record.key_prefix, record.step) in seen:
                continue
            seen.add((record.key_prefix, record.step))
            records.append(record)
    return records
