"""verl's validation dumps (``trainer.validation_data_dir``) read as score tables, as they are.

verl writes ``{step}.jsonl`` per validation, one row per sample: ``input``, ``output``, ``gts``,
``score`` (the proxy), ``step``, the reward function's extra keys (e.g. ``gold``) and, in the v1
trainer, ``uid`` = ``{prompt uid}_{session}_{output}``. Here ``uid`` without its two indices is
the prompt (the legacy trainer writes no ``uid``: the ``input`` text is), ``score`` the proxy,
the step the row's (else the file name's). A multi-output session's rows all carry the
session's final score: only its last output counts, once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bon_tracker.analysis.score_files import Columns, ScoreBatch, ScoreFileError, read_score_batches

_SAMPLE_KEY = re.compile(r"^(?P<prompt>.+)_(?P<session>\d+)_(?P<output>\d+)$")


def _step_order(path: Path) -> tuple[bool, int, str]:
    return (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.name)


def dump_files(paths: Sequence[str | Path]) -> list[Path]:
    """The dump files: each file given, and a folder's ``*.jsonl`` in step order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"), key=_step_order)
            if not found:
                raise ScoreFileError(f"{path}: no .jsonl files (verl writes {{step}}.jsonl into validation_data_dir)")
            files.extend(found)
        else:
            files.append(path)
    return files


def dump_columns(path: Path, true_col: str) -> Columns:
    """Columns of one dump file: ``uid`` (or ``input``) as the prompt, ``score`` as the proxy."""
    with open(path, encoding="utf-8") as stream:
        first = next((line for line in stream if line.strip()), "{}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        row = {}
    return Columns(prompt="uid" if "uid" in row else "input", proxy="score", true=true_col)


def sample_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """verl's per-sample keys -> (prompt ids, session ids); keys without indices are their own prompt."""
    prompts = np.empty(len(keys), dtype=object)
    sessions = np.empty(len(keys), dtype=object)
    for i, key in enumerate(keys.tolist()):
        match = _SAMPLE_KEY.match(str(key))
        prompts[i] = match["prompt"] if match else key
        sessions[i] = f"{match['prompt']}_{match['session']}" if match else (key, i)
    return prompts, sessions


def _take(batch: ScoreBatch, keep: np.ndarray, prompt: np.ndarray, omitted: int = 0) -> ScoreBatch:
    return ScoreBatch(
        prompt=prompt[keep],
        proxy=batch.proxy[keep],
        true=batch.true[keep],
        step=None if batch.step is None else batch.step[keep],
        run=None if batch.run is None else batch.run[keep],
        omitted=omitted,
    )


def read_dump_batches(
    path: str | Path,
    columns: Columns,
    *,
    fmt: str | None = None,
    nan_policy: str = "raise",
    batch_rows: int = 1 << 16,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ScoreBatch]:
    """The rows of one dump file as :func:`~bon_tracker.analysis.score_files.read_score_batches`
    yields them, with prompts and steps as above."""
    path = Path(path)
    file_step = int(path.name.split(".")[0]) if path.name.split(".")[0].isdigit() else None
    held: ScoreBatch | None = None  # the last row of the previous batch: its session may go on
    held_session: object = None
    batches = read_score_batches(
        path, columns, fmt=fmt, nan_policy=nan_policy, batch_rows=batch_rows, progress=progress
    )  # type: ignore[arg-type]
    for batch in batches:
        if batch.step is None and file_step is not None:
            batch.step = np.full(len(batch), file_step, dtype=np.int64)
        if len(batch) == 0:
            continue
        prompt, session = sample_keys(batch.prompt)
        last_of_session = np.append(session[1:] != session[:-1], True)
        if held is not None:
            if session[0] != held_session:
                yield held
            held = None
        kept = _take(batch, last_of_session, prompt)
        yield _take(kept, np.arange(len(kept) - 1), kept.prompt, batch.omitted)
        held, held_session = _take(kept, np.array([len(kept) - 1]), kept.prompt), session[-1]
    if held is not None:
        yield held
