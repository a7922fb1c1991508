"""Ray: the tracker inside an actor, and ``analyze --engine ray`` equal to the single-process numbers,
on both of its paths: grouped input reduced where it lies ("blocks"), scattered input shuffled.

One small local cluster (2 CPUs, no dashboard) for every test of the module, shut down at its end.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.analysis.grouping import curves_from_batches
from bon_tracker.analysis.ray_engine import _key_hashes, prompt_estimates, ray_curves
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


def score_rows(rng: np.random.Generator, order: str = "shuffled") -> list[dict]:
    """Two runs x three steps; ragged prompts (N from 3 to 16), ties (a discrete proxy) in run b;
    rows in random order (``"shuffled"``) or prompt by prompt (``"grouped"``)."""
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
    if order == "grouped":
        return rows
    shuffled = rng.permutation(len(rows))  # ungrouped input: the single-process reader's harder path
    return [rows[i] for i in shuffled]


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


def write_parts(rows: list[dict], folder: Path, suffix: str, cuts: list[int]) -> list[Path]:
    """The rows cut into files at the row numbers ``cuts`` (inside prompts, where they fall)."""
    folder.mkdir(exist_ok=True)
    bounds = [0, *cuts, len(rows)]
    return [write(rows[a:b], folder / f"part-{i}{suffix}") for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def single_process(paths: list[Path], columns: Columns | None = None, **options):
    def batches():
        for path in paths:
            yield from read_score_batches(path, columns, batch_rows=50, **options)

    return batches


def estimates_in_input_order(rows: list[dict], run: str, step: int, grid: np.ndarray) -> tuple:
    """Brute force: each prompt's estimates (prompt_estimates on that prompt alone), prompts in input order."""
    prompts: dict[str, list[dict]] = {}
    for r in rows:
        if r["run"] == run and r["step"] == step:
            prompts.setdefault(r["prompt_id"], []).append(r)
    true, proxy = [], []
    for samples in prompts.values():
        t, p = prompt_estimates(
            [np.array([s["proxy"] for s in samples])], [np.array([s["true"] for s in samples])], grid
        )
        true.append(t[0])
        proxy.append(p[0])
    return np.array(true), np.array(proxy)


@pytest.mark.parametrize(
    "suffix, order",
    [(".parquet", "grouped"), (".jsonl", "grouped"), (".parquet", "shuffled"), (".jsonl", "shuffled")],
)
def test_ray_curves_equal_the_single_process_result(cluster, tmp_path, rng, suffix, order, caplog):
    """Three files cut inside prompts, read 7 rows at a time: prompts cut at every kind of seam."""
    caplog.set_level(logging.INFO, logger="bon_tracker")
    rows = score_rows(rng, order)
    paths = write_parts(rows, tmp_path / "parts", suffix, [len(rows) // 3 + 5, 2 * len(rows) // 3 + 2])
    expected, info = curves_from_batches(single_process(paths))
    got, ray_info = ray_curves(paths, statistics=True, batch_rows=7)
    assert_same(got, expected)
    assert ray_info["prompts"] == info["prompts"] and ray_info["samples"] == info["samples"]
    assert ray_info["path"] == ("blocks" if order == "grouped" else "shuffle")
    assert ray_info["grouped"] is (order == "grouped") is info["grouped"]
    said = "the 3 files were reduced where they lie" if order == "grouped" else "grouped by a Ray Data shuffle"
    assert said in caplog.text
    assert any(curve.has_ties for curve in got["b"].values())  # the discrete proxy's exact KL took part
    if order == "grouped":  # prompts in input order, as the single-process engine has them
        for (run, step), (true_pp, proxy_pp) in ray_info["estimates"].items():
            true_bf, proxy_bf = estimates_in_input_order(rows, run, step, got[run][step].n)
            np.testing.assert_allclose(true_pp, true_bf, rtol=0, atol=1e-12)
            np.testing.assert_allclose(proxy_pp, proxy_bf, rtol=0, atol=1e-12)


def test_ray_curves_see_a_prompt_that_comes_back_in_another_file(cluster, tmp_path, rng):
    """Each file grouped by itself, but prompt p0 of step 0 is in the first and in the last file,
    with other prompts between: only the keys of all files together show it (the shuffle path)."""
    rows = [r for r in score_rows(rng, "grouped") if r["run"] == "a"]
    p0 = [r for r in rows if r["step"] == 0 and r["prompt_id"] == "p0"]
    rest = [r for r in rows if not (r["step"] == 0 and r["prompt_id"] == "p0")]
    paths = [
        write(p0[:2] + rest[:40], tmp_path / "first.parquet"),
        write(rest[40:], tmp_path / "middle.parquet"),
        write(p0[2:], tmp_path / "last.parquet"),
    ]
    expected, info = curves_from_batches(single_process(paths))
    got, ray_info = ray_curves(paths)
    assert ray_info["path"] == "shuffle" and ray_info["grouped"] is False is info["grouped"]
    assert_same(got, expected)


def test_key_hashes_tell_keys_apart():
    """The 64-bit keys behind the grouped check: (step s, prompt p) and (step p, prompt s) differ; an
    integer id hashes alike from an integer column and from Python ints; runs take part."""
    steps, prompts = (a.ravel() for a in np.meshgrid(np.arange(300), np.arange(300)))
    hashes = _key_hashes(None, steps, prompts)
    assert len(np.unique(hashes)) == len(hashes) == 90_000
    as_objects = np.empty(3, dtype=object)
    as_objects[:] = [5, 6, "5"]
    from_objects = _key_hashes(None, np.zeros(3, dtype=np.int64), as_objects)
    from_ints = _key_hashes(None, np.zeros(2, dtype=np.int64), np.array([5, 6]))
    assert from_objects[:2].tolist() == from_ints.tolist() and from_objects[2] != from_objects[0]
    runs = np.array(["a", "b"], dtype=object)
    assert len(set(_key_hashes(runs, np.zeros(2, dtype=np.int64), np.array([5, 5])).tolist())) == 2


def test_ray_curves_read_verls_dumps_as_the_single_process_engine(cluster, tmp_path, rng):
    """verl's {step}.jsonl dumps (uid = prompt_session_output; a session of two outputs counts once, its
    last): the per-file path, through verl's reader, gives the single-process curves."""
    from bon_tracker.analysis import verl_dumps

    folder = tmp_path / "dumps"
    folder.mkdir()
    for step in (0, 20):
        lines = []
        for prompt in range(6):
            for session in range(8):
                proxy, true = float(rng.normal()), float(rng.normal())
                outputs = 2 if session == 0 else 1  # a multi-output session: both rows carry its final score
                for output in range(outputs):
                    uid = f"u{prompt:02d}-{step}_{session}_{output}"
                    lines.append(
                        {"input": f"q{prompt}", "output": "a", "score": proxy, "gold": true, "step": step, "uid": uid}
                    )
        (folder / f"{step}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    files = verl_dumps.dump_files([folder])
    columns = verl_dumps.dump_columns(files[0], "gold")

    def batches():
        for path in files:
            yield from verl_dumps.read_dump_batches(path, columns, batch_rows=5)

    expected, info = curves_from_batches(batches)
    got, ray_info = ray_curves(files, columns, preset="verl", batch_rows=5)
    assert ray_info["path"] == "blocks" and ray_info["samples"] == info["samples"]
    assert set(ray_info["samples"].values()) == {6 * 8}  # one sample per session
    assert_same(got, expected)


@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_ray_curves_grid_and_nan_omit(cluster, tmp_path, rng, order):
    rows = [r for r in score_rows(rng, order) if r["run"] == "a"]
    rows[0]["true"] = None  # a missing score, dropped with nan_policy="omit"
    path = write(rows, tmp_path / "scores.parquet")
    columns = Columns(run="no-such-column")
    expected, _ = curves_from_batches(lambda: read_score_batches(path, columns, nan_policy="omit"), ns=[1, 2, 4, 8, 12])
    got, info = ray_curves([path], columns, ns=[1, 2, 4, 8, 12], nan_policy="omit")
    assert_same(got, expected)
    assert sum(info["omitted"].values()) == 1 and info["rows"] == len(rows)
    assert info["path"] == ("blocks" if order == "grouped" else "shuffle")
    with pytest.raises(ValueError, match="--nan-policy omit"):
        ray_curves([path], columns)


def test_analyze_engine_ray_cli(cluster, tmp_path, rng, capsys):
    """Grouped rows: the blocks path, whose prompts are in input order, so the intervals are the stream's too."""
    path = write(score_rows(rng, "grouped"), tmp_path / "scores.parquet")
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
            assert (a.interval is None) == (b.interval is None)
            if a.interval is not None:
                np.testing.assert_allclose(a.interval.kl_high, b.interval.kl_high, rtol=1e-12)


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


def _peaked_dumps(folder: Path, prompts: int = 400, shuffled: bool = False) -> Path:
    """A simulated run whose best-of-16 true reward falls at step 200 while its proxy rises, and whose
    headroom is gone by step 300 (tests/test_cli_user_reports.py), one Parquet file per eval, its rows
    prompt by prompt (or in random order: ``shuffled``)."""
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
        if shuffled:
            rows = [rows[j] for j in sim.permutation(len(rows))]
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
    """``-q``: no progress bar, no progress or INFO line of Ray's or Ray Data's (the command itself, in a
    process of its own, connected to this module's cluster; scattered rows, so that Ray Data shuffles them);
    without it Ray says what it does (grouped rows: no Ray Data, the shorter run), and ``-v`` which path
    the engine took."""
    _peaked_dumps(tmp_path / "dumps", prompts=20)
    _peaked_dumps(tmp_path / "scattered", prompts=20, shuffled=True)
    # This module's cluster, and its shuffle (see the fixture) for the command's Ray Data.
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY": "sort_shuffle_pull_based"}

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bon_tracker.cli", *args]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done

    loud = run("-v", "analyze", "--engine", "ray", "dumps/*.parquet", "--out", "loud")
    assert "INFO" in loud.stderr and "Ray cluster" in loud.stderr  # Ray's own lines: where it connects
    assert "the 6 files were reduced where they lie (one Ray task per file, no shuffle)" in loud.stderr
    quiet = run("analyze", "--engine", "ray", "scattered/*.parquet", "--out", "quiet", "-q")
    ray_lines = [line for line in quiet.stderr.splitlines() if "Dataset" in line or "INFO" in line]
    assert ray_lines == [] and "\r" not in quiet.stderr, quiet.stderr
    assert "run folder: quiet/0 (report: quiet/0/report.html)" in quiet.stdout
