"""The lab's fast path: a plain-torch policy-gradient loop against the proxy, tracked by ``BonTracker``.

Each training step samples ``group`` completions for each of ``batch_prompts`` prompts,
scores them with the proxy, subtracts the KL penalty ``kl_coef * sum_t log(pi/pi_ref)`` and
takes a REINFORCE step with each group's mean as the baseline (GRPO's group-relative
advantage, without the std normalisation, so the loop ascends ``E[proxy] - kl_coef * KL``
exactly). Each eval samples N completions for each of P fixed eval prompts, scores them by
proxy and gold and logs them through the tracker with the policy's KL to the frozen
reference; a large held-out sample measures the gold mean precisely (the "real" peak).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bon_tracker.lab.gold import WORDS
from bon_tracker.lab.policy import (
    build_policy,
    completion_log_probs,
    gold_of_words,
    random_prompts,
    sample,
    sequence_kl,
    word_counts,
)
from bon_tracker.lab.proxy import member_scores, train_ensemble
from bon_tracker.optional import require
from bon_tracker.tracking.tracker import BonTracker

torch = require("torch", "lab")


@dataclass(frozen=True)
class LabConfig:
    """What a researcher varies in the lab (the CLI flags), and the loop's fixed sizes.

    Attributes:
        labels: K, the number of gold labels the proxy is trained on.
        label_noise: standard deviation of the Gaussian noise added to each gold label.
        proxy_size: hidden units of the bag-of-words proxy MLP.
        ensemble: proxy members (each on a bootstrap resample of the labels); 1: one proxy.
        kl_coef: the KL penalty's coefficient (per nat of completion KL).
        seed: everything random (labels, models, sampling) follows from it.
        evals: eval steps, the first before any training.
        steps_per_eval: training steps between evals.
        prompts: P, eval prompts; samples: N, completions per eval prompt.
        heldout: completions of the held-out sample that measures the gold mean at each eval.
        batch_prompts, group: prompts per training step and completions per prompt.
        lr: Adam's learning rate for the policy.
        threads: torch CPU threads.
    """

    labels: int = 1000
    label_noise: float = 1.0
    proxy_size: int = 32
    ensemble: int = 1
    kl_coef: float = 0.02
    seed: int = 0
    evals: int = 16
    steps_per_eval: int = 10
    prompts: int = 32
    samples: int = 16
    heldout: int = 2048
    batch_prompts: int = 8
    group: int = 8
    lr: float = 1e-3
    threads: int = 1

    def __post_init__(self) -> None:
        for name in ("labels", "proxy_size", "ensemble", "evals", "steps_per_eval", "prompts", "samples",
                     "heldout", "batch_prompts", "group", "threads"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabConfig.{name} must be an integer >= 1, got {value!r}")
        if self.labels < 8:
            raise ValueError(f"LabConfig.labels must be at least 8 gold labels to train a proxy, got {self.labels}")
        if self.evals < 3:
            raise ValueError(f"LabConfig.evals must be at least 3 (a rise and a fall need them), got {self.evals}")
        if self.group < 2:
            raise ValueError(f"LabConfig.group must be at least 2 (the baseline is the group mean), got {self.group}")
        for name in ("label_noise", "kl_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LabConfig.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"LabConfig.lr must be in (0, 1), got {self.lr!r}")


@dataclass
class LabEval:
    """What one eval measured (beside what the tracker logged)."""

    step: int
    policy_kl: float
    gold_mean: float  # policy gold mean on the held-out sample
    gold_se: float
    proxy_mean: float  # policy proxy mean (members' mean) on the held-out sample
    proxy_se: float
    eval_gold_mean: float  # over the P x N eval samples the tracker saw
    eval_proxy_mean: float
    example: str  # one completion of the first eval prompt


@dataclass
class LabResult:
    """A lab run: its config, its evals, the tracker's alerts, where it was logged."""

    config: LabConfig
    evals: list[LabEval]
    alerts: list[dict[str, Any]]
    location: str | None  # where the backend put the run, in words (a folder, a URL, a run id)
    seconds: float
    proxy_fit_r2: float  # the proxy's R^2 against gold on fresh samples of the initial policy
    records: list[Any] = field(default_factory=list, repr=False)  # the tracker's EvalRecords
    run_dir: str | None = None  # the local backend's run folder (None for the other backends)

    @property
    def peak_index(self) -> int:
        """The eval where the held-out gold mean is highest (the real peak)."""
        return int(np.argmax([e.gold_mean for e in self.evals]))

    def peaked(self, z: float = 3.0) -> bool:
        """Gold peaked and fell: the last eval's held-out gold is ``z`` SE below the peak while the
        proxy rose past its value at the peak."""
        peak, last = self.evals[self.peak_index], self.evals[-1]
        fall = (peak.gold_mean - last.gold_mean) / math.hypot(peak.gold_se, last.gold_se)
        return self.peak_index < len(self.evals) - 1 and fall >= z and last.proxy_mean > peak.proxy_mean

    @property
    def first_alert_index(self) -> int | None:
        """The eval index of the first alert onset (any rule), None without one."""
        if not self.alerts:
            return None
        steps = [e.step for e in self.evals]
        return steps.index(min(a["step"] for a in self.alerts))

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "evals": [asdict(e) for e in self.evals],
            "alerts": self.alerts,
            "location": self.location,
            "run_dir": self.run_dir,
            "seconds": self.seconds,
            "proxy_fit_r2": self.proxy_fit_r2,
            "peak_index": self.peak_index,
            "peaked": self.peaked(),
            "first_alert_index": self.first_alert_index,
        }


class ProxyScorer:
    """The proxy the policy is trained against: the mean of the ensemble members' scores."""

    def __init__(self, members: dict[str, Any]):
        self.members = members

    def scores(self, words: np.ndarray) -> dict[str, np.ndarray]:
        """Each member's scores (the mapping ``log_scores`` will take for ensembles)."""
        return member_scores(self.members, words)

    def __call__(self, words: np.ndarray) -> np.ndarray:
        return np.mean(list(self.scores(words).values()), axis=0)


def initial_labels(policy: Any, config: LabConfig, rng: np.random.Generator, generator: Any):
    """K completions of the initial policy with noisy gold labels."""
    words = sample(policy, random_prompts(config.labels, rng), generator).numpy()
    labels = gold_of_words(words) + config.label_noise * rng.standard_normal(config.labels)
    return words, labels


def run_lab(
    config: LabConfig,
    *,
    tracker: BonTracker | None = None,
    progress: Callable[[str], None] | None = None,
    **tracker_kwargs: Any,
) -> LabResult:
    """Train a proxy on K gold labels, then a policy against it, tracking every eval.

    Args:
        config: the lab's settings.
        tracker: where the evals are logged; by default ``BonTracker(**tracker_kwargs)``
            (local backend unless configured), finished at the end.
        progress: called with one line per eval (e.g. ``print``).
        **tracker_kwargs: options of :class:`BonTracker` when ``tracker`` is not given.

    Returns:
        The :class:`LabResult` with every eval's held-out gold/proxy means and the alerts.
    """
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    own_tracker = tracker is None
    try:
        rng = np.random.default_rng(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        policy = build_policy(config.seed)
        reference = build_policy(config.seed)
        reference.load_state_dict(policy.state_dict())
        for model in (policy, reference):
            model.eval()  # no dropout: the KL is between the two deterministic nets
        for p in reference.parameters():
            p.requires_grad_(False)

        label_words, labels = initial_labels(policy, config, rng, generator)
        proxy = ProxyScorer(
            train_ensemble(label_words, labels, members=config.ensemble, hidden=config.proxy_size, seed=config.seed)
        )
        check_words = sample(policy, random_prompts(2048, rng), generator).numpy()
        proxy_fit_r2 = _r2(proxy(check_words), gold_of_words(check_words))

        eval_prompts = random_prompts(config.prompts, rng).repeat_interleave(config.samples, dim=0)
        heldout_prompts = random_prompts(config.heldout, rng)
        optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
        if own_tracker:
            tracker = BonTracker(**tracker_kwargs)
        evals: list[LabEval] = []
        step = 0
        for index in range(config.evals):
            if index:
                for _ in range(config.steps_per_eval):
                    _train_step(policy, reference, optimizer, proxy, config, rng, generator)
                    step += 1
            evals.append(_evaluate(step, policy, reference, proxy, config, eval_prompts, heldout_prompts, generator,
                                   tracker))  # fmt: skip
            if progress is not None:
                e = evals[-1]
                progress(
                    f"step {e.step:4d}  KL {e.policy_kl:6.2f}  gold {e.gold_mean:6.3f} ± {e.gold_se:.3f}  "
                    f"proxy {e.proxy_mean:6.3f}  alerts {len(tracker.alerts)}  e.g. {e.example!r}"
                )
        alerts = [a.to_dict() for a in tracker.alerts]
        records = list(tracker.history)
        if own_tracker:
            tracker.finish()
        return LabResult(
            config, evals, alerts, tracker.backend.location, time.perf_counter() - started, proxy_fit_r2, records,
            run_dir=local_run_dir(tracker),
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
        if own_tracker and tracker is not None:
            tracker.finish()


def _train_step(policy, reference, optimizer, proxy, config: LabConfig, rng, generator) -> None:
    prompts = random_prompts(config.batch_prompts, rng).repeat_interleave(config.group, dim=0)
    policy.eval()
    words = sample(policy, prompts, generator)
    log_p = completion_log_probs(policy, prompts, words)
    with torch.no_grad():
        log_ref = completion_log_probs(reference, prompts, words)
    chosen = log_p.gather(-1, words.unsqueeze(-1)).squeeze(-1)  # (M, L)
    chosen_ref = log_ref.gather(-1, words.unsqueeze(-1)).squeeze(-1)
    log_ratio = (chosen - chosen_ref).sum(dim=1).detach()
    reward = torch.as_tensor(proxy(words.numpy()), dtype=torch.float32) - config.kl_coef * log_ratio
    grouped = reward.view(config.batch_prompts, config.group)
    advantage = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    loss = -(advantage * chosen.sum(dim=1)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@torch.no_grad()
def _evaluate(step, policy, reference, proxy, config, eval_prompts, heldout_prompts, generator, tracker) -> LabEval:
    words = sample(policy, heldout_prompts, generator)
    log_p = completion_log_probs(policy, heldout_prompts, words)
    log_ref = completion_log_probs(reference, heldout_prompts, words)
    policy_kl = float(sequence_kl(log_p, log_ref).mean())
    heldout_words = words.numpy()
    gold = gold_of_words(heldout_words)
    proxy_scores = proxy(heldout_words)

    eval_words = sample(policy, eval_prompts, generator).numpy()
    shape = (config.prompts, config.samples)
    members = {name: s.reshape(shape) for name, s in proxy.scores(eval_words).items()}
    eval_gold = gold_of_words(eval_words).reshape(shape)
    eval_proxy = np.mean(list(members.values()), axis=0)
    # An ensemble goes in as its members ({name: (P, N)}): the tracker's default selection rule
    # ("mean") deploys their mean, the curve the policy is trained against, and adds each
    # member's and the worst-case and uncertainty-weighted rules' statistics (docs/selection.md).
    tracker.log_scores(step, members if len(members) > 1 else eval_proxy, eval_gold, policy_kl=policy_kl)
    root = math.sqrt(len(gold))
    return LabEval(
        step=step,
        policy_kl=policy_kl,
        gold_mean=float(gold.mean()),
        gold_se=float(gold.std(ddof=1) / root),
        proxy_mean=float(proxy_scores.mean()),
        proxy_se=float(proxy_scores.std(ddof=1) / root),
        eval_gold_mean=float(eval_gold.mean()),
        eval_proxy_mean=float(eval_proxy.mean()),
        example=" ".join(WORDS[i] for i in eval_words[0]),
    )


def local_run_dir(tracker: BonTracker) -> str | None:
    """The run folder when the tracker logs to the local backend, else None."""
    run_dir = getattr(tracker.backend, "run_dir", None) if tracker.backend.name == "local" else None
    return None if run_dir is None else str(run_dir)


def _r2(prediction: np.ndarray, target: np.ndarray) -> float:
    return float(1 - np.sum((prediction - target) ** 2) / np.sum((target - target.mean()) ** 2))


__all__ = ["LabConfig", "LabEval", "LabResult", "ProxyScorer", "run_lab", "word_counts"]
