"""What the callbacks write must really show in TensorBoard: a real ``tensorboard`` server on loopback, read through
the HTTP data API its web app uses (runs, scalars, images, text, custom-scalars layout, hparams).

Two tiny runs (TinyNet, 2 epochs of 4 batches) are trained once for the module, each with a ``CompressionReport``:
``prune_qat`` (pruning and QAT in one Trainer) and ``ptq`` (post-training quantization). The server is started over
their log directory once, and stopped (checked) when the module's tests are done.
"""

from __future__ import annotations

import io
import re
import socket
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import image as mpimg

from helpers import TinyClassifier, loader, trainer
from lightning_compress import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.callbacks.report import CompressionReport
from tools.tensorboard_client import TensorBoardClient, running_tensorboard

RUN = "prune_qat/version_0"
PTQ_RUN = "ptq/version_0"
LAYERS = ("net.fc1", "net.fc2")


def _processes_mentioning(text: str) -> list[int]:
    """Process ids whose command line contains ``text`` (the unique log directory of this module)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended while we looked
            continue
    return found


def _accepts_connections(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((parts.hostname, parts.port)) == 0


def _assert_stopped(url: str, logdir: Path) -> None:
    assert not _accepts_connections(url), f"TensorBoard still answers on {url}"
    assert _processes_mentioning(str(logdir)) == [], "a tensorboard process over the test's log dir is still alive"


def _fit(logdir: Path, name: str, callbacks: list) -> None:
    model = TinyClassifier()
    model.example_input_array = torch.randn(8, 16)
    logger = TensorBoardLogger(logdir, name=name)
    trainer(logdir, callbacks, max_epochs=2, log_every_n_steps=1, logger=logger).fit(model, loader(128), loader(64))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tensorboard_logs")
    pruning = IterativePruningCallback(target_sparsity=0.5, monitor="val_acc", update_every_n_steps=1, verbose=False)
    qat = QATCallback(monitor="val_acc", latency="off", verbose=False)
    report = CompressionReport(monitor="val_acc", latency_batch_sizes=[], verbose=False)
    _fit(logdir, "prune_qat", [pruning, qat, report])
    ptq = PostTrainingQuantCallback(monitor="val_acc", calibration_batches=2, latency="off", verbose=False)
    ptq_report = CompressionReport(monitor="val_acc", latency_batch_sizes=[], verbose=False)
    _fit(logdir, "ptq", [ptq, ptq_report])
    with running_tensorboard(logdir) as url:
        assert _processes_mentioning(str(logdir)), "the server process should be visible while it runs"
        yield SimpleNamespace(
            client=TensorBoardClient(url), qat=qat, ptq=ptq, reports={RUN: report, PTQ_RUN: ptq_report}
        )
    _assert_stopped(url, logdir)


def _scalar_tags(board, run: str = RUN) -> set[str]:
    return board.client.tags("scalars")[run]


def test_runs_are_listed(board):
    assert sorted(board.client.runs()) == [RUN, PTQ_RUN]


def test_pruning_scalars(board):
    tags = _scalar_tags(board)
    expected = {"compress/sparsity", "compress/target_sparsity", "compress/val_acc_vs_sparsity"}
    expected |= {f"compress/sparsity/{layer}.weight" for layer in LAYERS}
    expected |= {f"compress/final/{k}" for k in ("sparsity", "nonzero_params", "dense_bytes", "sparse_bytes")}
    assert expected <= tags, f"missing: {sorted(expected - tags)}"

    measured = board.client.scalars(RUN, "compress/sparsity")
    target = board.client.scalars(RUN, "compress/target_sparsity")
    assert measured[0].value == 0.0
    # 1280 selected weights at 50%: exactly 640 zeros at the end, and the schedule's target reached.
    assert measured[-1].value == pytest.approx(0.5) and target[-1].value == pytest.approx(0.5)
    assert [p.step for p in measured] == sorted(p.step for p in measured)

    # The metric-vs-sparsity curve: one point per validation (2 epochs), step = sparsity in per mille, value = the
    # monitored metric as the LightningModule logged it; the last validation sees the final 50%.
    curve = board.client.scalars(RUN, "compress/val_acc_vs_sparsity")
    val_acc = board.client.scalars(RUN, "val_acc")
    assert len(curve) == len(val_acc) == 2
    assert [p.value for p in curve] == pytest.approx([p.value for p in val_acc])
    assert curve[0].step < curve[1].step == 500


def test_quantization_scalars(board):
    tags = _scalar_tags(board)
    results = board.qat.results
    keys = ["float_bytes", "int8_bytes", "size_ratio", "int8_vs_fake_quant_sqnr_db", "top1_agreement"]
    keys += ["fake_quant_val_acc", "int8_val_acc", "val_acc_drop"] + [f"sqnr/{layer}" for layer in LAYERS]
    expected = {f"compress/quant/{k}" for k in keys}
    assert expected <= tags, f"missing: {sorted(expected - tags)}"
    assert not any("_ms/" in tag for tag in tags), "latency='off' must not log timings"
    for key in keys:
        (point,) = board.client.scalars(RUN, f"compress/quant/{key}")
        assert point.value == pytest.approx(results[key], rel=1e-6), key  # TensorBoard stores float32
    # Per-layer SQNR of an 8-bit model: finite and well above 10 dB (random weights give ~40 dB).
    for layer in LAYERS:
        assert 10.0 < board.client.scalars(RUN, f"compress/quant/sqnr/{layer}")[0].value < 100.0


def test_ptq_scalars(board):
    tags = _scalar_tags(board, PTQ_RUN)
    keys = ["float_bytes", "int8_bytes", "size_ratio", "quantized_layers", "attempts", "top1_agreement"]
    keys += ["float_val_acc", "int8_val_acc", "val_acc_drop"] + [f"sqnr/{layer}" for layer in LAYERS]
    expected = {f"compress/ptq/{k}" for k in keys}
    assert expected <= tags, f"missing: {sorted(expected - tags)}"
    assert not any(tag.startswith(("compress/quant/", "compress/sparsity")) for tag in tags)
    for key in keys:
        (point,) = board.client.scalars(PTQ_RUN, f"compress/ptq/{key}")
        assert point.value == pytest.approx(float(board.ptq.results[key]), rel=1e-6), key
    for layer in LAYERS:
        assert 10.0 < board.client.scalars(PTQ_RUN, f"compress/ptq/sqnr/{layer}")[0].value < 100.0


@pytest.mark.parametrize("run", [RUN, PTQ_RUN])
def test_report_scalars(board, run):
    results = board.reports[run].results
    for key in ("val_acc", "val_acc_before", "val_acc_drop", "sparsity", "size_bytes", "size_ratio"):
        (point,) = board.client.scalars(run, f"compress/report/{key}")
        assert point.value == pytest.approx(results[key], rel=1e-6), key
    # The final metric against the final sparsity, one point per run (step = sparsity in per mille).
    (point,) = board.client.scalars(run, "compress/report/val_acc_vs_sparsity")
    assert point.step == round(1000 * results["sparsity"]) and point.value == pytest.approx(results["val_acc"])


IMAGES = [
    (RUN, "compress/pruning/per_layer_sparsity"),
    (RUN, "compress/pruning/val_acc_vs_sparsity"),
    (RUN, "compress/quant/per_layer_sqnr"),
    (PTQ_RUN, "compress/ptq/per_layer_sqnr"),
]


@pytest.mark.parametrize(("run", "tag"), IMAGES)
def test_images_are_fetchable_pngs(board, run, tag):
    assert tag in board.client.tags("images")[run]
    png = board.client.image_bytes(run, tag)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05, "the figure is blank"


def test_text_summaries(board):
    assert {"compress/pruning/summary/text_summary", "compress/quant/summary/text_summary"} <= board.client.tags(
        "text"
    )[RUN]
    (pruning,) = board.client.text(RUN, "compress/pruning/summary/text_summary")
    # Served as HTML rendered from the markdown table: one row per pruned tensor and the total.
    assert "<table>" in pruning.html and "net.fc1.weight" in pruning.html and "50.00%" in pruning.html
    (quant,) = board.client.text(RUN, "compress/quant/summary/text_summary")
    assert "<table>" in quant.html and "int8_val_acc" in quant.html and "top1_agreement" in quant.html
    (ptq,) = board.client.text(PTQ_RUN, "compress/ptq/summary/text_summary")
    assert "<table>" in ptq.html and "int8_val_acc" in ptq.html and "quantized_layers" in ptq.html
    for run in (RUN, PTQ_RUN):
        (report,) = board.client.text(run, "compress/report/summary/text_summary")
        assert "<table>" in report.html and run.split("/")[0] in report.html and "val_acc" in report.html


def _chart_tags(charts: dict[str, list[str]], title_fragment: str, tags: set[str]) -> set[str]:
    """The scalar tags drawn by the chart whose title contains ``title_fragment`` (its regexes, searched)."""
    matching = [title for title in charts if title_fragment in title]
    assert len(matching) == 1, f"expected one chart titled like {title_fragment!r}, got {sorted(charts)}"
    return {tag for tag in tags if any(re.search(regex, tag) for regex in charts[matching[0]])}


def test_custom_scalars_layout_covers_all_callbacks(board):
    layout = board.client.custom_scalars_layout()  # TensorBoard merges the layouts of all runs
    tags = _scalar_tags(board)
    ptq_tags = _scalar_tags(board, PTQ_RUN)
    assert {"pruning", "quantization (QAT)", "post-training quantization", "compression report"} <= set(layout)
    pruning, qat, ptq = layout["pruning"], layout["quantization (QAT)"], layout["post-training quantization"]
    assert _chart_tags(pruning, "target vs measured", tags) == {"compress/sparsity", "compress/target_sparsity"}
    assert _chart_tags(pruning, "per-layer sparsity", tags) == {f"compress/sparsity/{x}.weight" for x in LAYERS}
    assert _chart_tags(pruning, "val_acc vs sparsity", tags) == {"compress/val_acc_vs_sparsity"}
    expected_metric = {"compress/quant/fake_quant_val_acc", "compress/quant/int8_val_acc"}
    assert _chart_tags(qat, "fake-quant vs int8", tags) == expected_metric
    assert _chart_tags(qat, "SQNR", tags) == {f"compress/quant/sqnr/{layer}" for layer in LAYERS}
    ptq_metric = {"compress/ptq/float_val_acc", "compress/ptq/int8_val_acc"}
    assert _chart_tags(ptq, "val_acc: float vs int8", ptq_tags) == ptq_metric
    assert _chart_tags(ptq, "SQNR", ptq_tags) == {f"compress/ptq/sqnr/{layer}" for layer in LAYERS}
    report = layout["compression report"]
    before_after = {"compress/report/val_acc", "compress/report/val_acc_before"}
    for run_tags in (tags, ptq_tags):
        assert _chart_tags(report, "before vs after", run_tags) == before_after
        assert "compress/report/val_acc_vs_sparsity" in _chart_tags(report, "all runs", run_tags)


def test_hparams_compare_the_runs(board):
    experiment = board.client.hparams_experiment()
    columns = {info["name"] for info in experiment["hparamInfos"]}
    assert {"method", "target_sparsity", "quantization", "bits", "mode"} <= columns
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"compress/report/val_acc", "compress/report/size_bytes", "compress/report/sparsity"} <= metrics
    groups = {group["name"]: group for group in board.client.hparams_session_groups()}
    assert sorted(groups) == [RUN, PTQ_RUN]
    for run, report in board.reports.items():
        # One row per run: its compression settings, and its final results as the metric columns.
        assert groups[run]["hparams"] == pytest.approx(report.settings), run
        values = {m["name"]["tag"]: m["value"] for m in groups[run]["metricValues"]}
        for tag in metrics:
            assert values[tag] == pytest.approx(report.results[tag.removeprefix("compress/report/")], rel=1e-6)
    assert groups[RUN]["hparams"]["target_sparsity"] == pytest.approx(0.5)
    assert groups[PTQ_RUN]["hparams"]["quantization"] != groups[RUN]["hparams"]["quantization"]


def test_server_stops_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError), running_tensorboard(tmp_path) as url:
        assert TensorBoardClient(url).runs() == []
        raise KeyError("boom")
    _assert_stopped(url, tmp_path)


def test_missing_logdir_is_rejected(tmp_path):
    missing = running_tensorboard(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="`logdir` must be an existing directory"), missing:
        pass
