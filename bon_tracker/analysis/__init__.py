"""Score files to curves: JSONL/CSV/Parquet readers and grouping rows into prompts."""
