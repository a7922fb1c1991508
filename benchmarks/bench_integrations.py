"""The tracker's own time per evaluation as a fraction of sampling and scoring.

    python benchmarks/bench_integrations.py [--evals 5] [--samples 16] [--new-tokens 32]

Uses the transformers example's tiny GPT-2 (built on the spot, CPU): at each of
`--evals` evaluations it samples `--samples` completions for each eval prompt and scores
them with both reward functions (what the callback does), then times the tracker's part
(validation, gather, curves, fit, logging) for each backend. Goal: below 5%.

The tiny model samples in milliseconds, far faster than any real policy, so the
fraction here is a worst case; the table also shows the tracker's time with charts off.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from transformers_example import EVAL_PROMPTS, proxy_reward, tiny_model, true_reward

from bon_tracker import BonTracker
from bon_tracker.integrations._sampling import sample_completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    model, tokenizer = tiny_model()
    prompts = EVAL_PROMPTS * 4  # 20 prompts

    evals = []
    for _ in range(args.evals):
        start = time.perf_counter()
        completions = sample_completions(
            model, tokenizer, prompts, args.samples, generation_kwargs={"max_new_tokens": args.new_tokens}
        )
        repeated = [p for p in prompts for _ in range(args.samples)]
        proxy = np.reshape(proxy_reward(repeated, completions), (len(prompts), args.samples))
        true = np.reshape(true_reward(repeated, completions), (len(prompts), args.samples))
        evals.append((time.perf_counter() - start, proxy, true))
    sampling = float(np.mean([t for t, _, _ in evals]))
    print(f"{len(prompts)} prompts x N = {args.samples}, {args.new_tokens} new tokens, tiny GPT-2 on CPU")
    print(f"sampling + scoring: {sampling:.3f} s per evaluation")
    print(f"{'backend':<8}{'charts':>8}{'tracker s/eval':>16}{'fraction':>10}")
    for backend in ("local", "mlflow", "wandb"):
        for charts in (True, False):
            with tempfile.TemporaryDirectory() as folder:
                options = {
                    "local": {"root": folder, "charts": charts},
                    "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "charts": charts},
                    "wandb": {"project": "bench", "dir": folder, "images": charts},
                }[backend]
                times = []
                with BonTracker(backend, spool_dir=folder, **options) as tracker:
                    for step, (_, proxy, true) in enumerate(evals):
                        start = time.perf_counter()
                        tracker.log_scores(step, proxy, true)
                        times.append(time.perf_counter() - start)
            # the first call opens the run (MLflow creates its database): report the steady state
            per_eval = float(np.mean(times[1:] if len(times) > 1 else times))
            print(f"{backend:<8}{'on' if charts else 'off':>8}{per_eval:>16.3f}{per_eval / sampling:>10.1%}")


if __name__ == "__main__":
    main()
