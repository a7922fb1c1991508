"""Plain-text views for terminals: a step's curve table, and where a run can be looked at.

>>> from bon_tracker.core import bon_curve
>>> import numpy as np
>>> from bon_tracker.record import EvalRecord
>>> rng = np.random.default_rng(0)
>>> true = rng.normal(size=(32, 8))
>>> print(curve_table(EvalRecord.build(5, bon_curve(true + rng.normal(size=(32, 8)), true))).splitlines()[0])
step 5: 32 prompts x N = 8 samples
"""

from __future__ import annotations

from typing import Any

from bon_tracker.record import EvalRecord


def curve_table(record: EvalRecord) -> str:
    """The best-of-n curve of one eval step as a fixed-width table, with its Goodhart point."""
    from bon_tracker.reports.charts import goodhart_text

    c = record.curve
    lines = [
        f"step {record.step}: {int(c.n_prompts.max())} prompts x N = {c.N} samples",
        f"{'n':>6}{'KL nats':>9}{'true':>9}{'± SE':>7}{'proxy':>9}{'± SE':>7}",
    ]
    for row in c.rows():
        lines.append(
            f"{row['n']:>6}{row['kl']:>9.3f}{row['true_mean']:>9.3f}{row['true_se']:>7.3f}"
            f"{row['proxy_mean']:>9.3f}{row['proxy_se']:>7.3f}"
        )
    lines.append(goodhart_text(record))
    return "\n".join(lines)


def where_to_look(backend: Any) -> list[str]:
    """Lines telling a user where the run that ``backend`` wrote can be viewed."""
    name = getattr(backend, "name", "")
    if name == "local":
        run_dir = getattr(backend, "run_dir", None)
        if run_dir is None:
            return ["nothing was logged"]
        return [
            f"Run folder: {run_dir}",
            f"  report:  {run_dir / 'report.html'}  (open it in a browser)",
            f"  charts:  {run_dir / 'charts'}",
            f"  tables:  {run_dir / 'bon_curves.csv'}",
        ]
    if name == "mlflow":
        from bon_tracker.backends.mlflow import mlflow_run_url

        uri, run_id = backend.tracking_uri, backend.run_id
        experiment_id = getattr(backend, "experiment_id", None)
        if uri.startswith(("http://", "https://")):
            return [f"MLflow run {run_id}: {mlflow_run_url(uri, experiment_id or '0', run_id)}"]
        return [
            f"MLflow run {run_id} in {uri}; view it with:",
            f"  mlflow ui --backend-store-uri {uri}",
            f"  then open {mlflow_run_url('http://127.0.0.1:5000', experiment_id or '0', run_id)}",
        ]
    if name == "wandb":
        run = getattr(backend, "run", None)
        spec = backend.spec() if hasattr(backend, "spec") else {}
        if spec.get("mode") == "offline" or run is None:
            where = spec.get("dir") or "./wandb"
            return [f"W&B run {backend.run_id} (offline, under {where}): upload it with `wandb sync`"]
        return [f"W&B run: {getattr(run, 'url', None) or backend.run_id}"]
    return [f"{name} run {getattr(backend, 'run_id', None)}"]
