"""The Goodhart lab: the gold rubric by hand, the quick mode's peak and alert, the TRL path.

The quick mode is the CLI's ``bon-tracker lab --quick`` (seed 0, default settings): the
gold reward measured on a large held-out sample must peak and fall by >= 3 SE while the
proxy rises, the tracker's default alert rules must fire within 2 evals of that peak, and
the local run folder must hold what the lab measured.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bon_tracker.backends.local import read_alerts, read_records  # noqa: E402
from bon_tracker.cli.main import main  # noqa: E402
from bon_tracker.lab.gold import GOOD_WORDS, WORDS, gold_reward  # noqa: E402
from bon_tracker.lab.loop import LabConfig  # noqa: E402
from bon_tracker.lab.policy import gold_of_words, word_counts  # noqa: E402


def test_gold_rubric_by_hand():
    # h(k) = k - 0.3 k (k - 1) per good word, -1 per bad word, neutral words 0
    assert gold_reward(["clear kind the rude"]).tolist() == [1.0]
    assert gold_reward(["clear clear"]).tolist() == pytest.approx([1.4])
    assert gold_reward(["clear clear clear clear clear clear clear clear"]).tolist() == pytest.approx([8 - 0.3 * 56])
    assert gold_reward([GOOD_WORDS]).tolist() == [8.0]
    rng = np.random.default_rng(0)
    words = rng.integers(0, len(WORDS), size=(200, 8))
    texts = [" ".join(WORDS[i] for i in row) for row in words]
    np.testing.assert_allclose(gold_of_words(words), gold_reward(texts))  # ids and texts agree
    np.testing.assert_array_equal(word_counts(words).sum(axis=1), 8)


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="labels"):
        LabConfig(labels=3)
    with pytest.raises(ValueError, match="kl_coef"):
        LabConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match="evals"):
        LabConfig(evals=2)


@pytest.fixture
def one_torch_thread():
    """Tiny models: one thread (two threads on a busy 2-core machine spin against each other)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_ensemble_members_on_resampled_labels(one_torch_thread):
    from bon_tracker.lab.loop import ProxyScorer
    from bon_tracker.lab.proxy import train_ensemble

    rng = np.random.default_rng(1)
    words = rng.integers(0, len(WORDS), size=(256, 8))
    labels = gold_of_words(words) + rng.standard_normal(256)
    members = train_ensemble(words, labels, members=3, hidden=8, seed=1)
    assert sorted(members) == ["member_0", "member_1", "member_2"]
    proxy = ProxyScorer(members)
    scores = proxy.scores(words)
    assert not np.allclose(scores["member_0"], scores["member_1"])  # other labels, other init
    np.testing.assert_allclose(proxy(words), np.mean([scores[m] for m in sorted(scores)], axis=0))
    # each member learned the rubric, not noise: it ranks completions like gold does
    for name in scores:
        assert np.corrcoef(scores[name], gold_of_words(words))[0, 1] > 0.6
    assert list(train_ensemble(words, labels, members=1, hidden=8, seed=1)) == ["proxy"]


@pytest.mark.slow
def test_ensemble_run_logs_its_members(tmp_path):
    from bon_tracker.lab.loop import run_lab

    config = LabConfig(labels=64, ensemble=2, evals=3, steps_per_eval=1, heldout=256, seed=3)
    result = run_lab(config, root=tmp_path, run_name="ens", spool_dir=tmp_path / "spool", charts=False)
    records = read_records(result.run_dir)
    assert [r.step for r in records] == [0, 1, 2]
    for record, e in zip(records, result.evals, strict=True):
        assert record.selection.member_names == ("member_0", "member_1")
        assert {"mean", "worst", "uwo"} <= set(record.selection.rules)
        # the deployed rule is the members' mean: the proxy the policy is trained against
        assert record.curve.proxy_mean[0] == pytest.approx(e.eval_proxy_mean)
        assert record.curve.true_mean[0] == pytest.approx(e.eval_gold_mean)


@pytest.mark.slow
def test_quick_mode_peaks_and_alerts(tmp_path, capsys):
    code = main(["lab", "--quick", "--root", str(tmp_path), "--spool-dir", str(tmp_path / "spool"), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    evals = summary["evals"]
    peak = summary["peak_index"]
    gold = np.array([e["gold_mean"] for e in evals])
    gold_se = np.array([e["gold_se"] for e in evals])
    proxy = np.array([e["proxy_mean"] for e in evals])
    assert 0 < peak < len(evals) - 1
    assert gold[peak] > gold[0] + 3 * math.hypot(gold_se[peak], gold_se[0])  # a real rise first
    assert (gold[peak] - gold[-1]) / math.hypot(gold_se[peak], gold_se[-1]) >= 3  # then a real fall
    assert proxy[-1] > proxy[peak]  # while the proxy kept rising
    first = summary["first_alert_index"]
    assert first is not None and -2 <= first - peak <= 2
    # what the tracker wrote is what the lab measured
    records = read_records(summary["run_dir"])
    assert [r.step for r in records] == [e["step"] for e in evals]
    for record, e in zip(records, evals, strict=True):
        assert record.curve.true_mean[0] == pytest.approx(e["eval_gold_mean"])
        assert record.curve.proxy_mean[0] == pytest.approx(e["eval_proxy_mean"])
        assert record.policy.kl == pytest.approx(e["policy_kl"])
        assert record.curve.N == 16 and record.curve.n_prompts[0] == 32
    assert evals[0]["policy_kl"] == pytest.approx(0.0, abs=1e-6) and evals[-1]["policy_kl"] > 5
    onsets = read_alerts(summary["run_dir"])
    assert min(a["step"] for a in onsets) == evals[first]["step"]


@pytest.mark.slow
def test_trl_path_logs_each_evaluation(tmp_path):
    pytest.importorskip("trl")
    from bon_tracker.lab.trl_lab import run_trl_lab

    config = LabConfig(labels=64, evals=3, steps_per_eval=1, samples=4, group=4, seed=5)
    result = run_trl_lab(config, prompts=4, root=tmp_path, run_name="trl-lab", spool_dir=tmp_path / "spool")
    records = read_records(tmp_path / "trl-lab")
    assert [r.step for r in records] == [0, 1, 2]  # eval_on_start, then every step
    for record in records:
        assert record.curve.N == 4 and record.curve.n_prompts[0] == 4
        # gold of 8 words lies in [-8, 8]; the policy point carries TRL's KL (0 before training)
        assert np.all(np.abs(record.curve.true_mean) <= 8)
        assert record.policy is not None and math.isfinite(record.policy.kl)
    assert records[0].policy.kl == pytest.approx(0.0, abs=1e-6)
    assert len(result.evals) == 3
