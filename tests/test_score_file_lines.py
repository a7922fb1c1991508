"""Score files: one line longer than the limit is an error naming it, read in bounded memory."""

from __future__ import annotations

import gzip
import tracemalloc

import numpy as np
import pytest

from bon_tracker.analysis.score_files import MAX_LINE_BYTES, ScoreFileError, read_score_batches


def rows_of(path, **options):
    return [batch for batch in read_score_batches(path, **options)]


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.csv", "scores.jsonl.gz", "scores.csv.gz"])
def test_a_line_over_the_limit_is_an_error_naming_the_file_and_line(tmp_path, name):
    if ".jsonl" in name:
        good = [b'{"prompt_id": "a", "proxy": 0.5, "true": 1.0}\n'] * 3
        long = b'{"prompt_id": "' + b"x" * 500 + b'", "proxy": 1, "true": 2}\n'
    else:
        good = [b"prompt_id,proxy,true\n"] + [b"a,0.5,1.0\n"] * 2
        long = b"b,0." + b"1" * 500 + b",2\n"
    data = b"".join(good) + long + b"".join(good[1:])
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(ScoreFileError, match=rf"^{name} line 4: longer than 200 bytes, the limit of one line"):
        rows_of(path, max_line_bytes=200)
    batches = rows_of(path, max_line_bytes=len(long))  # exactly at the limit: read
    assert sum(len(b) for b in batches) == (6 if ".jsonl" in name else 5)


def test_lines_at_the_limit_and_without_a_final_newline(tmp_path):
    path = tmp_path / "s.jsonl"
    line = b'{"prompt_id": "a", "proxy": 0.25, "true": 1.0}'
    path.write_bytes(line + b"\n" + line)  # the last line has no newline
    (batch,) = rows_of(path, max_line_bytes=len(line) + 1)
    np.testing.assert_array_equal(batch.proxy, [0.25, 0.25])
    with pytest.raises(ScoreFileError, match=r"s\.jsonl line 1: longer than"):
        rows_of(path, max_line_bytes=len(line))


@pytest.mark.slow
def test_a_huge_line_takes_bounded_memory(tmp_path):
    """A 200 MiB line (over the default 64 MiB limit) is refused with about twice the limit in memory."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt_id": 1, "proxy": 0.5, "true": 1.0}\n{"prompt_id": "')
        chunk = b"x" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write(b'"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(ScoreFileError, match=r"huge\.jsonl line 2: longer than 67,108,864 bytes"):
            rows_of(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * MAX_LINE_BYTES, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "neg.csv",
            "prompt_id,proxy,true,step\na,1,2,0\na,1,2,-5\n",
            r"neg.csv line 3, column 'step': step -5 is negative",
        ),
        ("big.csv", "prompt_id,proxy,true,step\na,1,2,1e20\n", r"big.csv line 2, column 'step': step '1e20' is out of"),
        (
            "big.jsonl",
            '{"prompt_id":"a","proxy":1,"true":2,"step":18446744073709551616}\n',
            r"big.jsonl line 1.*out of",
        ),
        ("dup.csv", "prompt_id,proxy,true,proxy\na,1,2,3\n", r"dup.csv line 1: column 'proxy' appears twice"),
    ],
)
def test_steps_outside_int64_and_duplicated_columns_are_errors_naming_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ScoreFileError, match=message):
        rows_of(path)


@pytest.mark.parametrize(("steps", "kind"), [([0, 7], "uint32"), ([3, 2**63 - 1], "uint64"), ([-0, 9], "int16")])
def test_parquet_steps_of_any_integer_type_in_range_read_as_int64(tmp_path, steps, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(
        {"prompt_id": ["a", "b"], "proxy": [1.0, 2.0], "true": [2.0, 1.0], "step": pa.array(steps, getattr(pa, kind)())}
    )
    pq.write_table(table, tmp_path / "s.parquet")
    (batch,) = rows_of(tmp_path / "s.parquet")
    assert batch.step.dtype == np.int64 and batch.step.tolist() == steps


@pytest.mark.parametrize(("step", "kind"), [(-5, "int64"), (-5, "int32"), (2**64 - 1, "uint64"), (2**63, "uint64")])
def test_parquet_steps_outside_int64_are_errors_naming_the_row(tmp_path, step, kind):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    kind = getattr(pa, kind)()
    table = pa.table(
        {"prompt_id": ["a", "a"], "proxy": [1.0, 2.0], "true": [2.0, 1.0], "step": pa.array([0, step], kind)}
    )
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(ScoreFileError, match=rf"s.parquet row 2, column 'step': step {step} is out of range"):
        rows_of(tmp_path / "s.parquet")
