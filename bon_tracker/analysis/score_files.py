"""Read score tables (JSONL, CSV, Parquet) in bounded batches.

A score table has one row per sample: a prompt id, a proxy score and a true score,
and optionally a training step and a run name. JSONL and Parquet also take one row
per prompt: the proxy and true columns hold lists, one score per sample (equal
lengths within a row; any length across rows). Such a row is one prompt; its prompt
id column is optional (without it, every row is a prompt of its own), and the row
reads as its samples, one after another. Files are read in batches of at most
``batch_rows`` rows (Parquet with ``pyarrow.parquet.ParquetFile.iter_batches``,
text files line by line), so a file of any size streams through in bounded memory. A
text line is read with at most ``max_line_bytes`` (64 MiB) in memory: a longer one is
an error naming the file and the line, never read whole.

Texts (optional, for the hack table: docs/texts.md): a prompt text column and a completion column
(``--prompt-text-col``/``--completion-col``), strings; in a row of one prompt the completion column
holds a list, one completion per score. They ride along with the scores they belong to.

Several proxies and true rewards (an ensemble of reward models, docs/selection.md): name more
score columns (``Columns.more_proxy``/``more_true``; ``--proxy-col rm_a --proxy-col rm_b``).
Each is read as the first one is (a number per sample, or in a row of one prompt a list of
equal length), a non-finite value in any of them drops the sample from all under ``omit``,
and the batch holds them as ``(K - 1, rows)`` / ``(T - 1, rows)`` arrays beside ``proxy`` and
``true`` (the first member and the first true reward).

Every bad row, value or file raises :class:`ScoreFileError` with a message that
names the file, the line (text files: physical line, counted from 1 with the header
as line 1) or row (Parquet: data rows counted from 1) and the column, e.g.
``scores.csv line 17, column 'proxy': 'abc' is not a number``.

Normalisation, the same for every format: prompt ids and run names are compared as
text in JSONL and CSV (``3`` and ``"3"`` are the same prompt); Parquet keeps the
column's own type. Steps are integers. Scores are float64; JSON booleans count as
0/1, and JSON strings are read as CSV cells are (``"0.5"`` is 0.5, ``""`` is missing,
``"abc"`` an error; the same for steps). Non-finite scores (NaN, inf, empty cells, JSON null) are an error with
``nan_policy="raise"`` and are dropped with ``"omit"``.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from bon_tracker.core.validation import NanPolicy, check_nan_policy

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
DEFAULT_BATCH_ROWS = 1 << 16
# Rows per batch of a Parquet file with one sample per row and no texts (ids and scores only, about
# 32 bytes a row), where the caller does not choose (default_batch_rows): every batch costs each
# thread of ``bon-tracker analyze`` a few Python-level steps and hand-offs of the GIL, and at 2^16
# rows these made benchmarks/bench_analyze.py 10 to 15 % slower (2^18 to 2^20 measured; 2^21 slower
# again). Peak RSS about 525 MiB against 430 at 2^16 (the benchmark: 528-534 MiB).
FLAT_PARQUET_BATCH_ROWS = 1 << 19
# One line of a JSONL or CSV file longer than this is an error (read in bounded pieces, never whole).
MAX_LINE_BYTES = 64 << 20


class ScoreFileError(ValueError):
    """A score file that cannot be read as a score table; the message says where and why."""


@dataclass(frozen=True)
class Columns:
    """Column names of a score table.

    ``step`` and ``run`` are optional columns: used when the file has them, else every
    row is step 0 of one run. ``require_step`` / ``require_run`` make a missing one an
    error (the user named the column explicitly).

    Rows of one prompt each (the proxy and true columns hold lists) need no ``prompt``
    column: when a row lacks it, the row is a prompt of its own (id ``"line 7"`` in
    JSONL, the row number in Parquet). When the rows have it, rows with the same id at
    the same step are one prompt, as with one row per sample.
    """

    prompt: str = "prompt_id"
    proxy: str = "proxy"
    true: str = "true"
    step: str = "step"
    run: str = "run"
    require_step: bool = False
    require_run: bool = False
    prompt_text: str | None = None  # the prompt's text (with ``completion``: the texts are read)
    completion: str | None = None  # the sample's completion text
    more_proxy: tuple[str, ...] = ()  # further proxy columns: ensemble members after ``proxy``
    more_true: tuple[str, ...] = ()  # further true reward columns after ``true``

    @property
    def has_texts(self) -> bool:
        return self.prompt_text is not None and self.completion is not None

    @property
    def proxy_names(self) -> tuple[str, ...]:
        """Every proxy column, the first (``proxy``) first: one ensemble member each."""
        return (self.proxy, *self.more_proxy)

    @property
    def true_names(self) -> tuple[str, ...]:
        """Every true reward column, ``true`` first."""
        return (self.true, *self.more_true)

    @property
    def extra_scores(self) -> tuple[str, ...]:
        """The score columns beyond ``proxy`` and ``true``, in the order of ``ScoreBatch.extra``."""
        return (*self.more_proxy, *self.more_true)


@dataclass
class ScoreBatch:
    """Consecutive rows of one file, as arrays of equal length."""

    prompt: np.ndarray  # str (object) or integer ids
    proxy: np.ndarray  # float64, finite
    true: np.ndarray  # float64, finite
    step: np.ndarray | None  # int64; None when the file has no step column
    run: np.ndarray | None  # str (object); None when the file has no run column
    omitted: int = 0  # rows of this batch dropped for a non-finite score (nan_policy="omit")
    prompt_text: np.ndarray | None = None  # str (object), per sample; None unless texts are read
    completion: np.ndarray | None = None  # str (object), per sample; None unless texts are read
    extra: np.ndarray | None = None  # float64 (E, rows), finite: Columns.extra_scores; None without them

    def __len__(self) -> int:
        return len(self.proxy)

    def members(self, columns: Columns) -> np.ndarray:
        """Every proxy column's scores, ``(K, rows)`` (the first is ``proxy``)."""
        more = self.extra[: len(columns.more_proxy)] if self.extra is not None else np.empty((0, len(self)))
        return np.concatenate([self.proxy[None, :], more])

    def trues(self, columns: Columns) -> np.ndarray:
        """Every true reward column's scores, ``(T, rows)`` (the first is ``true``)."""
        more = self.extra[len(columns.more_proxy) :] if self.extra is not None else np.empty((0, len(self)))
        return np.concatenate([self.true[None, :], more])


def detect_format(path: str | Path) -> str:
    """``jsonl``, ``csv`` or ``parquet`` from the file name (``.gz`` allowed for text)."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIXES.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise ScoreFileError(
            f"{path}: cannot tell the format from the name; use a .jsonl, .csv or .parquet "
            "file (or .jsonl.gz, .csv.gz), or pass --format"
        )
    if fmt == "parquet" and path.suffix.lower() == ".gz":
        raise ScoreFileError(f"{path}: Parquet files are compressed internally; do not gzip them")
    return fmt


def default_batch_rows(path: str | Path, columns: Columns | None = None, *, fmt: str | None = None) -> int:
    """Rows per batch for ``path`` where the caller does not choose: :data:`FLAT_PARQUET_BATCH_ROWS`
    for a Parquet file with one sample per row and no text columns, else :data:`DEFAULT_BATCH_ROWS`
    (a row of a text format, of texts or of list columns can be large). Never raises: a file that
    cannot be inspected gets the default, and its reader says what is wrong."""
    columns = columns or Columns()
    path = Path(path)
    try:
        if (fmt or detect_format(path)) != "parquet" or columns.prompt_text is not None:
            return DEFAULT_BATCH_ROWS
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        scores = (columns.proxy, columns.true, *columns.extra_scores)
        if any(name in schema.names and _is_list(schema.field(name).type) for name in scores):
            return DEFAULT_BATCH_ROWS
    except Exception:  # a missing or damaged file, no pyarrow: the reader reports it
        return DEFAULT_BATCH_ROWS
    return FLAT_PARQUET_BATCH_ROWS


def read_score_batches(
    path: str | Path,
    columns: Columns | None = None,
    *,
    fmt: str | None = None,
    nan_policy: NanPolicy = "raise",
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Callable[[int], None] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[ScoreBatch]:
    """Yield the rows of one score file in batches of at most ``batch_rows`` rows.

    Args:
        path: the file (``.jsonl``, ``.csv``, optionally gzipped, or ``.parquet``).
        columns: which columns hold the prompt id, scores, step and run (default :class:`Columns`).
        fmt: the format, if the file name does not tell it.
        nan_policy: ``"raise"`` on a non-finite score, or ``"omit"`` that sample.
        batch_rows: rows per batch (bounds memory).
        progress: called with the number of bytes of the file consumed since the last call.
        max_line_bytes: JSONL and CSV: a longer line is an error naming it (memory stays bounded
            by this, whatever the file holds).

    Raises:
        ScoreFileError: the file is missing, malformed, or a row holds a bad value.
    """
    check_nan_policy(nan_policy)
    columns = columns or Columns()
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ScoreFileError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise ScoreFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if fmt == "parquet":
        yield from _read_parquet(path, columns, nan_policy, max(1, int(batch_rows)), progress or (lambda _: None))
        return
    reader = {"jsonl": _read_jsonl, "csv": _read_csv}[fmt]
    yield from reader(
        path, columns, nan_policy, max(1, int(batch_rows)), progress or (lambda _: None), max(1, int(max_line_bytes))
    )


# ---- shared helpers ------------------------------------------------------------------------


def _located(path: Path, where: str, column: str, problem: str, item: str = "") -> ScoreFileError:
    """``scores.jsonl line 3, column 'proxy'[, sample 2 of 8]: problem``."""
    return ScoreFileError(f"{path.name} {where}, column {column!r}{item}: {problem}")


def _no_item(i: int) -> str:
    return ""


def _shown_json(value: Any, limit: int = 40) -> str:
    """A JSON value for a message, at most about ``limit`` characters, cut between items (never mid-number)."""
    if isinstance(value, str):
        return repr(value[:limit])
    text = json.dumps(value)
    if len(text) <= limit:
        return text
    cut = text.rfind(", ", 0, limit)
    shown = (text[:cut] if cut > 0 else text[:limit]) + ", …"
    if isinstance(value, list):
        return f"{shown}] (a list of {len(value)})"
    if isinstance(value, dict):
        return shown + "}"
    return shown


def _finite_or_drop(
    path: Path,
    proxy: np.ndarray,
    true: np.ndarray,
    columns: Columns,
    nan_policy: str,
    where: Callable[[int], str],
    item: Callable[[int], str] = _no_item,
    extra: np.ndarray | None = None,
) -> np.ndarray | None:
    """Indices to keep (None: keep all); raise on a non-finite score under ``"raise"``.

    ``extra``: the further score columns ``(E, rows)`` (``columns.extra_scores``); a sample is
    kept only where every score column is finite."""
    with np.errstate(over="ignore", invalid="ignore"):  # a finite sum: every value is finite (no temporaries)
        if (
            np.isfinite(np.add.reduce(proxy))
            and np.isfinite(np.add.reduce(true))
            and (extra is None or np.isfinite(np.add.reduce(extra, axis=None)))
        ):
            return None
    good = np.isfinite(proxy) & np.isfinite(true)
    if extra is not None:
        good &= np.isfinite(extra).all(axis=0)
    if good.all():
        return None
    if nan_policy == "omit":
        return np.flatnonzero(good)
    i = int(np.flatnonzero(~good)[0])
    values = [(columns.proxy, proxy[i]), (columns.true, true[i])]
    if extra is not None:
        values += list(zip(columns.extra_scores, extra[:, i]))
    column, value = next((name, v) for name, v in values if not np.isfinite(v))
    shown = "missing or NaN (an empty cell, null or 'nan')" if math.isnan(value) else f"{value} is not finite"
    problem = f"{shown}; clean the file, or pass --nan-policy omit to drop such samples"
    raise _located(path, where(i), column, problem, item(i))


def _select(batch: ScoreBatch, keep: np.ndarray | None) -> ScoreBatch:
    if keep is None:
        return batch
    return ScoreBatch(
        prompt=batch.prompt[keep],
        proxy=batch.proxy[keep],
        true=batch.true[keep],
        step=None if batch.step is None else batch.step[keep],
        run=None if batch.run is None else batch.run[keep],
        omitted=len(batch) - len(keep),
        prompt_text=None if batch.prompt_text is None else batch.prompt_text[keep],
        completion=None if batch.completion is None else batch.completion[keep],
        extra=None if batch.extra is None else batch.extra[:, keep],
    )


def _object_array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


# ---- text formats ------------------------------------------------------------------------------


def _open_binary(path: Path) -> tuple[IO[bytes], Callable[[], int]]:
    """The file as bytes, and a function returning how many bytes of the file on disk
    have been consumed (the compressed position for .gz, for progress)."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    if path.suffix.lower() == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw.tell
    return raw, raw.tell


def _bounded_lines(path: Path, stream: IO[bytes], max_line_bytes: int) -> Iterator[bytes]:
    """The stream's lines, each read with at most ``max_line_bytes + 1`` bytes in memory.

    A longer line is an error naming the file and the line (it is never read whole).
    """
    readline = stream.readline
    number = 0
    while True:
        line = readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line_bytes:
            raise ScoreFileError(
                f"{path.name} line {number}: longer than {max_line_bytes:,} bytes, the limit of one line "
                "(a score table has one short row per line: is this the right file, with newlines intact?)"
            )
        yield line


def _decoded_lines(path: Path, stream: IO[bytes], max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    for number, line in enumerate(_bounded_lines(path, stream, max_line_bytes), start=1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise ScoreFileError(f"{path.name} line {number}: not valid UTF-8 text ({err.reason})") from None


_NUMBER_TYPES = (int, float, bool)


_CSV_LIST_HINT = (
    " (a CSV cell holds one score: write one row per sample, or lists of a prompt's scores as JSONL or Parquet)"
)


def _text_floats(
    path: Path,
    values: list[Any],
    where: Callable[[int], str],
    column: str,
    *,
    json_values: bool,
    item: Callable[[int], str] = _no_item,
) -> np.ndarray:
    """Convert one column of a text batch to float64, naming the line of a bad value.

    A JSON string is read as a CSV cell is: a number's text is the number, an empty
    (or blank) one is missing."""
    if json_values:
        if all(type(v) in _NUMBER_TYPES for v in values):
            return np.array(values, dtype=np.float64)
    else:
        try:
            return np.array(values, dtype=np.float64)
        except ValueError:
            pass
    out = np.empty(len(values), dtype=np.float64)
    for i, value in enumerate(values):
        if json_values and not isinstance(value, str):
            if type(value) in _NUMBER_TYPES:
                out[i] = float(value)
                continue
            if value is None:
                out[i] = math.nan  # missing: an error or dropped, by nan_policy (checked later)
                continue
            raise _located(path, where(i), column, f"{_shown_json(value)} is not a number", item(i))
        try:
            out[i] = float(value)
        except ValueError:
            if value.strip() == "":
                out[i] = math.nan
                continue
            hint = _CSV_LIST_HINT if not json_values and value.lstrip().startswith("[") else ""
            raise _located(path, where(i), column, f"{value[:40]!r} is not a number{hint}", item(i)) from None
    return out


MAX_STEP = 2**63  # steps are int64 in every tracking service
_STEP_RANGE = "steps are integers from 0 to 2**63 - 1"


def _text_steps(
    path: Path, values: list[Any], where: Callable[[int], str], column: str, *, json_values: bool
) -> np.ndarray:
    out = _parsed_text_steps(path, values, where, column, json_values=json_values)
    negative = np.flatnonzero(out < 0)
    if negative.size:
        i = int(negative[0])
        raise _located(path, where(i), column, f"step {int(out[i])} is negative; {_STEP_RANGE}")
    return out


def _parsed_text_steps(
    path: Path, values: list[Any], where: Callable[[int], str], column: str, *, json_values: bool
) -> np.ndarray:
    if not json_values:
        try:
            return np.array(values, dtype=np.int64)
        except (ValueError, OverflowError):
            pass
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        try:
            if _store_step(out, i, value, json_values):
                continue
        except OverflowError:
            shown = repr(value)[:40]
            raise _located(path, where(i), column, f"step {shown} is out of range; {_STEP_RANGE}") from None
        shown = _shown_json(value) if json_values and not isinstance(value, str) else repr(str(value)[:40])
        raise _located(path, where(i), column, f"{shown} is not an integer step")
    return out


def _store_step(out: np.ndarray, i: int, value: Any, json_values: bool) -> bool:
    """Put ``value`` into ``out[i]`` if it is an integer step (OverflowError past int64)."""
    if json_values and type(value) is int:
        out[i] = _in_range(value)
        return True
    if json_values and type(value) is float and value.is_integer():
        out[i] = _in_range(int(value))
        return True
    if not json_values or isinstance(value, str):  # a JSON string: read as a CSV cell
        try:
            out[i] = _in_range(int(value.strip()))
            return True
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                as_float = math.nan
            if as_float.is_integer():
                out[i] = _in_range(int(as_float))
                return True
    return False


def _in_range(step: int) -> int:
    if not -MAX_STEP <= step < MAX_STEP:
        raise OverflowError(step)
    return step


class _TextBatch:
    """Rows of a text file gathered column by column until a batch is full."""

    def __init__(self, has_step: bool, has_run: bool, has_texts: bool = False, n_extra: int = 0):
        self.prompt_text: list[str] | None = [] if has_texts else None
        self.completion: list[str] | None = [] if has_texts else None
        self.prompt: list[Any] = []
        self.proxy: list[Any] = []
        self.true: list[Any] = []
        self.extra: list[list[Any]] = [[] for _ in range(n_extra)]  # Columns.extra_scores, column by column
        self.step: list[Any] | None = [] if has_step else None
        self.run: list[Any] | None = [] if has_run else None
        self.lines: list[int] = []
        self.lists: dict[int, tuple[int, int]] = {}  # line of a row of lists -> (its first sample's index, samples)

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}"

    def item(self, i: int) -> str:
        """``, sample 2 of 8`` for a score from a row of lists, else nothing."""
        found = self.lists.get(self.lines[i])
        return "" if found is None else f", sample {i - found[0] + 1} of {found[1]}"

    def build(self, path: Path, columns: Columns, nan_policy: str, *, json_values: bool) -> ScoreBatch:
        where, item = self.where, self.item
        batch = ScoreBatch(
            prompt=_object_array(self.prompt),
            proxy=_text_floats(path, self.proxy, where, columns.proxy, json_values=json_values, item=item),
            true=_text_floats(path, self.true, where, columns.true, json_values=json_values, item=item),
            step=None
            if self.step is None
            else _text_steps(path, self.step, where, columns.step, json_values=json_values),
            run=None if self.run is None else _object_array(self.run),
            prompt_text=None if self.prompt_text is None else _object_array(self.prompt_text),
            completion=None if self.completion is None else _object_array(self.completion),
        )
        if self.extra:
            batch.extra = np.stack(
                [
                    _text_floats(path, values, where, name, json_values=json_values, item=item)
                    for name, values in zip(columns.extra_scores, self.extra)
                ]
            )
        keep = _finite_or_drop(path, batch.proxy, batch.true, columns, nan_policy, where, item, batch.extra)
        return _select(batch, keep)


def _read_csv(
    path: Path,
    columns: Columns,
    nan_policy: str,
    batch_rows: int,
    progress: Callable[[int], None],
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[ScoreBatch]:
    stream, position = _open_binary(path)
    with stream:
        reader = csv.reader(_decoded_lines(path, stream, max_line_bytes))
        try:
            header = next(reader)
            while not any(cell.strip() for cell in header):  # blank lines before the header
                header = next(reader)
        except StopIteration:
            raise ScoreFileError(f"{path.name}: empty file (expected a header line naming the columns)") from None
        except csv.Error as err:
            raise ScoreFileError(f"{path.name} line 1: malformed CSV header ({err})") from None
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            raise ScoreFileError(f"{path.name}: cannot read ({err})") from None
        names = [h.strip() for h in header]
        seen: dict[str, int] = {}
        for i, name in enumerate(names, start=1):
            if name and name in seen:
                raise ScoreFileError(
                    f"{path.name} line 1: column {name!r} appears twice (columns {seen[name]} and {i}); "
                    "rename one, so it is clear which holds the scores"
                )
            seen[name] = i
        index = _column_index(path, names, columns)
        i_prompt, i_proxy, i_true, i_step, i_run = index
        assert i_prompt is not None
        i_texts = _text_index(path, names, columns)
        i_extra = _extra_index(path, names, columns)
        width = len(names)
        batch = _TextBatch(i_step is not None, i_run is not None, i_texts is not None, len(i_extra))
        reported = 0
        try:
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line
                line = reader.line_num
                if len(row) != width:
                    raise ScoreFileError(
                        f"{path.name} line {line}: expected {width} fields (as in the header), got {len(row)}"
                    )
                prompt = row[i_prompt]
                if not prompt.strip():
                    raise _located(path, f"line {line}", columns.prompt, "empty prompt id")
                batch.prompt.append(prompt)
                batch.proxy.append(row[i_proxy])
                batch.true.append(row[i_true])
                for values, i in zip(batch.extra, i_extra):
                    values.append(row[i])
                if i_step is not None:
                    batch.step.append(row[i_step])  # type: ignore[union-attr]
                if i_run is not None:
                    batch.run.append(row[i_run])  # type: ignore[union-attr]
                if i_texts is not None:
                    batch.prompt_text.append(row[i_texts[0]])  # type: ignore[union-attr]
                    batch.completion.append(row[i_texts[1]])  # type: ignore[union-attr]
                batch.lines.append(line)
                if len(batch.lines) >= batch_rows:
                    yield batch.build(path, columns, nan_policy, json_values=False)
                    batch = _TextBatch(i_step is not None, i_run is not None, i_texts is not None, len(i_extra))
                    done = position()
                    progress(done - reported)
                    reported = done
        except csv.Error as err:
            raise ScoreFileError(f"{path.name} line {reader.line_num}: malformed CSV ({err})") from None
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            raise ScoreFileError(f"{path.name}: cannot read past line {reader.line_num} ({err})") from None
        if batch.lines:
            yield batch.build(path, columns, nan_policy, json_values=False)
        progress(position() - reported)


def _column_index(
    path: Path, names: list[str], columns: Columns, *, prompt_required: bool = True
) -> tuple[int | None, int, int, int | None, int | None]:
    def find(name: str, option: str, required: bool) -> int | None:
        if name in names:
            return names.index(name)
        if required:
            shown = ", ".join(repr(n) for n in names[:20])
            raise ScoreFileError(
                f"{path.name}: no column {name!r} (the columns are {shown}); name the right one with {option}"
            )
        return None

    return (
        find(columns.prompt, "--prompt-col", prompt_required),
        find(columns.proxy, "--proxy-col", True),  # type: ignore[return-value]
        find(columns.true, "--true-col", True),
        find(columns.step, "--step-col", columns.require_step),
        find(columns.run, "--run-col", columns.require_run),
    )


def _extra_index(path: Path, names: list[str], columns: Columns) -> list[int]:
    """Where the further score columns are (``columns.extra_scores``), in that order."""
    found = []
    for name in columns.extra_scores:
        if name not in names:
            shown = ", ".join(repr(n) for n in names[:20])
            option = "--proxy-col" if name in columns.more_proxy else "--true-col"
            raise ScoreFileError(
                f"{path.name}: no column {name!r} (the columns are {shown}); name the right one with {option}"
            )
        found.append(names.index(name))
    return found


def _text_index(path: Path, names: list[str], columns: Columns) -> tuple[int, int] | None:
    """Where the prompt text and completion columns are (None when texts are not read)."""
    if not columns.has_texts:
        return None
    found = []
    for name, option in ((columns.prompt_text, "--prompt-text-col"), (columns.completion, "--completion-col")):
        if name not in names:
            shown = ", ".join(repr(n) for n in names[:20])
            raise ScoreFileError(
                f"{path.name}: no column {name!r} (the columns are {shown}); name the right one with {option}"
            )
        found.append(names.index(name))
    return found[0], found[1]


_MISSING = object()


def _samples_of_row(path: Path, line: int, columns: Columns, proxy: Any, true: Any) -> int | None:
    """How many samples a row of one prompt holds (its proxy and true lists); None for a row of one sample."""
    proxy_list, true_list = isinstance(proxy, list), isinstance(true, list)
    if not proxy_list and not true_list:
        return None
    if proxy_list and true_list:
        if len(proxy) != len(true):
            raise _located(
                path,
                f"line {line}",
                columns.true,
                f"a list of {len(true)} scores, but {columns.proxy!r} has {len(proxy)}: a row of one prompt "
                "holds one proxy and one true score per sample",
            )
        return len(proxy)
    listed, other, value = (columns.proxy, columns.true, true) if proxy_list else (columns.true, columns.proxy, proxy)
    if value is _MISSING:
        return len(proxy if proxy_list else true)  # the caller reports the missing column
    raise _located(
        path,
        f"line {line}",
        other,
        f"{_shown_json(value)} is one score, but {listed!r} holds a list: a row holds either one sample "
        "(a number in each score column) or one prompt's samples (a list in each, of equal length)",
    )


def _row_extra(path: Path, line: int, columns: Columns, row: dict, samples: int | None) -> list[list[Any]]:
    """A JSONL row's further score columns (``columns.extra_scores``), each as the list of its
    samples' values: one value, or in a row of one prompt a list of ``samples``."""
    out = []
    for name in columns.extra_scores:
        if name not in row:
            keys = ", ".join(repr(k) for k in list(row)[:20])
            option = "--proxy-col" if name in columns.more_proxy else "--true-col"
            raise _located(path, f"line {line}", name, f"missing (the row has {keys}); name the column with {option}")
        value = row[name]
        if samples is None:
            if isinstance(value, list):
                raise _located(
                    path, f"line {line}", name,
                    f"holds a list, but {columns.proxy!r} holds one score: a row holds either one sample (a number "
                    "in each score column) or one prompt's samples (a list in each, of equal length)",
                )  # fmt: skip
            out.append([value])
        elif not isinstance(value, list) or len(value) != samples:
            shown = f"a list of {len(value)} scores" if isinstance(value, list) else f"{_shown_json(value)}"
            raise _located(
                path, f"line {line}", name,
                f"{shown}, but {columns.proxy!r} has {samples}: a row of one prompt holds one score per sample in "
                "every score column",
            )  # fmt: skip
        else:
            out.append(value)
    return out


def _row_texts(path: Path, line: int, columns: Columns, row: dict, samples: int | None) -> tuple[str, list[str]]:
    """A JSONL row's prompt text and its completions (one; or a list of ``samples`` in a row of one prompt)."""
    assert columns.prompt_text is not None and columns.completion is not None
    for name, option in ((columns.prompt_text, "--prompt-text-col"), (columns.completion, "--completion-col")):
        if name not in row:
            keys = ", ".join(repr(k) for k in list(row)[:20])
            raise _located(path, f"line {line}", name, f"missing (the row has {keys}); name the column with {option}")
    prompt_text, completion = row[columns.prompt_text], row[columns.completion]
    if not isinstance(prompt_text, str):
        raise _located(path, f"line {line}", columns.prompt_text, f"{_shown_json(prompt_text)} is not a text")
    if samples is None:
        if not isinstance(completion, str):
            raise _located(path, f"line {line}", columns.completion, f"{_shown_json(completion)} is not a text")
        return prompt_text, [completion]
    if not isinstance(completion, list) or len(completion) != samples:
        problem = (
            f"{_shown_json(completion)} is not a list of {samples} completions: a row of one prompt holds one "
            "completion per score"
        )
        raise _located(path, f"line {line}", columns.completion, problem)
    bad = next((j for j, c in enumerate(completion) if not isinstance(c, str)), None)
    if bad is not None:
        raise _located(
            path, f"line {line}", columns.completion, f"{_shown_json(completion[bad])} is not a text",
            f", sample {bad + 1} of {samples}",
        )  # fmt: skip
    return prompt_text, completion


def _read_jsonl(
    path: Path,
    columns: Columns,
    nan_policy: str,
    batch_rows: int,
    progress: Callable[[int], None],
    max_line_bytes: int = MAX_LINE_BYTES,
) -> Iterator[ScoreBatch]:
    stream, position = _open_binary(path)
    has_step = has_run = None  # decided by the first row (the columns of a table are fixed)
    batch: _TextBatch | None = None
    reported = 0
    line = 0
    with stream:
        try:
            for line, text in enumerate(_decoded_lines(path, stream, max_line_bytes), start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise ScoreFileError(
                        f"{path.name} line {line}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                if not isinstance(row, dict):
                    raise ScoreFileError(
                        f"{path.name} line {line}: expected a JSON object per line, got {type(row).__name__}"
                    )
                if batch is None:
                    has_step = columns.step in row or columns.require_step
                    has_run = columns.run in row or columns.require_run
                    batch = _TextBatch(bool(has_step), bool(has_run), columns.has_texts, len(columns.extra_scores))
                proxy, true = row.get(columns.proxy, _MISSING), row.get(columns.true, _MISSING)
                samples = _samples_of_row(path, line, columns, proxy, true)  # None: one sample
                for name, option, present in (
                    (columns.prompt, "--prompt-col", samples is None),  # a row of lists is a prompt by itself
                    (columns.proxy, "--proxy-col", True),
                    (columns.true, "--true-col", True),
                    (columns.step, "--step-col", has_step),
                    (columns.run, "--run-col", has_run),
                ):
                    if present and name not in row:
                        keys = ", ".join(repr(k) for k in list(row)[:20])
                        raise _located(
                            path, f"line {line}", name, f"missing (the row has {keys}); name the column with {option}"
                        )
                prompt = row.get(columns.prompt, _MISSING)
                if prompt is _MISSING:
                    prompt = f"line {line}"
                elif prompt is None or isinstance(prompt, (dict, list)) or prompt == "":
                    raise _located(
                        path,
                        f"line {line}",
                        columns.prompt,
                        f"{_shown_json(prompt)} is not a prompt id (use a string or an integer)",
                    )
                prompt = prompt if isinstance(prompt, str) else str(prompt)
                run = row[columns.run] if has_run else None
                if has_run and not isinstance(run, str):
                    run = json.dumps(run)
                if columns.has_texts:
                    prompt_text, completions = _row_texts(path, line, columns, row, samples)
                    batch.prompt_text.extend([prompt_text] * len(completions))  # type: ignore[union-attr]
                    batch.completion.extend(completions)  # type: ignore[union-attr]
                if columns.extra_scores:
                    for values, scores in zip(batch.extra, _row_extra(path, line, columns, row, samples)):
                        values.extend(scores)
                if samples is None:
                    batch.prompt.append(prompt)
                    batch.proxy.append(proxy)
                    batch.true.append(true)
                    if has_step:
                        batch.step.append(row[columns.step])  # type: ignore[union-attr]
                    if has_run:
                        batch.run.append(run)  # type: ignore[union-attr]
                    batch.lines.append(line)
                elif samples:
                    batch.lists[line] = (len(batch.lines), samples)
                    batch.prompt.extend([prompt] * samples)
                    batch.proxy.extend(proxy)
                    batch.true.extend(true)
                    if has_step:
                        batch.step.extend([row[columns.step]] * samples)  # type: ignore[union-attr]
                    if has_run:
                        batch.run.extend([run] * samples)  # type: ignore[union-attr]
                    batch.lines.extend([line] * samples)
                if len(batch.lines) >= batch_rows:
                    yield batch.build(path, columns, nan_policy, json_values=True)
                    batch = _TextBatch(bool(has_step), bool(has_run), columns.has_texts, len(columns.extra_scores))
                    done = position()
                    progress(done - reported)
                    reported = done
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            raise ScoreFileError(f"{path.name}: cannot read past line {line} ({err})") from None
        if batch is None:
            raise ScoreFileError(f"{path.name}: no rows (an empty JSONL file)")
        if batch.lines:
            yield batch.build(path, columns, nan_policy, json_values=True)
        progress(position() - reported)


# ---- Parquet ---------------------------------------------------------------------------------------


def _read_parquet(
    path: Path, columns: Columns, nan_policy: str, batch_rows: int, progress: Callable[[int], None]
) -> Iterator[ScoreBatch]:
    from bon_tracker.optional import require

    require("pyarrow", "parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # No pre-buffering and no reader threads: either reads ahead several row groups
        # at once; this way memory holds one row group, whatever the file's size.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise ScoreFileError(f"{path.name}: not a readable Parquet file ({err})") from None
    with parquet:
        schema = parquet.schema_arrow
        names = list(schema.names)
        lists = _list_layout(path, schema, columns)
        index = _column_index(path, names, columns, prompt_required=not lists)
        texts = _text_index(path, names, columns)
        extra = _extra_index(path, names, columns)
        wanted = [names[i] for i in (*index, *(texts or ()), *extra) if i is not None]
        total_rows = parquet.metadata.num_rows
        size = path.stat().st_size
        reported = 0
        first_row = 0  # rows before this batch
        try:
            for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted, use_threads=False):
                n = record_batch.num_rows
                if n == 0:
                    continue
                where = (lambda start: lambda i: f"row {start + i + 1}")(first_row)
                if lists:
                    batch, keep = _arrow_prompt_rows(path, record_batch, columns, index, first_row, where, nan_policy)
                    first_row += n
                    yield _select(batch, keep)
                    done = int(size * first_row / total_rows) if total_rows else size
                    progress(done - reported)
                    reported = done
                    continue
                batch = ScoreBatch(
                    prompt=_arrow_ids(path, record_batch.column(columns.prompt), columns.prompt, where),
                    proxy=_arrow_floats(path, record_batch.column(columns.proxy), columns.proxy, where),
                    true=_arrow_floats(path, record_batch.column(columns.true), columns.true, where),
                    step=(
                        _arrow_steps(path, record_batch.column(columns.step), columns.step, where)
                        if index[3] is not None
                        else None
                    ),
                    run=(
                        _arrow_runs(path, record_batch.column(columns.run), columns.run, where)
                        if index[4] is not None
                        else None
                    ),
                )
                if texts is not None:
                    batch.prompt_text = _arrow_texts(
                        path, record_batch.column(columns.prompt_text), columns.prompt_text, where
                    )
                    batch.completion = _arrow_texts(
                        path, record_batch.column(columns.completion), columns.completion, where
                    )
                if extra:
                    batch.extra = np.stack(
                        [_arrow_floats(path, record_batch.column(c), c, where) for c in columns.extra_scores]
                    )
                keep = _finite_or_drop(path, batch.proxy, batch.true, columns, nan_policy, where, extra=batch.extra)
                first_row += n
                yield _select(batch, keep)
                done = int(size * first_row / total_rows) if total_rows else size
                progress(done - reported)
                reported = done
        except pa.ArrowException as err:
            raise ScoreFileError(f"{path.name}: cannot read past row {first_row} ({err})") from None


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _list_layout(path: Path, schema: Any, columns: Columns) -> bool:
    """Whether the score columns hold lists (one row per prompt); an error when only one does."""
    scores = (columns.proxy, columns.true, *columns.extra_scores)
    kinds = {name: schema.field(name).type for name in scores if name in schema.names}
    listed = [name for name, kind in kinds.items() if _is_list(kind)]
    if not listed or len(listed) == len(kinds) == len(scores):
        return bool(listed)
    if len(kinds) < len(scores) and len(listed) == len(kinds):
        return True  # the missing score column is reported by name
    other = next(name for name in kinds if name not in listed)
    raise ScoreFileError(
        f"{path.name}, column {other!r}: has type {kinds[other]}, but {listed[0]!r} holds lists: a row holds "
        "either one sample (a number in each score column) or one prompt's samples (a list in each)"
    )


def _arrow_prompt_rows(
    path: Path,
    record_batch: Any,
    columns: Columns,
    index: tuple[int | None, ...],
    first_row: int,
    where: Callable[[int], str],
    nan_policy: str,
) -> tuple[ScoreBatch, np.ndarray | None]:
    """Rows of one prompt each (list columns) as samples: each row's lists, one after another."""
    import pyarrow.compute as pc

    lengths = {}
    for column in (columns.proxy, columns.true, *columns.extra_scores):
        array = record_batch.column(column)
        if array.null_count:
            raise _located(path, where(_first_null(array)), column, "missing (null instead of a list of scores)")
        lengths[column] = np.asarray(pc.list_value_length(array).to_numpy(zero_copy_only=False), dtype=np.int64)
    count = lengths[columns.proxy]
    for column in (columns.true, *columns.extra_scores):
        unequal = np.flatnonzero(count != lengths[column])
        if unequal.size:
            r = int(unequal[0])
            raise _located(
                path,
                where(r),
                column,
                f"a list of {lengths[column][r]} scores, but {columns.proxy!r} has {count[r]}: a row of one "
                "prompt holds one score per sample in every score column",
            )
    parent = np.repeat(np.arange(len(count)), count)  # the row of each sample
    start = np.concatenate(([0], np.cumsum(count)[:-1]))

    def sample_where(i: int) -> str:
        return where(int(parent[i]))

    def item(i: int) -> str:
        r = int(parent[i])
        return f", sample {i - int(start[r]) + 1} of {int(count[r])}"

    if index[0] is not None:
        prompt = _arrow_ids(path, record_batch.column(columns.prompt), columns.prompt, where)[parent]
    else:  # no prompt column: each row is a prompt, named by its row number (from 1)
        prompt = first_row + 1 + parent
    batch = ScoreBatch(
        prompt=prompt,
        proxy=_arrow_floats(
            path, pc.list_flatten(record_batch.column(columns.proxy)), columns.proxy, sample_where, item
        ),
        true=_arrow_floats(path, pc.list_flatten(record_batch.column(columns.true)), columns.true, sample_where, item),
        step=(
            _arrow_steps(path, record_batch.column(columns.step), columns.step, where)[parent]
            if index[3] is not None
            else None
        ),
        run=(
            _arrow_runs(path, record_batch.column(columns.run), columns.run, where)[parent]
            if index[4] is not None
            else None
        ),
    )
    if columns.has_texts:
        assert columns.prompt_text is not None and columns.completion is not None
        batch.prompt_text = _arrow_texts(path, record_batch.column(columns.prompt_text), columns.prompt_text, where)[
            parent
        ]
        listed = record_batch.column(columns.completion)
        if not _is_list(listed.type) or listed.null_count:
            raise ScoreFileError(
                f"{path.name}, column {columns.completion!r}: holds {listed.type}, not lists of completions "
                "without nulls: a row of one prompt holds one completion per score"
            )
        texts_per_row = np.asarray(pc.list_value_length(listed).to_numpy(zero_copy_only=False), dtype=np.int64)
        unequal = np.flatnonzero(texts_per_row != count)
        if unequal.size:
            r = int(unequal[0])
            raise _located(
                path, where(r), columns.completion,
                f"a list of {texts_per_row[r]} completions, but {columns.proxy!r} has {count[r]} scores",
            )  # fmt: skip
        batch.completion = _arrow_texts(path, pc.list_flatten(listed), columns.completion, sample_where)
    if columns.extra_scores:
        batch.extra = np.stack(
            [
                _arrow_floats(path, pc.list_flatten(record_batch.column(c)), c, sample_where, item)
                for c in columns.extra_scores
            ]
        )
    return batch, _finite_or_drop(path, batch.proxy, batch.true, columns, nan_policy, sample_where, item, batch.extra)


def _first_null(array: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.index(pc.is_null(array), True).as_py())


def _arrow_floats(
    path: Path, array: Any, column: str, where: Callable[[int], str], item: Callable[[int], str] = _no_item
) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), kind.value_type
    if (
        pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
        or pa.types.is_decimal(kind)
    ):
        if not pa.types.is_float64(kind):
            array = pc.cast(array, pa.float64())
        out = array.to_numpy(zero_copy_only=False)
        return np.asarray(out, dtype=np.float64)  # nulls became NaN: checked by nan_policy
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = array.to_pylist()
        out = np.empty(len(values), dtype=np.float64)
        for i, value in enumerate(values):
            if value is None or not value.strip():
                out[i] = math.nan
                continue
            try:
                out[i] = float(value)
            except ValueError:
                raise _located(path, where(i), column, f"{value[:40]!r} is not a number", item(i)) from None
        return out
    raise ScoreFileError(f"{path.name}, column {column!r}: has type {kind}, not a number type")


def _arrow_steps(path: Path, array: Any, column: str, where: Callable[[int], str]) -> np.ndarray:
    import pyarrow as pa

    kind = array.type
    if array.null_count:
        raise _located(path, where(_first_null(array)), column, "missing step (null)")
    if pa.types.is_integer(kind):
        values = np.asarray(array.to_numpy(zero_copy_only=False))
        # One pass finds a step out of range: only unsigned 64-bit steps can reach 2^63.
        unsigned = values.dtype.kind == "u"
        if values.size and (values.max() >= MAX_STEP if unsigned else values.min() < 0):
            i = int(np.flatnonzero((values < 0) | (values >= MAX_STEP))[0])
            raise _located(path, where(i), column, f"step {int(values[i])} is out of range; {_STEP_RANGE}")
        return values.astype(np.int64, copy=False)  # int64 steps (the usual) as they are: no copy
    if pa.types.is_floating(kind):
        values = np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.float64)
        bad = ~(np.isfinite(values) & (values == np.round(values)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise _located(path, where(i), column, f"{values[i]!r} is not an integer step")
        outside = np.flatnonzero((values < 0) | (values >= MAX_STEP))
        if outside.size:
            i = int(outside[0])
            raise _located(path, where(i), column, f"step {values[i]!r} is out of range; {_STEP_RANGE}")
        return values.astype(np.int64)
    raise ScoreFileError(f"{path.name}, column {column!r}: has type {kind}; steps must be integers")


def _arrow_ids(path: Path, array: Any, column: str, where: Callable[[int], str]) -> np.ndarray:
    import pyarrow as pa

    if array.null_count:
        raise _located(path, where(_first_null(array)), column, "missing prompt id (null)")
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_integer(array.type):
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=object)
    raise ScoreFileError(
        f"{path.name}, column {column!r}: has type {array.type}; prompt ids must be strings or integers"
    )


def _arrow_texts(path: Path, array: Any, column: str, where: Callable[[int], str]) -> np.ndarray:
    """A string column as an object array of str (a null is an error naming its row)."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise ScoreFileError(f"{path.name}, column {column!r}: has type {array.type}; texts must be strings")
    if array.null_count:
        raise _located(path, where(_first_null(array)), column, "missing text (null)")
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=object)


def _arrow_runs(path: Path, array: Any, column: str, where: Callable[[int], str]) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if array.null_count:
        raise _located(path, where(_first_null(array)), column, "missing run name (null)")
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return np.asarray(pc.cast(array, pa.string()).to_numpy(zero_copy_only=False), dtype=object)
