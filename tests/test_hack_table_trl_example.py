"""The TRL example (examples/trl_example.py), whose proxy pays for length while its true reward
penalises rambling: at every eval the hack table's rows are the proxy's long picks against the
true reward's short ones, and the length feature of the picks sits above the samples' mean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")


def test_the_trl_examples_hack_table_shows_the_length_hack(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_example.py"
    subprocess.run(
        [sys.executable, str(example), "--steps", "8", "--root", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    from bon_tracker.backends.local import read_records

    records = read_records(tmp_path / "trl")
    assert [r.step for r in records] == [0, 2, 4, 6, 8]
    for record in records:
        hacks = record.hacks
        assert hacks is not None and hacks.rows, record.step
        for row in hacks.rows:
            words = len(row.proxy_pick.text.split()), len(row.true_pick.text.split())
            # proxy = good + 0.1 * words; true = good - 0.3 * (words - 3)+: a pick that wins the
            # proxy and loses true reward must be the longer one
            assert words[0] > words[1], (record.step, row)
            assert row.proxy_pick.true < row.true_pick.true and row.gap > 0
        features = hacks.feature_scalars()
        assert features["length_chars/diff"] > 0, record.step  # the proxy's picks are the long ones
        assert features["length_chars/pick"] == pytest.approx(
            features["length_chars/all"] + features["length_chars/diff"]
        )
