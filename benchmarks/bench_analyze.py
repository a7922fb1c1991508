"""``bon-tracker analyze`` on a large Parquet file against reading it and sorting each prompt.

    python benchmarks/bench_analyze.py            # 50,000 prompts x 64 samples x 4 steps (12.8M rows)
    python benchmarks/bench_analyze.py --quick    # 12,500 prompts (3.2M rows), for a smoke run
    python benchmarks/bench_analyze.py --threads 1

Issue 12, goal 4: ``analyze`` within 2x the time of the floor: reading the three columns
(prompt id, proxy, true) with ``pyarrow.parquet.read_table`` and ``np.argsort`` of every
prompt's samples, on the same file, with memory still bounded. Writes the file (sorted by
step and prompt, row groups of 2^18 rows, as a trainer's eval dump would be), then times,
best of several repeats, in this process (imports already done):

* the floor (read + argsort);
* ``curves_from_batches`` over ``read_score_batches`` (the curves, no output files);
* the whole ``analyze`` command without charts (``local: {charts: false}``): curves,
  run folder, tables, report;
* the whole command with its default PNG charts (matplotlib: a fixed cost per eval step,
  whatever the number of rows).

Each ratio is printed beside its goal. Peak resident memory of the command and of the
load-everything floor, each in a fresh process, shows that ``analyze`` streams. The
core's threads (``BON_TRACKER_THREADS``) and pyarrow's CPU pool are pinned to
``--threads`` and printed.

Measured on a 2-core machine (numpy 2.4, pyarrow 25, ``--threads 2``, best of 3; six runs here and
section 5 of bench_core.py): floor 0.15-0.25 s; curves 0.15-0.28 s (0.77-1.40x); analyze without
charts 0.34-0.46 s (1.49-2.53x: within 2x in two of the seven); with charts 1.8-2.7 s (matplotlib,
about 0.35-0.55 s a step). analyze reads grouped input once (the curves' own sort gives each
prompt's estimates; a step's rows, 50 MiB here, are kept until the step is done), sorts the
curves' chunks on a worker thread while the pass groups the next rows, holds BLAS to one thread
(OpenBLAS's threads spinning between products had doubled the statistics' CPU time), and reads
flat Parquet in batches of 2^19 rows. Peak RSS: analyze 511-539 MiB, the floor 827-934 MiB. What
remains above 2x is CPU on the same two cores (about 0.6 s of it: the pyarrow decode and
conversion on the reader thread, the curves, each step's interval, predictions and agreement,
the first step's bootstrap draws), and a floor that itself varies from 0.15 to 0.42 s between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_core import best_time

GOAL = 2.0


def write_scores(path: Path, prompts: int, samples: int, steps: int, seed: int = 0) -> int:
    """One Parquet file of ``steps x prompts x samples`` rows, sorted by step and prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = prompts * samples
    schema = pa.schema(
        [("step", pa.int64()), ("prompt_id", pa.int64()), ("proxy", pa.float64()), ("true", pa.float64())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for step in range(steps):
            true = rng.normal(size=rows)
            proxy = true + rng.standard_t(2, size=rows)
            table = pa.table(
                {
                    "step": np.full(rows, 100 * step),
                    "prompt_id": np.repeat(np.arange(prompts), samples),
                    "proxy": proxy,
                    "true": true,
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=1 << 18)
    return steps * rows


def read_and_sort(path: Path, samples: int) -> None:
    """The floor: the three columns with pyarrow, then every prompt's samples argsorted."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["prompt_id", "proxy", "true"])
    table.column("prompt_id").to_numpy()
    table.column("true").to_numpy()
    proxy = table.column("proxy").to_numpy()
    np.argsort(proxy.reshape(-1, samples), axis=1)


def run_analyze(args: list[str]) -> dict:
    from bon_tracker.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["analyze", *args, "--json", "--quiet"])
    if code != 0:
        raise SystemExit(f"analyze exited with {code}")
    return json.loads(out.getvalue())


PROBE = (
    "import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
    "print(json.dumps({'rc': r.returncode, 'maxrss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)


def peak_rss_mib(command: list[str], env: dict) -> float:
    """Peak resident memory of ``command`` in a fresh child process (MiB)."""
    done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{command} exited with {result['rc']}")
    return result["maxrss"] / 1024


def measure(prompts: int, samples: int, steps: int, threads: int, repeats: int, folder: Path) -> None:
    """Write the file under ``folder``, time the floor and ``analyze``, print the ratios and memory."""
    import pyarrow as pa

    from bon_tracker.analysis.grouping import curves_from_batches
    from bon_tracker.analysis.score_files import read_score_batches

    os.environ["BON_TRACKER_THREADS"] = str(threads)
    pa.set_cpu_count(threads)
    path = folder / "scores.parquet"
    start = time.perf_counter()
    rows = write_scores(path, prompts, samples, steps)
    print(
        f"file: {rows:,} rows ({steps} steps x {prompts:,} prompts x {samples} samples), "
        f"{path.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.1f} s; "
        f"core threads {threads}, pyarrow CPU pool {pa.cpu_count()}"
    )
    no_charts = folder / "no_charts.yaml"
    no_charts.write_text("local:\n  charts: false\n")
    out = folder / "runs"

    read_and_sort(path, samples)  # warm the page cache and the imports
    summary = run_analyze([str(path), "--out", str(out), "--config", str(no_charts)])
    assert summary["rows"] == rows and summary["grouped"], summary

    t_floor = best_time(lambda: read_and_sort(path, samples), repeats)
    t_curves = best_time(lambda: curves_from_batches(lambda: read_score_batches(path)), repeats)
    again = [str(path), "--out", str(out), "--overwrite"]  # each repeat replaces the run folder, as a rerun would
    t_plain = best_time(lambda: run_analyze([*again, "--config", str(no_charts)]), repeats)
    t_charts = best_time(lambda: run_analyze(again), max(1, repeats - 1))

    print(f"{'':<58}{'s':>8}{'ratio':>8}{'goal':>8}")
    print(f"{'floor: pyarrow read of 3 columns + argsort per prompt':<58}{t_floor:>8.3f}{1.0:>8.2f}")
    for name, seconds in (
        ("curves_from_batches (the curves only)", t_curves),
        ("analyze, no charts (curves, run folder, tables, report)", t_plain),
        ("analyze with PNG charts (matplotlib, per eval step)", t_charts),
    ):
        print(f"{name:<58}{seconds:>8.3f}{seconds / t_floor:>8.2f}{'<= ' + str(GOAL):>8}")

    env = {**os.environ, "BON_TRACKER_THREADS": str(threads)}
    script = shutil.which("bon-tracker", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "bon_tracker.cli.main"]
    rss_analyze = peak_rss_mib(
        [*command, "analyze", str(path), "--out", str(out), "--config", str(no_charts), "--json", "--quiet"], env
    )
    here = str(Path(__file__).parent)
    floor_code = (
        f"import sys, pathlib; sys.path.insert(0, {here!r}); import bench_analyze as b, pyarrow as pa; "
        f"pa.set_cpu_count({threads}); b.read_and_sort(pathlib.Path({str(path)!r}), {samples})"
    )
    rss_floor = peak_rss_mib([sys.executable, "-c", floor_code], env)
    print(
        f"peak RSS (fresh process): analyze {rss_analyze:,.0f} MiB (streams: bounded, whatever the rows), "
        f"floor {rss_floor:,.0f} MiB (holds every row); the scores alone are {rows * 16 / 2**20:,.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="12,500 prompts instead of 50,000")
    parser.add_argument("--prompts", type=int, help="prompts per step (default 50,000; --quick 12,500)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="core threads and pyarrow CPU pool (default 2)")
    parser.add_argument("--dir", help="where to write the file (default: a temporary folder, removed after)")
    args = parser.parse_args()
    import pyarrow as pa

    versions = f"numpy {np.__version__}, pyarrow {pa.__version__}, Python {platform.python_version()}"
    print(f"{versions}, {os.cpu_count()} cores\n")
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        prompts = args.prompts or (12_500 if args.quick else 50_000)
        measure(prompts, args.samples, args.steps, args.threads, 2 if args.quick else 3, folder)
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
