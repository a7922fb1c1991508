"""Score-file layouts: one row per prompt (JSONL and Parquet lists), numeric strings in JSON,
warnings about what a curve rests on (ragged prompts, N = 1, one prompt, verl keys), and the
sample files in examples/scores/, which all give the same curves."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.analysis.grouping import curves_from_batches
from bon_tracker.analysis.score_files import Columns, ScoreFileError, read_score_batches
from bon_tracker.analysis.verl_dumps import default_run_name, dump_columns, read_dump_batches
from bon_tracker.backends.local import read_records
from bon_tracker.cli.main import main
from bon_tracker.core import bon_curve

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "scores"
FIELDS = ("n", "kl", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts")


def same_curve(got, want):
    assert got.N == want.N
    for field in FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-12, err_msg=field)


def curves_of(path, columns=None, **options):
    curves, info = curves_from_batches(lambda: read_score_batches(path, columns, **options))
    return curves, info


def ragged_rows(rng, sizes):
    """One (proxy, true) pair of lists per prompt, ``sizes[i]`` samples each (a few ties)."""
    rows = []
    for k in sizes:
        true = rng.normal(size=k).round(3)
        rows.append(((true + rng.standard_t(3, size=k)).round(1).tolist(), true.tolist()))
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(capsys, *args):
    """``bon-tracker analyze ARGS`` without charts (the numbers only: nothing to draw)."""
    out_dir = Path(args[args.index("--out") + 1])
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "no_charts.yaml"
    config.write_text("local:\n  charts: false\n", encoding="utf-8")
    code = main([str(a) for a in (*args, "--config", config)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- one row per prompt ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_rows", [1, 5, 1000])
def test_per_prompt_list_rows_give_bon_curve_of_the_same_rows(tmp_path, rng, batch_rows):
    """``{"prompt": …, "proxy": [..], "true": [..]}``, ragged N: each row is one prompt, as in bon_curve."""
    rows = ragged_rows(rng, [8, 5, 8, 3, 8, 8, 6])
    path = write_jsonl(
        tmp_path / "pp.jsonl", [{"prompt": f"q{i}", "proxy": p, "true": t} for i, (p, t) in enumerate(rows)]
    )
    curves, info = curves_of(path, batch_rows=batch_rows)
    same_curve(curves[None][0], bon_curve([p for p, _ in rows], [t for _, t in rows]))
    assert info["prompts"][(None, 0)] == len(rows) and info["samples"][(None, 0)] == sum(len(p) for p, _ in rows)
    assert info["min_samples"][(None, 0)] == 3


def test_per_prompt_rows_without_an_id_are_each_a_prompt_and_with_one_are_merged(tmp_path, rng):
    rows = ragged_rows(rng, [4, 4, 4])
    # The same prompt text twice: without an id column (the default 'prompt_id' is absent) two prompts, as bon_curve.
    lines = [{"prompt": "same", "proxy": p, "true": t} for p, t in rows]
    curves, _ = curves_of(write_jsonl(tmp_path / "a.jsonl", lines))
    same_curve(curves[None][0], bon_curve([p for p, _ in rows], [t for _, t in rows]))
    # Naming the column merges rows of one id (rows 0 and 1 are then one prompt of 8 samples).
    curves, _ = curves_of(tmp_path / "a.jsonl", Columns(prompt="prompt"))
    assert curves[None][0].N == 12  # every row is prompt 'same'
    ids = [{"prompt_id": i, "proxy": p, "true": t} for i, (p, t) in zip([7, 7, 9], rows)]
    curves, _ = curves_of(write_jsonl(tmp_path / "b.jsonl", ids))
    same_curve(curves[None][0], bon_curve([rows[0][0] + rows[1][0], rows[2][0]], [rows[0][1] + rows[1][1], rows[2][1]]))


def test_per_prompt_rows_with_steps_and_runs_and_per_sample_rows_alike(tmp_path, rng):
    rows = ragged_rows(rng, [6, 6, 4, 6])
    lines = [
        {"run": run, "step": step, "prompt": f"q{i}", "proxy": p, "true": t}
        for run in ("a", "b")
        for step in (0, 10)
        for i, (p, t) in enumerate(rows)
    ]
    curves, _ = curves_of(write_jsonl(tmp_path / "pp.jsonl", lines))
    flat = [
        {"run": r["run"], "step": r["step"], "prompt_id": r["prompt"], "proxy": p, "true": t}
        for r in lines
        for p, t in zip(r["proxy"], r["true"])
    ]
    per_sample, _ = curves_of(write_jsonl(tmp_path / "ps.jsonl", flat))
    want = bon_curve([p for p, _ in rows], [t for _, t in rows])
    assert list(curves) == ["a", "b"]
    for run in ("a", "b"):
        assert list(curves[run]) == [0, 10]
        for step in (0, 10):
            same_curve(curves[run][step], want)
            same_curve(per_sample[run][step], want)


def test_per_prompt_rows_follow_nan_policy_per_sample(tmp_path):
    path = write_jsonl(tmp_path / "nan.jsonl", [{"proxy": [0.1, None, 0.3], "true": [1.0, 2.0, 3.0]}])
    with pytest.raises(ScoreFileError, match=r"^nan\.jsonl line 1, column 'proxy', sample 2 of 3: missing or NaN"):
        curves_of(path)
    (batch,) = read_score_batches(path, nan_policy="omit")
    assert batch.proxy.tolist() == [0.1, 0.3] and batch.true.tolist() == [1.0, 3.0] and batch.omitted == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "a", "proxy": [0.1, 0.2, 0.3], "true": [0.1, 0.2]},
            r"^bad\.jsonl line 2, column 'true': a list of 2 scores, but 'proxy' has 3",
        ),
        (
            {"prompt": "a", "proxy": [0.1, 0.2], "true": 0.5},
            r"^bad\.jsonl line 2, column 'true': 0\.5 is one score, but 'proxy' holds a list",
        ),
        (
            {"prompt": "a", "proxy": [0.1, "x", 0.3], "true": [0.1, 0.2, 0.3]},
            r"^bad\.jsonl line 2, column 'proxy', sample 2 of 3: 'x' is not a number$",
        ),
        ({"prompt": "a", "proxy": [0.1, 0.2]}, r"^bad\.jsonl line 2, column 'true': missing .*--true-col"),
    ],
)
def test_per_prompt_row_errors_name_the_line_and_sample(tmp_path, row, message):
    good = {"prompt": "z", "proxy": [0.5, 0.6], "true": [0.1, 0.2]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(ScoreFileError, match=message):
        curves_of(path)


def test_long_values_in_messages_are_cut_between_items_never_mid_number(tmp_path):
    values = [0.123456789 * (i + 1) for i in range(30)]
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt_id": "a", "proxy": {"scores": values}, "true": 0.5}])
    with pytest.raises(ScoreFileError) as err:
        curves_of(path)
    message = str(err.value)
    assert message.startswith("x.jsonl line 1, column 'proxy': {\"scores\": [0.123456789, ")
    shown = message.split(": ", 1)[1].split(" is not a number")[0]
    numbers = [float(t) for t in shown.replace("{", " ").replace("}", " ").replace("[", " ").split(", ") if
               t.strip() and t.strip() != "…" and not t.strip().startswith('"')]  # fmt: skip
    assert all(any(abs(v - n) < 1e-12 for v in values) for n in numbers), shown  # each number shown whole


def test_per_prompt_list_columns_in_parquet(tmp_path, rng):
    rows = ragged_rows(rng, [8, 5, 8, 8])
    table = pa.table(
        {
            "step": [3] * len(rows),
            "prompt": [f"q{i}" for i in range(len(rows))],
            "proxy": [p for p, _ in rows],
            "true": [t for _, t in rows],
        }
    )
    pq.write_table(table, tmp_path / "pp.parquet", row_group_size=3)
    curves, info = curves_of(tmp_path / "pp.parquet", batch_rows=2)
    same_curve(curves[None][3], bon_curve([p for p, _ in rows], [t for _, t in rows]))
    assert info["prompts"][(None, 3)] == 4 and info["min_samples"][(None, 3)] == 5
    # Rows without an id are each a prompt (numbered by row); with an id column, rows of one id merge.
    pq.write_table(table.drop_columns(["prompt"]), tmp_path / "noid.parquet")
    curves, _ = curves_of(tmp_path / "noid.parquet")
    same_curve(curves[None][3], bon_curve([p for p, _ in rows], [t for _, t in rows]))


@pytest.mark.parametrize(
    ("proxy", "true", "message"),
    [
        (
            [["0.1", "0.2"], ["0.3", "x"]],  # list<string>: numbers' text is read, as in CSV
            [[0.1, 0.2], [0.3, 0.4]],
            r"^e\.parquet row 2, column 'proxy', sample 2 of 2: 'x'",
        ),
        (
            [[0.1, 0.2], [0.3, 0.4, 0.5]],
            [[0.1, 0.2], [0.3, 0.4]],
            r"^e\.parquet row 2, column 'true': a list of 2 scores",
        ),
        ([[0.1, 0.2], None], [[0.1, 0.2], [0.3, 0.4]], r"^e\.parquet row 2, column 'proxy': missing \(null"),
        ([[0.1, 0.2], [0.3, 0.4]], [0.1, 0.2], r"^e\.parquet, column 'true': has type double, but 'proxy' holds lists"),
    ],
)
def test_parquet_list_errors_name_the_row_and_sample(tmp_path, proxy, true, message):
    pq.write_table(pa.table({"proxy": proxy, "true": true}), tmp_path / "e.parquet")
    with pytest.raises(ScoreFileError, match=message):
        curves_of(tmp_path / "e.parquet")


def test_cli_reads_per_prompt_lists(tmp_path, capsys, rng):
    rows = ragged_rows(rng, [8] * 6)
    path = write_jsonl(
        tmp_path / "pp.jsonl", [{"prompt": f"q{i}", "proxy": p, "true": t} for i, (p, t) in enumerate(rows)]
    )
    code, out, err = run_cli(capsys, "analyze", path, "--out", tmp_path / "runs", "--json", "-q")
    assert code == 0, err
    (run,) = json.loads(out)["runs"]
    assert run["name"] == "pp" and run["steps"][0]["prompts"] == 6 and run["steps"][0]["N"] == 8
    (record,) = read_records(run["run_dir"])
    same_curve(record.curve, bon_curve([p for p, _ in rows], [t for _, t in rows]))


# ---- numeric strings in JSON ---------------------------------------------------------------------------------


def test_json_numeric_strings_read_as_csv_cells_are(tmp_path):
    cells = [("0.5", "1"), ("1e-3", " 2.25 "), ("-3", "0"), ("7", "nan")]
    write_jsonl(
        tmp_path / "s.jsonl",
        [{"prompt_id": "a", "proxy": p, "true": t, "step": "4"} for p, t in cells],
    )
    (tmp_path / "s.csv").write_text(
        "prompt_id,proxy,true,step\n" + "".join(f"a,{p},{t},4\n" for p, t in cells), encoding="utf-8"
    )
    (from_json,) = read_score_batches(tmp_path / "s.jsonl", nan_policy="omit")
    (from_csv,) = read_score_batches(tmp_path / "s.csv", nan_policy="omit")
    assert from_json.proxy.tolist() == from_csv.proxy.tolist() == [0.5, 0.001, -3.0]
    assert from_json.true.tolist() == from_csv.true.tolist() == [1.0, 2.25, 0.0]
    assert from_json.step.tolist() == from_csv.step.tolist() == [4, 4, 4]
    assert from_json.omitted == from_csv.omitted == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"abc"', r"^s\.jsonl line 2, column 'proxy': 'abc' is not a number$"),
        ('"0.5x"', r"^s\.jsonl line 2, column 'proxy': '0\.5x' is not a number$"),
        ('""', r"^s\.jsonl line 2, column 'proxy': missing or NaN"),
        ('"inf"', r"^s\.jsonl line 2, column 'proxy': inf is not finite"),
    ],
)
def test_json_strings_that_are_not_numbers_are_errors_naming_the_line(tmp_path, value, message):
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"prompt_id": "a", "proxy": "0.5", "true": 1}\n' + f'{{"prompt_id": "a", "proxy": {value}, "true": 1}}\n',
        encoding="utf-8",
    )
    with pytest.raises(ScoreFileError, match=message):
        curves_of(path)


def test_a_csv_cell_holding_a_list_says_how_to_write_one_row_per_prompt(tmp_path):
    (tmp_path / "l.csv").write_text('prompt_id,proxy,true\na,"[0.1, 0.2]","[1, 2]"\n', encoding="utf-8")
    with pytest.raises(ScoreFileError, match=r"l\.csv line 2, column 'proxy': '\[0\.1, 0\.2\]' is not a number.*JSONL"):
        curves_of(tmp_path / "l.csv")


# ---- warnings about what a curve rests on -----------------------------------------------------------------------


def warnings_of(caplog, path, columns=None):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        curves, info = curves_of(path, columns)
    messages = [r.getMessage() for r in caplog.records if r.name == "bon_tracker"]
    assert messages == [f"bon_tracker: {m}" for m in info["warnings"]]
    return curves, messages


def test_ragged_prompts_warn_how_many_prompts_reach_the_largest_n(tmp_path, rng, caplog):
    rows = ragged_rows(rng, [11] * 4 + [8] * 26)
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt_id": i, "proxy": p, "true": t} for i, (p, t) in enumerate(rows)])
    curves, (message,) = warnings_of(caplog, path)
    assert curves[None][0].N == 11 and curves[None][0].n_prompts[-1] == 4
    assert message.startswith("bon_tracker: step 0: prompts have 8 to 11 samples, so best-of-11 averages only the 4 of")
    assert "4 of 30 prompts" in message and "n ≤ 8 averages all 30" in message and "n ≤ 8 (ns, --ns)" in message


def test_one_sample_per_prompt_warns_that_there_is_no_curve_beyond_n_1(tmp_path, caplog):
    lines = [{"prompt_id": f"q{i}", "proxy": 0.1 * i, "true": 0.2, "step": s} for s in (0, 5) for i in range(30)]
    curves, (message,) = warnings_of(caplog, write_jsonl(tmp_path / "one.jsonl", lines))
    assert curves[None][0].N == 1
    assert message.startswith("bon_tracker: step 0 (and 1 more step): every prompt has one sample (N = 1; 30 prompts")
    assert "no best-of-n curve beyond n = 1" in message and "'q0'" in message


def test_all_samples_in_one_prompt_warn(tmp_path, caplog):
    lines = [{"prompt_id": "same", "proxy": 0.1 * i, "true": 0.2} for i in range(16)]
    _, (message,) = warnings_of(caplog, write_jsonl(tmp_path / "one.jsonl", lines))
    assert "step 0: all 16 samples are one prompt ('same')" in message


def test_even_prompts_warn_nothing(tmp_path, rng, caplog):
    rows = ragged_rows(rng, [8] * 5)
    path = write_jsonl(tmp_path / "ok.jsonl", [{"proxy": p, "true": t} for p, t in rows])
    _, messages = warnings_of(caplog, path)
    assert messages == []


def test_the_cli_prints_the_warning(tmp_path, capsys, rng):
    rows = ragged_rows(rng, [11] * 4 + [8] * 26)
    path = write_jsonl(tmp_path / "r.jsonl", [{"proxy": p, "true": t} for p, t in rows])
    code, _, err = run_cli(capsys, "analyze", path, "--out", tmp_path / "runs", "-q")
    assert code == 0
    assert "best-of-11 averages only the 4 of 30 prompts" in err


# ---- verl dumps ---------------------------------------------------------------------------------------------------


def verl_dump(folder: Path, key, steps=(10, 20), prompts=60, samples=8):
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    for step in steps:
        lines = [
            {"input": f"q{q}", "output": "a", "score": float(rng.normal()), "gold": float(rng.normal()), "step": step}
            | ({"uid": key(q, j)} if key else {})
            for q in range(prompts)
            for j in range(samples)
        ]
        write_jsonl(folder / f"{step}.jsonl", lines)
    return folder


def verl_warnings(caplog, folder):
    caplog.clear()
    files = sorted(folder.glob("*.jsonl"))
    columns = dump_columns(files[0], "gold")
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        curves, _ = curves_from_batches(lambda: (b for f in files for b in read_dump_batches(f, columns)))
    return curves, [r.getMessage() for r in caplog.records if r.name == "bon_tracker"]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        # every sample an output of one session: 480 rows read as 60 prompts of 1 sample
        (lambda q, j: f"p{q}_0_{j}", "10.jsonl: 480 rows read as 60 prompts of 1 sample each"),
        # a uid per sample without verl's indices: 480 prompts of 1 sample
        (lambda q, j: f"p{q}-{j}", "10.jsonl: every one of the 480 prompts has 1 sample"),
        # one uid for everything: one prompt
        (lambda q, j: "run-abc", "10.jsonl: all 480 samples are one prompt"),
    ],
)
def test_verl_keys_that_do_not_group_warn_with_an_example_uid(tmp_path, caplog, key, expected):
    folder = verl_dump(tmp_path / "val", key)
    _, messages = verl_warnings(caplog, folder)
    (verl,) = [m for m in messages if ".jsonl:" in m]  # once per folder, not once per file
    assert verl.startswith(f"bon_tracker: {expected}"), verl
    assert "(e.g. uid '" in verl and "--prompt-col input --proxy-col score" in verl
    assert any("(and 1 more step)" in m for m in messages if ".jsonl:" not in m)  # and the curve's own warning


def test_verl_keys_of_verl_itself_warn_nothing(tmp_path, caplog):
    folder = verl_dump(tmp_path / "val", lambda q, j: f"5f0c9a4e-{q:04d}_{j}_0")
    curves, messages = verl_warnings(caplog, folder)
    assert messages == [] and curves[None][10].N == 8 and curves[None][10].n_prompts[0] == 60


def test_a_verl_dump_folder_is_named_after_the_folder(tmp_path, capsys):
    folder = verl_dump(tmp_path / "ppo-lr1e-5" / "val_dump", lambda q, j: f"u{q}_{j}_0")
    assert default_run_name([folder]) == "val_dump"
    assert default_run_name([folder / "10.jsonl"]) is None  # files given: named by the file, as today


# ---- the sample files --------------------------------------------------------------------------------------------

SAMPLES = ["scores.jsonl", "scores.csv", "scores_per_prompt.jsonl", "scores.parquet", "scores_per_prompt.parquet"]


def test_the_sample_parquet_files_are_small_and_what_the_script_writes(tmp_path):
    import runpy

    runpy.run_path(str(EXAMPLES / "make_parquet.py"), run_name="make")["main"](tmp_path)
    for name in ("scores.parquet", "scores_per_prompt.parquet"):
        assert (EXAMPLES / name).stat().st_size < 10_000
        assert pq.read_table(EXAMPLES / name).equals(pq.read_table(tmp_path / name))


def test_every_sample_file_gives_the_same_curves(tmp_path, capsys):
    files = [EXAMPLES / name for name in SAMPLES]
    for name in ("scores.jsonl", "scores.csv", "scores_per_prompt.jsonl"):  # and gzipped
        gz = tmp_path / "in" / f"{name}.gz"
        gz.parent.mkdir(exist_ok=True)
        gz.write_bytes(gzip.compress((EXAMPLES / name).read_bytes()))
        files.append(gz)
    results = []
    for i, path in enumerate(files):
        code, out, err = run_cli(capsys, "analyze", path, "--out", tmp_path / f"runs{i}", "--json", "-q")
        assert code == 0, (path.name, err)
        assert err == "", (path.name, err)  # even prompts: no warning
        (run,) = json.loads(out)["runs"]
        results.append((path.name, read_records(run["run_dir"])))
    rows = [json.loads(line) for line in (EXAMPLES / "scores_per_prompt.jsonl").read_text().splitlines()]
    for step in (0, 100):
        mine = [r for r in rows if r["step"] == step]
        want = bon_curve([r["proxy"] for r in mine], [r["true"] for r in mine])
        for name, records in results:
            (record,) = [r for r in records if r.step == step]
            assert [r.step for r in records] == [0, 100], name
            same_curve(record.curve, want)


def test_the_readme_shows_a_row_of_each_sample_file():
    readme = (EXAMPLES.parent.parent / "README.md").read_text(encoding="utf-8")
    for name in ("scores.jsonl", "scores_per_prompt.jsonl"):
        (line,) = [row for row in readme.splitlines() if row.startswith(f"| `{name}` |")]
        shown = line.split("| `", 2)[2].rsplit("` |", 1)[0]
        assert shown in (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
    csv_lines = (EXAMPLES / "scores.csv").read_text(encoding="utf-8").splitlines()
    assert "| `scores.csv` | `0,q1,0.51,0.5` under the header `step,prompt_id,proxy,true` |" in readme
    assert csv_lines[:2] == ["step,prompt_id,proxy,true", "0,q1,0.51,0.5"]


def test_analyze_names_a_verl_run_after_its_dump_folder(tmp_path, capsys):
    folder = verl_dump(tmp_path / "ppo-lr1e-5", lambda q, j: f"u{q}_{j}_0")
    files = sorted(str(p) for p in folder.glob("*.jsonl"))
    assert (
        main(["analyze", *files, "--preset", "verl", "--true-col", "gold", "--out", str(tmp_path / "out"), "-q"]) == 0
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ppo-lr1e-5"]


def test_analyze_preset_verl_reads_an_ensemble_and_several_true_rewards_from_the_extra_keys(tmp_path, capsys):
    rng = np.random.default_rng(5)
    folder = tmp_path / "val"
    folder.mkdir()
    rows = {}
    for step in (10, 20):
        lines = [
            {
                "input": f"q{q}",
                "output": f"a{j}",
                "score": float(rng.normal()),
                "rm_b": float(rng.normal()),
                "gold": float(rng.normal()),
                "verifier": float(rng.integers(0, 2)),
                "step": step,
                "uid": f"u{q}_{j}_0",
            }
            for q in range(12)
            for j in range(8)
        ]
        write_jsonl(folder / f"{step}.jsonl", lines)
        rows[step] = lines
    args = ["analyze", str(folder), "--preset", "verl", "--proxy-col", "score", "--proxy-col", "rm_b"]
    args += ["--true-col", "gold", "--true-col", "verifier", "--out", str(tmp_path / "out"), "--json", "-q"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    (run,) = json.loads(out)["runs"]
    records = {r.step: r for r in read_records(run["run_dir"])}
    assert sorted(records) == [10, 20]
    for step, lines in rows.items():

        def matrix(key, lines=lines):
            return np.array([[row[key] for row in lines if row["input"] == f"q{q}"] for q in range(12)])

        selection = records[step].selection
        assert list(selection.member_names) == ["score", "rm_b"] and list(selection.true_names) == ["gold", "verifier"]
        got = selection.get("rm_b", "verifier").curve("bon")  # a member's own curve under the second true reward
        want = bon_curve(matrix("rm_b"), matrix("verifier"), ns=[int(n) for n in got.values])
        np.testing.assert_allclose(got.true_mean, want.true_mean, rtol=0, atol=1e-12)
        deployed = bon_curve((matrix("score") + matrix("rm_b")) / 2, matrix("gold"))  # mean of the members
        np.testing.assert_allclose(records[step].curve.true_mean, deployed.true_mean, rtol=0, atol=1e-12)


def test_default_batch_rows_are_large_only_for_flat_parquet_scores_without_texts(tmp_path, rng):
    from bon_tracker.analysis.score_files import DEFAULT_BATCH_ROWS, FLAT_PARQUET_BATCH_ROWS, default_batch_rows

    flat = pa.table({"prompt": [0, 0, 1], "proxy": [0.1, 0.2, 0.3], "true": [1.0, 2.0, 3.0], "completion": list("abc")})
    pq.write_table(flat, tmp_path / "flat.parquet")
    lists = pa.table({"prompt": [0], "proxy": [[0.1, 0.2]], "true": [[1.0, 2.0]]})
    pq.write_table(lists, tmp_path / "lists.parquet")
    (tmp_path / "rows.jsonl").write_text('{"prompt": 0, "proxy": 0.1, "true": 1.0}\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    texts = Columns(prompt_text="prompt", completion="completion")
    assert default_batch_rows(tmp_path / "flat.parquet") == FLAT_PARQUET_BATCH_ROWS > DEFAULT_BATCH_ROWS
    assert default_batch_rows(tmp_path / "flat.parquet", texts) == DEFAULT_BATCH_ROWS  # a row may hold long texts
    assert default_batch_rows(tmp_path / "lists.parquet") == DEFAULT_BATCH_ROWS  # a row holds a prompt's samples
    assert default_batch_rows(tmp_path / "rows.jsonl") == DEFAULT_BATCH_ROWS
    assert (
        default_batch_rows(tmp_path / "rows.jsonl", fmt="parquet") == DEFAULT_BATCH_ROWS
    )  # not Parquet: the reader says so
    assert default_batch_rows(tmp_path / "broken.parquet") == DEFAULT_BATCH_ROWS
    assert default_batch_rows(tmp_path / "missing.parquet") == DEFAULT_BATCH_ROWS


def test_analyze_of_flat_parquet_in_its_large_default_batches_equals_small_batches(tmp_path, rng, capsys, monkeypatch):
    """A file of 3 steps x 700 prompts x 16 samples is read in one default batch, or in 34 of 1,000
    rows: the very same curves, intervals, predictions and agreement."""
    steps, prompts, samples = 3, 700, 16
    true = rng.normal(size=(steps, prompts, samples))
    proxy = true + rng.standard_t(2, size=true.shape)
    table = pa.table(
        {
            "step": np.repeat(np.arange(steps) * 10, prompts * samples),
            "prompt_id": np.tile(np.repeat(np.arange(prompts), samples), steps),
            "proxy": proxy.ravel(),
            "true": true.ravel(),
        }
    )
    pq.write_table(table, tmp_path / "scores.parquet", row_group_size=4096)
    monkeypatch.chdir(tmp_path)
    records = []
    for name, extra in (("large", []), ("small", ["--batch-rows", "1000"])):
        assert main(["analyze", "scores.parquet", "--out", "runs", "--run-name", name, "-q", *extra]) == 0
        records.append(read_records(tmp_path / "runs" / name))
    capsys.readouterr()
    for large, small in zip(*records):  # the accumulator's blocks do not depend on the batches
        assert large.curve.to_dict() == small.curve.to_dict() and large.interval is not None
        assert (large.interval, large.agreement, large.predictions) == (
            small.interval,
            small.agreement,
            small.predictions,
        )
    assert len(records[0]) == steps
