"""Ray: the tracker inside an actor, and ``analyze --engine ray`` equal to the single-process numbers.

One small local cluster (2 CPUs, no dashboard) for the module, shut down at its end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def _peaked_dumps(folder: Path, prompts: int = 400) -> Path:
    """A simulated run whose best-of-16 true reward falls at step 200 while its proxy rises, and whose
    headroom is gone by step 300 (tests/test_cli_user_reports.py), one Parquet file per eval."""
    from bon_tracker.core.simulation import SimulationModel

    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    sim = np.random.default_rng(3)
    ids = model.draw_prompts(prompts, sim)
    folder.mkdir()
    for i, lam in enumerate((0.0, 0.4, 0.8, 1.2, 1.6, 2.0)):
        proxy, true = model.sample(ids, 16, lam, sim)
        rows = [
            {"step": 100 * i, "prompt_id": f"p{p:04d}", "proxy": float(a), "true": float(b)}
            for p in range(proxy.shape[0])
            for a, b in zip(proxy[p], true[p])
        ]
        write(rows, folder / f"{i}.parquet")
    return folder


def test_analyze_engine_ray_raises_the_alerts_of_the_stream_engine(cluster, tmp_path, capsys):
    """The README's command, quoted glob and relative paths included: the same alerts at the same steps
    as the single-process engine (prompt ids in id order = file order here, so the same intervals too)."""
    _peaked_dumps(tmp_path / "dumps")
    args = ["analyze", "dumps/*.parquet", "--json", "-q"]
    assert main([*args, "--engine", "ray", "--out", "ray"]) == 0
    with_ray = json.loads(capsys.readouterr().out)
    assert main([*args, "--out", "stream"]) == 0
    stream = json.loads(capsys.readouterr().out)
    (run_ray,), (run_stream,) = with_ray["runs"], stream["runs"]
    onsets = [(a["step"], a["rule"]) for a in run_ray["alerts"]]
    assert (
        onsets
        == [(a["step"], a["rule"]) for a in run_stream["alerts"]]
        == [
            (200, "bon_true_falls"),
            (300, "headroom_shrinks"),
        ]
    )
    for a, b in zip(read_records(run_ray["run_dir"]), read_records(run_stream["run_dir"])):
        np.testing.assert_allclose(a.interval.kl_high, b.interval.kl_high, rtol=1e-9)
        np.testing.assert_allclose(a.agreement.mean, b.agreement.mean, rtol=1e-9)
        assert len(a.predictions) == len(b.predictions)


def test_analyze_engine_ray_quiet_prints_no_line_of_rays(cluster, tmp_path):
    """``-q``: no progress bar, no progress or INFO line of Ray's (the command itself, in a process of its own,
    connected to this module's cluster); without it Ray says what it runs."""
    _peaked_dumps(tmp_path / "dumps", prompts=20)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "bon_tracker.cli", "analyze", "--engine", "ray", "dumps/*.parquet"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*command, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    loud = run("--out", "loud")
    assert "Dataset" in loud.stderr  # Ray Data's own lines (what it executes, its progress)
    quiet = run("--out", "quiet", "-q")
    ray_lines = [line for line in quiet.stderr.splitlines() if "Dataset" in line or "INFO" in line]
    assert ray_lines == [] and "\r" not in quiet.stderr, quiet.stderr
    assert "run folder: quiet/0 (report: quiet/0/report.html)" in quiet.stdout
