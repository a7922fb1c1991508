"""Lightning: ``validation_step`` returns ``{"bon_proxy": ..., "bon_true": ...}``; the callback logs the curves.

A tiny LightningModule is a policy that picks one of K canned answers per prompt and is
trained by REINFORCE on a proxy reward that overrates some answers. Each validation step
samples N answers for its batch of prompts and returns both rewards' scores, shape
(prompts in the batch, N); ``BonTrackerCallback`` collects them over the validation epoch
and logs the best-of-n curves at ``trainer.global_step``, with the KL the module logs.
Runs in well under a minute on a CPU:

    python examples/lightning_example.py [--epochs 10] [--root examples/output]

Add ``--mlflow`` to log into the run of an ``MLFlowLogger`` (``sqlite:///examples/output/mlflow.db``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch

from bon_tracker import BonTracker
from bon_tracker.integrations.lightning import BonTrackerCallback
from bon_tracker.reports.text import curve_table, where_to_look

PROMPTS, ANSWERS, N = 64, 32, 16


class CannedAnswerPolicy(pl.LightningModule):
    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        true = torch.randn(PROMPTS, ANSWERS, generator=generator)
        error = torch.distributions.StudentT(2.0).sample((PROMPTS, ANSWERS))
        self.register_buffer("true_table", true)  # what each answer is really worth
        self.register_buffer("proxy_table", true + 0.8 * error)  # what the reward model says
        self.logits = torch.nn.Parameter(torch.zeros(PROMPTS, ANSWERS))

    def _sample(self, prompts: torch.Tensor, n: int) -> torch.Tensor:
        return torch.multinomial(self.logits[prompts].softmax(-1), n, replacement=True)  # (prompts, n)

    def training_step(self, batch, batch_idx):
        (prompts,) = batch
        answers = self._sample(prompts, 8)
        reward = self.proxy_table[prompts[:, None], answers]
        advantage = reward - reward.mean(dim=1, keepdim=True)
        logp = self.logits[prompts].log_softmax(-1).gather(1, answers)
        probs = self.logits.softmax(-1)
        self.log("kl", (probs * (probs * ANSWERS).log()).sum(-1).mean())  # KL to the uniform start
        return -(advantage * logp).mean()

    def validation_step(self, batch, batch_idx):
        (prompts,) = batch
        answers = self._sample(prompts, N)
        return {
            "bon_proxy": self.proxy_table[prompts[:, None], answers],
            "bon_true": self.true_table[prompts[:, None], answers],
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--root", default=str(Path(__file__).parent / "output"), help="folder for local runs")
    parser.add_argument("--mlflow", action="store_true", help="log into an MLFlowLogger's run")
    args = parser.parse_args()

    torch.manual_seed(0)
    prompts = torch.utils.data.TensorDataset(torch.arange(PROMPTS))
    train = torch.utils.data.DataLoader(prompts, batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(prompts, batch_size=32)
    options = {
        "max_epochs": args.epochs,
        "accelerator": "cpu",
        "enable_checkpointing": False,
        "enable_model_summary": False,
    }
    options.update(enable_progress_bar=False, log_every_n_steps=1, default_root_dir=args.root)

    if args.mlflow:  # the callback builds its tracker, attached to the logger's run
        uri = f"sqlite:///{Path(args.root).resolve() / 'mlflow.db'}"
        run_logger = pl.loggers.MLFlowLogger(experiment_name="bon-lightning", tracking_uri=uri)
        callback = BonTrackerCallback(backend="mlflow", kl_metric="kl")
        pl.Trainer(logger=run_logger, callbacks=[callback], **options).fit(CannedAnswerPolicy(), train, val)
        print("\n" + curve_table(callback.tracker.history[-1]))
        print()
        print("\n".join(where_to_look(callback.tracker.backend)))
        return

    with BonTracker("local", root=args.root, run_name="lightning") as tracker:  # or pass a tracker you own
        callback = BonTrackerCallback(tracker, kl_metric="kl")
        pl.Trainer(logger=False, callbacks=[callback], **options).fit(CannedAnswerPolicy(), train, val)
    for record in tracker.history:
        p = record.policy
        print(f"step {record.step:4d}  KL {p.kl:5.2f}  policy true {p.true_mean:+.3f}  proxy {p.proxy_mean:+.3f}")
    print("\n" + curve_table(tracker.history[-1]))
    print()
    print("\n".join(where_to_look(tracker.backend)))


if __name__ == "__main__":
    main()
