"""Rows per second of ``analyze``'s two engines on the same Parquet file, and their ratio.

    python benchmarks/bench_ray.py [--prompts 20000] [--samples 64] [--steps 2] [--num-cpus 2]

Writes one Parquet file of ``steps x prompts x samples`` rows (sorted by step and prompt,
row groups of 64k rows) and times the single-process streaming reader
(:func:`~bon_tracker.analysis.grouping.curves_from_batches`) against Ray Data
(:func:`~bon_tracker.analysis.ray_engine.ray_curves`) on a local cluster of ``--num-cpus``
CPUs (the Ray time includes its read, shuffle and combine, not the cluster's start; the
first Ray run warms the workers and is not counted). It checks that both give the same
curves (1e-12) and prints rows/s for each and Ray / single-process. Ray's gain needs more
CPUs (or machines) than a laptop's: on 2 CPUs its shuffle costs more than it parallelises.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def write_scores(path: Path, prompts: int, samples: int, steps: int, seed: int = 0) -> int:
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
                    "step": np.full(rows, step * 100, dtype=np.int64),
                    "prompt_id": np.repeat(np.arange(prompts, dtype=np.int64), samples),
                    "proxy": proxy,
                    "true": true,
                }
            )
            writer.write_table(table, row_group_size=1 << 16)
    return rows * steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--shuffle", default=None, help="Ray Data shuffle strategy (default: Ray's own)")
    args = parser.parse_args()

    import ray

    from bon_tracker.analysis.grouping import curves_from_batches
    from bon_tracker.analysis.ray_engine import ray_curves
    from bon_tracker.analysis.score_files import read_score_batches

    folder = tempfile.mkdtemp(prefix="bench_ray_")
    path = Path(folder) / "scores.parquet"
    rows = write_scores(path, args.prompts, args.samples, args.steps)
    size = os.path.getsize(path) / 2**20
    print(f"{rows:,} rows ({args.steps} steps x {args.prompts:,} prompts x {args.samples} samples), {size:.0f} MiB")

    start = time.perf_counter()
    single, _ = curves_from_batches(lambda: read_score_batches(path))
    single_s = time.perf_counter() - start

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if args.shuffle:
        context.shuffle_strategy = args.shuffle
    try:
        ray_curves([path])  # warm-up: workers start, modules import
        start = time.perf_counter()
        distributed, _ = ray_curves([path])
        ray_s = time.perf_counter() - start
    finally:
        ray.shutdown()

    for step, curve in single[None].items():
        other = distributed[None][step]
        for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
            np.testing.assert_allclose(getattr(other, field), getattr(curve, field), rtol=0, atol=1e-12)
    print(f"single process: {single_s:7.2f} s  {rows / single_s:12,.0f} rows/s")
    print(f"ray ({args.num_cpus} CPUs, {context.shuffle_strategy}): {ray_s:7.2f} s  {rows / ray_s:12,.0f} rows/s")
    print(f"ray / single-process rows/s: {single_s / ray_s:.2f}  (curves equal at 1e-12)")


if __name__ == "__main__":
    main()
