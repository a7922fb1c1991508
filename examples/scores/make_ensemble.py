"""Write the ensemble sample files: three reward models and two true rewards per sample.

``ensemble.csv`` holds one row per sample (columns ``rm_a``, ``rm_b``, ``rm_c``: the members;
``gold`` and ``verifier``: the true rewards); ``ensemble_per_prompt.jsonl`` the same scores as
one row per prompt, each score column a list. Each member is the gold reward plus its own
heavy-tailed error (Student t, 1.5 degrees of freedom), so a member alone overoptimizes earlier
than their mean; the verifier is the gold reward rounded to 0/1.

    python examples/scores/make_ensemble.py [OUT_DIR]
    bon-tracker analyze examples/scores/ensemble.csv --proxy-col rm_a,rm_b,rm_c --true-col gold,verifier
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MEMBERS = ("rm_a", "rm_b", "rm_c")
TRUES = ("gold", "verifier")


def scores(seed: int = 0, steps: tuple[int, ...] = (0, 100), prompts: int = 24, samples: int = 16) -> list[dict]:
    """One dict per prompt and step: its id, step and a list of scores per column (rounded to 3 places)."""
    rng = np.random.default_rng(seed)
    out = []
    for step in steps:
        for p in range(prompts):
            gold = rng.standard_normal(samples) + 0.002 * step
            row = {"step": step, "prompt_id": f"q{p + 1}"}
            for name in MEMBERS:
                row[name] = np.round(gold + 0.5 * rng.standard_t(1.5, samples), 3).tolist()
            row["gold"] = np.round(gold, 3).tolist()
            row["verifier"] = (gold > 0.5).astype(float).tolist()
            out.append(row)
    return out


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = scores()
    columns = ("step", "prompt_id", *MEMBERS, *TRUES)
    with open(out / "ensemble.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        for row in rows:
            for i in range(len(row["gold"])):
                writer.writerow([row["step"], row["prompt_id"], *(row[c][i] for c in (*MEMBERS, *TRUES))])
    with open(out / "ensemble_per_prompt.jsonl", "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
