"""Write the Parquet sample files from the JSONL ones (needs pyarrow: ``pip install 'bon-tracker[parquet]'``).

``scores.parquet`` holds one row per sample (as ``scores.jsonl``); ``scores_per_prompt.parquet``
one row per prompt with list columns (as ``scores_per_prompt.jsonl``). All four files, and
``scores.csv``, hold the same scores: ``bon-tracker analyze`` gives the same curves for each.

    python examples/scores/make_parquet.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def rows(name: str) -> list[dict]:
    with open(HERE / name, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def main(out: Path = HERE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    per_sample = rows("scores.jsonl")
    pq.write_table(
        pa.table({name: [r[name] for r in per_sample] for name in ("step", "prompt_id", "proxy", "true")}),
        out / "scores.parquet",
    )
    per_prompt = rows("scores_per_prompt.jsonl")
    schema = pa.schema(
        [
            ("step", pa.int64()),
            ("prompt", pa.string()),
            ("proxy", pa.list_(pa.float64())),
            ("true", pa.list_(pa.float64())),
        ]
    )
    pq.write_table(
        pa.table({name: [r[name] for r in per_prompt] for name in schema.names}, schema=schema),
        out / "scores_per_prompt.parquet",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
