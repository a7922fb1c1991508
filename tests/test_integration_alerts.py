"""``stop_on_alert`` stops real training, the framework's own way: a transformers ``Trainer``
(``control.should_training_stop``) with a tiny GPT-2, and a Lightning ``Trainer``
(``trainer.should_stop``) with a tiny module. The scores follow a script with a known onset:
the proxy rises at every eval, the true reward rises, then falls at the third eval."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TRUE_LEVEL = (0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0)  # falls at eval 2 (0-based)


class ScriptedScores:
    """Scores by eval: proxy = eval index + noise, true = TRUE_LEVEL[eval index] + noise."""

    def __init__(self):
        self.evals = 0
        self.rng = np.random.default_rng(0)

    def next(self, shape):
        i = self.evals
        self.evals += 1
        noise = self.rng.normal(size=shape)
        return i + noise, TRUE_LEVEL[i] + 0.3 * noise + 0.05 * self.rng.normal(size=shape)


# ---- transformers ---------------------------------------------------------------------------------


def _hf_trainer(tmp_path, stop_on_alert, on_alert=None):
    transformers = pytest.importorskip("transformers")
    from bon_tracker.integrations.transformers import BonTrackerCallback
    from tests.tiny_models import PROMPTS, lm_dataset, tiny_gpt2, tiny_tokenizer

    script = ScriptedScores()
    held: dict[str, np.ndarray] = {}

    def proxy_fn(prompts, completions):
        held["proxy"], held["true"] = script.next(len(completions))
        return held["proxy"].tolist()

    def true_fn(prompts, completions):
        return held["true"].tolist()

    callback = BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=proxy_fn,
        true_fn=true_fn,
        num_samples=8,
        root=str(tmp_path / "runs"),
        run_name="hf",
        charts=False,
        stop_on_alert=stop_on_alert,
        on_alert=on_alert,
    )
    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=16,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    data = lm_dataset(tokenizer)
    trainer = transformers.Trainer(
        model=tiny_gpt2(tokenizer),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    return trainer, callback


def test_transformers_trainer_stops_at_the_alert(tmp_path):
    from bon_tracker.backends.local import read_records

    seen = []
    trainer, _ = _hf_trainer(tmp_path, stop_on_alert=True, on_alert=seen.append)
    trainer.train()
    # Evals at 2, 4, 6: the fall at the third stops training at the next step (its alert rules
    # ran off the training thread during step 7; the callback acts at that step's end).
    assert trainer.state.global_step == 7
    assert [(a.step, a.rule) for a in seen] == [(6, "policy_true_falls"), (6, "bon_true_falls")]
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = read_records(run_dir)
    assert [r.step for r in records] == [2, 4, 6]
    assert records[-1].alert_states["policy_true_falls"] == 1


def test_transformers_trainer_runs_on_when_the_rule_is_not_chosen(tmp_path):
    trainer, callback = _hf_trainer(tmp_path, stop_on_alert=["goodhart_kl"])
    trainer.train()
    assert trainer.state.global_step == 16
    assert {a.rule for a in callback.tracker.alerts} == {"policy_true_falls", "bon_true_falls"}


def test_stop_on_alert_is_checked():
    pytest.importorskip("transformers")
    from bon_tracker.tracking.alerting import check_stop_on_alert

    with pytest.raises(ValueError, match=r"unknown rule\(s\) \['goodhart'\]"):
        check_stop_on_alert(["goodhart"])
    with pytest.raises(TypeError, match="stop_on_alert"):
        check_stop_on_alert("goodhart_kl")


# ---- Lightning ----------------------------------------------------------------------------------------


def test_lightning_trainer_stops_at_the_alert(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from bon_tracker.integrations.lightning import BonTrackerCallback

    script = ScriptedScores()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            if self.trainer.sanity_checking:
                return None
            proxy, true = script.next((32, 8))
            return {"bon_proxy": torch.tensor(proxy), "bon_true": torch.tensor(true)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def loader(rows):
        data = torch.utils.data.TensorDataset(torch.randn(rows, 3, generator=torch.Generator().manual_seed(rows)))
        return torch.utils.data.DataLoader(data, batch_size=4)

    callback = BonTrackerCallback(root=tmp_path / "runs", run_name="lit", charts=False, stop_on_alert=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=8,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(Module(), loader(8), loader(4))
    assert trainer.current_epoch == 3 and trainer.global_step == 6  # stopped after the third validation
    assert script.evals == 3
