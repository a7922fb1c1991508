"""The Lightning callback on a real Lightning Trainer with a tiny module.

``validation_step`` returns ``{"bon_proxy": (B, N), "bon_true": (B, N)}`` (tensors); the
module keeps what it returned so the test can recompute the curves it expects.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from bon_tracker import bon_curve  # noqa: E402
from bon_tracker.backends.local import read_records  # noqa: E402
from bon_tracker.integrations.lightning import BonTrackerCallback  # noqa: E402

N = 4
STEPS_PER_EPOCH = 4


class TinyPolicy(pl.LightningModule):
    """Proxy scores are the outputs of a linear layer; the true score punishes large ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, N)
        self.returned: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def training_step(self, batch, batch_idx):
        self.log("policy_kl", 0.01 * (self.global_step + 1))  # logged as trainers log a KL
        loss = -self.layer(batch[0]).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        proxy = self.layer(batch[0])
        true = proxy - 0.5 * proxy**2
        if not self.trainer.sanity_checking:
            self.returned.setdefault(self.global_step, []).append((proxy.numpy(), true.numpy()))
        return {"bon_proxy": proxy, "bon_true": true}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(rows, batch_size):
    data = torch.utils.data.TensorDataset(torch.randn(rows, 3, generator=torch.Generator().manual_seed(rows)))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _fit(tmp_path, callbacks, *, max_epochs=2, logger=False, ckpt_path=None, module=None):
    module = module or TinyPolicy()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=STEPS_PER_EPOCH,
        num_sanity_val_steps=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(module, _loader(4 * STEPS_PER_EPOCH, 4), _loader(6, 3), ckpt_path=ckpt_path)
    return module


def _check_against_returned(records, module):
    for record in records:
        blocks = module.returned[record.step]
        expected = bon_curve(np.vstack([p for p, _ in blocks]), np.vstack([t for _, t in blocks]))
        assert record.curve.n_prompts[0] == 6  # every validation batch of the epoch
        np.testing.assert_allclose(record.curve.true_mean, expected.true_mean, rtol=1e-6)
        np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean, rtol=1e-6)


def test_curves_logged_at_each_validation_epoch_end(tmp_path):
    callback = BonTrackerCallback(root=tmp_path / "runs", run_name="lit", kl_metric="policy_kl")
    module = _fit(tmp_path, [callback])
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = read_records(run_dir)
    assert [r.step for r in records] == [4, 8]  # trainer.global_step at each epoch end; no sanity check
    _check_against_returned(records, module)
    assert [r.policy.kl for r in records] == pytest.approx([0.04, 0.08])


def test_curves_go_into_the_mlflow_loggers_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_logger = pl.loggers.MLFlowLogger(experiment_name="lit", tracking_uri=uri)
    _fit(tmp_path, [BonTrackerCallback(backend="mlflow")], logger=mlflow_logger)

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])  # one run
    assert run.info.run_id == mlflow_logger.run_id
    assert "train_loss" in run.data.metrics  # Lightning's metrics and the curves side by side
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "bon/1_true/n0001")) == [4, 8]


def test_fit_resumed_from_checkpoint_continues_the_run(tmp_path):
    checkpoints = tmp_path / "ckpt"

    def callbacks():
        return [
            BonTrackerCallback(root=tmp_path / "runs", run_name="lit"),
            pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_last=True),
        ]

    first = _fit(tmp_path, callbacks(), max_epochs=1)
    resumed = _fit(tmp_path, callbacks(), max_epochs=2, ckpt_path=str(checkpoints / "last.ckpt"))

    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["lit"]  # the same tracking run
    records = read_records(tmp_path / "runs" / "lit")
    assert [r.step for r in records] == [4, 8]
    _check_against_returned(records[:1], first)
    _check_against_returned(records[1:], resumed)


def test_eval_every_and_reward_names_come_from_the_config_file(tmp_path):
    (tmp_path / "bon_tracker.yaml").write_text("eval_every: 8\nproxy_name: linear RM\ntrue_name: gold\n")
    callback = BonTrackerCallback(root=tmp_path / "runs", run_name="lit")  # the working dir is tmp_path
    module = _fit(tmp_path, [callback], max_epochs=3)
    (run_dir,) = (tmp_path / "runs").iterdir()
    records = read_records(run_dir)
    assert [r.step for r in records] == [8]  # epochs end at steps 4, 8, 12: only multiples of 8
    assert (records[0].proxy_name, records[0].true_name) == ("linear RM", "gold")
    _check_against_returned(records, module)


class EnsemblePolicy(TinyPolicy):
    """Returns two reward models' scores and two true rewards per validation batch, as mappings."""

    def validation_step(self, batch, batch_idx):
        score = self.layer(batch[0])
        members = {"rm_a": score, "rm_b": score + 0.3 * torch.sin(7 * score)}
        trues = {"gold": score - 0.5 * score**2, "verifier": (score > 0).float()}
        if not self.trainer.sanity_checking:
            self.returned.setdefault(self.global_step, []).append(
                ({k: v.numpy() for k, v in members.items()}, {k: v.numpy() for k, v in trues.items()})
            )
        return {"bon_proxy": members, "bon_true": trues}


def test_validation_step_returning_members_logs_an_ensemble(tmp_path):
    from bon_tracker.core.selection import rule_scores, selection_input

    callback = BonTrackerCallback(root=tmp_path / "runs", run_name="lit", selection={"n_resamples": 50}, charts=False)
    module = _fit(tmp_path, [callback], max_epochs=1, module=EnsemblePolicy())
    (record,) = read_records(tmp_path / "runs" / "lit")
    blocks = module.returned[record.step]
    members = {k: np.vstack([m[k] for m, _ in blocks]).astype(float) for k in ("rm_a", "rm_b")}
    trues = {k: np.vstack([t[k] for _, t in blocks]).astype(float) for k in ("gold", "verifier")}
    mean = rule_scores(selection_input(members, trues), "mean")  # the default selection_rule
    np.testing.assert_allclose(mean, (members["rm_a"] + members["rm_b"]) / 2, rtol=0, atol=1e-12)
    expected = bon_curve(mean, trues["gold"])
    np.testing.assert_allclose(record.curve.true_mean, expected.true_mean, rtol=1e-6)
    np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean, rtol=1e-6)
    assert record.selection.member_names == ("rm_a", "rm_b")
    assert record.selection.true_names == ("gold", "verifier")
    assert set(record.selection.rules) == {"rm_a", "rm_b", "mean", "worst", "uwo"}
    assert record.selection.n_prompts == 6
