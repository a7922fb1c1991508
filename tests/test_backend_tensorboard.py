"""The TensorBoard backend, read back with TensorBoard's own EventAccumulator and
compared with bon_curve on the same scores."""

from __future__ import annotations

import errno
import json
import threading
from dataclasses import replace

import numpy as np
import pytest

from bon_tracker.backends import ConfigurationError, RunNotFoundError, backend_class, backend_from_spec
from bon_tracker.core import bon_curve
from bon_tracker.record import METRIC_SECTIONS, EvalRecord
from bon_tracker.reports.charts import goodhart_text as goodhart_sentence

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from tensorboard.backend.event_processing.event_accumulator import (
    STORE_EVERYTHING_SIZE_GUIDANCE,
    EventAccumulator,
)
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.util import tensor_util

from bon_tracker.backends.tensorboard import (
    CUSTOM_SCALARS_TAG,
    LOWER_SUFFIX,
    UPPER_SUFFIX,
    TensorBoardBackend,
    curve_tags,
    se_tag,
)

STEPS = (10, 20, 30)
NS = [1, 2, 4, 8, 32]


def _scores(rng, steps=STEPS):
    out = {}
    for step in steps:
        true = rng.normal(size=(24, 32))
        out[step] = (true + rng.standard_t(2, size=true.shape), true)
    return out


def _record(step, proxy, true, **kwargs):
    return EvalRecord.build(step, bon_curve(proxy, true, ns=NS), policy_kl=step / 10, **kwargs)


def _accumulator(log_dir) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()


def _values(acc: EventAccumulator, tag: str) -> dict[int, float]:
    events = acc.Tensors(tag)
    assert len({e.step for e in events}) == len(events), f"{tag} logged twice at a step"
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in events}


def test_scalars_chart_text_and_layout_read_back(tmp_path, rng):
    scores = _scores(rng)
    backend = TensorBoardBackend(log_dir=tmp_path / "tb")
    records = {step: _record(step, *pair) for step, pair in scores.items()}
    for record in records.values():
        backend.log_eval(record)
    backend.finish()

    acc = _accumulator(tmp_path / "tb")
    tags = set(acc.Tags()["tensors"])
    for step, (proxy, true) in scores.items():
        record, curve = records[step], bon_curve(proxy, true, ns=NS)
        for key, value in record.scalars().items():
            # TensorBoard keeps scalars as float32, as its own writers do.
            assert _values(acc, key)[step] == np.float32(value), key
        keys = curve_tags(record)
        for i in range(len(NS)):
            assert _values(acc, keys["true"][i])[step] == pytest.approx(curve.true_mean[i], rel=1e-6)
            assert _values(acc, keys["proxy"][i])[step] == pytest.approx(curve.proxy_mean[i], rel=1e-6)
            lower = _values(acc, se_tag("bon", keys["true"][i], LOWER_SUFFIX))[step]
            upper = _values(acc, se_tag("bon", keys["true"][i], UPPER_SUFFIX))[step]
            assert lower == pytest.approx(curve.true_mean[i] - curve.true_se[i], rel=1e-6)
            assert upper == pytest.approx(curve.true_mean[i] + curve.true_se[i], rel=1e-6)
        assert len(set(keys["true"]) | set(keys["proxy"])) == 2 * len(NS)  # one distinct tag per series and n

        text = _values_text(acc, "bon/goodhart_point")[step]
        g = record.goodhart
        assert g is not None and "n\\* ≈" in text  # the reports' sentence, Markdown-escaped
        assert goodhart_sentence(record).replace("*", "\\*") in text and f"α = {g.true_alpha:.4g}" in text

    images = acc.Images("bon/0_curve")
    assert [image.step for image in images] == list(STEPS)
    for image in images:
        assert image.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
        assert image.width > 300 and image.height > 200

    full = acc.Images("bon/0_curve_full")  # the full two-panel chart beside the compact one
    assert [image.step for image in full] == list(STEPS) and all(f.width > 600 for f in full)
    # Time Series groups cards by the tag up to its first "/": the SE bounds are a group of their own
    assert {tag.split("/", 1)[0] for tag in tags - {CUSTOM_SCALARS_TAG}} == {"bon", "bon_se_bands"}
    assert not any(tag.startswith("bon/") and tag.endswith(("_plus_se", "_minus_se")) for tag in tags)

    layout = layout_pb2.Layout.FromString(acc.Tensors(CUSTOM_SCALARS_TAG)[-1].tensor_proto.string_val[0])
    goodhart, true, proxy = layout.category
    assert "Goodhart" in goodhart.title and "true" in true.title and "proxy" in proxy.title
    (series,) = goodhart.chart[0].margin.series
    assert (series.value, series.lower, series.upper) == (
        "bon/4_goodhart/n",
        "bon/4_goodhart/n_low",
        "bon/4_goodhart/n_high",
    )
    for category, name in ((true, "true"), (proxy, "proxy")):
        assert len(category.chart) == len(NS)
        # n descending in the layout: TensorBoard's Custom Scalars tab shows the charts reversed,
        # n ascending (tests/test_ui_legible.py reads the page)
        for chart, n in zip(category.chart, sorted(NS, reverse=True), strict=True):
            assert chart.title.startswith(f"n = {n}:")
            (series,) = chart.margin.series  # true and proxy never share an axis
            assert {series.value, series.lower, series.upper} <= tags
            assert f"/{METRIC_SECTIONS[name]}/" in series.value

    label, read = TensorBoardBackend.read_records(str(tmp_path / "tb"))
    assert label == "tb"
    assert [r.to_json() for r in read] == [records[s].to_json() for s in STEPS]


def _values_text(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)}


def test_a_replayed_step_is_written_once(tmp_path, rng):
    scores = _scores(rng, steps=(10, 20))
    first, second = (_record(step, *pair) for step, pair in scores.items())
    backend = TensorBoardBackend(log_dir=tmp_path / "tb", charts=False)
    backend.log_eval(first)
    backend.log_eval(first)  # a retry
    backend.release()  # the tracker gave up (its records left for sync): the log dir's lock goes
    # `bon-tracker sync` in another process: rebuilt from the spec, replays both steps.
    replay = backend_from_spec(json.loads(json.dumps(backend.spec())))
    replay.log_eval(first)
    replay.log_eval(second)
    replay.log_eval(replace(second, timestamp=second.timestamp + 3600))  # the same step, recomputed later

    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
    acc = _accumulator(tmp_path / "tb")
    for key, value in second.scalars().items():
        assert _values(acc, key) == {10: np.float32(first.scalars()[key]), 20: np.float32(value)}
    assert acc.Tags()["images"] == []  # charts=False, kept by the spec
    assert [r.step for r in TensorBoardBackend.read_records(str(tmp_path / "tb"))[1]] == [10, 20]


def test_writes_into_a_trainers_log_dir(tmp_path, rng):
    """A transformers Trainer that reports to TensorBoard writes with torch's SummaryWriter
    into ``args.logging_dir``; the curves land in that same run."""
    tensorboard_writer = pytest.importorskip("torch.utils.tensorboard")
    logging_dir = tmp_path / "runs" / "trainer"
    trainer_writer = tensorboard_writer.SummaryWriter(log_dir=str(logging_dir))
    for step in range(0, 40, 5):
        trainer_writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    trainer_writer.flush()

    scores = _scores(rng)
    backend = TensorBoardBackend(log_dir=logging_dir)
    done = threading.Thread(target=lambda: [backend.log_eval(_record(s, *p)) for s, p in scores.items()])
    done.start()  # the delivery worker's thread
    done.join()
    trainer_writer.close()

    acc = _accumulator(logging_dir)
    assert len(acc.Scalars("train/loss")) == 8  # the trainer's own scalars, untouched
    key = curve_tags(_record(30, *scores[30]))["true"][-1]
    assert sorted(_values(acc, key)) == list(STEPS)
    assert _values(acc, key)[30] == pytest.approx(bon_curve(*scores[30], ns=NS).true_mean[-1], rel=1e-6)
    assert TensorBoardBackend.claims(str(logging_dir)) and not TensorBoardBackend.claims(str(tmp_path / "runs"))


def test_spec_check_classify_and_registry(tmp_path):
    backend = TensorBoardBackend(log_dir=tmp_path / "tb", charts=False)
    assert backend.run_id is None  # nothing touched yet
    assert not (tmp_path / "tb").exists()
    assert backend.spec() == {"backend": "tensorboard", "log_dir": str((tmp_path / "tb").resolve()), "charts": False}
    assert backend_class("tensorboard") is TensorBoardBackend
    backend.check()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigurationError, match="is a file"):
        TensorBoardBackend(log_dir=tmp_path / "file").check()
    assert backend.classify(PermissionError(errno.EACCES, "denied")) == "config"
    assert backend.classify(OSError(errno.EROFS, "read-only file system")) == "config"
    assert backend.classify(OSError(errno.ENOSPC, "no space left")) == "transient"
    with pytest.raises(RunNotFoundError):
        TensorBoardBackend.read_records(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="charts"):
        TensorBoardBackend(charts="yes")


def test_default_log_dir_is_named_after_the_run():
    assert TensorBoardBackend(run_name="ppo lr=1e-5").spec()["log_dir"].endswith("runs/ppo-lr-1e-5")
