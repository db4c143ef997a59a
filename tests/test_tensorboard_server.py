"""What the callbacks write must really show in TensorBoard: a real ``tensorboard`` server on loopback, read through
the HTTP data API its web app uses (runs, scalars, images, text, custom-scalars layout, hparams).

One tiny run (TinyNet, 2 epochs of 4 batches) with pruning and QAT is trained once for the module; the server is
started over its log directory once, and stopped (checked) when the module's tests are done.
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
from helpers import TinyClassifier, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import image as mpimg

from lightning_compress import IterativePruningCallback, QATCallback
from lightning_compress.tensorboard_server import TensorBoardClient, running_tensorboard

RUN = "tiny/version_0"
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


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tensorboard_logs")
    model = TinyClassifier()
    model.example_input_array = torch.randn(8, 16)
    pruning = IterativePruningCallback(target_sparsity=0.5, monitor="val_acc", update_every_n_steps=1, verbose=False)
    qat = QATCallback(monitor="val_acc", latency="off", verbose=False)
    fit = trainer(
        logdir, [pruning, qat], max_epochs=2, log_every_n_steps=1, logger=TensorBoardLogger(logdir, name="tiny")
    )
    fit.fit(model, loader(128), loader(64))
    with running_tensorboard(logdir) as url:
        assert _processes_mentioning(str(logdir)), "the server process should be visible while it runs"
        yield SimpleNamespace(client=TensorBoardClient(url), qat=qat)
    _assert_stopped(url, logdir)


def _scalar_tags(board) -> set[str]:
    return board.client.tags("scalars")[RUN]


def test_run_is_listed(board):
    assert board.client.runs() == [RUN]


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


IMAGES = [
    "compress/pruning/per_layer_sparsity",
    "compress/pruning/val_acc_vs_sparsity",
    "compress/quant/per_layer_sqnr",
]


@pytest.mark.parametrize("tag", IMAGES)
def test_images_are_fetchable_pngs(board, tag):
    assert tag in board.client.tags("images")[RUN]
    png = board.client.image_bytes(RUN, tag)
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


def _chart_tags(charts: dict[str, list[str]], title_fragment: str, tags: set[str]) -> set[str]:
    """The scalar tags drawn by the chart whose title contains ``title_fragment`` (its regexes, searched)."""
    matching = [title for title in charts if title_fragment in title]
    assert len(matching) == 1, f"expected one chart titled like {title_fragment!r}, got {sorted(charts)}"
    return {tag for tag in tags if any(re.search(regex, tag) for regex in charts[matching[0]])}


def test_custom_scalars_layout_covers_both_callbacks(board):
    layout = board.client.custom_scalars_layout()
    tags = _scalar_tags(board)
    assert {"pruning", "quantization (QAT)"} <= set(layout)
    pruning, qat = layout["pruning"], layout["quantization (QAT)"]
    assert _chart_tags(pruning, "target vs measured", tags) == {"compress/sparsity", "compress/target_sparsity"}
    assert _chart_tags(pruning, "per-layer sparsity", tags) == {f"compress/sparsity/{x}.weight" for x in LAYERS}
    assert _chart_tags(pruning, "val_acc vs sparsity", tags) == {"compress/val_acc_vs_sparsity"}
    expected_metric = {"compress/quant/fake_quant_val_acc", "compress/quant/int8_val_acc"}
    assert _chart_tags(qat, "fake-quant vs int8", tags) == expected_metric
    assert _chart_tags(qat, "SQNR", tags) == {f"compress/quant/sqnr/{layer}" for layer in LAYERS}


def test_hparams_session_for_the_run(board):
    experiment = board.client.hparams_experiment()
    assert {"lr", "optimizer", "weight_decay"} <= {info["name"] for info in experiment["hparamInfos"]}
    (group,) = board.client.hparams_session_groups()
    assert group["name"] == RUN
    assert group["hparams"]["optimizer"] == "sgd" and group["hparams"]["lr"] == pytest.approx(0.05)


def test_server_stops_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError), running_tensorboard(tmp_path) as url:
        assert TensorBoardClient(url).runs() == []
        raise KeyError("boom")
    _assert_stopped(url, tmp_path)


def test_missing_logdir_is_rejected(tmp_path):
    missing = running_tensorboard(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="`logdir` must be an existing directory"), missing:
        pass
