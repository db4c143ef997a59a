"""The demo study (``python examples/study.py``) on tiny subsets of the real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import study
from lightning_compress.demos.data import DEFAULT_DIR
from lightning_compress.demos.models import LeNet5

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
    runs = study.main(["--quick", "--studies", "dense", "prune", "--logdir", str(logdir)])
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
    study.main(["--quick", "--studies", "dense", "prune_qat", "--logdir", str(logdir)])
    runs = study.main(["--quick", "--studies", "ptq", "--logdir", str(logdir)])
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
