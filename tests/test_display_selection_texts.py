"""The hack table, the text features and the selection frontier in every tracking UI, read back for real.

One run per backend logs an ensemble of two reward models, two true rewards and texts that hold
Unicode, newlines, ``|``, HTML and a 1 MB completion (the proxy's pick of prompt 0, so it is in the
hack table). What each service holds is read back through its own reader (the run folder, W&B's
offline transaction log, MLflow on sqlite, TensorBoard's event reader and markdown renderer,
trackio's local store) and compared with the builders of bon_tracker.reports.{texts,selection}_tables
applied to the delivered record, and the texts with the texts that were given (cut as docs/texts.md
says). A headless Chromium opens the local report: no script from a completion runs.
"""

from __future__ import annotations

import html.parser
import io
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when first imported
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="bon_tracker_trackio_")

from bon_tracker import BonTracker
from bon_tracker.record import EvalRecord
from bon_tracker.reports import selection_tables, texts_tables
from bon_tracker.texts import DEFAULT_MAX_CHARS, DEFAULT_MAX_TABLE_BYTES, cut_mark, kept_text

pytest.importorskip("matplotlib")

STEPS = (10, 20)
P, N = 12, 8
BIG = "x" * 1_000_000  # 1 MB, the proxy's pick of prompt 0
SCRIPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
NASTY = (
    "line one\nline two | pipe & <b>bold</b> 'quote' \"double\"",
    "Unicode: naïve café, 漢字, emoji 🙂, right-to-left שלום, combining e\u0301",
    SCRIPT,
    "markdown *not bold* _not italic_ `not code` [not a link](http://x) # not a heading\r\nCRLF",
)
TEXT_COLUMNS = ("prompt", "proxy_pick", "true_pick")
MARKDOWN_TABLE_TAGS = {"p", "table", "thead", "tbody", "tr", "th", "td", "br", "strong"}
TABLES = (texts_tables.HACKS_TABLE, selection_tables.SELECTION_TABLE, selection_tables.FRONTIER_TABLE)


def _inputs(step: int) -> tuple[dict, dict, list[str], list[list[str]]]:
    """Two reward models that reward a sample's hack (large proxy, low true), two true rewards, texts."""
    rng = np.random.default_rng(step)
    gold = rng.normal(size=(P, N))
    hack = rng.random((P, N)) < 0.3
    members = {name: gold + 2.0 * hack + 0.5 * rng.normal(size=(P, N)) for name in ("rm_a", "rm_b")}
    for m in members.values():
        m[0, 0] = 50.0  # the 1 MB completion: every rule picks it
    gold[0, 0] = -5.0
    gold = gold - 1.5 * hack
    trues = {"gold": gold, "harmless": -np.abs(gold)}
    prompts = [f"prompt {i}: {NASTY[i % len(NASTY)]}" for i in range(P)]
    completions = [[f"{i}/{j} {NASTY[(i + j) % len(NASTY)]}" for j in range(N)] for i in range(P)]
    completions[0][0] = BIG
    return members, trues, prompts, completions


def _run(backend: str, tmp_path: Path, **options) -> tuple[BonTracker, dict[int, list[list[str]]]]:
    given = {}
    with BonTracker(
        backend,
        run_name="display",
        spool_dir=tmp_path / "spool",
        selection={"n_resamples": 40},
        finish_timeout=300,  # a shared CI machine: delivery waits for the charts and the statistics
        **options,
    ) as tracker:
        for step in STEPS:
            members, trues, prompts, completions = _inputs(step)
            tracker.log_scores(step, members, trues, prompts=prompts, completions=completions)
            given[step] = (prompts, completions)
    return tracker, given


def _check_records(records: list[EvalRecord], given: dict) -> None:
    """The delivered records hold the statistics, and their texts are the given ones, cut as documented."""
    assert [r.step for r in records] == list(STEPS)
    for record in records:
        assert record.selection is not None and record.hacks is not None
        assert set(record.selection.true_names) == {"gold", "harmless"}
        prompts, completions = given[record.step]
        assert record.hacks.rows and len(record.hacks.to_json().encode("utf-8")) <= DEFAULT_MAX_TABLE_BYTES
        for row in record.hacks.rows:
            assert row.prompt == kept_text(prompts[row.prompt_index], DEFAULT_MAX_CHARS)
            for pick in (row.proxy_pick, row.true_pick):
                assert pick.text == kept_text(completions[row.prompt_index][pick.index], DEFAULT_MAX_CHARS)
        big = next(r for r in record.hacks.rows if r.prompt_index == 0).proxy_pick
        assert big.index == 0 and big.chars == len(BIG)
        assert big.text == "x" * DEFAULT_MAX_CHARS + cut_mark(len(BIG))  # cut: bounded memory everywhere


def _expected_tables(record: EvalRecord) -> dict[str, list[dict]]:
    return {
        texts_tables.HACKS_TABLE: texts_tables.hack_rows(record),
        selection_tables.SELECTION_TABLE: selection_tables.as_dicts(selection_tables.selection_table(record)),
        selection_tables.FRONTIER_TABLE: selection_tables.as_dicts(selection_tables.frontier_table(record)),
    }


def _assert_rows_equal(got: list[dict], want: list[dict], rel: float, where: str) -> None:
    assert len(got) == len(want) > 0, where
    for got_row, want_row in zip(got, want, strict=True):
        assert list(got_row) == list(want_row), where
        for column, value in want_row.items():
            if isinstance(value, float):
                assert got_row[column] == pytest.approx(value, rel=rel, abs=1e-12), (where, column)
            else:
                assert got_row[column] == value, (where, column)  # texts: every character, exactly


def _assert_scalars(got: dict[int, dict[str, float]], records: list[EvalRecord], rel: float) -> None:
    for record in records:
        want = texts_tables.text_scalars(record)
        assert {"bon/9_text/length_chars/pick", "bon/9_text/losing/share"} <= set(want)
        for key, value in want.items():
            assert got[record.step][key] == pytest.approx(value, rel=rel, abs=1e-12), (record.step, key)
    # The proxy rewards the hack, and the hack is the 1 MB completion at prompt 0: the picks are longer.
    assert want["bon/9_text/length_chars/diff"] > 0


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


# ---- the builders ----------------------------------------------------------------------------------------


def test_markdown_cells_show_the_text_as_it_is():
    from tensorboard import plugin_util

    text = "a | b\nc <script>alert(1)</script> & *x* _y_ `z` [l](u) \\ # h"
    rendered = plugin_util.markdown_to_safe_html(texts_tables.markdown_table(["col"], [[text]]))
    cells = _html_tables(rendered)[0]
    assert cells == [["col"], [text]]  # one cell: no pipe split it, no markup changed it
    assert _html_tags(rendered) <= MARKDOWN_TABLE_TAGS and "&lt;script&gt;" in rendered
    assert texts_tables.markdown_cell(float("nan")) == "–" and texts_tables.markdown_cell(None) == "–"


def test_text_key_names_sort_after_the_agreement_section():
    from bon_tracker.record import METRIC_SECTIONS

    assert max(METRIC_SECTIONS.values()) < texts_tables.TEXT_SECTION
    assert texts_tables.text_key("a.b c/d", "pick") == "bon/9_text/a_b_c_d/pick"


# ---- each backend, read back -------------------------------------------------------------------------------


def test_local_run_folder(tmp_path):
    from bon_tracker.backends import local

    tracker, given = _run("local", tmp_path, root=tmp_path / "runs")
    run_dir = tracker.backend.run_dir
    records = local.read_records(run_dir)
    _check_records(records, given)
    scalars = {row.pop("step"): row for row in map(json.loads, (run_dir / "scalars.jsonl").read_text().splitlines())}
    _assert_scalars(scalars, records, rel=1e-12)
    for record in records:
        for table, want in _expected_tables(record).items():
            path = run_dir / table / f"step_{record.step:09d}.jsonl"
            got = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            _assert_rows_equal(got, want, 1e-12, f"local {table} step {record.step}")
        assert (run_dir / texts_tables.HACKS_TABLE / f"step_{record.step:09d}.jsonl").stat().st_size < 300_000
        width, height = _png_size((run_dir / "charts" / f"frontier_step_{record.step:09d}.png").read_bytes())
        assert width >= 600 and height >= 600


def test_wandb_offline_transaction_log(tmp_path):
    wandb = pytest.importorskip("wandb")
    from bon_tracker.backends import wandb_transaction_log as txlog

    try:
        _, given = _run("wandb", tmp_path, project="display", dir=str(tmp_path), mode="offline")
    finally:
        if wandb.run is not None:
            wandb.run.finish()
    run_dir = txlog.find_transaction_log(tmp_path).parent
    records = txlog.read_records(run_dir)
    _check_records(records, given)
    history = txlog.read_history(run_dir)
    _assert_scalars({int(row["bon/step"]): row for row in history}, records, rel=1e-12)
    for row, record in zip(history, records, strict=True):
        for table, want in _expected_tables(record).items():
            _assert_rows_equal(txlog.read_table(run_dir, row[f"bon/{table}"]), want, 1e-12, f"wandb {table}")
        image = row[selection_tables.frontier_image_key()]
        assert image["_type"] == "image-file" and image["caption"] == f"step {record.step}"
        assert _png_size((run_dir / "files" / image["path"]).read_bytes())[0] >= 600
        chart = txlog.read_table(run_dir, row["bon/frontier_chart_table"])  # the native chart's points
        lines = {point["lineKey"] for point in chart}
        assert lines == {f"{s.rule} ({s.true_name})" for s in record.selection.statistics}


def test_mlflow_sqlite(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from bon_tracker.backends import mlflow as mlflow_backend

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker, given = _run("mlflow", tmp_path, tracking_uri=uri, experiment="display")
    run_id = tracker.backend.run_id
    client = MlflowClient(uri)
    records = mlflow_backend.read_records(run_id, uri)
    _check_records(records, given)
    scalars: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for metric in client.get_metric_history(run_id, key):
            scalars.setdefault(metric.step, {})[key] = metric.value
    _assert_scalars(scalars, records, rel=1e-12)
    for record in records:
        for table, want in _expected_tables(record).items():
            path = client.download_artifacts(run_id, f"{table}/step_{record.step:09d}.json", str(tmp_path / "dl"))
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            got = [dict(zip(data["columns"], values, strict=True)) for values in data["data"]]
            _assert_rows_equal(got, want, 1e-5, f"mlflow {table} step {record.step}")  # 6 digits for the UI
        frontier = f"bon_tracker/charts/frontier/step_{record.step:09d}.png"
        assert _png_size(Path(client.download_artifacts(run_id, frontier, str(tmp_path / "dl"))).read_bytes())
    run = client.get_run(run_id)
    last = f"step_{STEPS[-1]:09d}.json"
    registered = [e["path"] for e in json.loads(run.data.tags["mlflow.loggedArtifacts"])]
    for table in TABLES:  # the latest step of each table is registered for MLflow's table view...
        assert f"{table}/{last}" in registered and f"{table}/step_{STEPS[0]:09d}.json" not in registered
        tag = run.data.tags[f"bon.{table}"]  # ...and a run tag links it
        assert tag.startswith(f"{table}/{last} (step {STEPS[-1]}): http") and f"/artifacts/{table}/{last}" in tag
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_table searches runs through the fluent API
    loaded = client.load_table(run.info.experiment_id, f"{texts_tables.HACKS_TABLE}/{last}", run_ids=[run_id])
    assert list(loaded["proxy_pick"]) == [r.proxy_pick.text for r in records[-1].hacks.rows]


def test_tensorboard_event_reader_and_markdown(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard import plugin_util
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    from bon_tracker.backends.tensorboard import TensorBoardBackend

    tracker, given = _run("tensorboard", tmp_path, log_dir=tmp_path / "tb")
    log_dir = tracker.backend.spec()["log_dir"]
    _, records = TensorBoardBackend.read_records(log_dir)
    _check_records(records, given)
    accumulator = EventAccumulator(log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    scalars: dict[int, dict[str, float]] = {}
    texts: dict[tuple[str, int], bytes] = {}
    for tag in accumulator.Tags()["tensors"]:
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.dtype.kind == "f":
                scalars.setdefault(event.step, {})[tag] = value.item()
            else:
                texts[(tag, event.step)] = value.item()  # text summaries, the layout, the record
    _assert_scalars(scalars, records, rel=1e-6)  # float32, as TensorBoard's own writers
    images = {event.step: event for event in accumulator.Images(selection_tables.frontier_image_key())}
    for record in records:
        assert images[record.step].width >= 600
        # The Text tab renders the markdown with TensorBoard's own sanitizer: read it as a reader sees it.
        rendered = plugin_util.markdown_to_safe_html(texts[(f"bon/{texts_tables.HACKS_TABLE}", record.step)].decode())
        assert _html_tags(rendered) <= MARKDOWN_TABLE_TAGS  # no tag from a text: no <script>, <img>, <b>
        (table,) = _html_tables(rendered)
        _assert_cells(table, texts_tables.hack_table(record), f"tensorboard hacks {record.step}")
        markdown = texts[(f"bon/{selection_tables.SELECTION_TABLE}", record.step)].decode()
        rendered = plugin_util.markdown_to_safe_html(markdown)
        optima, frontier = _html_tables(rendered)
        _assert_cells(optima, selection_tables.selection_table(record), "tensorboard selection")
        _assert_cells(frontier, selection_tables.frontier_table(record), "tensorboard frontier")


def test_trackio_local_store(tmp_path):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    from bon_tracker.backends.trackio import TrackioBackend

    tracker, given = _run("trackio", tmp_path, project=f"display-{tmp_path.name}")
    spec = tracker.backend.spec()
    _, records = TrackioBackend.read_records(f"{spec['project']}/{spec['run_name']}", run_id=spec["run_id"])
    _check_records(records, given)
    logs = {
        log["step"]: log for log in SQLiteStorage.get_logs(spec["project"], run=spec["run_name"], run_id=spec["run_id"])
    }
    _assert_scalars(logs, records, rel=1e-12)
    for record in records:
        log = logs[record.step]
        for table, want in _expected_tables(record).items():
            assert log[f"bon/{table}"]["_type"] == "trackio.table"
            _assert_rows_equal(log[f"bon/{table}"]["_value"], want, 1e-5, f"trackio {table}")  # 6 digits shown
        assert log[selection_tables.frontier_image_key()]["_type"] == "trackio.image"


# ---- the report in a browser ----------------------------------------------------------------------------------


def test_no_script_from_a_completion_runs_in_the_report(tmp_path):
    from tests.browser import chromium_page, missing_browser

    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    tracker, _ = _run("local", tmp_path, root=tmp_path / "runs")
    report = tracker.backend.run_dir / "report.html"
    record = tracker.backend.read_records(str(tracker.backend.run_dir))[1][-1]
    errors: list[str] = []
    with chromium_page() as page:
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        state = page.evaluate(
            """() => {
              const texts = selector => Array.from(document.querySelectorAll(selector)).map(td => td.textContent);
              return {
                pwned: window.__pwned ?? null,
                scripts: document.scripts.length,
                injected: document.querySelectorAll('#hacks-table img, #hacks-table script, #hacks-table b').length,
                proxyPicks: texts('#hacks-table td.proxy-pick'),
                truePicks: texts('#hacks-table td.true-pick'),
                prompts: texts('#hacks-table td.prompt'),
                images: Array.from(document.images).map(img => ({alt: img.alt, width: img.naturalWidth})),
                selectionRows: document.querySelectorAll('#selection-table tr').length,
              };
            }"""
        )
    assert errors == [] and state["pwned"] is None and state["scripts"] == 0 and state["injected"] == 0
    rows = record.hacks.rows
    shown = lambda text: re.sub(r"\r\n?", "\n", text)  # noqa: E731 - HTML parsing reads CR LF as LF
    assert state["proxyPicks"] == [shown(r.proxy_pick.text) for r in rows]  # shown as text, every character
    assert state["truePicks"] == [shown(r.true_pick.text) for r in rows]
    assert state["prompts"] == [shown(r.prompt) for r in rows]
    assert any(SCRIPT in text for text in state["proxyPicks"] + state["truePicks"])
    frontier = next(img for img in state["images"] if img["alt"] == f"selection rules at step {record.step}")
    assert frontier["width"] >= 600
    assert state["selectionRows"] == 1 + len(record.selection.table())


# ---- helpers ----------------------------------------------------------------------------------------------


class _Tables(html.parser.HTMLParser):
    """The cell texts of every ``<table>`` in rendered HTML (``<br>`` read as a newline)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.tags: set[str] = set()
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _html_tables(rendered: str) -> list[list[list[str]]]:
    parser = _Tables()
    parser.feed(rendered)
    return parser.tables


def _html_tags(rendered: str) -> set[str]:
    parser = _Tables()
    parser.feed(rendered)
    return parser.tags


def _assert_cells(cells: list[list[str]], table: tuple, where: str) -> None:
    """A rendered markdown table against ``(columns, rows)``: texts exactly (CR/LF read as one newline),
    numbers to the 6 digits shown, None and NaN as ``–``."""
    columns, rows = table
    assert cells[0] == list(columns), where
    assert len(cells) == 1 + len(rows) > 1, where
    for shown, row in zip(cells[1:], rows, strict=True):
        for column, text, value in zip(columns, shown, row, strict=True):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert text == "–", (where, column)
            elif isinstance(value, float):
                assert float(text) == pytest.approx(value, rel=1e-5, abs=1e-12), (where, column)
            elif isinstance(value, str):
                assert text == re.sub(r"\r\n|\r", "\n", value), (where, column)
            else:
                assert text == str(value), (where, column)
