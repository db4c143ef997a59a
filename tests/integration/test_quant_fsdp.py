"""FSDP2 through Lightning's ModelParallelStrategy on CPU (2 gloo processes): QAT and PTQ on sharded parameters.

The observers are reduced across ranks, the full model is gathered on rank zero, which alone converts it and writes
the one int8 artifact, and every rank gets the results. Each run is a script in a subprocess
(``fsdp_quant_run.py``): the strategy launches its processes by re-running the script, which a pytest process
cannot be."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TinyClassifier, run_two_rank_script
from lightning_compress import QATCallback, load_quantized

SCRIPT = Path(__file__).with_name("fsdp_quant_run.py")


def _run(out_dir: Path, *args: str) -> tuple[dict, dict]:
    return run_two_rank_script(SCRIPT, out_dir, *args)


def _check_one_artifact_agreeing(out_dir: Path, rank0: dict, rank1: dict, name: str) -> None:
    """One int8 file, written by rank zero, whose outputs agree with the gathered network's (``reference.pt``)."""
    assert [p.name for p in (out_dir / "int8").iterdir()] == [name]
    assert not [p for p in out_dir.rglob("*") if p.suffix in (".onnx", ".pt2") and p.parent.name != "int8"]
    assert rank0["has_int8"] and not rank1["has_int8"]
    assert rank0["results"] == rank1["results"]  # every rank got rank zero's results
    assert rank0["results"]["saved_to"] == str(out_dir / "int8" / name)
    reference = torch.load(out_dir / "reference.pt")
    out = load_quantized(out_dir / "int8" / name)(reference["x"])
    error = (out - reference["out"]).pow(2).mean() / reference["out"].pow(2).mean()
    assert float(error) < 1e-2  # SQNR above 20 dB
    assert (out.argmax(1) == reference["out"].argmax(1)).float().mean() >= 0.9


@pytest.mark.ddp
def test_qat_with_pruning_on_sharded_weights_one_artifact_and_resume(tmp_path):
    rank0, rank1 = _run(tmp_path / "full", "prune_qat", "--checkpoint-every", "10")
    # without FSDP's help (it broadcasts no buffer), each rank observes its own data (rank 1's inputs are 5x wider)
    assert rank0["first"] != rank1["first"]
    # the callback's all-reduce (MIN/MAX) makes them identical: the union of the ranks' ranges
    assert rank0["observers"] == rank1["observers"]
    for layer in ("net.fc1", "net.fc2"):
        low, high = f"{layer}.activation_observer.min_val", f"{layer}.activation_observer.max_val"
        assert rank0["observers"][low] == [min(rank0["local"][low][0], rank1["local"][low][0])]
        assert rank0["observers"][high] == [max(rank0["local"][high][0], rank1["local"][high][0])]
    assert rank0["zeros"] == 640  # pruning alongside: exactly half of the 1280 weights of the gathered model
    _check_one_artifact_agreeing(tmp_path / "full", rank0, rank1, "prune_qat_int8.onnx")

    ckpt = next((tmp_path / "full" / "ckpt").glob("*step=10.ckpt"))  # a distributed checkpoint, mid-epoch
    resumed0, resumed1 = _run(tmp_path / "resumed", "prune_qat", "--resume", str(ckpt), "--no-convert")
    assert resumed0["observers"] == resumed1["observers"] == rank0["observers"]
    assert resumed0["checksum"] == rank0["checksum"]
    assert resumed0["zeros"] == 640

    # outside a Trainer: the distributed checkpoint, consolidated into one file, loads into a plain prepared model
    single = tmp_path / "consolidated.ckpt"
    consolidate = [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint", str(ckpt)]
    subprocess.run([*consolidate, "--output_file", str(single)], check=True, capture_output=True, timeout=120)
    model = QATCallback(module="net", averaging_constant=0.1).load_checkpoint(TinyClassifier(), single)
    assert model.net.fc1.observer.is_initialized and bool(torch.isfinite(model.net.fc1.observer.min_val))
    assert int((model.net.fc1.weight == 0).sum()) > 0  # the pruned, trained weights of step 10


@pytest.mark.ddp
def test_ptq_on_rank_zero_from_the_gathered_model(tmp_path):
    rank0, rank1 = _run(tmp_path, "ptq")
    _check_one_artifact_agreeing(tmp_path, rank0, rank1, "ptq_int8.onnx")
    assert rank0["results"]["quantized_layers"] == 2.0
    assert "int8_val_acc" in rank0["results"]  # the user's validation ran on rank zero with the int8 network


@pytest.mark.ddp
def test_a_conversion_failing_on_rank_zero_fails_every_rank_instead_of_hanging(tmp_path):
    """The preflight (after the first batch) fails on rank zero: rank 1 gets the error instead of waiting forever in
    the next collective (a hang would end in the subprocess timeout)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "qat_dict"], capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0
    assert "[rank0]: lightning_compress.engine.ort.OrtConversionError: Preflight" in result.stderr
    assert "[rank1]: lightning_compress.engine.distributed.RankZeroError: Rank 0 failed" in result.stderr
    assert "The model returns dict" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))
