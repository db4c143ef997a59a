"""FSDP2 through Lightning's ModelParallelStrategy on CPU (2 gloo processes): the pruning callback works on the
local shards, ranks globally without a gather, and resumes mid-ramp from Lightning's distributed checkpoint.

Each run is a script in a subprocess (``fsdp_pruning_run.py``): the strategy launches its processes by re-running
the script, which a pytest process cannot be."""

from pathlib import Path

import lightning as L
import pytest

from helpers import ResumableLoader, TinyClassifier, classification_data, run_two_rank_script, trainer
from lightning_compress import IterativePruningCallback

SCRIPT = Path(__file__).with_name("fsdp_pruning_run.py")


def _run(out_dir: Path, *args: str) -> tuple[dict, dict]:
    return run_two_rank_script(SCRIPT, out_dir, *args)


@pytest.mark.ddp
def test_exact_global_sparsity_on_sharded_weights_and_bitwise_resume(tmp_path):
    rank0, rank1 = _run(tmp_path / "full", "--checkpoint-every", "10")
    # exactly round(s * N) zeros in the gathered full model, N = 64*16 + 4*64
    assert rank0["numel"] == 1280 and rank0["zeros"] == round(0.7 * 1280)
    assert rank0["results"]["sparsity"] == rank1["results"]["sparsity"] == pytest.approx(896 / 1280)
    # each rank holds only its rows (FSDP2 splits 64 rows 32/32 and 4 rows 2/2)
    assert rank0["local_mask_rows"]["net.fc1.weight"] == [32, 16]
    assert rank0["checksum"] == rank1["checksum"]

    ckpt = next((tmp_path / "full" / "ckpt").glob("*step=10.ckpt"))  # mid-ramp (end_step=20), mid-epoch
    resumed0, _ = _run(tmp_path / "resumed", "--resume", str(ckpt))
    assert resumed0["zeros"] == rank0["zeros"]
    assert resumed0["checksum"] == rank0["checksum"]


@pytest.mark.ddp
def test_sharded_masks_equal_a_single_process_run_on_the_same_weights(tmp_path):
    """With lr=0 the weights stay the seeded initial ones, so the masks depend on them alone: the 2-process run over
    row shards must zero exactly the weights a single-process run of the same callback zeroes."""
    sharded, _ = _run(tmp_path / "sharded", "--lr", "0")

    L.seed_everything(0)
    model = TinyClassifier(lr=0.0)
    pruning = IterativePruningCallback(
        target_sparsity=0.7, start_step=2, end_step=20, update_every_n_steps=3, verbose=False
    )
    trainer(tmp_path / "single", [pruning], max_epochs=3).fit(model, ResumableLoader(classification_data()))
    weights = dict(model.named_parameters())
    single = {n: (weights[n] == 0).flatten().nonzero().flatten().tolist() for n in pruning.pruner.weights}
    assert sharded["zero_indices"] == single
    assert sum(map(len, single.values())) == round(0.7 * 1280)
