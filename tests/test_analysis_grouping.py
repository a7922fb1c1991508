"""Score rows -> curves per (run, step): blocks of whole prompts, keys out of order, read errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bon_tracker.analysis.grouping import curves_from_batches
from bon_tracker.analysis.score_files import ScoreBatch, ScoreFileError
from bon_tracker.core import bon_curve

FIELDS = ("kl", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts")


def table(rng, prompts: int, samples, steps=(0,), runs=(None,)):
    """Rows (run, step, prompt, proxy, true), grouped by run, step and prompt; samples may vary per prompt."""
    rows = []
    for run in runs:
        for step in steps:
            for q in range(prompts):
                k = samples if isinstance(samples, int) else int(samples[q])
                true = rng.normal(size=k)
                proxy = np.round(true + rng.standard_t(2, size=k), 1)  # some ties
                rows.append((run, step, q, proxy, true))
    return rows


def batches_of(rows, batch_rows: int, *, with_run: bool, order=None):
    flat = [(run, step, q, p, t) for run, step, q, proxy, true in rows for p, t in zip(proxy, true)]
    if order is not None:
        flat = [flat[i] for i in order]

    def open_batches():
        for start in range(0, len(flat), batch_rows):
            part = flat[start : start + batch_rows]
            yield ScoreBatch(
                prompt=np.array([r[2] for r in part], dtype=np.int64),
                proxy=np.array([r[3] for r in part]),
                true=np.array([r[4] for r in part]),
                step=np.array([r[1] for r in part], dtype=np.int64),
                run=np.array([r[0] for r in part], dtype=object) if with_run else None,
            )

    return open_batches


def check(curves, rows, runs=(None,)):
    for run in runs:
        for step in {r[1] for r in rows if r[0] == run}:
            mine = [r for r in rows if r[0] == run and r[1] == step]
            want = bon_curve([r[3] for r in mine], [r[4] for r in mine])
            got = curves[run][step]
            for field in FIELDS:
                np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_rows", [7, 64, 1000, 100_000])
def test_sorted_rows_in_any_batch_size_equal_bon_curve(rng, batch_rows):
    rows = table(rng, 60, 16, steps=(0, 10, 20))
    curves, info = curves_from_batches(batches_of(rows, batch_rows, with_run=False))
    assert info["grouped"] is True and sorted(curves[None]) == [0, 10, 20]
    check(curves, rows)


def test_prompts_of_different_sizes_and_several_runs(rng):
    runs = ("b-run", "a-run")  # runs one after another, not in sorted order
    rows = table(rng, 40, rng.integers(1, 30, size=40), steps=(5, 1), runs=runs)  # steps not sorted either
    curves, info = curves_from_batches(batches_of(rows, 50, with_run=True))
    assert info["grouped"] is True and list(curves) == list(runs)
    check(curves, rows, runs)


def test_grouped_rows_of_prompts_in_shuffled_order_stay_grouped(rng):
    rows = table(rng, 50, 12)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # each prompt still contiguous
    curves, info = curves_from_batches(batches_of(rows, 33, with_run=False))
    assert info["grouped"] is True
    check(curves, rows)


@pytest.mark.parametrize("where", ["early", "late", "same batch"])
def test_a_prompt_that_reappears_is_found_and_read_again(rng, where):
    rows = table(rng, 30, 10, steps=(0, 1))
    moved = {"early": 3, "late": 55, "same batch": 1}[where]
    rows = rows[:moved] + rows[moved + 1 :] + [rows[moved]]  # ... and prompt `moved` comes back at the end
    rows.append((rows[0][0], rows[0][1], rows[0][2], np.array([0.5]), np.array([1.0])))  # one more row of prompt 0
    seen = []
    curves, info = curves_from_batches(
        batches_of(rows, 10_000 if where == "same batch" else 40, with_run=False), on_ungrouped=seen.append
    )
    assert info["grouped"] is False and len(seen) == 1
    merged = {}
    for _run, step, q, proxy, true in rows:
        p, t = merged.get((step, q), (np.empty(0), np.empty(0)))
        merged[(step, q)] = (np.append(p, proxy), np.append(t, true))
    for step in (0, 1):
        keys = sorted(k for k in merged if k[0] == step)
        want = bon_curve([merged[k][0] for k in keys], [merged[k][1] for k in keys])
        for field in FIELDS:
            np.testing.assert_allclose(getattr(curves[None][step], field), getattr(want, field), rtol=1e-10)


def test_a_run_that_comes_back_is_not_grouped(rng):
    rows = table(rng, 10, 8, runs=("x", "y")) + table(rng, 1, 8, runs=("x",))  # run x's prompt 0 again
    _, info = curves_from_batches(batches_of(rows, 16, with_run=True))
    assert info["grouped"] is False


def test_read_errors_surface_at_their_batch_and_the_file_is_closed(rng):
    rows = table(rng, 20, 8)
    opened = batches_of(rows, 16, with_run=False)
    state = {"read": 0, "closed": False}

    def failing():
        try:
            for i, batch in enumerate(opened()):
                if i == 5:
                    raise ScoreFileError("scores.csv line 97, column 'proxy': 'abc' is not a number")
                state["read"] += 1
                yield batch
        finally:
            state["closed"] = True

    with pytest.raises(ScoreFileError, match="line 97"):
        curves_from_batches(failing)
    assert state["read"] == 5 and state["closed"]


@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_ragged_prompts_are_reported_in_info_and_warned_either_way(rng, order, caplog):
    """30 prompts, 4 of them with 11 samples and the rest 8: best-of-11 averages 4 prompts."""
    rows = table(rng, 30, [11] * 4 + [8] * 26, steps=(0, 5))
    n_rows = sum(len(r[3]) for r in rows)
    shuffle = rng.permutation(n_rows) if order == "shuffled" else None
    with caplog.at_level("WARNING", logger="bon_tracker"):
        curves, info = curves_from_batches(batches_of(rows, 50, with_run=False, order=shuffle))
    assert info["grouped"] is (order == "grouped")
    check(curves, rows)
    assert info["min_samples"] == {(None, 0): 8, (None, 5): 8}
    assert curves[None][0].N == 11 and curves[None][0].n_prompts.tolist() == [30, 30, 30, 30, 4]
    (message,) = info["warnings"]
    assert message.startswith("step 0 (and 1 more step): prompts have 8 to 11 samples, so best-of-11 averages only")
    assert "the 4 of 30 prompts with that many; n ≤ 8 averages all 30" in message
    assert [r.getMessage() for r in caplog.records if "best-of-11" in r.getMessage()] == [f"bon_tracker: {message}"]


def test_n_1_and_one_prompt_are_warned_with_an_example_id(rng):
    single = table(rng, 12, 1)
    _, info = curves_from_batches(batches_of(single, 5, with_run=False))
    (message,) = info["warnings"]
    assert "every prompt has one sample (N = 1; 12 prompts, e.g. 0)" in message
    assert "no best-of-n curve beyond n = 1" in message
    one = table(rng, 1, 16, runs=("r",))
    _, info = curves_from_batches(batches_of(one, 5, with_run=True))
    assert info["warnings"] == [
        "step 0 of run 'r': all 16 samples are one prompt (0): the curve averages over nothing and has no standard "
        "errors. If the data holds several prompts, name the column that tells them apart"
    ]
    _, info = curves_from_batches(batches_of(table(rng, 6, 8), 7, with_run=False))
    assert info["warnings"] == []


@pytest.mark.parametrize(("grouped", "ragged"), [(True, False), (True, True), (False, True)])
def test_chunks_reduced_on_the_reducers_thread_are_merged_in_order_to_the_bit(rng, grouped, ragged, monkeypatch):
    """The pass hands full chunks to a worker thread and merges them in the order it handed them
    over: curves, counts and every prompt's estimates are those of reducing each chunk in turn on
    the pass's own thread (the reducer switched off), bit for bit, with steps peeked at midway."""
    from bon_tracker.analysis import grouping

    rows = table(rng, 90, rng.integers(3, 40, size=90) if ragged else 24, steps=(0, 10, 20))
    order = None if grouped else rng.permutation(sum(len(r[3]) for r in rows))
    threads = []
    real_submit = grouping._ChunkReducer.submit

    def counted(fn):
        def run(*args):
            threads.append(threading.current_thread().name)
            return fn(*args)

        return run

    def handed_over(self, fn, *args):
        return real_submit(self, counted(fn), *args)

    real_init = grouping._SizedAccumulator.__init__

    def without_reducer(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.reducer = None  # each chunk reduced and merged at once, on the pass's thread

    def one_pass(reducer: bool):
        accumulators: dict = {}
        with monkeypatch.context() as patch:
            patch.setattr(grouping._ChunkReducer, "submit", handed_over)
            if not reducer:
                patch.setattr(grouping._SizedAccumulator, "__init__", without_reducer)
            curves, info = curves_from_batches(
                batches_of(rows, 37, with_run=False, order=order),
                chunk_samples=64,
                accumulators=accumulators if grouped else None,
            )
        kept = {key: acc.estimates_on(curves[None][key[1]].n) for key, acc in accumulators.items()}
        return curves, info, kept

    with_reducer = one_pass(True)
    assert len(threads) > 20 and {name.startswith("bon_tracker_curves") for name in threads} == {True}
    threads.clear()
    alone = one_pass(False)
    assert threads == []
    for step, curve in alone[0][None].items():
        got = with_reducer[0][None][step]
        for field in (*FIELDS, "kl_bound", "n"):
            np.testing.assert_array_equal(getattr(got, field), getattr(curve, field), err_msg=f"{step} {field}")
    assert with_reducer[1] == alone[1]
    assert len(alone[2]) == (3 if grouped else 0) and with_reducer[2].keys() == alone[2].keys()
    for key, estimates in alone[2].items():
        if ragged:  # prompts on different grids: analyze computes their estimates again
            assert estimates is None and with_reducer[2][key] is None
            continue
        np.testing.assert_array_equal(with_reducer[2][key][0], estimates[0])
        np.testing.assert_array_equal(with_reducer[2][key][1], estimates[1])
    check(with_reducer[0], rows)
