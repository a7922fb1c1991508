"""The ``bon-tracker`` command end to end: real files, real run folders, real MLflow (sqlite)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from bon_tracker import bon_curve
from bon_tracker.backends.local import read_records
from bon_tracker.cli.main import EXIT_OK, EXIT_PENDING, EXIT_USAGE, main
from bon_tracker.core import bon_estimate, goodhart_interval, predict_curve
from bon_tracker.record import EvalRecord
from bon_tracker.reports.compare import resolve_run
from bon_tracker.tracking.alerting import resamples_for
from bon_tracker.tracking.tracker import BonTracker
from bon_tracker.tracking.wal import WriteAheadLog, wal_files

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("matplotlib")

CURVE_FIELDS = ("n", "kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- data and helpers -----------------------------------------------------------------------------------


def make_rows(rng: np.random.Generator, steps=(0, 10), prompts: int = 12, samples: int = 16) -> list[dict]:
    """Rows grouped by step and prompt; every third prompt has fewer samples (ragged);
    the proxy error grows with the step so the curves bend."""
    rows = []
    for step in steps:
        for p in range(prompts):
            n = samples if p % 3 else samples // 2 + p % 4
            true = rng.normal(size=n)
            proxy = true + (1 + step / 10) * rng.standard_t(df=2, size=n)
            rows += [
                {"prompt_id": f"q{p}", "proxy": float(a), "true": float(b), "step": step} for a, b in zip(proxy, true)
            ]
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
        return path
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        if name.endswith(".csv"):
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        else:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def reference(rows: list[dict], nan_policy: str = "raise", ns=None, run: str | None = None) -> dict[int, EvalRecord]:
    """The expected record per step: bon_curve on the rows grouped in memory."""
    groups: dict[int, dict[str, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for row in rows:
        if run is not None and row.get("run") != run:
            continue
        proxy, true = groups[row.get("step", 0)][row["prompt_id"]]
        proxy.append(row["proxy"])
        true.append(row["true"])
    out = {}
    for step, prompts in groups.items():
        proxy = [np.array(p, dtype=float) for p, _ in prompts.values()]
        true = [np.array(t, dtype=float) for _, t in prompts.values()]
        out[step] = EvalRecord.build(step, bon_curve(proxy, true, ns=ns, nan_policy=nan_policy))
    return out


def assert_same_records(got: list[EvalRecord], expected: dict[int, EvalRecord]) -> None:
    assert [r.step for r in got] == sorted(expected)
    for record in got:
        want = expected[record.step]
        for name in CURVE_FIELDS:
            np.testing.assert_allclose(
                getattr(record.curve, name),
                getattr(want.curve, name),
                rtol=1e-10,
                atol=1e-12,
                err_msg=f"step {record.step}: {name}",
            )
        assert (record.curve.N, record.curve.has_ties) == (want.curve.N, want.curve.has_ties)
        assert (record.goodhart is None) == (want.goodhart is None)
        if want.goodhart is not None:
            assert math.isclose(record.goodhart.n, want.goodhart.n, rel_tol=1e-7)
            assert math.isclose(record.goodhart.kl, want.goodhart.kl, rel_tol=1e-7)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def analyze_json(capsys, *args) -> dict:
    code, out, err = cli(capsys, "analyze", *args, "--json", "--quiet")
    assert code == EXIT_OK, err
    return json.loads(out)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


@pytest.fixture(autouse=True)
def _isolated(cli_folder):
    """Each test in its own working folder: no bon_tracker.yaml, runs or spool from elsewhere."""


# ---- analyze: results --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scores.jsonl", "scores.csv", "scores.parquet", "scores.csv.gz"])
def test_analyze_equals_bon_curve_on_the_same_data(tmp_path, capsys, rng, name):
    rows = make_rows(rng)
    path = write_rows(tmp_path / name, rows)
    summary = analyze_json(capsys, path, "--out", tmp_path / "out", "--batch-rows", 7)
    assert summary["rows"] == len(rows) and summary["grouped"] is True
    (run,) = summary["runs"]
    assert run["name"] == "scores"
    assert [s["step"] for s in run["steps"]] == [0, 10]
    assert all(s["prompts"] == 12 for s in run["steps"])
    assert_same_records(read_records(run["run_dir"]), reference(rows))
    run_dir = Path(run["run_dir"])
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "Goodhart" in html
    for chart in ("overlay.png", "trend.png", "curve_step_000000010.png"):
        assert_png(run_dir / "charts" / chart)


def test_analyze_rows_in_any_order(tmp_path, capsys, rng):
    rows = make_rows(rng)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    path = write_rows(tmp_path / "shuffled.jsonl", shuffled)
    summary = analyze_json(capsys, path, "--out", tmp_path / "out", "--batch-rows", 16)
    assert summary["grouped"] is False  # detected, and read again with per-step buffers
    assert_same_records(read_records(summary["runs"][0]["run_dir"]), reference(rows))


def _live_reader_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("bon_tracker_reader", "bon_tracker_statistics"))
    ]


@pytest.mark.parametrize("order", ["grouped", "shuffled"])
def test_analyze_statistics_are_the_same_on_any_number_of_threads(tmp_path, capsys, monkeypatch, rng, order):
    """With two threads each step's interval and predictions run on worker threads while a reader
    thread reads ahead (and the steps share their bootstrap draws): the records are those of one
    thread to the bit, the statistics those of the interval and predictions on the step's estimates
    computed in memory, and no thread outlives the command (also when the first pass stops early)."""
    rows = make_rows(rng, steps=(0, 10, 20), prompts=40, samples=16)
    if order == "shuffled":
        rows = [rows[i] for i in rng.permutation(len(rows))]
    path = write_rows(tmp_path / "scores.parquet", rows)
    records = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("BON_TRACKER_THREADS", threads)
        summary = analyze_json(capsys, path, "--out", tmp_path / threads, "--batch-rows", 64)
        assert summary["grouped"] is (order == "grouped")
        records[threads] = read_records(summary["runs"][0]["run_dir"])
        assert _live_reader_threads() == []
    assert [r.step for r in records["2"]] == [0, 10, 20]
    for one, two in zip(records["1"], records["2"]):
        assert one.interval is not None and one.interval.to_dict() == two.interval.to_dict()
        assert one.predictions == two.predictions and one.predictions
    for record in records["2"]:  # prompts in the order they first appear, as the statistics pass takes them
        prompts: dict[str, tuple[list, list]] = {}
        for row in rows:
            if row["step"] == record.step:
                proxy, true = prompts.setdefault(row["prompt_id"], ([], []))
                proxy.append(row["proxy"])
                true.append(row["true"])
        proxy_rows = [np.array(p) for p, _ in prompts.values()]
        true_rows = [np.array(t) for _, t in prompts.values()]
        ns, B = record.curve.n, resamples_for(len(prompts))
        true_pp, proxy_pp = bon_estimate(proxy_rows, true_rows, ns), bon_estimate(proxy_rows, proxy_rows, ns)
        want = goodhart_interval(true_pp, ns, kl=record.curve.kl, n_resamples=B).to_dict()
        got = record.interval.to_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-9, abs=1e-12)), key
        predicted = predict_curve(true_pp, proxy_pp, ns, [r["n"] for r in record.predictions], n_resamples=B).rows()
        for got_row, want_row in zip(record.predictions, predicted):
            assert got_row == pytest.approx(want_row, rel=1e-9, abs=1e-12)


def test_a_read_error_after_batches_read_ahead_is_raised_naming_its_row(tmp_path, capsys, monkeypatch):
    """The reader thread's error comes out where the rows before it end, as on one thread."""
    proxy = [str(0.1 * i) for i in range(40)]
    proxy[29] = "abc"
    table = pa.table({"prompt_id": [f"q{i // 4}" for i in range(40)], "proxy": proxy, "true": [0.0] * 40})
    pq.write_table(table, tmp_path / "scores.parquet", row_group_size=4)
    for threads in ("1", "2"):
        monkeypatch.setenv("BON_TRACKER_THREADS", threads)
        code, _, err = cli(capsys, "analyze", tmp_path / "scores.parquet", "-q", "--batch-rows", 3)
        assert code == EXIT_USAGE
        assert "scores.parquet row 30, column 'proxy': 'abc' is not a number" in err
        assert _live_reader_threads() == []


def test_analyze_without_step_column_is_one_step_zero(tmp_path, capsys, rng):
    rows = [{k: v for k, v in row.items() if k != "step"} for row in make_rows(rng, steps=(5,))]
    path = write_rows(tmp_path / "nostep.csv", rows)
    summary = analyze_json(capsys, path, "--out", tmp_path / "out")
    assert_same_records(read_records(summary["runs"][0]["run_dir"]), reference(rows))


def test_analyze_run_column_gives_one_run_each(tmp_path, capsys, rng):
    rows = [{**row, "run": "ppo"} for row in make_rows(rng, steps=(0, 10))]
    rows += [{**row, "run": "bon"} for row in make_rows(rng, steps=(0,))]
    path = write_rows(tmp_path / "runs.parquet", rows)
    summary = analyze_json(capsys, path, "--out", tmp_path / "out", "--run-name", "exp")
    assert [r["name"] for r in summary["runs"]] == ["exp-ppo", "exp-bon"]
    for entry, run in zip(summary["runs"], ("ppo", "bon")):
        assert_same_records(read_records(entry["run_dir"]), reference(rows, run=run))


def test_analyze_custom_columns_grid_and_omitted_nan(tmp_path, capsys, rng):
    rows = make_rows(rng, steps=(3,))
    rows[4]["proxy"] = float("nan")
    rows[30]["true"] = None
    renamed = [
        {"question": r["prompt_id"], "rm": r["proxy"], "gold": r["true"], "global_step": r["step"]} for r in rows
    ]
    path = write_rows(tmp_path / "renamed.jsonl", renamed)
    summary = analyze_json(
        capsys,
        path,
        "--out",
        tmp_path / "out",
        "--prompt-col",
        "question",
        "--proxy-col",
        "rm",
        "--true-col",
        "gold",
        "--step-col",
        "global_step",
        "--ns",
        "1,2,4,8",
        "--nan-policy",
        "omit",
        "--key-prefix",
        "cli",
    )
    assert summary["omitted"] == 2
    (record,) = read_records(summary["runs"][0]["run_dir"])
    assert record.key_prefix == "cli" and record.curve.n.tolist() == [1, 2, 4, 8]
    clean = [{**r, "true": float("nan") if r["true"] is None else r["true"]} for r in rows]
    assert_same_records([record], reference(clean, nan_policy="omit", ns=[1, 2, 4, 8]))


def test_analyze_several_files_are_one_table(tmp_path, capsys, rng):
    rows = make_rows(rng)
    half = len(rows) // 2 + 3  # splits a prompt across the two files
    first = write_rows(tmp_path / "a.jsonl", rows[:half])
    second = write_rows(tmp_path / "b.csv", rows[half:])
    summary = analyze_json(capsys, first, second, "--out", tmp_path / "out")
    assert summary["grouped"] is True
    assert_same_records(read_records(summary["runs"][0]["run_dir"]), reference(rows))


def test_analyze_uses_the_config_file(tmp_path, capsys, rng):
    (tmp_path / "bon_tracker.yaml").write_text(
        textwrap.dedent(f"""
        ns: [1, 4]
        key_prefix: cfg
        true_name: gold RM
        local:
          root: {tmp_path / "cfg_runs"}
    """),
        encoding="utf-8",
    )
    path = write_rows(tmp_path / "s.csv", make_rows(rng, steps=(0,)))
    summary = analyze_json(capsys, path)
    run_dir = Path(summary["runs"][0]["run_dir"])
    assert run_dir.parent == tmp_path / "cfg_runs"
    (record,) = read_records(run_dir)
    assert record.curve.n.tolist() == [1, 4] and record.key_prefix == "cfg"
    summary = analyze_json(capsys, path, "--ns", "1,2,16", "--out", tmp_path / "explicit")  # options win
    assert read_records(summary["runs"][0]["run_dir"])[0].curve.n.tolist() == [1, 2, 16]


def test_analyze_text_summary(tmp_path, capsys, rng):
    rows = make_rows(rng)
    path = write_rows(tmp_path / "s.jsonl", rows)
    code, out, _ = cli(capsys, "analyze", path, "--out", tmp_path / "out", "-q")
    assert code == EXIT_OK
    assert f"read {len(rows)} samples from 1 file" in out and "run 's': 2 eval steps" in out
    assert "step 10: 12 prompts, N=16" in out and "report: " in out


# ---- analyze: bad input -------------------------------------------------------------------------------------


def _csv(tmp_path: Path, lines: list[str], name: str = "scores.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_CSV = ["prompt_id,proxy,true,step"] + [f"q{i // 4},{i * 0.1},{i % 3},0" for i in range(15)]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([*GOOD_CSV, "q9,abc,1.0,0"], "scores.csv line 17, column 'proxy': 'abc' is not a number"),
        ([*GOOD_CSV[:5], "q9,0.5,,0"], "scores.csv line 6, column 'true': missing or NaN"),
        ([*GOOD_CSV[:3], "q9,0.5,nan,0"], "scores.csv line 4, column 'true': missing or NaN"),
        ([*GOOD_CSV[:3], "q9,0.5,inf,0"], "scores.csv line 4, column 'true': inf is not finite"),
        ([*GOOD_CSV[:8], "q9,0.5,1.0,1.5"], "scores.csv line 9, column 'step': '1.5' is not an integer step"),
        ([*GOOD_CSV[:8], "q9,0.5,1.0"], "scores.csv line 9: expected 4 fields (as in the header), got 3"),
        ([*GOOD_CSV[:2], ",0.5,1.0,0"], "scores.csv line 3, column 'prompt_id': empty prompt id"),
        (
            ["prompt,proxy,true", *GOOD_CSV[1:3]],
            "scores.csv: no column 'prompt_id' (the columns are 'prompt', 'proxy', 'true'); name the right one with "
            "--prompt-col",
        ),
        ([""], "scores.csv: empty file"),
    ],
)
def test_malformed_csv(tmp_path, capsys, lines, message):
    code, out, err = cli(capsys, "analyze", _csv(tmp_path, lines), "-q")
    assert code == EXIT_USAGE
    assert err.startswith("bon-tracker analyze: error: ")
    assert message in err, err
    assert out == ""


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt_id": "a", "proxy": 1, "true": 0}', '{"prompt_id": "a", "proxy": 1, "true": 0'],
            "scores.jsonl line 2: not valid JSON",
        ),
        (
            ['{"prompt_id": "a", "proxy": 1, "true": 0}', "", '{"prompt_id": "a", "proxy": "abc", "true": 0}'],
            "scores.jsonl line 3, column 'proxy': 'abc' is not a number",
        ),
        (
            ['{"prompt_id": "a", "proxy": 1, "true": 0}'] * 3 + ['{"prompt_id": "a", "proxy": 1}'],
            "scores.jsonl line 4, column 'true': missing",
        ),
        (['{"prompt_id": "a", "proxy": 1, "true": null}'], "scores.jsonl line 1, column 'true': missing or NaN"),
        (['{"prompt_id": null, "proxy": 1, "true": 1}'], "scores.jsonl line 1, column 'prompt_id': null is not a"),
        (
            ['{"prompt_id": "a", "proxy": 1, "true": 1, "step": "late"}'],
            "scores.jsonl line 1, column 'step': 'late' is not an integer step",
        ),
        (["[1, 2, 3]"], "scores.jsonl line 1: expected a JSON object per line, got list"),
    ],
)
def test_malformed_jsonl(tmp_path, capsys, lines, message):
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = cli(capsys, "analyze", path, "-q")
    assert code == EXIT_USAGE
    assert message in err, err


def test_malformed_parquet_names_the_row(tmp_path, capsys):
    table = pa.table(
        {"prompt_id": ["a"] * 8, "proxy": ["0.1", "0.2", "0.3", "0.4", "0.5", "abc", "0.7", "0.8"], "true": [0.0] * 8}
    )
    pq.write_table(table, tmp_path / "scores.parquet", row_group_size=4)
    code, _, err = cli(capsys, "analyze", tmp_path / "scores.parquet", "-q", "--batch-rows", 3)
    assert code == EXIT_USAGE
    assert "scores.parquet row 6, column 'proxy': 'abc' is not a number" in err
    steps = pa.table({"prompt_id": ["a"] * 4, "proxy": [0.1] * 4, "true": [0.0] * 4, "step": [1, 2, None, 4]})
    pq.write_table(steps, tmp_path / "steps.parquet")
    code, _, err = cli(capsys, "analyze", tmp_path / "steps.parquet", "-q")
    assert code == EXIT_USAGE and "steps.parquet row 3, column 'step': missing step (null)" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("scores.parquet", b"not parquet at all", "scores.parquet: not a readable Parquet file"),
        ("scores.txt", b"a,b\n", "cannot tell the format from the name"),
        ("scores.csv.gz", b"not gzip", "scores.csv.gz: cannot read"),
    ],
)
def test_unreadable_files(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, _, err = cli(capsys, "analyze", tmp_path / name, "-q")
    assert code == EXIT_USAGE and message in err, err


def test_missing_file_and_too_large_grid(tmp_path, capsys, rng):
    code, _, err = cli(capsys, "analyze", tmp_path / "absent.csv")
    assert code == EXIT_USAGE and "absent.csv: no such file" in err
    path = write_rows(tmp_path / "s.csv", make_rows(rng, steps=(0,)))
    code, _, err = cli(capsys, "analyze", path, "--ns", "1,64", "-q")
    assert code == EXIT_USAGE and "ns [64] exceed the largest number of samples per prompt (16)" in err


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze"])
    assert exit_info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "x.csv", "--ns", "1,zero"])
    assert exit_info.value.code == EXIT_USAGE and "expected integers" in capsys.readouterr().err
    for command in ([], ["analyze"], ["compare"], ["report"], ["sync"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out and "examples:" in out and "bon-tracker sync" in out
    code, _, err = cli(capsys, "analyze", "x.csv", "--config", "absent.yaml")
    assert code == EXIT_USAGE and "absent.yaml: no such config file" in err


# ---- analyze: memory -----------------------------------------------------------------------------------------


def _peak_rss_kib(args: list[str], cwd: Path) -> tuple[int, dict]:
    """Run the installed ``bon-tracker`` in a fresh parent process; return the child's
    peak resident memory (KiB) and its JSON summary."""
    script = shutil.which("bon-tracker", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "bon_tracker.cli"]
    probe = (
        "import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
        "text=True); print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr, "
        "'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=True
    )
    result = json.loads(done.stdout)
    assert result["rc"] == 0, result["err"]
    return result["maxrss"], json.loads(result["out"])


def _write_big_parquet(path: Path, steps: int, prompts: int, samples: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(steps, prompts, samples))
    proxy = true + rng.standard_t(df=2, size=true.shape)
    step = np.repeat(np.arange(steps) * 100, prompts * samples)
    prompt = np.tile(np.repeat(np.arange(prompts), samples), steps)
    table = pa.table({"prompt_id": prompt, "step": step, "proxy": proxy.ravel(), "true": true.ravel()})
    pq.write_table(table, path, row_group_size=1 << 18)
    return proxy, true


@pytest.mark.slow
def test_large_parquet_streams_in_bounded_memory(tmp_path):
    steps, prompts, samples = 2, 31_250, 64  # 4 million rows
    rows = steps * prompts * samples
    proxy, true = _write_big_parquet(tmp_path / "big.parquet", steps, prompts, samples, seed=1)
    _write_big_parquet(tmp_path / "small.parquet", 2, 16, 64, seed=2)
    options = ["--out", "out", "--json", "--quiet"]
    small_rss, _ = _peak_rss_kib(["analyze", "small.parquet", *options], tmp_path)
    big_rss, summary = _peak_rss_kib(["analyze", "big.parquet", *options], tmp_path)
    # Loading the file at once needs at least its proxy and true floats: 16 bytes a row
    # (64 MB here), before any prompt id, step or grouping. Streaming grouped rows must
    # stay well below that, above the fixed cost of the same command on a tiny file, beside
    # what one step's Goodhart interval and predictions take as the tracker computes them:
    # their bootstrap holds a (resamples x prompts) array, about 26 bytes per cell at its peak
    # (core.uncertainty.resample_prompt_means, core.prediction.predict_curve), one step at a time.
    bootstrap = prompts * resamples_for(prompts) * 26
    grown_bytes = (big_rss - small_rss) * 1024
    assert grown_bytes < rows * 16 + bootstrap, f"peak RSS grew by {grown_bytes / 2**20:.0f} MiB for {rows:,} rows"
    assert summary["rows"] == rows and summary["grouped"] is True
    got = read_records(summary["runs"][0]["run_dir"])
    for i, record in enumerate(got):  # and the curves are exactly those of the data in memory
        want = bon_curve(proxy[i], true[i])
        for name in CURVE_FIELDS:
            np.testing.assert_allclose(getattr(record.curve, name), getattr(want, name), rtol=1e-9, atol=1e-12)


# ---- compare and report ----------------------------------------------------------------------------------------


def log_run(rng, steps=(0, 10, 20), drift=1.0, **tracker_options) -> BonTracker:
    with BonTracker(**tracker_options) as tracker:
        for i, step in enumerate(steps):
            true = rng.normal(size=(24, 16))
            tracker.log_scores(step, true + (1 + drift * i) * rng.standard_t(df=2, size=true.shape), true)
    return tracker


def test_compare_two_local_runs(tmp_path, capsys, rng):
    root = tmp_path / "runs"
    a = log_run(rng, backend="local", root=root, run_name="ppo-a", charts=False)
    b = log_run(rng, steps=(0, 15), drift=3.0, backend="local", root=root, run_name="ppo-b", charts=False)
    code, out, err = cli(capsys, "compare", root / "ppo-a", f"local:{root / 'ppo-b'}", "--out", tmp_path / "cmp")
    assert code == EXIT_OK, err
    assert "local run 'ppo-a'" in out and "showing step 20" in out and "showing step 15" in out
    html = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2 and "ppo-a" in html and "ppo-b" in html
    assert f"{a.history[-1].curve.true_mean[0]:.4g}" in html and f"{b.history[-1].curve.true_mean[0]:.4g}" in html
    assert_png(tmp_path / "cmp" / "compare_curves.png")
    assert_png(tmp_path / "cmp" / "runs_over_steps.png")
    code, out, _ = cli(
        capsys,
        "compare",
        root / "ppo-a",
        root / "ppo-b",
        "--step",
        "12",
        "--n",
        "4",
        "--sqrt-kl",
        "--out",
        tmp_path / "cmp2",
    )
    assert code == EXIT_OK and "showing step 10" in out and "true@4" in (tmp_path / "cmp2" / "compare.html").read_text()
    code, _, err = cli(capsys, "compare", root / "ppo-a", root / "ppo-b", "--step", "-1")
    assert code == EXIT_USAGE and "no eval step at or before step -1" in err


def test_compare_rejects_an_unknown_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "compare", tmp_path / "empty")
    assert code == EXIT_USAGE and "not a run folder of any backend" in err


def test_report_of_a_local_run(tmp_path, capsys, rng):
    tracker = log_run(rng, backend="local", root=tmp_path / "runs", run_name="r", charts=False)
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "charts" / "trend.png").exists()
    code, out, _ = cli(capsys, "report", run_dir, "--true-name", "gold")
    assert code == EXIT_OK and str(run_dir / "report.html") in out
    assert_png(run_dir / "charts" / "trend.png")
    assert f"latest step {tracker.history[-1].step}" in (run_dir / "report.html").read_text(encoding="utf-8")


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_compare_two_mlflow_runs(tmp_path, capsys, rng, mlflow_uri):
    a = log_run(rng, backend="mlflow", tracking_uri=mlflow_uri, experiment="goodhart", run_name="ppo-a", charts=False)
    b = log_run(
        rng,
        steps=(0, 5),
        backend="mlflow",
        tracking_uri=mlflow_uri,
        experiment="goodhart",
        run_name="ppo-b",
        charts=False,
    )
    run_b = b.backend.run_id
    code, out, err = cli(
        capsys,
        "compare",
        "mlflow:ppo-a",
        run_b,
        "--tracking-uri",
        mlflow_uri,
        "--experiment",
        "goodhart",
        "--out",
        tmp_path / "cmp",
    )
    assert code == EXIT_OK, err
    assert f"mlflow run 'ppo-a' ({a.backend.run_id})" in out and f"mlflow run 'ppo-b' ({run_b})" in out
    assert_png(tmp_path / "cmp" / "compare_curves.png")
    for tracker, ref in ((a, "ppo-a"), (b, run_b)):  # what compare read is what was logged
        run = resolve_run(ref, tracking_uri=mlflow_uri)
        assert_same_records(list(run.records), {r.step: r for r in tracker.history})
    code, out, _ = cli(capsys, "report", "ppo-b", "--tracking-uri", mlflow_uri, "--out", tmp_path / "rep")
    assert code == EXIT_OK and (tmp_path / "rep" / "report.html").is_file()
    log_run(
        rng, steps=(0,), backend="mlflow", tracking_uri=mlflow_uri, experiment="other", run_name="ppo-a", charts=False
    )
    code, _, err = cli(capsys, "compare", "ppo-a", "--tracking-uri", mlflow_uri)
    assert code == EXIT_USAGE and "2 MLflow runs are named 'ppo-a'" in err and "pass a run id" in err
    code, _, err = cli(capsys, "compare", "mlflow:nope", "--tracking-uri", mlflow_uri)
    assert code == EXIT_USAGE and "no MLflow run with id or name 'nope'" in err


def test_analyze_logs_to_mlflow(tmp_path, capsys, rng, mlflow_uri):
    from bon_tracker.backends.mlflow import read_records as read_mlflow

    (tmp_path / "cfg.yaml").write_text("mlflow:\n  charts: false\n", encoding="utf-8")
    rows = make_rows(rng)
    path = write_rows(tmp_path / "s.parquet", rows)
    summary = analyze_json(
        capsys,
        path,
        "--config",
        tmp_path / "cfg.yaml",
        "--backend",
        "mlflow",
        "--tracking-uri",
        mlflow_uri,
        "--experiment",
        "cli",
        "--run-name",
        "from-file",
    )
    backend = summary["runs"][0]["backend"]
    assert backend["delivered"] == 2 and backend["spool"] is None
    assert_same_records(read_mlflow(backend["run_id"], mlflow_uri), reference(rows))


@pytest.mark.slow
def test_compare_a_wandb_transaction_log_run_with_a_local_run(tmp_path, capsys, rng):
    pytest.importorskip("wandb")
    w = log_run(
        rng,
        steps=(0, 10),
        backend="wandb",
        mode="offline",
        dir=str(tmp_path / "w"),
        project="p",
        run_name="w",
        images=False,
    )
    log_run(rng, backend="local", root=tmp_path / "runs", run_name="loc", charts=False)
    (folder,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    code, out, err = cli(capsys, "compare", folder, tmp_path / "runs" / "loc", "--out", tmp_path / "cmp")
    assert code == EXIT_OK, err
    assert "wandb run 'w'" in out and "local run 'loc'" in out
    assert_same_records(list(resolve_run(str(folder)).records), {r.step: r for r in w.history})


# ---- sync -----------------------------------------------------------------------------------------------------------


def test_sync_replays_a_spool_exactly_once(tmp_path, capsys, rng, caplog):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the run folder's parent should be", encoding="utf-8")
    root = blocker / "runs"  # unwritable: a path under a regular file
    spool_dir = tmp_path / "spool"
    tracker = log_run(
        rng,
        steps=(0, 10, 20),
        backend="local",
        root=root,
        run_name="r",
        charts=False,
        spool_dir=spool_dir,
        finish_timeout=0.5,
    )
    (spool_path,) = wal_files(spool_dir)
    assert [e.record.step for e in WriteAheadLog(spool_path).pending() if e.record] == [0, 10, 20]
    assert "bon-tracker sync" in caplog.text

    code, out, _ = cli(capsys, "sync", "--dry-run")  # the spool folder from $BON_TRACKER_SPOOL_DIR
    assert code == EXIT_OK and "3 record(s) for local (steps 0, 10, 20)" in out
    code, out, err = cli(capsys, "sync")  # still unwritable: nothing lost, exit 3
    assert code == EXIT_PENDING and "replayed 0 record(s); 3 remain" in out and "NotADirectoryError" in err
    assert len(WriteAheadLog(spool_path)) == 3

    blocker.unlink()  # the file system is back
    code, out, err = cli(capsys, "sync", spool_path)
    assert code == EXIT_OK, err
    assert "replayed 3 of 3 record(s) to local run r" in out and "replayed 3 record(s); 0 remain" in out
    assert not spool_path.exists()
    run_dir = root / "r"
    assert_same_records(read_records(run_dir), {r.step: r for r in tracker.history})
    assert len((run_dir / "scalars.jsonl").read_text().splitlines()) == 3
    table = [json.loads(line) for line in (run_dir / "bon_curves.jsonl").read_text().splitlines()]
    assert len(table) == sum(len(r.curve.n) for r in tracker.history)

    code, out, _ = cli(capsys, "sync")
    assert code == EXIT_OK and "nothing to replay" in out
    assert len((run_dir / "scalars.jsonl").read_text().splitlines()) == 3  # exactly once


def test_sync_of_a_missing_spool_file(tmp_path, capsys):
    code, _, err = cli(capsys, "sync", tmp_path / "absent.jsonl")
    assert code == EXIT_USAGE and "no such spool file" in err


def test_dead_mlflow_server_spools_and_sync_keeps_the_records(tmp_path, capsys, rng):
    pytest.importorskip("mlflow")
    from tests.mlflow_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "cfg.yaml").write_text("finish_timeout: 3\nmlflow:\n  max_retries: 0\n  timeout: 2\n  charts: false\n")
    path = write_rows(tmp_path / "s.csv", make_rows(rng))
    code, out, _err = cli(
        capsys,
        "analyze",
        path,
        "--config",
        tmp_path / "cfg.yaml",
        "--backend",
        "mlflow",
        "--tracking-uri",
        dead,
        "-q",
        "--json",
    )
    assert code == EXIT_PENDING
    backend = json.loads(out)["runs"][0]["backend"]
    assert backend["delivered"] == 0 and backend["spooled"] == 2
    assert Path(json.loads(out)["runs"][0]["report"]).is_file()  # the local report is there regardless
    spool_path = Path(backend["spool"])
    wal = WriteAheadLog(spool_path)
    assert [e.record.step for e in wal.pending() if e.record] == [0, 10] and wal.spec()["tracking_uri"] == dead
    code, out, _ = cli(capsys, "sync", spool_path)
    assert code == EXIT_PENDING and "2 remain" in out
    assert len(WriteAheadLog(spool_path)) == 2


def test_input_without_samples(tmp_path, capsys):
    pq.write_table(
        pa.table(
            {
                "prompt_id": pa.array([], pa.string()),
                "proxy": pa.array([], pa.float64()),
                "true": pa.array([], pa.float64()),
            }
        ),
        tmp_path / "empty.parquet",
    )
    code, _, err = cli(capsys, "analyze", tmp_path / "empty.parquet", "-q")
    assert code == EXIT_USAGE and "no samples in" in err
    path = _csv(tmp_path, ["prompt_id,proxy,true", "a,nan,1", "b,1,"])
    code, _, err = cli(capsys, "analyze", path, "-q", "--nan-policy", "omit")
    assert code == EXIT_USAGE and "(2 dropped by --nan-policy omit)" in err


@pytest.mark.slow
def test_sync_replays_to_an_mlflow_server_that_came_back(tmp_path, capsys, rng):
    pytest.importorskip("mlflow")
    from bon_tracker.backends.mlflow import read_records as read_mlflow
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")  # not started yet: its port is dead
    (tmp_path / "cfg.yaml").write_text("finish_timeout: 3\nmlflow:\n  max_retries: 0\n  timeout: 2\n  charts: false\n")
    rows = make_rows(rng)
    path = write_rows(tmp_path / "s.jsonl", rows)
    code, out, _ = cli(
        capsys,
        "analyze",
        path,
        "--config",
        tmp_path / "cfg.yaml",
        "--backend",
        "mlflow",
        "--tracking-uri",
        server.url,
        "--experiment",
        "outage",
        "-q",
        "--json",
    )
    assert code == EXIT_PENDING
    spool_path = Path(json.loads(out)["runs"][0]["backend"]["spool"])
    server.start()
    try:
        code, out, err = cli(capsys, "sync", spool_path)
        assert code == EXIT_OK, err
        assert "replayed 2 of 2 record(s) to mlflow run" in out and not spool_path.exists()
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=server.url)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert_same_records(read_mlflow(run.info.run_id, server.url), reference(rows))
        history = client.get_metric_history(run.info.run_id, "bon/1_true/n0001")
        assert sorted(m.step for m in history) == [0, 10]  # each step exactly once
        code, out, _ = cli(capsys, "sync")
        assert code == EXIT_OK and "nothing to replay" in out
    finally:
        server.stop()


def test_a_run_path_that_does_not_exist_is_an_error_naming_it_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in ("compare", "report"):
        code, _, err = cli(capsys, command, "bon_runs/typo")
        assert code == EXIT_USAGE and "bon_runs/typo: no such run folder or file" in err
    code, _, err = cli(capsys, "report", "some-run-name")  # not a path: an MLflow run name, but no database here
    assert code == EXIT_USAGE and "no MLflow database" in err
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/, nothing
