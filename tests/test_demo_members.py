"""``examples/demo.py --members K``: an ensemble of reward models, its selection statistics in the
run's records, the per-rule table it prints and the frontier chart it writes."""

from __future__ import annotations

import importlib.util
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, PROMPTS, SAMPLES, MEMBERS, SEED = 3, 64, 16, 3, 0
RULES = ("rm0", "rm1", "rm2", "mean", "worst", "uwo")


def _demo():
    spec = importlib.util.spec_from_file_location("bon_demo_members", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def _replayed_scores(demo):
    """The demo's members, true reward and policy KL at every eval, drawn again from its seed."""
    rng = np.random.default_rng(SEED)
    return [demo.sample_member_scores(rng, i / (STEPS - 1), PROMPTS, SAMPLES, MEMBERS) for i in range(STEPS)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    import contextlib
    import io

    demo = _demo()
    root = tmp_path_factory.mktemp("demo_members")
    png = root / "charts" / "frontier.png"
    argv = ["--root", str(root), "--steps", str(STEPS), "--prompts", str(PROMPTS), "--samples", str(SAMPLES)]
    argv += ["--members", str(MEMBERS), "--seed", str(SEED), "--frontier-png", str(png)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        returned = demo.main(argv)
    return demo, root, png, out.getvalue(), returned


def test_records_on_disk_carry_every_rules_statistics_equal_to_a_direct_computation(demo_run):
    from bon_tracker.backends.local import read_records
    from bon_tracker.core import bon_curve

    demo, root, _, _, returned = demo_run
    records = read_records(root / "demo")
    assert [r.step for r in records] == [r.step for r in returned] == [0, 100, 200]
    for record, (members, true, policy_kl) in zip(records, _replayed_scores(demo), strict=True):
        stats = record.selection
        assert stats is not None
        assert stats.member_names == ("rm0", "rm1", "rm2")
        assert stats.rules == RULES
        assert (stats.n_prompts, stats.N) == (PROMPTS, SAMPLES)
        stacked = np.stack([members[name] for name in stats.member_names])
        for rule, score in (("mean", stacked.mean(axis=0)), ("worst", stacked.min(axis=0)), ("rm1", stacked[1])):
            expected = bon_curve(score, true)
            got = stats.get(rule).curve("bon")
            np.testing.assert_allclose(got.values, expected.n, rtol=0, atol=0)
            np.testing.assert_allclose(got.true_mean, expected.true_mean, rtol=0, atol=1e-12)
            # mean's aggregate is snapped to a power-of-two grid 2**-40 below its largest magnitude
            # (docs/selection.md: equal sums tie), which moves each score by at most half a step
            snap = math.ldexp(1.0, math.frexp(float(np.abs(score).max()))[1] - 40)
            np.testing.assert_allclose(got.proxy_mean, expected.proxy_mean, rtol=0, atol=snap / 2)
            np.testing.assert_allclose(got.kl, expected.kl, rtol=0, atol=1e-12)
        # the deployed rule (mean) is the run's plain curve, and the policy point is at n = 1
        mean_curve = bon_curve(stacked.mean(axis=0), true)
        np.testing.assert_allclose(record.curve.true_mean, mean_curve.true_mean, rtol=0, atol=1e-12)
        assert record.policy.kl == pytest.approx(policy_kl, rel=1e-15)
        assert record.policy.true_mean == pytest.approx(true.mean(), abs=1e-12)


def test_members_share_quality_and_exploit_and_rm0_is_the_single_proxy():
    demo = _demo()
    members, true, kl = demo.sample_member_scores(np.random.default_rng(5), 0.6, 40, 8, 4)
    proxy, true_single, kl_single = demo.sample_scores(np.random.default_rng(5), 0.6, 40, 8)
    # the same draws up to the first error: rm0 is today's single proxy, the true reward the same
    np.testing.assert_array_equal(members["rm0"], proxy)
    np.testing.assert_array_equal(true, true_single)
    assert kl == kl_single
    # every member adds its own error to the same q + e: the members' differences are errors alone,
    # different for each pair (independent draws), and none of them is zero
    diffs = [members[f"rm{k}"] - members["rm0"] for k in range(1, 4)]
    assert all(np.all(d != 0) for d in diffs)
    assert not np.allclose(diffs[0], diffs[1])


def test_printed_table_is_the_records_optima_at_the_policys_peak(demo_run):
    _, _, _, out, records = demo_run
    peak = max(records, key=lambda r: r.policy.true_mean)
    assert f"Selection rules at step {peak.step} ({PROMPTS} prompts x N = {SAMPLES}; best-of-n):" in out
    assert f"Frontier chart of step {peak.step}:" in out
    table = out.split(f"Selection rules at step {peak.step}", 1)[1].splitlines()[2 : 2 + len(RULES)]
    stats = peak.selection
    for line, rule in zip(table, RULES, strict=True):
        fields = line.split()
        assert fields[0] == rule
        best = stats.get(rule).optimum("bon", "curve_argmax")
        assert int(fields[1]) == best.value
        assert float(fields[2]) == pytest.approx(best.true_mean, abs=5e-4)
        assert float(fields[3]) == pytest.approx(best.kl, abs=5e-3)
        root = stats.get(rule).optimum("bon", "derivative_root")
        if np.isfinite(root.value):
            assert float(fields[4]) == pytest.approx(root.value, abs=0.05)
        else:
            assert fields[4:6] == [">", "N"]


def test_frontier_png_is_the_chosen_steps_chart(demo_run):
    from bon_tracker.reports.selection_charts import frontier_chart

    _, _, png, out, records = demo_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    step = int(re.search(r"Frontier chart of step (\d+):", out).group(1))
    fig = frontier_chart(next(r for r in records if r.step == step))
    expected = np.round(fig.get_size_inches() * fig.dpi).astype(int).tolist()
    assert [width, height] == expected  # one panel (one true reward), at the chart's own size
    assert 20_000 < len(data) < 2_000_000


def test_frontier_options_need_members(tmp_path, capsys):
    demo = _demo()
    with pytest.raises(SystemExit) as err:
        demo.main(["--root", str(tmp_path), "--frontier-png", str(tmp_path / "f.png")])
    assert err.value.code == 2
    assert "need --members K with K >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--root", str(tmp_path), "--members", "2", "--steps", "3", "--frontier-step", "250"])
    assert "--frontier-step must be an eval step, 0, 100, ..., 200" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists() and not (tmp_path / "demo").exists()
