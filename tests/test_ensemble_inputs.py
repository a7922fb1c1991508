"""Several proxies (an ensemble) and several true rewards in score files and ``bon-tracker analyze``.

What analyze writes for a step must be what ``BonTracker.log_scores`` computes from the same
scores: the deployed rule's curve and the selection statistics of every rule and true reward.
Every layout (CSV and Parquet rows of one sample, JSONL and Parquet rows of one prompt, shuffled
rows, prompts cut across batches) gives the same records.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bon_tracker import bon_curve
from bon_tracker.analysis.score_files import Columns, ScoreFileError, read_score_batches
from bon_tracker.backends.local import read_records
from bon_tracker.cli.main import EXIT_OK, EXIT_USAGE, main
from bon_tracker.core.selection import rule_scores, selection_input
from bon_tracker.core.selection_stats import compute_selection_statistics
from bon_tracker.tracking.tracker import BonTracker

MEMBERS = ("rm_a", "rm_b", "rm_c")
TRUES = ("gold", "verifier")
CURVE_FIELDS = ("n", "kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts")
STEPS = (0, 10)


@pytest.fixture(autouse=True)
def _isolated(cli_folder):
    (cli_folder / "bon_tracker.yaml").write_text("local:\n  charts: false\n")  # records only: no PNGs to draw


def make_scores(seed: int = 0, prompts: int = 10, samples: int = 8) -> dict[int, dict[str, np.ndarray]]:
    """Per step, each column's (P, N) scores. Members are integers 0..4 (ties everywhere, and
    UWO aggregates that tie only in exact arithmetic); the verifier is 0/1."""
    rng = np.random.default_rng(seed)
    out = {}
    for step in STEPS:
        gold = rng.integers(0, 5, (prompts, samples)).astype(float)
        scores = {name: np.clip(gold + rng.integers(-2, 3, gold.shape), 0, 4).astype(float) for name in MEMBERS}
        scores["gold"] = gold
        scores["verifier"] = (gold >= 3).astype(float)
        out[step] = scores
    return out


def flat_rows(scores: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    rows = []
    for step, by_column in scores.items():
        P, N = by_column["gold"].shape
        for p in range(P):
            for i in range(N):
                row = {"step": step, "prompt_id": f"q{p}"}
                row.update({c: float(by_column[c][p, i]) for c in (*MEMBERS, *TRUES)})
                rows.append(row)
    return rows


def prompt_rows(scores: dict[int, dict[str, np.ndarray]]) -> list[dict]:
    rows = []
    for step, by_column in scores.items():
        for p in range(by_column["gold"].shape[0]):
            row = {"step": step, "prompt_id": f"q{p}"}
            row.update({c: by_column[c][p].tolist() for c in (*MEMBERS, *TRUES)})
            rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=13)
    return path


def analyze(tmp_path: Path, path: Path, *args: str, name: str = "run") -> list:
    code = main(
        [
            "analyze",
            str(path),
            "--proxy-col",
            "rm_a,rm_b",
            "--proxy-col",
            "rm_c",
            "--true-col",
            "gold,verifier",
            "--out",
            str(tmp_path / "out"),
            "--run-name",
            name,
            "-q",
            "--json",
            *args,
        ]
    )
    assert code == EXIT_OK
    return read_records(tmp_path / "out" / name)


def tracked(tmp_path: Path, scores: dict[int, dict[str, np.ndarray]], rule: str) -> list:
    with BonTracker("local", root=tmp_path / "tracked", run_name="tracked", selection_rule=rule) as tracker:
        for step, by_column in scores.items():
            tracker.log_scores(step, {m: by_column[m] for m in MEMBERS}, {t: by_column[t] for t in TRUES})
    return read_records(tmp_path / "tracked" / "tracked")


def assert_same_records(got: list, want: list) -> None:
    assert [r.step for r in got] == [r.step for r in want]
    for a, b in zip(got, want):
        for field in CURVE_FIELDS:
            np.testing.assert_allclose(getattr(a.curve, field), getattr(b.curve, field), rtol=1e-12, atol=1e-13)
        assert a.selection is not None and b.selection is not None
        assert a.selection.member_names == b.selection.member_names
        assert a.selection.true_names == b.selection.true_names
        assert a.selection.to_json() == b.selection.to_json()
        assert a.alert_states == b.alert_states  # the deployed rule's under every true reward
        assert any(key.startswith("verifier/") for key in a.alert_states)


# ---- the records are log_scores's --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["mean", "uwo", "rm_b"])
def test_analyze_of_an_ensemble_is_what_log_scores_records(tmp_path, rule):
    scores = make_scores()
    path = write_csv(tmp_path / "ensemble.csv", flat_rows(scores))
    got = analyze(tmp_path, path, "--selection-rule", rule, "--batch-rows", "11")  # prompts cut across batches
    want = tracked(tmp_path, scores, rule)
    assert_same_records(got, want)
    for record in got:
        assert record.selection.member_names == MEMBERS and record.selection.true_names == TRUES
        assert set(record.selection.rules) == {*MEMBERS, "mean", "worst", "uwo"}
        assert {s.true_name for s in record.selection.statistics} == set(TRUES)


def test_the_curve_is_the_deployed_rules_best_of_n(tmp_path):
    """worst = the minimum over members, computed here with numpy: the record's curve is its bon_curve
    against the first true reward, and the selection statistics are compute_selection_statistics'."""
    scores = make_scores(seed=3)
    path = write_csv(tmp_path / "ensemble.csv", flat_rows(scores))
    records = analyze(tmp_path, path, "--selection-rule", "worst")
    for record in records:
        by_column = scores[record.step]
        worst = np.min([by_column[m] for m in MEMBERS], axis=0)
        want = bon_curve(worst, by_column["gold"])
        for field in CURVE_FIELDS:
            np.testing.assert_allclose(getattr(record.curve, field), getattr(want, field), rtol=1e-12, atol=1e-13)
        inp = selection_input({m: by_column[m] for m in MEMBERS}, {t: by_column[t] for t in TRUES})
        np.testing.assert_array_equal(rule_scores(inp, "worst"), worst)
        assert record.selection.to_json() == compute_selection_statistics(inp).to_json()


def test_every_layout_gives_the_same_records(tmp_path):
    scores = make_scores(seed=1)
    flat, per_prompt = flat_rows(scores), prompt_rows(scores)
    # Sample by sample across prompts: no prompt's rows are contiguous, prompts first appear in order.
    order = sorted(range(len(flat)), key=lambda i: (flat[i]["step"], i % 8, int(flat[i]["prompt_id"][1:])))
    interleaved = [flat[i] for i in order]
    want = analyze(tmp_path, write_csv(tmp_path / "a.csv", flat), name="csv")
    layouts = {
        "jsonl_prompts": write_jsonl(tmp_path / "b.jsonl", per_prompt),
        "csv_interleaved": write_csv(tmp_path / "c.csv", interleaved),  # not grouped: every row buffered
        "parquet_samples": write_parquet(tmp_path / "d.parquet", flat),
        "parquet_prompts": write_parquet(tmp_path / "e.parquet", per_prompt),
    }
    for name, path in layouts.items():
        got = analyze(tmp_path, path, "--batch-rows", "5", name=name)
        assert_same_records(got, want)


def test_ragged_prompts_are_what_log_scores_records(tmp_path):
    rng = np.random.default_rng(5)
    rows, members, trues = [], {m: [] for m in MEMBERS}, {t: [] for t in TRUES}
    for p in range(9):
        n = 4 + p % 3
        gold = rng.normal(size=n).round(2)
        by_column = {m: (gold + rng.normal(size=n)).round(2) for m in MEMBERS}
        by_column.update(gold=gold, verifier=(gold > 0).astype(float))
        for c in (*MEMBERS, *TRUES):
            (members if c in MEMBERS else trues)[c].append(by_column[c])
        rows.append({"prompt_id": f"q{p}", **{c: by_column[c].tolist() for c in by_column}})
    records = analyze(tmp_path, write_jsonl(tmp_path / "ragged.jsonl", rows))
    with BonTracker("local", root=tmp_path / "tracked", run_name="tracked") as tracker:
        tracker.log_scores(0, members, trues)
    assert_same_records(records, read_records(tmp_path / "tracked" / "tracked"))


def test_one_proxy_with_selection_flag(tmp_path):
    scores = make_scores(seed=2)
    path = write_csv(tmp_path / "one.csv", flat_rows(scores))
    base = ["analyze", str(path), "--proxy-col", "rm_a", "--true-col", "gold", "--out", str(tmp_path / "out"), "-q"]
    assert main([*base, "--run-name", "plain"]) == EXIT_OK
    assert main([*base, "--run-name", "selected", "--selection"]) == EXIT_OK
    plain, selected = read_records(tmp_path / "out" / "plain"), read_records(tmp_path / "out" / "selected")
    for a, b in zip(plain, selected):
        assert a.selection is None
        assert b.selection.member_names == ("rm_a",) and b.selection.rules == ("rm_a",)
        np.testing.assert_array_equal(a.curve.true_mean, b.curve.true_mean)
        inp = selection_input({"rm_a": scores[b.step]["rm_a"]}, {"gold": scores[b.step]["gold"]})
        assert b.selection.to_json() == compute_selection_statistics(inp).to_json()


def test_omit_drops_a_sample_from_every_column(tmp_path):
    scores = make_scores(seed=4)
    rows = flat_rows(scores)
    rows[3]["rm_b"] = float("nan")  # step 0, prompt q0, sample 3
    rows[20]["verifier"] = None  # step 0, prompt q2, sample 4
    csv_rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    records = analyze(tmp_path, write_csv(tmp_path / "nan.csv", csv_rows), "--nan-policy", "omit")
    members = {m: [scores[0][m][p] for p in range(10)] for m in MEMBERS}
    trues = {t: [scores[0][t][p] for p in range(10)] for t in TRUES}
    for column in (*members.values(), *trues.values()):
        column[0] = np.delete(column[0], 3)
        column[2] = np.delete(column[2], 4)
    inp = selection_input(members, trues)
    assert records[0].selection.to_json() == compute_selection_statistics(inp).to_json()
    assert records[0].curve.n_prompts.tolist()[-1] == 8  # two prompts have 7 of 8 samples left


# ---- the reader ---------------------------------------------------------------------------------------------


def test_reader_holds_every_column(tmp_path):
    scores = make_scores()
    columns = Columns(proxy="rm_a", true="gold", more_proxy=("rm_b", "rm_c"), more_true=("verifier",))
    for path in (
        write_csv(tmp_path / "a.csv", flat_rows(scores)),
        write_jsonl(tmp_path / "b.jsonl", prompt_rows(scores)),
    ):
        batches = list(read_score_batches(path, columns, batch_rows=7))
        members = np.concatenate([b.members(columns) for b in batches], axis=1)
        trues = np.concatenate([b.trues(columns) for b in batches], axis=1)
        want = np.stack([np.concatenate([scores[s][m].ravel() for s in STEPS]) for m in MEMBERS])
        np.testing.assert_array_equal(members, want)
        np.testing.assert_array_equal(trues[1], np.concatenate([scores[s]["verifier"].ravel() for s in STEPS]))


def test_reader_errors_name_the_column(tmp_path):
    columns = Columns(proxy="rm_a", true="gold", more_proxy=("rm_b",))
    path = write_csv(tmp_path / "a.csv", [{"prompt_id": "q", "rm_a": 1, "gold": 0}])
    with pytest.raises(ScoreFileError, match=r"no column 'rm_b'.*--proxy-col"):
        list(read_score_batches(path, columns))
    path = write_csv(tmp_path / "b.csv", [{"prompt_id": "q", "rm_a": 1, "rm_b": "x", "gold": 0}])
    with pytest.raises(ScoreFileError, match=r"b.csv line 2, column 'rm_b': 'x' is not a number"):
        list(read_score_batches(path, columns))
    path = write_csv(tmp_path / "c.csv", [{"prompt_id": "q", "rm_a": 1, "rm_b": "", "gold": 0}])
    with pytest.raises(ScoreFileError, match=r"c.csv line 2, column 'rm_b': missing"):
        list(read_score_batches(path, columns))
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt_id": "q", "rm_a": [1, 2], "rm_b": [1], "gold": [0, 1]}])
    with pytest.raises(ScoreFileError, match=r"d.jsonl line 1, column 'rm_b': a list of 1 scores, but 'rm_a' has 2"):
        list(read_score_batches(path, columns))
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt_id": "q", "rm_a": 1, "gold": 0}])
    with pytest.raises(ScoreFileError, match=r"e.jsonl line 1, column 'rm_b': missing.*--proxy-col"):
        list(read_score_batches(path, columns))


def test_command_line_errors(tmp_path, capsys):
    path = write_csv(tmp_path / "a.csv", flat_rows(make_scores()))
    base = ["analyze", str(path), "--out", str(tmp_path / "out"), "-q", "--true-col", "gold"]
    assert main([*base, "--proxy-col", "rm_a,rm_b", "--selection-rule", "median"]) == EXIT_USAGE
    assert "unknown selection rule 'median'; known: rm_a, rm_b, mean, worst, uwo" in capsys.readouterr().err
    assert main([*base, "--proxy-col", "rm_a,rm_a"]) == EXIT_USAGE
    assert "['rm_a'] named more than once" in capsys.readouterr().err
    assert main([*base, "--proxy-col", "rm_a,rm_b", "--engine", "ray"]) == EXIT_USAGE
    assert "need --engine stream" in capsys.readouterr().err
    assert main([*base, "--proxy-col", "rm_a,"]) == EXIT_USAGE
    assert "empty column name" in capsys.readouterr().err
