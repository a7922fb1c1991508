"""Ray: the tracker inside an actor, and ``analyze --engine ray`` equal to the single-process numbers.

One small local cluster (2 CPUs, no dashboard) for the module, shut down at its end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.analysis.grouping import curves_from_batches
from bon_tracker.analysis.ray_engine import ray_curves
from bon_tracker.analysis.score_files import Columns, read_score_batches
from bon_tracker.backends.local import read_records
from bon_tracker.cli import main
from bon_tracker.core import bon_curve
from bon_tracker.record import EvalRecord

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FIELDS = ("n", "n_prompts", "true_mean", "true_se", "proxy_mean", "proxy_se", "kl", "kl_bound")


@pytest.fixture(scope="module")
def cluster():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Sort-based shuffle: the same groups as the default hash shuffle, without its aggregator actors,
    # which cost most of the time on a 2-CPU test cluster. The results do not depend on it.
    context.shuffle_strategy = "sort_shuffle_pull_based"
    yield
    ray.shutdown()


def score_rows(rng: np.random.Generator) -> list[dict]:
    """Two runs x three steps; ragged prompts (N from 3 to 16), ties (a discrete proxy) in run b."""
    rows = []
    for run in ("a", "b"):
        for step in (0, 10, 20):
            for prompt in range(12):
                N = int(rng.integers(3, 17))
                true = rng.normal(size=N) + 0.01 * step
                proxy = np.round(true + rng.standard_t(2, size=N), 0 if run == "b" else 6)
                rows += [
                    {"run": run, "step": step, "prompt_id": f"p{prompt}", "proxy": float(p), "true": float(t)}
                    for p, t in zip(proxy, true)
                ]
    order = rng.permutation(len(rows))  # ungrouped input: the single-process reader's harder path
    return [rows[i] for i in order]


def write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=500)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def assert_same(got, expected) -> None:
    assert got.keys() == expected.keys()
    for run in expected:
        assert got[run].keys() == expected[run].keys()
        for step, curve in expected[run].items():
            for field in FIELDS:
                np.testing.assert_allclose(
                    getattr(got[run][step], field), getattr(curve, field), rtol=0, atol=1e-12, err_msg=field
                )
            assert got[run][step].has_ties == curve.has_ties and got[run][step].N == curve.N
            fit_got, fit_expected = EvalRecord.build(step, got[run][step]), EvalRecord.build(step, curve)
            assert (fit_got.goodhart is None) == (fit_expected.goodhart is None)
            if fit_expected.goodhart is not None:
                np.testing.assert_allclose(fit_got.goodhart.kl, fit_expected.goodhart.kl, rtol=1e-10)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_ray_curves_equal_the_single_process_result(cluster, tmp_path, rng, suffix):
    path = write(score_rows(rng), tmp_path / f"scores{suffix}")
    expected, info = curves_from_batches(lambda: read_score_batches(path))
    got, ray_info = ray_curves([path])
    assert_same(got, expected)
    assert ray_info["prompts"] == info["prompts"] and ray_info["samples"] == info["samples"]
    assert any(curve.has_ties for curve in got["b"].values())  # the discrete proxy's exact KL took part


def test_ray_curves_grid_and_nan_omit(cluster, tmp_path, rng):
    rows = [r for r in score_rows(rng) if r["run"] == "a"]
    rows[0]["true"] = None  # a missing score, dropped with nan_policy="omit"
    path = write(rows, tmp_path / "scores.parquet")
    columns = Columns(run="no-such-column")
    expected, _ = curves_from_batches(lambda: read_score_batches(path, columns, nan_policy="omit"), ns=[1, 2, 4, 8, 12])
    got, info = ray_curves([path], columns, ns=[1, 2, 4, 8, 12], nan_policy="omit")
    assert_same(got, expected)
    assert sum(info["omitted"].values()) == 1
    with pytest.raises(ValueError, match="non-finite"):
        ray_curves([path], columns)


def test_analyze_engine_ray_cli(cluster, tmp_path, rng, capsys):
    path = write(score_rows(rng), tmp_path / "scores.parquet")
    assert main(["analyze", str(path), "--out", str(tmp_path / "stream"), "--json", "--quiet"]) == 0
    stream = json.loads(capsys.readouterr().out)
    assert main(["analyze", str(path), "--engine", "ray", "--out", str(tmp_path / "ray"), "--json", "--quiet"]) == 0
    with_ray = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in stream["runs"]}
    assert sorted(r["name"] for r in with_ray["runs"]) == sorted(by_name) == ["a", "b"]
    for run_ray in with_ray["runs"]:
        run_stream = by_name[run_ray["name"]]
        records_ray, records_stream = read_records(run_ray["run_dir"]), read_records(run_stream["run_dir"])
        assert [r.step for r in records_ray] == [r.step for r in records_stream] == [0, 10, 20]
        for a, b in zip(records_ray, records_stream):
            np.testing.assert_allclose(a.curve.true_se, b.curve.true_se, rtol=0, atol=1e-12)


@ray.remote
class TrainerActor:
    """Stands in for verl's TaskRunner: an actor that owns the tracker."""

    def run(self, root: str, proxy: np.ndarray, true: np.ndarray) -> str:
        from bon_tracker import BonTracker

        tracker = BonTracker("local", root=root, run_name="in-actor")
        for step in (1, 2):
            tracker.log_scores(step, proxy + step, true)
        tracker.finish()
        return str(next(Path(root).iterdir()))


def test_tracker_inside_a_ray_actor(cluster, tmp_path, goodhart_scores):
    proxy, true = goodhart_scores
    actor = TrainerActor.remote()
    run_dir = ray.get(actor.run.remote(str(tmp_path / "runs"), proxy, true), timeout=120)
    records = read_records(run_dir)
    assert [r.step for r in records] == [1, 2]
    for record in records:
        expected = bon_curve(proxy + record.step, true)
        np.testing.assert_allclose(record.curve.true_mean, expected.true_mean, atol=1e-12)
        np.testing.assert_allclose(record.curve.proxy_se, expected.proxy_se, atol=1e-12)
    ray.kill(actor)
