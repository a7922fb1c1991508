"""BonTrackerCallback on a real transformers Trainer with a tiny GPT-2 built on the spot.

Every check reads back what was logged (the local run folder, or MLflow's sqlite store)
and compares it with curves recomputed from the scores the reward functions returned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bon_tracker import bon_curve  # noqa: E402
from bon_tracker.backends.local import read_records  # noqa: E402
from bon_tracker.integrations._sampling import sample_completions  # noqa: E402
from bon_tracker.integrations.transformers import BonTrackerCallback  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    PROMPTS,
    RecordingScorer,
    lm_dataset,
    proxy_reward,
    tiny_gpt2,
    tiny_tokenizer,
    true_reward,
)

N = 4


class InjectKL(transformers.TrainerCallback):
    """Adds a KL to each training log, as TRL's trainers do (``objective/kl``)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["objective/kl"] = 0.1 * state.global_step


def _trainer(tmp_path, callbacks, *, report_to="none", max_steps=4):
    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
    )
    data = lm_dataset(tokenizer)
    return transformers.Trainer(
        model=tiny_gpt2(tokenizer),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _expected(proxy_scorer, true_scorer, call):
    """The curve of one eval call, recomputed from what the score functions returned."""
    proxy = np.asarray(proxy_scorer.calls[call][2], dtype=float).reshape(-1, N)
    true = np.asarray(true_scorer.calls[call][2], dtype=float).reshape(-1, N)
    return bon_curve(proxy, true)


def test_sampling_is_batched_left_padded_eval_mode_no_grad():
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(tokenizer)
    model.train()
    seen = []

    def probe(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((module.training, torch.is_grad_enabled(), None if mask is None else mask.clone()))

    handle = model.register_forward_pre_hook(probe, with_kwargs=True)
    prompts = ["tell me", "the cat sat on", "a"]  # 2, 4 and 1 tokens
    completions = sample_completions(model, tokenizer, prompts, 3, generation_kwargs={"max_new_tokens": 3})
    handle.remove()

    assert len(completions) == 9 and all(isinstance(c, str) for c in completions)
    assert model.training  # train mode restored
    assert all(not training and not grad for training, grad, _ in seen)
    first_mask = seen[0][2]  # one batch of 3 prompts x 3 samples, padded on the left
    assert first_mask.shape[0] == 9
    assert first_mask[:, :4].tolist()[::3] == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]


def test_curves_logged_at_eval_steps(tmp_path):
    proxy = RecordingScorer(lambda p, c: torch.tensor(proxy_reward(p, c)))  # a CPU tensor
    true = RecordingScorer(true_reward)  # a list
    callback = BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=proxy,
        true_fn=true,
        num_samples=N,
        generation_kwargs={"max_new_tokens": 6},
        root=tmp_path / "runs",
        run_name="hf",
    )
    trainer = _trainer(tmp_path, [InjectKL(), callback])
    trainer.evaluate()  # a baseline before training: step 0, in the same tracking run
    trainer.train()

    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["hf"]
    records = read_records(runs[0])
    assert [r.step for r in records] == [0, 2, 4]  # the trainer's eval steps
    for call, record in enumerate(records):
        prompts, completions, _ = proxy.calls[call]
        assert prompts == [p for p in PROMPTS for _ in range(N)] and len(completions) == len(PROMPTS) * N
        assert true.calls[call][:2] == proxy.calls[call][:2]  # both scored the same samples
        expected = _expected(proxy, true, call)
        np.testing.assert_allclose(record.curve.true_mean, expected.true_mean)
        np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean)
        np.testing.assert_allclose(record.curve.kl, expected.kl)
    # the RL point: the latest KL the trainer logged before the eval, and the policy's own scores (n = 1)
    assert records[0].policy is None  # no KL logged yet
    for record in records[1:]:
        assert record.policy.kl == pytest.approx(0.1 * record.step)
        assert record.policy.true_mean == pytest.approx(record.curve.true_mean[0])

    # a stand-alone evaluate() after training continues the same run; step 4 is not logged twice
    trainer.evaluate()
    assert [r.name for r in (tmp_path / "runs").iterdir()] == ["hf"]
    assert [r.step for r in read_records(runs[0])] == [0, 2, 4]
    assert len((runs[0] / "scalars.jsonl").read_text().splitlines()) == 3


def test_mlflow_curves_go_into_the_trainers_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-trainer")
    proxy, true = RecordingScorer(proxy_reward), RecordingScorer(true_reward)
    callback = BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=proxy,
        true_fn=true,
        num_samples=N,
        generation_kwargs={"max_new_tokens": 6},
        backend="mlflow",
    )
    try:
        _trainer(tmp_path, [callback], report_to=["mlflow"]).train()
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()

    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1  # one run: the Trainer's, holding its metrics and the curves
    run = runs[0]
    assert "train_loss" in run.data.metrics and "eval_loss" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "bon/1_true/n0001")
    assert sorted(m.step for m in history) == [2, 4]
    for call, step in enumerate((2, 4)):
        expected = _expected(proxy, true, call)
        for i, n in enumerate(expected.n.tolist()):
            metric = client.get_metric_history(run.info.run_id, f"bon/1_true/n{n:04d}")
            (logged,) = [m.value for m in metric if m.step == step]
            assert logged == pytest.approx(expected.true_mean[i])


def test_wandb_curves_go_into_the_trainers_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from bon_tracker.backends import wandb_transaction_log

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # offline mode (conftest): run folders land here
    monkeypatch.setenv("WANDB_PROJECT", "hf-trainer")
    proxy, true = RecordingScorer(proxy_reward), RecordingScorer(true_reward)
    callback = BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=proxy,
        true_fn=true,
        num_samples=N,
        generation_kwargs={"max_new_tokens": 6},
        backend="wandb",
    )
    try:
        _trainer(tmp_path, [callback], report_to=["wandb"]).train()
        # W&B fixes its folder at its first use in a process, so ask the run where it is
        run_dir = Path(wandb.run.settings.sync_dir)
        trainers_run = wandb.run.id
    finally:
        if wandb.run is not None:
            wandb.run.finish()

    assert callback.tracker.backend.run_id == trainers_run  # one run: the Trainer's
    wandb_transaction_log.wait_until_complete(wandb_transaction_log.find_transaction_log(run_dir))
    records = wandb_transaction_log.read_records(run_dir)
    assert [r.step for r in records] == [2, 4]
    for call, record in enumerate(records):
        np.testing.assert_allclose(record.curve.true_mean, _expected(proxy, true, call).true_mean)
    assert any("train/loss" in row for row in wandb_transaction_log.read_history(run_dir))  # the Trainer's metrics


def test_eval_every_is_a_documented_argument(tmp_path):
    import inspect

    assert "eval_every" in inspect.signature(BonTrackerCallback).parameters
    assert "eval_every:" in BonTrackerCallback.__doc__
    callback = BonTrackerCallback(
        prompts=PROMPTS, proxy_fn=proxy_reward, true_fn=true_reward, num_samples=N, eval_every=4, root=tmp_path
    )
    assert callback.eval_every == 4


def test_proxy_fn_returning_members_logs_an_ensemble(tmp_path):
    """proxy_fn and true_fn return mappings: the record's selection holds every member and true
    reward, and its curve is best-of-n on the deployed rule (worst: the minimum over members)."""
    from bon_tracker.core.selection import selection_input
    from bon_tracker.core.selection_stats import compute_selection_statistics

    calls = []

    def members(prompts, completions):
        scores = {
            "rm_good": torch.tensor(proxy_reward(prompts, completions)),
            "rm_short": [-len(c) / 10 for c in completions],
        }
        calls.append(scores)  # a float32 tensor and a list
        return scores

    def trues(prompts, completions):
        gold = true_reward(prompts, completions)
        calls.append({"gold": gold, "verifier": [float(g > 0) for g in gold]})
        return calls[-1]

    settings = {"n_resamples": 50}
    callback = BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=members,
        true_fn=trues,
        num_samples=N,
        generation_kwargs={"max_new_tokens": 6},
        root=tmp_path / "runs",
        run_name="hf",
        selection_rule="worst",
        selection=settings,
        charts=False,
    )
    _trainer(tmp_path, [callback], max_steps=2).train()
    (record,) = read_records(tmp_path / "runs" / "hf")
    proxy = {k: np.asarray(v, dtype=float).reshape(-1, N) for k, v in calls[0].items()}
    true = {k: np.asarray(v).reshape(-1, N) for k, v in calls[1].items()}
    expected = bon_curve(np.minimum(proxy["rm_good"], proxy["rm_short"]), true["gold"])
    np.testing.assert_allclose(record.curve.true_mean, expected.true_mean)
    np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean)
    assert record.selection.member_names == ("rm_good", "rm_short")
    assert record.selection.true_names == ("gold", "verifier")
    want = compute_selection_statistics(selection_input(proxy, true), **settings)
    assert record.selection.to_json() == want.to_json()
