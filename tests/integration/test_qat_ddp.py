"""Two CPU processes (gloo, ddp_spawn): the QAT observers end up identical on both ranks although each rank sees
different data (its own shard of the samples, and on rank 1 inputs scaled 5x)."""

import json

import pytest
from lightning.pytorch.callbacks import Callback

from helpers import TinyClassifier, loader, trainer
from lightning_compress import QATCallback


class RankSkewed(TinyClassifier):
    """Rank 1 trains on inputs 5x wider than rank 0's, so the ranks' observers really see different ranges."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x * (1.0 + 4.0 * self.global_rank), y), batch_idx)


def _observers(pl_module) -> dict[str, list[float]]:
    return {k: v.float().flatten().tolist() for k, v in pl_module.state_dict().items() if ".activation_observer." in k}


class ObserverDump(Callback):
    """Each rank writes its observer state at the last step of training (before the final validation synchronizes
    it) and at fit end."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        self.first = {}
        self.local = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            self.local = _observers(pl_module)  # before the epoch's validation synchronizes them
            if trainer.current_epoch == 0:
                self.first = self.local  # before any synchronization at all

    def on_fit_end(self, trainer, pl_module):  # runs after QATCallback.on_fit_end (listed after it)
        state = {"first": self.first, "local": self.local, "synced": _observers(pl_module)}
        state["weight"] = pl_module.net.fc1.weight.sum().item()
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(state, f)


@pytest.mark.ddp
def test_observers_identical_across_ranks(tmp_path):
    callback = QATCallback(backend="inductor", module="net", averaging_constant=0.1, convert_on_fit_end=False)
    fit = trainer(
        tmp_path,
        [callback, ObserverDump(tmp_path)],
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        num_sanity_val_steps=0,
    )
    fit.fit(RankSkewed(), loader(), loader(64))
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # DDP broadcasts rank 0's buffers (observers included) before every forward, then each rank updates its observers
    # with its own batch: after a step they differ, and the callback's all-reduce (MIN/MAX) makes them identical
    assert rank0["first"] != rank1["first"]
    assert rank0["synced"] == rank1["synced"]
    assert rank0["weight"] == rank1["weight"]  # DDP itself keeps the weights identical
    # the synchronized range is the union of the ranks' ranges
    for layer in ("net.fc1", "net.fc2"):
        low, high = f"{layer}.activation_observer.min_val", f"{layer}.activation_observer.max_val"
        assert rank0["synced"][low] == [min(rank0["local"][low][0], rank1["local"][low][0])]
        assert rank0["synced"][high] == [max(rank0["local"][high][0], rank1["local"][high][0])]


class WithTorchmetrics(TinyClassifier):
    """Logs a torchmetrics object, which synchronizes across processes when computed."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.val_accuracy = MulticlassAccuracy(num_classes=4, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val_acc", self.val_accuracy)


@pytest.mark.ddp
@pytest.mark.slow
def test_conversion_on_rank_zero_with_torchmetrics_does_not_hang(tmp_path):
    """Rank zero measures the int8 model alone: its torchmetrics must not wait for the other rank."""
    callback = QATCallback(
        backend="inductor", module="net", monitor="val_acc", latency="off", save_path=str(tmp_path / "int8.pt2")
    )
    fit = trainer(tmp_path, [callback], strategy="ddp_spawn", devices=2, max_epochs=1, num_sanity_val_steps=0)
    fit.fit(WithTorchmetrics(), loader(), loader(64))
    assert (tmp_path / "int8.pt2").is_file()
