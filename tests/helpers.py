"""Small models and data shared by the callback tests (module level, so DDP spawn can pickle them)."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def classification_data(n: int = 256, features: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def loader(n: int = 256, batch_size: int = 32, seed: int = 0) -> DataLoader:
    return DataLoader(classification_data(n, seed=seed), batch_size=batch_size)


class TinyNet(nn.Module):
    """Linear + BatchNorm + Linear: has biases and a norm layer that must never be pruned by default."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TinyClassifier(L.LightningModule):
    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, weight_decay: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = {
        "default_root_dir": tmp_path,
        "max_epochs": 4,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 4,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


class ResumableLoader:
    """An iterable of batches that Lightning can checkpoint mid-epoch (it has ``state_dict``/``load_state_dict``).

    A plain ``DataLoader`` restarts its epoch from the first batch on resume, so a mid-epoch checkpoint could never
    continue with the same data; this one skips the batches already consumed, like torchdata's StatefulDataLoader.
    """

    def __init__(self, dataset, batch_size: int = 32) -> None:
        self.batches = list(DataLoader(dataset, batch_size=batch_size))
        self.position = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._skip = self._skip, 0
        for index in range(start, len(self.batches)):
            self.position = index + 1  # batches handed out so far, as torchdata's StatefulDataLoader counts
            yield self.batches[index]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._skip = state["position"] % len(self.batches)


def shard_tiny_classifier(module: L.LightningModule) -> None:
    """FSDP2 for a ``TinyClassifier`` in ``configure_model``: both Linear layers and the module over the data-parallel
    mesh (the full 2-D mesh shards nothing on CPU)."""
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for layer in (module.net.fc1, module.net.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


def run_two_rank_script(script, out_dir, *args: str) -> tuple[dict, dict]:
    """Run a 2-process test script that writes ``OUT_DIR/rank<r>.json``, and read both files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, str(script), str(out_dir), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[return-value]
