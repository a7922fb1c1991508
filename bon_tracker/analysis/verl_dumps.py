"""verl's validation dumps (``trainer.validation_data_dir``) read as score tables, as they are.

verl writes ``{step}.jsonl`` per validation, one row per sample: ``input``, ``output``, ``gts``,
``score`` (the proxy), ``step``, the reward function's extra keys (e.g. ``gold``) and, in the v1
trainer, ``uid`` = ``{prompt uid}_{session}_{output}``. Here ``uid`` without its two indices is
the prompt (the legacy trainer writes no ``uid``: the ``input`` text is), ``score`` the proxy,
the step the row's (else the file name's). A multi-output session's rows all carry the
session's final score: only its last output counts, once.

E.g. ``"uid": "5f0c9a4e-7d1b-4c3e-9a51-2b8e6f1d0c7a_3_0"`` is sample (session) 3 of the
prompt ``5f0c9a4e-…``, its only output. A dump whose keys do not group that way (every
prompt with one sample, or every sample in one prompt) is read, and a warning on the
``bon_tracker`` logger names the file and an example key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bon_tracker.analysis.score_files import Columns, ScoreBatch, ScoreFileError, read_score_batches

_SAMPLE_KEY = re.compile(r"^(?P<prompt>.+)_(?P<session>\d+)_(?P<output>\d+)$")
logger = logging.getLogger("bon_tracker")
_warned: set[tuple] = set()  # (kind, folder, folder's mtime): one warning per folder and kind, not one per file


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


def default_run_name(paths: Sequence[str | Path]) -> str | None:
    """The run name of a dump: the folder's name when the first path is a folder (verl's
    ``validation_data_dir``; its files are named by step), else None (name it by the file)."""
    first = Path(paths[0]) if paths else None
    if first is None or not first.is_dir():
        return None
    return first.resolve().name or None


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
        extra=None if batch.extra is None else batch.extra[:, keep],  # further proxy and true columns
        step=None if batch.step is None else batch.step[keep],
        run=None if batch.run is None else batch.run[keep],
        omitted=omitted,
        prompt_text=None if batch.prompt_text is None else batch.prompt_text[keep],
        completion=None if batch.completion is None else batch.completion[keep],
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
    shape = _DumpShape()
    batches = read_score_batches(
        path, columns, fmt=fmt, nan_policy=nan_policy, batch_rows=batch_rows, progress=progress
    )  # type: ignore[arg-type]
    for batch in batches:
        if batch.step is None and file_step is not None:
            batch.step = np.full(len(batch), file_step, dtype=np.int64)
        if len(batch) == 0:
            continue
        prompt, session = sample_keys(batch.prompt)
        shape.read(batch.prompt, prompt)
        last_of_session = np.append(session[1:] != session[:-1], True)
        if held is not None:
            if session[0] != held_session:
                yield shape.count(held)
            held = None
        kept = _take(batch, last_of_session, prompt)
        yield shape.count(_take(kept, np.arange(len(kept) - 1), kept.prompt, batch.omitted))
        held, held_session = _take(kept, np.array([len(kept) - 1]), kept.prompt), session[-1]
    if held is not None:
        yield shape.count(held)
    shape.warn(path, columns.prompt)


class _DumpShape:
    """How one dump file's keys group: rows read, samples per (step, prompt), an example key."""

    def __init__(self) -> None:
        self.rows = 0
        self.samples: dict[tuple[int | None, object], int] = {}  # one entry per prompt, not per row
        self.example: tuple[object, object] | None = None  # (a raw key, the prompt read from it)

    def read(self, keys: np.ndarray, prompt: np.ndarray) -> None:
        self.rows += len(keys)
        if self.example is None and len(keys):
            self.example = (keys[0], prompt[0])

    def count(self, batch: ScoreBatch) -> ScoreBatch:
        """Count the samples (one per session) of a batch about to be yielded; return it."""
        if len(batch):
            steps = batch.step.tolist() if batch.step is not None else [None] * len(batch)
            for key in zip(steps, batch.prompt.tolist()):
                self.samples[key] = self.samples.get(key, 0) + 1
        return batch

    def warn(self, path: Path, key_column: str) -> None:
        if self.example is None:
            return
        sizes = list(self.samples.values())
        samples, prompts = sum(sizes), len(sizes)
        raw, prompt = self.example
        raw = _shown(raw)
        verl_format = (
            "; verl's v1 trainer writes {prompt uid}_{sample}_{output}, the samples of a prompt sharing the prompt uid"
            if key_column == "uid"
            else ""
        )
        kind = message = None
        if prompts == 1 and samples > 1:
            kind = "one prompt"
            message = (
                f"all {samples:,} samples are one prompt: every {key_column} reads as the prompt {_shown(prompt)} "
                f"(e.g. {key_column} {raw}{verl_format})"
            )
        elif prompts > 1 and max(sizes) == 1 and self.rows > samples:
            kind = "one session"
            match = _SAMPLE_KEY.match(str(self.example[0]))
            parts = (
                f" (prompt {match['prompt']!r}, session {match['session']}, output {match['output']})" if match else ""
            )
            message = (
                f"{self.rows:,} rows read as {prompts:,} prompts of 1 sample each: the rows of each prompt are "
                f"outputs of one multi-output session, and a session counts once, with its last output "
                f"(e.g. {key_column} {raw}{parts}{verl_format})"
            )
        elif prompts > 1 and max(sizes) == 1:
            kind = "one sample"
            message = (
                f"every one of the {prompts:,} prompts has 1 sample: no two rows share a prompt key "
                f"(e.g. {key_column} {raw} reads as the prompt {_shown(prompt)}{verl_format})"
            )
        if kind is None:
            return
        folder = path.resolve().parent
        try:
            stamp = folder.stat().st_mtime_ns
        except OSError:
            stamp = None
        if (kind, folder, stamp) in _warned:
            return
        if len(_warned) > 1000:
            _warned.clear()
        _warned.add((kind, folder, stamp))
        advice = (
            " If the dump holds several samples of each prompt, read it without --preset verl, with the prompt "
            f"text as the prompt id: bon-tracker analyze {folder / '*.jsonl'} --prompt-col input --proxy-col score "
            "--true-col ..."
            if key_column == "uid"
            else ""
        )
        logger.warning("bon_tracker: %s: %s.%s (reported once per folder)", path.name, message, advice)


def _shown(key: object, limit: int = 60) -> str:
    text = str(key)
    return repr(text[:limit]) + ("…" if len(text) > limit else "")
