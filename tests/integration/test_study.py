"""The demo study (``python examples/study.py``) on tiny subsets of the real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import study
from lightning_compress.demos.data import DEFAULT_DIR
from lightning_compress.demos.models import LeNet5, ResNetish
from lightning_compress.engine.structured import load_compact

pytestmark = pytest.mark.skipif(
    not Path(DEFAULT_DIR, "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)",
)


@pytest.fixture
def tiny(monkeypatch):
    """Smaller than --quick: a few hundred images, so a study trains in about a second."""
    original = study.Settings.from_args

    def from_args(args):
        settings = original(args)
        settings.train_subset, settings.val_size, settings.test_subset = 256, 128, 128
        settings.latency_repeats = 3
        return settings

    monkeypatch.setattr(study.Settings, "from_args", from_args)


def test_dense_and_prune_quick_study(tmp_path, tiny, capsys):
    logdir = tmp_path / "demo"
    runs = study.main(["--quick", "--net", "lenet5", "--studies", "dense", "prune", "--logdir", str(logdir)])
    out = capsys.readouterr().out

    assert list(runs) == ["dense", "prune"]
    assert f"tensorboard --logdir {logdir.resolve()}" in out
    assert "prune (float)" in out and "dense (float)" in out
    document = json.loads((logdir / "study.json").read_text())
    dense, prune = document["runs"]["dense"], document["runs"]["prune"]
    # every study is its own TensorBoard run with a compression report
    assert Path(dense["log_dir"]) == logdir.resolve() / "dense" / "version_0"
    assert (Path(prune["log_dir"]) / "compression_report.json").is_file()
    assert prune["settings"]["method"] == "prune" and prune["settings"]["target_sparsity"] == 0.9
    # the report of a compressed run is relative to the dense run's accuracy
    assert prune["report"]["val_acc_before"] == pytest.approx(dense["report"]["val_acc"])
    # the artifacts were measured from disk: the pruned weights really are 90% zeros
    assert prune["measured"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert dense["measured"]["sparsity"] < 0.01
    assert prune["measured"]["gzip_bytes"] < 0.5 * dense["measured"]["gzip_bytes"]
    assert set(prune["measured"]) >= {"test_acc", "ms/batch_1", "ms/batch_64", "ratio_to_dense/batch_64"}
    net = LeNet5()
    net.load_state_dict(torch.load(prune["artifact"], weights_only=True))  # a plain LeNet5 state_dict
    markdown = (logdir / "study.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[2].startswith("| prune (float) | ")  # header, dense, prune
    # the cross-run view
    events = EventAccumulator(str(logdir / "study"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "compress/study/val_acc_vs_sparsity" in events.Tags()["images"]
    assert "compress/study/summary/text_summary" in events.Tags()["tensors"]


def test_bad_epochs_are_rejected(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--epochs", "0"])
    assert "`--epochs` must be a positive integer, got 0." in capsys.readouterr().err


@pytest.mark.slow
def test_all_studies_quick_and_ptq_reuses_an_earlier_dense_run(tmp_path, tiny, capsys):
    logdir = tmp_path / "demo"
    study.main(["--quick", "--net", "lenet5", "--studies", "dense", "prune_qat", "--logdir", str(logdir)])
    runs = study.main(["--quick", "--net", "lenet5", "--studies", "ptq", "--logdir", str(logdir)])
    out = capsys.readouterr().out
    assert list(runs) == ["ptq"]  # no dense retraining: the earlier dense weights were quantized
    assert not (logdir / "dense" / "version_1").exists()
    document = json.loads((logdir / "study.json").read_text())
    assert set(document["runs"]) == {"dense", "ptq"}
    ptq = document["runs"]["ptq"]
    assert ptq["kind"] == "int8" and ptq["artifact"].endswith("ptq_int8.onnx")
    assert ptq["settings"]["quantization"] == "ptq" and ptq["report"]["size_ratio"] < 1.0
    assert ptq["measured"]["size_bytes"] < document["runs"]["dense"]["measured"]["size_bytes"]
    assert abs(ptq["measured"]["test_acc"] - document["runs"]["dense"]["measured"]["test_acc"]) < 0.05
    assert "ptq (int8)" in out


def test_channel_study_on_the_resnetish_net_removes_channels_for_real(tmp_path, tiny, capsys):
    logdir = tmp_path / "demo"
    runs = study.main(["--quick", "--studies", "dense", "channel", "--logdir", str(logdir)])  # the default net
    assert list(runs) == ["dense", "channel"]
    assert "ResNet-ish on Fashion-MNIST" in capsys.readouterr().out
    document = json.loads((logdir / "study.json").read_text())
    assert document["net"] == "resnetish"
    dense, channel = document["runs"]["dense"], document["runs"]["channel"]
    assert channel["kind"] == "compact" and channel["artifact"].endswith("compact_model.pt")
    # the artifact is a smaller network (channels gone, not zeroed), rebuilt from a fresh ResNetish
    compact = load_compact(channel["artifact"], model=ResNetish())
    assert sum(p.numel() for p in compact.parameters()) < 0.75 * sum(p.numel() for p in ResNetish().parameters())
    assert channel["measured"]["weights"] == channel["measured"]["nonzero_weights"] or (
        channel["measured"]["nonzero_weights"] > 0.99 * channel["measured"]["weights"]
    )
    assert channel["measured"]["sparsity"] > 0.25  # against the dense network's weights
    assert channel["measured"]["size_bytes"] < 0.75 * dense["measured"]["size_bytes"]
    assert channel["settings"]["structure"] == "channel"
    # timed alternated with dense; times and ratio come from the same series
    ratio = channel["measured"]["ratio_to_dense/batch_64"]
    pair = channel["measured"]["ms/batch_64"] / channel["measured"]["dense_ms_in_pair/batch_64"]
    assert ratio == pytest.approx(pair)


@pytest.mark.slow
def test_pruned_plus_int8_study_converts_the_compact_network(tmp_path, tiny):
    logdir = tmp_path / "demo"
    study.main(["--quick", "--studies", "dense", "channel_qat", "--logdir", str(logdir)])
    document = json.loads((logdir / "study.json").read_text())
    run = document["runs"]["channel_qat"]
    assert run["kind"] == "int8" and run["artifact"].endswith("qat_int8.onnx")
    # the int8 file holds the compact widths: fewer int8 weights than the dense network has weights
    assert run["measured"]["weights"] < 0.75 * document["runs"]["dense"]["measured"]["weights"]
    assert run["measured"]["size_bytes"] < 0.25 * document["runs"]["dense"]["measured"]["size_bytes"]
