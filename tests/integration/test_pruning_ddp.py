"""Two CPU processes (gloo): every rank must compute the same masks, for both criteria."""

import json

import pytest
from lightning.pytorch.callbacks import Callback

from helpers import TinyClassifier, loader, trainer
from lightning_compress import IterativePruningCallback


class MaskChecksums(Callback):
    """Each rank writes a checksum of its masks and pruned weights at fit end."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_fit_end(self, trainer, pl_module):
        callback = next(cb for cb in trainer.callbacks if isinstance(cb, IterativePruningCallback))
        checksums = {name: int(mask.flatten().nonzero().sum()) for name, mask in callback.pruner.masks.items()}
        checksums["zeros"] = sum(int((w == 0).sum()) for w in callback.pruner.weights.values())
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(checksums, f)


@pytest.mark.ddp
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_masks_identical_across_ranks(tmp_path, criterion):
    pruner = IterativePruningCallback(target_sparsity=0.7, end_step=6, update_every_n_steps=2, criterion=criterion)
    fit = trainer(tmp_path, [pruner, MaskChecksums(tmp_path)], strategy="ddp_spawn", devices=2, max_epochs=2)
    fit.fit(TinyClassifier(), loader())
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["zeros"] == round(0.7 * 1280)


@pytest.mark.ddp
def test_channel_masks_identical_across_ranks(tmp_path):
    pruner = IterativePruningCallback(
        target_sparsity=0.5, end_step=6, update_every_n_steps=2, structure="channel", round_to=1
    )
    fit = trainer(tmp_path, [pruner, MaskChecksums(tmp_path)], strategy="ddp_spawn", devices=2, max_epochs=2)
    fit.fit(TinyClassifier(), loader())
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1
    assert rank0["net.fc1.weight"] > 0 and (tmp_path / "compact_model.pt").exists()  # saved by rank zero
