"""``bon-tracker sync``: deliver what trackers left in their write-ahead logs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bon_tracker.cli.common import (
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PENDING,
    UsageError,
    _add_config,
    _config,
    _Formatter,
    logger,
)

# ---- sync ------------------------------------------------------------------------------------------------------


def _cmd_sync(args: argparse.Namespace) -> int:
    from bon_tracker.tracking.wal import WriteAheadLog, default_wal_dir, wal_files

    config = _config(args)
    if args.spool_files:
        paths = [Path(p) for p in args.spool_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"no such spool file: {', '.join(missing)}")
        folder = None
    else:
        folder = Path(config.spool_dir) if config.spool_dir else default_wal_dir()
        paths = list(wal_files(folder))
    if not paths:
        print(f"nothing to replay: no spool files in {folder}")
        return EXIT_OK
    replayed = remaining = 0
    damaged: list[str] = []  # logs with bad lines or that could not be read: the others go on
    for path in paths:
        wal = WriteAheadLog(path)
        if not args.dry_run and not wal.claim():
            print(f"{path}: in use by a running tracker ({wal.holder()}; it delivers its own records); skipped")
            continue
        try:
            replayed_here, remaining_here, ok = _sync_one(wal, args.dry_run)
        except _UnreadableLog as err:
            print(f"{path}: {err}", file=sys.stderr)
            damaged.append(str(path))
            continue
        finally:
            wal.release()
        replayed += replayed_here
        remaining += remaining_here
        if not ok:
            damaged.append(str(path))
    if args.dry_run:
        print(f"{remaining} record(s) pending in {len(paths)} spool file(s)")
        return EXIT_OK
    print(f"replayed {replayed} record(s); {remaining} remain")
    if damaged:
        print(f"{len(damaged)} log(s) had damaged parts (see above): {', '.join(damaged)}", file=sys.stderr)
    if remaining:
        return EXIT_PENDING
    return EXIT_FAILURE if damaged else EXIT_OK


class _UnreadableLog(Exception):
    """A log this command cannot deliver at all (its backend spec is unreadable)."""


def _sync_one(wal: Any, dry_run: bool) -> tuple[int, int, bool]:
    """Deliver one write-ahead log in order through the tracker's own delivery path, then
    finish the run if the tracker had finished it; returns (replayed, remaining, no damage).

    Bad lines (damaged on disk: a checksum mismatch, not an entry) are reported with their
    line numbers and kept in ``<log>.bad.jsonl``; every good record is still delivered."""
    from bon_tracker.backends import BACKENDS, backend_from_spec
    from bon_tracker.tracking.delivery import Delivery

    path = wal.path
    pending, bad = wal.pending_and_bad()
    for line in bad:
        print(f"{path}: line {line.number}: {line.reason}; set aside in {wal.bad_path}", file=sys.stderr)
    if bad and not dry_run:
        wal.set_aside_bad_lines(bad)
    records = [e for e in pending if e.record is not None]
    finished = any(e.finish for e in pending)
    spec = wal.spec()
    if dry_run:
        steps = ", ".join(str(e.record.step) for e in records)
        print(f"{path}: {len(records)} record(s) for {spec.get('backend')} (steps {steps or 'none'})")
        return 0, len(records), not bad
    if not records and not finished:
        wal.remove()  # an empty or torn-only log (its bad lines, if any, are kept aside)
        return 0, 0, not bad
    if spec.get("backend") not in BACKENDS:
        raise _UnreadableLog(
            f"its backend spec {wal.spec_path} is missing or damaged (backend {spec.get('backend')!r:.40}); "
            f"{len(records)} record(s) kept in the log; restore the spec file to deliver them"
        )
    if "end_run" in spec:  # end the run only if the tracker had finished it (not after a crash)
        spec = {**spec, "end_run": spec["end_run"] if finished else False}
    try:
        backend = backend_from_spec(spec)
    except (TypeError, ValueError) as err:
        raise _UnreadableLog(f"its backend spec {wal.spec_path} is invalid ({err}); the records are kept") from None
    delivery = Delivery(backend, wal)
    left = delivery.run_once(pending)
    left_records = [e for e in left if e.record is not None]
    done = len(records) - len(left_records)
    if not delivery.stopped and (done or finished):
        try:
            backend.finish()  # cumulative tables, run status: what the tracker's finish() would have done
        except Exception as err:
            logger.warning("bon_tracker: closing the %s backend failed: %s", backend.name, err)
        else:
            if not left_records:
                wal.remove()
    target = f"{backend.name} run {backend.run_id}"
    print(f"{path}: replayed {done} of {len(records)} record(s) to {target}")
    if delivery.stats.dead_lettered:
        print(f"{path}: {delivery.stats.dead_lettered} record(s) rejected; see {wal.dead_path}", file=sys.stderr)
    if left_records:
        why = delivery.stats.config_error or delivery.stats.last_error
        print(
            f"{path}: stopped at step {left_records[0].record.step}: {why}; {len(left_records)} record(s) remain",
            file=sys.stderr,
        )
    return done, len(left_records), not bad


def add_parser(commands: Any) -> None:
    """The ``sync`` subcommand."""
    sync = commands.add_parser(
        "sync",
        formatter_class=_Formatter,
        help="deliver eval records a tracker left in its write-ahead log",
        description=(
            "Every eval record is appended to a write-ahead log on local disk before a background worker "
            "delivers it. Records still there when finish(timeout) ran out (a service down, frozen or slow) "
            "stay in the log; this delivers them through the same path: in order, to the run they were meant "
            "for, each at most once (backends skip a step they already hold); rejected records go to the "
            "log's .dead.jsonl. If the tracker had finished, the run is then finished too (an MLflow run ends "
            "FINISHED, its cumulative table written). A log whose tracker is still running is left alone."
        ),
        epilog=(
            "examples:\n"
            "  bon-tracker sync                                   (every log in the log folder)\n"
            "  bon-tracker sync ~/.cache/bon_tracker/spool/mlflow-1a2b3c4d5e6f.jsonl\n"
            "  bon-tracker sync --dry-run\n\n" + EXIT_CODES_HELP
        ),
    )
    sync.add_argument(
        "spool_files", nargs="*", metavar="LOG_FILE", help="write-ahead logs (default: every *.jsonl in the folder)"
    )
    _add_config(sync)
    sync.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="log folder (config: spool_dir; default $BON_TRACKER_SPOOL_DIR, else ~/.cache/bon_tracker/spool)",
    )
    sync.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    sync.set_defaults(handler=_cmd_sync)
