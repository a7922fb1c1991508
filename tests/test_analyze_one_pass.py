"""``bon-tracker analyze`` reads grouped input once: each step's statistics (interval, predictions,
agreement, hack table, selection statistics) come from the curves' own pass, and are exactly what
the second read gives (the path a step past the buffer budget, or one whose rows come back, takes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.analysis import grouping
from bon_tracker.analysis.ray_engine import prompt_estimates
from bon_tracker.analysis.score_files import read_score_batches
from bon_tracker.backends.local import read_records
from bon_tracker.cli import analyze
from bon_tracker.cli.main import EXIT_OK, main
from bon_tracker.core.accumulator import CurveAccumulator

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(autouse=True)
def _isolated(cli_folder):
    """Each test in its own working folder: no bon_tracker.yaml, runs or spool from elsewhere."""


def make_rows(rng, steps=(0, 10, 20), prompts=40, samples=16, ties=False, texts=False, members=1) -> list[dict]:
    rows = []
    for step in steps:
        for p in range(prompts):
            true = rng.normal(size=samples)
            proxies = [true + (1 + step / 10) * rng.standard_t(df=2, size=samples) for _ in range(members)]
            if ties:  # a rating scale: few proxy levels, many ties (the curves count levels)
                proxies = [np.round(proxy) for proxy in proxies]
            for j in range(samples):
                row = {"step": step, "prompt_id": f"q{p}", "true": float(true[j])}
                if members == 1:
                    row["proxy"] = float(proxies[0][j])
                else:
                    row.update({f"rm_{m}": float(proxies[m][j]) for m in range(members)})
                if texts:
                    row["question"] = f"question {p} at {step}"
                    row["answer"] = "x" * (1 + (j * 7 + p) % 23) + (" sorry" if j % 5 == 0 else "")
                rows.append(row)
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run(capsys, monkeypatch, tmp_path, path: Path, *args: str, budget: int | None = None, out: str = "out"):
    """The summary (paths left out), each run's records (their JSON, no timestamp) and how many
    times a file was opened."""
    opens = []

    def counting(*a, **k):
        opens.append(a[0])
        return read_score_batches(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(analyze, "read_score_batches", counting)
        if budget is not None:
            patch.setattr(analyze, "STEP_BUFFER_BYTES", budget)
        code = main(["analyze", str(path), "--out", str(tmp_path / out), "--json", "--quiet", *args])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    summary = json.loads(captured.out)
    records = []
    for entry in summary["runs"]:
        for record in read_records(entry.pop("run_dir")):
            data = record.to_json()
            data.pop("timestamp")
            records.append(data)
        entry.pop("report")
    return summary, records, len(opens)


def both(capsys, monkeypatch, tmp_path, path, *args, budget=0):
    """The one-read run and the run whose steps all take the second read (budget 0: today's path)."""
    one = run(capsys, monkeypatch, tmp_path, path, *args, out="one")
    two = run(capsys, monkeypatch, tmp_path, path, *args, budget=budget, out="two")
    return one, two


@pytest.mark.parametrize(
    "name, kind",
    [("scores.parquet", "continuous"), ("scores.jsonl", "ties"), ("scores.parquet", "many prompts")],
)
def test_grouped_input_is_read_once_with_the_records_of_two_reads(tmp_path, capsys, monkeypatch, rng, name, kind):
    if kind == "many prompts":  # past MAX_AGREEMENT_PROMPTS: the agreement's evenly spaced subset
        rows = make_rows(rng, steps=(0, 10), prompts=2100, samples=4)
    else:
        rows = make_rows(rng, ties=kind == "ties")
    path = write(tmp_path / name, rows)
    (summary, records, opens), (summary_2, records_2, opens_2) = both(
        capsys, monkeypatch, tmp_path, path, "--batch-rows", "100"
    )
    assert (opens, opens_2) == (1, 2)
    assert summary["grouped"] is True and summary["rows"] == len(rows)
    assert records == records_2 and summary == summary_2
    assert all(r["interval"] is not None and r["predictions"] for r in records)
    assert all(r["agreement"] is not None for r in records)


def test_a_step_past_the_budget_alone_is_read_again(tmp_path, capsys, monkeypatch, rng):
    """Steps of 10, 40 and 80 prompts x 16 samples (16 bytes a sample kept): a budget between them
    sends only the larger ones to the second read; the records are the same either way."""
    rows = make_rows(rng, steps=(0,), prompts=10) + make_rows(rng, steps=(10,), prompts=40)
    rows += make_rows(rng, steps=(20,), prompts=80)
    path = write(tmp_path / "scores.parquet", rows)
    seen = []
    real = analyze._OnePass.end

    def end(self, curves):
        done = real(self, curves)
        seen.append((sorted(step for _, step in done), sorted(step for _, step in self.again)))
        return done

    monkeypatch.setattr(analyze._OnePass, "end", end)
    mid = 20 * 16 * 16
    one, two = both(capsys, monkeypatch, tmp_path, path, "--batch-rows", "64", budget=mid)
    tiny = run(capsys, monkeypatch, tmp_path, path, "--batch-rows", "64", budget=1, out="tiny")
    assert seen == [([0, 10, 20], []), ([0], [10, 20]), ([], [0, 10, 20])]
    assert (one[2], two[2], tiny[2]) == (1, 2, 2)
    assert one[1] == two[1] == tiny[1] and one[0] == two[0] == tiny[0]


def test_a_step_whose_rows_come_back_is_read_again(tmp_path, capsys, monkeypatch, rng):
    """Grouped (each prompt's rows together) but step 0's prompts before and after step 10's."""
    rows = make_rows(rng, steps=(0, 10), prompts=12)
    step0 = [r for r in rows if r["step"] == 0]
    rows = step0[: 6 * 16] + [r for r in rows if r["step"] == 10] + step0[6 * 16 :]
    path = write(tmp_path / "scores.jsonl", rows)
    (summary, records, opens), (summary_2, records_2, _) = both(
        capsys, monkeypatch, tmp_path, path, "--batch-rows", "50"
    )
    assert summary["grouped"] is True and opens == 2  # step 0 from the second read
    assert records == records_2 and summary == summary_2
    assert [s["prompts"] for s in summary["runs"][0]["steps"]] == [12, 12]


@pytest.mark.parametrize(
    "extra",
    [
        ("--prompt-text-col", "question", "--completion-col", "answer"),
        ("--selection",),
        ("--proxy-col", "rm_0,rm_1", "--selection-rule", "worst"),
        ("--proxy-col", "rm_0,rm_1", "--prompt-text-col", "question", "--completion-col", "answer"),
    ],
)
def test_texts_and_selection_statistics_in_one_read(tmp_path, capsys, monkeypatch, rng, extra):
    members = 2 if "rm_0,rm_1" in extra else 1
    rows = make_rows(rng, prompts=30, texts=True, members=members)
    path = write(tmp_path / "scores.jsonl", rows)
    (summary, records, opens), (summary_2, records_2, opens_2) = both(
        capsys, monkeypatch, tmp_path, path, "--batch-rows", "70", *extra
    )
    assert (opens, opens_2) == (1, 2)
    assert records == records_2 and summary == summary_2
    if "answer" in extra:
        assert all(r["hacks"] for r in records)
    if members > 1 or "--selection" in extra:
        assert all(r["selection"] for r in records)


def test_ungrouped_input_keeps_its_two_reads(tmp_path, capsys, monkeypatch, rng):
    rows = make_rows(rng, steps=(0, 10), prompts=12)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path = write(tmp_path / "scores.parquet", rows)
    summary, records, opens = run(capsys, monkeypatch, tmp_path, path, "--batch-rows", "64")
    assert summary["grouped"] is False and opens == 3  # the curves' two reads, the statistics' one
    assert all(r["interval"] is not None for r in records)


# ---- the accumulator that keeps the estimates ----------------------------------------------------------


def _prompts(rng, ties: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k in range(60):
        N = (5, 8, 12, 16)[k % 4] if k % 7 else 3
        true = rng.normal(size=N)
        proxy = true + rng.standard_t(df=2, size=N)
        out.append((np.round(proxy) if ties else proxy, true))
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ns", [None, [1, 2, 4, 8]])
def test_keeping_estimates_leaves_the_curve_as_it_is(rng, ties, ns):
    """The curve to the bit, blocks and single prompts, ragged; the estimates are
    prompt_estimates' on each chunk, where the chunk's grid is the step's."""
    prompts = _prompts(rng, ties)
    plain, kept = CurveAccumulator(ns, chunk_samples=64), grouping._SizedAccumulator(ns, 64, keep_estimates=True)
    first_half = CurveAccumulator(ns, chunk_samples=64)  # the prompts before the look midway
    chunks, pending, size = [], [], 0
    i = 0
    while i < len(prompts):
        accs = (plain, kept, first_half) if i < 30 else (plain, kept)
        if i % 5 == 0 and i + 3 <= len(prompts) and len({len(p) for p, _ in prompts[i : i + 3]}) == 1:
            block = prompts[i : i + 3]
            args = (np.stack([p for p, _ in block]), np.stack([t for _, t in block]))
            for acc in accs:
                acc.add_prompts(*args)
        else:
            block = [prompts[i]]
            for acc in accs:
                acc.add_prompt(*prompts[i])
        i += len(block)
        pending += block
        size += sum(len(p) for p, _ in block)
        if size >= 64:
            chunks.append(pending)
            pending, size = [], 0
        if i == 30:  # a look at the curve midway changes nothing that follows
            assert analyze._same_curve(kept.peek_curve(), first_half.curve())
    if pending:
        chunks.append(pending)
    peeked = kept.peek_curve()
    want, got = plain.curve(), kept.curve()
    assert analyze._same_curve(want, got) and analyze._same_curve(peeked, got)
    estimates = kept.estimates_on(got.n)
    assert estimates is not None
    true_pp, proxy_pp = estimates
    want_true, want_proxy = zip(*(prompt_estimates([p for p, _ in c], [t for _, t in c], got.n) for c in chunks))
    assert np.array_equal(true_pp, np.concatenate(want_true), equal_nan=True)
    assert np.array_equal(proxy_pp, np.concatenate(want_proxy), equal_nan=True)
    assert true_pp.shape == (len(prompts), len(got.n)) and np.isnan(true_pp[:, -1]).sum() > 0


def test_blocks_are_kept_within_the_budget_only():
    acc = grouping._SizedAccumulator(None, 1 << 18, keep_estimates=True)
    recorder = analyze._StepRecorder(3 * 8 * 8 * 2)
    acc.keep_blocks(recorder)
    acc.add_prompts(np.zeros((3, 8)), np.ones((3, 8)))
    assert len(recorder.calls) == 1 and not recorder.over
    acc.add_prompt(np.zeros(8), np.ones(8))  # past the budget: dropped
    assert acc.take_blocks() is recorder and recorder.over and recorder.calls == []
    assert not acc.reopened
    acc.add_prompt(np.zeros(8), np.ones(8))  # after take_blocks: the step was taken as done
    assert acc.reopened


def test_a_chunk_on_another_grid_gives_no_estimates(rng):
    """A chunk of prompts of 12 samples is reduced on 1, 2, 4, 8, 12; the step's grid (N = 16) has
    no 12: its estimates there are not the step's, and the step is left to the second read."""
    acc = grouping._SizedAccumulator(None, 64, keep_estimates=True)
    acc.add_prompts(rng.normal(size=(6, 12)), rng.normal(size=(6, 12)))
    acc.add_prompt(rng.normal(size=16), rng.normal(size=16))
    assert acc.estimates_on(acc.curve().n) is None
    on_user_grid = grouping._SizedAccumulator([1, 2, 4, 8], 64, keep_estimates=True)
    on_user_grid.add_prompts(rng.normal(size=(6, 12)), rng.normal(size=(6, 12)))
    on_user_grid.add_prompt(rng.normal(size=16), rng.normal(size=16))
    assert on_user_grid.estimates_on(on_user_grid.curve().n)[0].shape == (7, 4)


def test_the_statistics_do_not_depend_on_the_blas_threads_the_caller_set(tmp_path, capsys, monkeypatch):
    """OpenBLAS's threaded products round differently for some shapes (the predictions' bootstrap
    product at 700 prompts: (1000, 700) @ (700, 6)). analyze holds BLAS to one thread for the whole
    command, so its records are the same bits whatever the caller (or the machine's cores) set."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(700)
    prompts, samples = 700, 256
    true = rng.normal(size=(prompts, samples))
    proxy = true + rng.standard_t(2, size=true.shape)
    table = {
        "step": np.zeros(prompts * samples, dtype=np.int64),
        "prompt_id": np.repeat(np.arange(prompts), samples),
        "proxy": proxy.ravel(),
        "true": true.ravel(),
    }
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table(table), path)
    found = {}
    for limit in (1, 2):
        with threadpoolctl.threadpool_limits(limits=limit, user_api="blas"):
            blas = [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]
            if limit == 2 and max(blas) < 2:
                pytest.skip("BLAS runs one thread here: nothing to compare")
            _, found[limit], _ = run(capsys, monkeypatch, tmp_path, path, out=f"blas{limit}")
    assert found[1][0]["predictions"] and found[1][0]["interval"] is not None
    assert found[1] == found[2]
