"""A training run resumed from a checkpoint continues the same tracking run, each step once.

Real transformers Trainers: the first stops after its step-4 checkpoint (as if the job
were preempted); a second Trainer, with a new callback as in a new process, resumes from
that checkpoint and evaluates on start (step 4 again) and at step 6.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from bon_tracker.backends.local import read_records  # noqa: E402
from bon_tracker.integrations.transformers import BonTrackerCallback  # noqa: E402
from bon_tracker.tracking.tracker import STATE_FILE, BonTracker  # noqa: E402
from tests.tiny_models import PROMPTS, lm_dataset, proxy_reward, tiny_gpt2, tiny_tokenizer, true_reward  # noqa: E402


class StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` (its eval and checkpoint still happen): a preemption."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(tmp_path, callbacks, **overrides):
    tokenizer = tiny_tokenizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **overrides,
    )
    data = lm_dataset(tokenizer, repeat=2)
    return transformers.Trainer(
        model=tiny_gpt2(tokenizer),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _callback(root):
    return BonTrackerCallback(
        prompts=PROMPTS,
        proxy_fn=proxy_reward,
        true_fn=true_reward,
        num_samples=4,
        generation_kwargs={"max_new_tokens": 4},
        root=root,
        run_name="job",
    )


@pytest.mark.slow
def test_resumed_trainer_continues_the_same_run_each_step_once(tmp_path):
    root = tmp_path / "runs"
    _trainer(tmp_path, [_callback(root), StopAt(4)]).train()

    run_dir = root / "job"
    assert [r.step for r in read_records(run_dir)] == [2, 4]
    checkpoint = tmp_path / "out" / "checkpoint-4"
    state = BonTracker.load_state(checkpoint)
    assert state["last_step"] == 4 and state["backend"]["run_id"] == "job"
    first_step_4 = json.loads((run_dir / "records" / "step_000000004.json").read_text())

    resumed = _trainer(tmp_path, [_callback(root)], eval_on_start=True)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert [p.name for p in root.iterdir()] == ["job"]  # the same tracking run, no new one
    assert [r.step for r in read_records(run_dir)] == [2, 4, 6]
    scalar_steps = [json.loads(line)["step"] for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert scalar_steps == [2, 4, 6]
    table_steps = [json.loads(line)["step"] for line in (run_dir / "bon_curves.jsonl").read_text().splitlines()]
    assert sorted(set(table_steps)) == [2, 4, 6] and len(table_steps) == 3 * 3  # n = 1, 2, 4 at each step
    # eval_on_start re-evaluated step 4 after resuming: skipped, the first record stands
    assert json.loads((run_dir / "records" / "step_000000004.json").read_text()) == first_step_4
    assert BonTracker.load_state(tmp_path / "out" / "checkpoint-6")["last_step"] == 6
    assert (tmp_path / "out" / STATE_FILE).exists()  # kept at the end for a later trainer.evaluate()
