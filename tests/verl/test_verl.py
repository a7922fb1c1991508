"""The verl adapter against the real verl package (run in .venv-verl: scripts/verl_env.sh).

verl's own trainer classes, its config, its ``DataProto`` and ``extract_reward``, its
``_val_metrics_update`` and its ``Tracking`` file logger; no GPU, no inference engine.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import verl.trainer
from omegaconf import OmegaConf
from verl.protocol import DataProto
from verl.trainer.ppo.ray_trainer import RayPPOTrainer
from verl.trainer.ppo.reward import extract_reward
from verl.trainer.ppo.v1 import get_trainer_cls
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.tracking import Tracking

from bon_tracker.backends.local import read_records
from bon_tracker.core import bon_curve
from bon_tracker.integrations.verl import BonValidation, register, validation_scores
from bon_tracker.record import EvalRecord

N_SAMPLES = 8
N_PROMPTS = 6


def verl_config(tmp_path: Path, **bon_options):
    """verl's own default PPO config, with file/console loggers and a ``bon_tracker`` section."""
    path = Path(verl.trainer.__file__).parent / "config" / "_generated_ppo_trainer.yaml"
    config = OmegaConf.load(path)
    config.trainer.logger = ["console", "file"]
    config.trainer.experiment_name = "bon-verl-test"
    options = {"true_key": "gold", "local": {"root": str(tmp_path / "bon_runs")}, **bon_options}
    config.bon_tracker = options
    return config


def scores(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    true = rng.normal(size=(N_PROMPTS, N_SAMPLES))
    return true + rng.standard_t(df=2, size=true.shape), true


def legacy_arguments(proxy: np.ndarray, true: np.ndarray) -> tuple:
    """``_val_metrics_update``'s arguments as ``RayPPOTrainer._validate`` builds them: a ``DataProto``
    of prompts repeated ``n`` times (interleaved), rm_scores and the reward extra infos."""
    prompts = DataProto.from_single_dict(
        {
            "input_ids": torch.zeros(N_PROMPTS, 4, dtype=torch.long),
            "data_source": np.array(["gsm8k"] * N_PROMPTS, dtype=object),
        }
    )
    prompts.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(N_PROMPTS)], dtype=object)
    batch = prompts.repeat(repeat_times=N_SAMPLES, interleave=True)
    rm_scores = torch.zeros(len(batch), 5, dtype=torch.float64)
    rm_scores[:, -1] = torch.from_numpy(proxy.reshape(-1))  # the score sits on the last response token
    batch = batch.union(
        DataProto.from_single_dict(
            {"rm_scores": rm_scores, "gold": true.reshape(-1).astype(object)},
            meta_info={"reward_extra_keys": ["gold"]},
        )
    )
    reward_tensor, reward_extra_info = extract_reward(batch)  # verl's own
    reward_extra_infos_dict: dict[str, list] = defaultdict(list)
    reward_extra_infos_dict["reward"].extend(reward_tensor.sum(-1).cpu().tolist())
    for key, values in reward_extra_info.items():
        reward_extra_infos_dict[key].extend(values.tolist() if isinstance(values, np.ndarray) else values)
    data_sources = np.concatenate([batch.non_tensor_batch["data_source"]], axis=0)
    return data_sources, list(batch.non_tensor_batch["uid"]), reward_extra_infos_dict, []


def v1_arguments(proxy: np.ndarray, true: np.ndarray, without_gold: set[int]) -> tuple:
    """The same as ``PPOTrainer._validate`` (v1) builds them: per-sample ``extra_fields`` whose
    ``reward_extra_info`` lacks ``gold`` for the samples in ``without_gold``, padded with None."""
    uids = [str(uuid.uuid4()) for _ in range(N_PROMPTS)]
    sample_uids = [uid for uid in uids for _ in range(N_SAMPLES)]
    scores_ = proxy.reshape(-1).tolist()
    extra_fields_list = [
        {"reward_extra_info": {"acc": float(s > 0)} | ({} if i in without_gold else {"gold": float(t)})}
        for i, (s, t) in enumerate(zip(scores_, true.reshape(-1)))
    ]
    reward_extra_infos_dict: dict[str, list] = defaultdict(list)
    reward_extra_infos_dict["reward"].extend(scores_)
    # verbatim from verl/trainer/ppo/v1/trainer_base.py (_validate, step 4)
    n_prior = len(reward_extra_infos_dict["reward"]) - len(extra_fields_list)
    for extra_field in extra_fields_list:
        reward_extra_info = extra_field.get("reward_extra_info", {}) if isinstance(extra_field, dict) else {}
        for key in reward_extra_infos_dict:
            if key != "reward" and key not in reward_extra_info:
                reward_extra_infos_dict[key].append(None)
        for key, value in reward_extra_info.items():
            if key not in reward_extra_infos_dict:
                reward_extra_infos_dict[key] = [None] * n_prior
            reward_extra_infos_dict[key].append(value)
        n_prior += 1
    expected = {("gsm8k", uid): N_SAMPLES for uid in uids}
    return ["gsm8k"] * len(sample_uids), sample_uids, reward_extra_infos_dict, [], expected


def expected_scalars(step: int, proxy, true) -> dict[str, float]:
    return EvalRecord.build(step, bon_curve(proxy, true), key_prefix="bon").scalars()


def assert_same_scalars(metrics: dict, expected: dict) -> None:
    """Every scalar of the record of ``bon_curve`` on the same scores is there, with its value (the
    Goodhart point's keys too; the tracker may add more of them, e.g. an interval)."""
    assert expected and all(k.startswith("bon/") for k in expected)
    missing = sorted(set(expected) - set(metrics))
    assert not missing
    np.testing.assert_allclose([metrics[k] for k in expected], list(expected.values()), rtol=0, atol=1e-12)


def test_register_adds_a_bon_mode_for_each_verl_mode():
    modes = register()
    assert register() == modes  # idempotent
    assert {"bon_sync", "bon_colocate_async", "bon_separate_async"} <= set(modes)
    cls = get_trainer_cls("bon_sync")
    assert issubclass(cls, PPOTrainerSync) and issubclass(cls, BonValidation) and cls.base_mode == "sync"


def test_v1_trainer_curves_in_verls_metrics_and_file_logger(tmp_path, monkeypatch):
    register()
    config = verl_config(tmp_path)
    config.trainer.v1.trainer_mode = "bon_sync"
    trainer = get_trainer_cls(config.trainer.v1.trainer_mode)(config=config)  # as TaskRunnerV1.run does
    assert trainer.trainer_mode == "sync" and config.trainer.v1.trainer_mode == "sync"  # verl runs its own mode
    trainer.global_steps = 20

    proxy, true = scores(np.random.default_rng(1))
    without_gold = {3, 17}  # two samples the reward function gave no gold score
    data_sources, uids, extra, turns, expected_counts = v1_arguments(proxy, true, without_gold)
    assert extra["gold"][3] is None and extra["gold"][17] is None
    metrics = trainer._val_metrics_update(data_sources, uids, extra, turns, expected_acc_counts=expected_counts)
    assert any(k.startswith("val-core/gsm8k/") for k in metrics)  # verl's own metrics are still there

    keep = np.ones(proxy.size, dtype=bool)
    keep[list(without_gold)] = False
    rows = np.arange(proxy.size).reshape(proxy.shape)
    proxy_rows = [proxy.reshape(-1)[r[keep[r]]] for r in rows]
    true_rows = [true.reshape(-1)[r[keep[r]]] for r in rows]
    assert_same_scalars(metrics, expected_scalars(20, proxy_rows, true_rows))
    assert metrics["bon/context/samples_without_true"] == 2

    # verl's Tracking logger writes what the trainer returns (TaskRunner: self.logger.log(val_metrics, step))
    log_file = tmp_path / "verl_log.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(log_file))
    tracking = Tracking(config.trainer.project_name, config.trainer.experiment_name, config.trainer.logger)
    tracking.log(data=metrics, step=trainer.global_steps)
    tracking.finish()
    logged = json.loads(log_file.read_text().splitlines()[0])
    assert logged["step"] == 20
    assert_same_scalars(logged["data"], expected_scalars(20, proxy_rows, true_rows))

    trainer._bon_tracker.finish()  # fit() does this at the end of training
    (run_dir,) = (tmp_path / "bon_runs").iterdir()
    (record,) = read_records(run_dir)  # the charts' and tables' run holds the same curve
    np.testing.assert_allclose(record.curve.true_mean, bon_curve(proxy_rows, true_rows).true_mean, atol=1e-12)
    assert record.step == 20 and run_dir.name.startswith("bon-verl-test")


def test_legacy_ray_ppo_trainer_mixin(tmp_path):
    class BonRayPPOTrainer(BonValidation, RayPPOTrainer):
        pass

    trainer = BonRayPPOTrainer.__new__(BonRayPPOTrainer)  # its __init__ needs GPUs' worker groups
    trainer.config = verl_config(tmp_path, ns=[1, 2, 4, 8])
    proxy, true = scores(np.random.default_rng(2))
    for step in (5, 10):
        trainer.global_steps = step
        metrics = trainer._val_metrics_update(*legacy_arguments(proxy + step, true))
        assert_same_scalars(metrics, expected_scalars(step, proxy + step, true))
        assert "val-aux/gsm8k/gold/mean@8" in metrics
    trainer._bon_tracker.finish()
    (run_dir,) = (tmp_path / "bon_runs").iterdir()
    assert [r.step for r in read_records(run_dir)] == [5, 10]


def test_missing_true_key_leaves_verls_metrics_alone(tmp_path, caplog):
    class Trainer(BonValidation, RayPPOTrainer):
        pass

    trainer = Trainer.__new__(Trainer)
    trainer.config = verl_config(tmp_path, true_key="human")
    trainer.global_steps = 1
    proxy, true = scores(np.random.default_rng(3))
    metrics = trainer._val_metrics_update(*legacy_arguments(proxy, true))
    assert metrics and not any(k.startswith("bon/") for k in metrics)
    assert "no 'human' values" in caplog.text and "'gold'" in caplog.text


def test_validation_scores_groups_by_uid_in_first_seen_order():
    proxy, true, dropped = validation_scores(
        ["b", "a", "b", "a", "b"], {"reward": [1, 2, 3, 4, None], "gold": [5, None, 7, 8, 9]}, "reward", "gold"
    )
    assert [p.tolist() for p in proxy] == [[1.0, 3.0], [4.0]] and [t.tolist() for t in true] == [[5.0, 7.0], [8.0]]
    assert dropped == 2
    with pytest.raises(ValueError, match="5 uids"):
        validation_scores(["a"] * 5, {"reward": [1.0] * 5, "gold": [1.0] * 4}, "reward", "gold")


def test_setup_hook_registers_the_modes_in_ray_actors():
    """The import route of the recipe: Ray's worker_process_setup_hook runs register() in every
    worker, so verl's TaskRunner actor finds ``bon_sync`` in its registry."""
    import ray

    ray.init(
        num_cpus=1,
        include_dashboard=False,
        runtime_env={
            "worker_process_setup_hook": "bon_tracker.integrations.verl.register",
            "env_vars": {"PYTHONWARNINGS": "ignore"},
        },
    )
    try:

        @ray.remote
        def trainer_class(mode: str) -> str:
            from verl.trainer.ppo.v1 import get_trainer_cls  # what TaskRunnerV1.run calls

            return get_trainer_cls(mode).__name__

        assert ray.get(trainer_class.remote("bon_sync"), timeout=120) == "BonPPOTrainerSync"
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


@pytest.mark.parametrize("trainer_cls", ["v1", "legacy"])
def test_zero_code_route_reads_verls_own_dumps(tmp_path, capsys, trainer_cls):
    """``bon-tracker analyze --preset verl DIR --true-col gold`` on files written by verl's own
    ``_write_generations`` (v1: ``uid`` = ``{prompt}_{session}_{output}``; legacy: no uid)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from bon_tracker.cli import main

    write = (PPOTrainer if trainer_cls == "v1" else RayPPOTrainer)._write_generations
    dump = tmp_path / "validation"
    rng = np.random.default_rng(4)
    expected = {}
    for step in (0, 40, 100):  # file names sort as numbers: 100 after 40
        proxy, true = scores(rng)
        uids = [str(uuid.uuid4()) for _ in range(N_PROMPTS)]
        inputs = [f"question {i}" for i in range(N_PROMPTS) for _ in range(N_SAMPLES)]
        keys = [f"{uid}_{j}_0" for uid in uids for j in range(N_SAMPLES)]
        gold, score = true.reshape(-1).tolist(), proxy.reshape(-1).tolist()
        if trainer_cls == "v1":  # a two-output session: both rows carry its final score; it is one sample
            keys.insert(1, f"{uids[0]}_0_1")
            for column in (inputs, gold, score):
                column.insert(1, column[0])
        extra = {"reward": score, "gold": gold} | ({"uid": keys} if trainer_cls == "v1" else {})
        write(inputs, ["answer"] * len(inputs), [None] * len(inputs), score, extra, str(dump), step)
        expected[step] = bon_curve(proxy, true)

    out = tmp_path / "runs"
    capsys.readouterr()  # verl prints "Dumped generations to ..."
    assert main(["analyze", "--preset", "verl", str(dump), "--true-col", "gold", "--out", str(out), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    records = read_records(run["run_dir"])
    assert [r.step for r in records] == [0, 40, 100]
    for record in records:
        for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
            np.testing.assert_allclose(getattr(record.curve, field), getattr(expected[record.step], field), atol=1e-12)
        assert record.curve.n_prompts.tolist() == [N_PROMPTS] * len(record.curve.n)

    if trainer_cls == "v1":  # the Ray engine reads the same dump to the same numbers
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        try:
            args = ["analyze", "--preset", "verl", str(dump), "--true-col", "gold", "--engine", "ray", "--json"]
            assert main([*args, "--out", str(tmp_path / "ray_runs")]) == 0
        finally:
            ray.shutdown()
        (run,) = json.loads(capsys.readouterr().out)["runs"]
        for record in read_records(run["run_dir"]):
            np.testing.assert_allclose(record.curve.true_se, expected[record.step].true_se, atol=1e-12)
            assert record.curve.n_prompts.tolist() == [N_PROMPTS] * len(record.curve.n)


def test_validation_scores_with_several_keys_drop_a_sample_missing_any():
    """A list of proxy keys (an ensemble's members) and of true keys: ``{key: rows}``, grouped by uid
    in first-seen order; a sample is dropped where any key is None."""
    extra = {"rm_a": [1, 2, 3, 4, 5], "rm_b": [0, 1, None, 1, 0], "gold": [5, 6, 7, 8, 9], "ver": [1, 0, 1, 0, None]}
    proxy, true, dropped = validation_scores(["b", "a", "b", "a", "b"], extra, ["rm_a", "rm_b"], ["gold", "ver"])
    assert {k: [r.tolist() for r in v] for k, v in proxy.items()} == {
        "rm_a": [[1.0], [2.0, 4.0]],
        "rm_b": [[0.0], [1.0, 1.0]],
    }
    assert {k: [r.tolist() for r in v] for k, v in true.items()} == {
        "gold": [[5.0], [6.0, 8.0]],
        "ver": [[1.0], [0.0, 0.0]],
    }
    assert dropped == 2
    with pytest.raises(ValueError, match="distinct reward extra keys"):
        validation_scores(["a"], {"reward": [1.0]}, ["reward"], "reward")
