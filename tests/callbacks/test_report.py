"""CompressionReport: the summary it gathers, its files, and what TensorBoard shows (text, scalars, HParams, layout)."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from helpers import TinyClassifier, loader, trainer
from lightning_compress import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.callbacks import _logging as reporting
from lightning_compress.callbacks.report import NO_SETTINGS, CompressionReport, jsonable, summarize
from lightning_compress.engine.convert import model_size_bytes
from tools.tensorboard_client import TensorBoardClient, running_tensorboard


def _events(log_dir: str) -> EventAccumulator:
    return EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0}).Reload()


def _layout(events: EventAccumulator) -> layout_pb2.Layout:
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return layout


def _fit(tmp_path, callbacks, name="run", default_hp_metric=False, epochs=2, **kwargs):
    logger = TensorBoardLogger(tmp_path, name=name, default_hp_metric=default_hp_metric)
    t = trainer(tmp_path, callbacks, max_epochs=epochs, logger=logger, **kwargs)
    t.fit(_model(), loader(), loader(128, seed=1))
    return t, logger


def _model() -> TinyClassifier:
    model = TinyClassifier(optimizer="adam", lr=0.01)
    model.example_input_array = torch.zeros(1, 16)  # the report times the float model on it
    return model


# ----------------------------------------------------------------------------------------------------------------
# summarize: the pure gathering
# ----------------------------------------------------------------------------------------------------------------
def test_summarize_quantized_run_uses_int8_numbers_and_baseline():
    qat = {
        "float_bytes": 4000.0,
        "int8_bytes": 1000.0,
        "fake_quant_val_acc": 0.90,
        "int8_val_acc": 0.89,
        "int8_vs_fake_quant_sqnr_db": 31.0,
        "sqnr/fc1": 40.0,
        "sqnr/fc2": 30.0,
        "top1_agreement": 0.99,
        "float_ms/batch_1": 2.0,
        "int8_ms/batch_1": 1.0,
        "saved_to": "/x/qat_int8.pt2",
    }
    pruning = {"sparsity": 0.9, "nonzero_params": 100.0, "total_params": 1000.0, "sparse_bytes": 525.0}
    out = summarize(monitor="val_acc", trained_metric=0.9, baseline_metric=0.92, pruning=pruning, quantization=qat)
    assert out["val_acc_before"] == 0.92 and out["val_acc"] == 0.89
    assert out["val_acc_drop"] == pytest.approx(0.03)
    assert (out["size_bytes"], out["float_bytes"], out["size_ratio"]) == (1000.0, 4000.0, 0.25)
    assert (out["latency_ms/batch_1"], out["speedup/batch_1"]) == (1.0, 2.0)
    assert (out["min_layer_sqnr_db"], out["mean_layer_sqnr_db"], out["output_sqnr_db"]) == (30.0, 35.0, 31.0)
    assert out["sparsity"] == 0.9 and out["top1_agreement"] == 0.99


def test_summarize_dense_run_uses_measurements_and_float_before():
    measured = {"sparsity": 0.0, "nonzero_params": 50.0, "float_bytes": 800.0, "float_ms/batch_64": 3.0}
    out = summarize(monitor="val_acc", trained_metric=0.8, measured=measured)
    assert (out["val_acc_before"], out["val_acc"], out["val_acc_drop"]) == (0.8, 0.8, 0.0)
    assert (out["size_bytes"], out["size_ratio"]) == (800.0, 1.0)
    assert (out["latency_ms/batch_64"], out["speedup/batch_64"]) == (3.0, 1.0)
    assert "min_layer_sqnr_db" not in out
    # PTQ: "before" is the float model's metric when no baseline is given
    ptq = summarize(monitor="val_acc", trained_metric=0.8, quantization={"float_val_acc": 0.8, "int8_val_acc": 0.7})
    assert ptq["val_acc_drop"] == pytest.approx(0.1)


def test_json_has_no_bare_infinity():
    document = {"results": {"output_sqnr_db": float("inf"), "x": 1.5}, "runs": [float("nan"), -float("inf")]}
    text = json.dumps(jsonable(document), allow_nan=False)  # strict JSON: would raise on a bare inf/nan
    assert json.loads(text) == {"results": {"output_sqnr_db": "inf", "x": 1.5}, "runs": ["nan", "-inf"]}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latency_batch_sizes": [0]}, r"`latency_batch_sizes` must hold positive integers, got \[0\]"),
        ({"baseline_metric": 0.9}, r"`baseline_metric` needs `monitor`"),
        ({"monitor": "val_acc", "baseline_metric": float("nan")}, r"`baseline_metric` must be a finite number"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)


def test_unlogged_monitor_names_the_logged_metrics(tmp_path):
    with pytest.raises(ValueError, match=r"`monitor`='val_f1' was not logged.*`val_acc`"):
        _fit(tmp_path, [CompressionReport(monitor="val_f1", latency_batch_sizes=[])], epochs=1)


# ----------------------------------------------------------------------------------------------------------------
# A pruning + QAT run: files, text, scalars, HParams, layout
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prune_qat_run(tmp_path_factory):
    """Report first in the list (order must not matter), Lightning's placeholder hp_metric on, and a CSV logger."""
    tmp_path = tmp_path_factory.mktemp("prune_qat")
    report = CompressionReport(monitor="val_acc", baseline_metric=0.95, module="net", latency_batch_sizes=[2])
    qat = QATCallback(module="net", monitor="val_acc", latency="off", verbose=False)
    pruning = IterativePruningCallback(target_sparsity=0.8, monitor="val_acc", verbose=False)
    tb = TensorBoardLogger(tmp_path, name="prune_qat", default_hp_metric=True)
    csv = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [report, qat, pruning], max_epochs=2, logger=[tb, csv])
    t.fit(_model(), loader(), loader(128, seed=1))
    return report, qat, pruning, tb, csv


def test_report_combines_the_callbacks_results(prune_qat_run):
    report, qat, pruning, _, _ = prune_qat_run
    r = report.results
    assert r["sparsity"] == pytest.approx(0.8, abs=1e-3) == pruning.results["sparsity"]
    assert r["val_acc"] == qat.results["int8_val_acc"]
    assert r["val_acc_before"] == 0.95 and r["val_acc_drop"] == pytest.approx(0.95 - r["val_acc"])
    assert r["size_bytes"] == qat.results["int8_bytes"] and r["float_bytes"] == qat.results["float_bytes"]
    assert "latency_ms/batch_2" not in r and r["float_ms/batch_2"] > 0  # QAT timed nothing: float measured only
    assert r["min_layer_sqnr_db"] <= r["mean_layer_sqnr_db"]
    assert report.settings == {
        **NO_SETTINGS,
        "method": "prune+qat",
        "target_sparsity": 0.8,
        "schedule": "cubic",
        "scope": "global",
        "structure": "unstructured",
        "quantization": "qat",
        "bits": 8,
        "mode": "static",
        "observer": "moving_average",
    }


def test_report_files(prune_qat_run):
    report, _, _, tb, _ = prune_qat_run
    document = json.loads(report.path.read_text())
    assert str(report.path.parent) == tb.log_dir
    assert document["run"] == "prune_qat/version_0" and document["monitor"] == "val_acc"
    assert document["settings"]["method"] == "prune+qat"
    assert document["results"] == jsonable(report.results)  # floats round-trip exactly through JSON
    markdown = report.path.with_suffix(".md").read_text()
    assert "| sparsity | 80.00% |" in markdown and "| val_acc_before | 0.9500 |" in markdown


def test_tensorboard_text_scalars_and_csv(prune_qat_run):
    report, _, _, tb, csv = prune_qat_run
    events = _events(tb.log_dir)
    assert "compress/report/summary/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("compress/report/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| size_ratio |" in text and "method=prune+qat" in text
    scalars = set(events.Tags()["scalars"])
    assert {f"compress/report/{k}" for k in report.results} <= scalars
    curve = events.Scalars("compress/report/val_acc_vs_sparsity")
    assert [p.step for p in curve] == [800] and curve[0].value == pytest.approx(report.results["val_acc"])
    with open(f"{csv.log_dir}/metrics.csv") as f:
        assert "compress/report/size_bytes" in f.readline()


def test_hparams_session_is_the_reports_even_with_default_hp_metric(prune_qat_run):
    report, _, _, tb, _ = prune_qat_run
    events = _events(tb.log_dir)
    content = events.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["method"].string_value == "prune+qat"
    assert start.hparams["target_sparsity"].number_value == pytest.approx(0.8)
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert metric_tags == set(report.hparam_metric_tags())
    assert "compress/report/val_acc" in metric_tags and "hp_metric" not in metric_tags
    assert hp_metadata.SESSION_END_INFO_TAG in content
    # every declared metric that was measured has a scalar the HParams tab reads its value from
    measured = {t for t in metric_tags if t.removeprefix("compress/report/") in report.results}
    assert measured <= set(events.Tags()["scalars"]) and len(measured) == len(metric_tags) - 1  # no int8 latency


def test_layout_covers_every_callback_in_a_fixed_order(prune_qat_run):
    _, _, _, tb, _ = prune_qat_run
    layout = _layout(_events(tb.log_dir))
    assert [c.title for c in layout.category] == ["pruning", "quantization (QAT)", "compression report"]
    charts = {chart.title for c in layout.category for chart in c.chart}
    assert {"sparsity: target vs measured", "per-layer sparsity", "per-layer SQNR (dB)"} <= charts
    assert {"val_acc: fake-quant vs int8", "val_acc vs sparsity, all runs (x axis: sparsity in per mille)"} <= charts


# ----------------------------------------------------------------------------------------------------------------
# Several runs in one directory, as TensorBoard shows them
# ----------------------------------------------------------------------------------------------------------------
def test_runs_compare_side_by_side_in_a_real_tensorboard(tmp_path):
    """A dense run and a pruned run (one with Lightning's hp_metric on): the HParams tab lists both, same columns."""
    _fit(tmp_path, [CompressionReport("val_acc", latency_batch_sizes=[1], verbose=False)], name="dense")
    prune = IterativePruningCallback(target_sparsity=0.5, monitor="val_acc", verbose=False)
    report = CompressionReport("val_acc", latency_batch_sizes=[1], verbose=False)
    _fit(tmp_path, [report, prune], name="prune", default_hp_metric=True)

    with running_tensorboard(tmp_path) as url:
        client = TensorBoardClient(url)
        experiment = client.hparams_experiment()
        groups = client.hparams_session_groups()
        layout = client.custom_scalars_layout()
    columns = {info["name"] for info in experiment["hparamInfos"]}
    assert columns == set(NO_SETTINGS)
    metric_columns = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert metric_columns == set(report.hparam_metric_tags())
    by_method = {g["hparams"]["method"]: g for g in groups}
    assert set(by_method) == {"dense", "prune"}
    values = {m: {v["name"]["tag"]: v["value"] for v in g["metricValues"]} for m, g in by_method.items()}
    assert values["prune"]["compress/report/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert values["dense"]["compress/report/sparsity"] == pytest.approx(0.0, abs=1e-3)
    for run_values in values.values():
        assert set(run_values) == metric_columns and 0.0 <= run_values["compress/report/val_acc"] <= 1.0
    assert by_method["prune"]["hparams"]["target_sparsity"] == pytest.approx(0.5)
    assert "compression report" in layout and "pruning" in layout


def test_dense_run_measures_what_no_callback_did(tmp_path):
    report = CompressionReport("val_acc", latency_batch_sizes=[1, 4], verbose=False)
    t, _ = _fit(tmp_path, [report], epochs=1)
    r = report.results
    assert r["sparsity"] == 0.0 and r["nonzero_params"] == r["total_params"] == 16 * 64 + 64 * 4
    # the float size is the serialized state_dict of the whole module (no `module` given)
    assert r["size_bytes"] == r["float_bytes"] == model_size_bytes(t.lightning_module)
    assert r["latency_ms/batch_1"] > 0 and r["latency_ms/batch_4"] > 0 and r["speedup/batch_1"] == 1.0
    # a validation after fit adds nothing new: the report of the fit stays
    before = report.path.stat().st_mtime_ns
    t.validate(t.lightning_module, loader(64, seed=2), verbose=False)
    assert report.path.stat().st_mtime_ns == before


def test_ptq_in_validate_is_reported_after_the_validation(tmp_path):
    """PTQ quantizes in ``trainer.validate``: the report follows there, whichever callback comes first."""
    ptq = PostTrainingQuantCallback(
        module="net", monitor="val_acc", calibration_data="val", calibration_batches=2, run_on=["validate"],
        latency="off", verbose=False,
    )  # fmt: skip
    report = CompressionReport("val_acc", latency_batch_sizes=[], verbose=False)
    logger = TensorBoardLogger(tmp_path, name="ptq")
    t = trainer(tmp_path, [report, ptq], logger=logger)
    t.validate(_model(), loader(128, seed=1), verbose=False)
    assert report.settings["method"] == "ptq" and report.settings["observer"] == "histogram"
    assert report.settings["calibration_batches"] == 2
    assert report.results["val_acc"] == ptq.results["int8_val_acc"]
    assert report.results["val_acc_before"] == ptq.results["float_val_acc"]
    assert report.results["size_bytes"] == ptq.results["int8_bytes"] and "latency_ms/batch_1" not in report.results
    assert json.loads(report.path.read_text())["run"] == "ptq/version_0"
    assert [c.title for c in _layout(_events(logger.log_dir)).category] == [
        "post-training quantization",
        "compression report",
    ]


def test_layout_of_all_callbacks_does_not_depend_on_their_order():
    callbacks = [
        CompressionReport("val_acc"),
        PostTrainingQuantCallback(monitor="val_acc"),
        QATCallback(monitor="val_acc"),
        IterativePruningCallback(monitor="val_acc"),
    ]
    layouts = [
        reporting.dashboard_layout(order) for order in (callbacks, callbacks[::-1], callbacks[1:] + callbacks[:1])
    ]
    assert layouts[0] == layouts[1] == layouts[2]
    assert list(layouts[0]) == ["pruning", "post-training quantization", "quantization (QAT)", "compression report"]
    charts = {chart for category in layouts[0].values() for chart in category}
    assert {"sparsity: target vs measured", "val_acc: fake-quant vs int8", "val_acc: float vs int8"} <= charts
    assert "quantization error: SQNR (dB)" in charts and "per-layer SQNR (dB)" in charts


# ----------------------------------------------------------------------------------------------------------------
# The protocol, the sign convention, and errors before training
# ----------------------------------------------------------------------------------------------------------------
class _OwnPruner(Callback):
    """A user's own compression callback: the report reads it through the protocol, without importing it."""

    compression_role = "pruning"

    def __init__(self):
        self.results = {}

    def compression_settings(self):
        return {"target_sparsity": 0.3, "schedule": "mine", "not_a_column": 1}

    def on_fit_end(self, trainer, pl_module):
        self.results = {"sparsity": 0.3, "nonzero_params": 7.0, "total_params": 10.0, "sparse_bytes": 12.0}


def test_any_callback_implementing_the_protocol_is_reported(tmp_path):
    own = _OwnPruner()
    report = CompressionReport("val_acc", latency_batch_sizes=[], hparams=False, verbose=False)
    _fit(tmp_path, [own, report])
    assert report.settings["method"] == "prune"
    assert report.settings["target_sparsity"] == 0.3 and report.settings["schedule"] == "mine"
    assert "not_a_column" not in report.settings  # the HParams columns are fixed
    assert report.results["sparsity"] == 0.3 and report.results["nonzero_params"] == 7.0


def test_monitor_mode_min_makes_a_worse_loss_a_positive_drop():
    quant = {"float_val_loss": 0.50, "int8_val_loss": 0.55}
    out = summarize(monitor="val_loss", monitor_mode="min", quantization={**quant, "int8_bytes": 1.0})
    assert out["val_loss_drop"] == pytest.approx(0.05)
    assert summarize(monitor="val_loss", quantization=quant)["val_loss_drop"] == pytest.approx(-0.05)


class _FailIfTrained(Callback):
    def on_train_batch_start(self, *args):
        raise AssertionError("a training step ran before the configuration error")


def test_missing_module_fails_before_training(tmp_path):
    report = CompressionReport(module="backbone", verbose=False)
    with pytest.raises(ValueError, match=r"`module`='backbone' is not a submodule of TinyClassifier"):
        _fit(tmp_path, [report, _FailIfTrained()])


def test_monitor_never_logged_fails_at_the_first_validation(tmp_path):
    report = CompressionReport("val_f1", verbose=False, hparams=False)
    with pytest.raises(
        ValueError, match=r"`monitor`='val_f1' was not logged .* Metrics logged: `train_loss`, `val_acc`"
    ):
        _fit(tmp_path, [report], epochs=5, num_sanity_val_steps=0, limit_train_batches=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor_mode": "up"}, r"`monitor_mode` must be one of 'max', 'min', got 'up'"),
        ({"latency_batch_sizes": 8}, r"`latency_batch_sizes` must be a list of positive integers or None, got 8"),
        ({"module": ["net"]}, r"`module` must be a non-empty string or None, got \['net'\]"),
        ({"hparams": "no"}, r"`hparams` must be True or False, got 'no'"),
    ],
)
def test_arguments_of_the_wrong_type_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionReport(**kwargs)
