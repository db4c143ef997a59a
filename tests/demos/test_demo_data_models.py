"""Tests of the demo data (Fashion-MNIST from the Debian package, digits fallback) and the demo models."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from lightning_compress.demos.data import (
    DEFAULT_DIR,
    FILES,
    EpochSeededSampler,
    FashionMNISTDataModule,
    load_fashion_mnist,
)
from lightning_compress.demos.models import ImageClassifier, build_model

HAS_FASHION = all((Path(DEFAULT_DIR) / name).is_file() for name in FILES)
needs_fashion = pytest.mark.skipif(not HAS_FASHION, reason="needs `apt-get install -y dataset-fashion-mnist`")
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


@pytest.fixture(scope="module")
def fashion() -> tuple[torch.Tensor, ...]:
    return load_fashion_mnist()


@needs_fashion
def test_load_fashion_mnist_shapes_and_labels(fashion: tuple[torch.Tensor, ...]) -> None:
    train_x, train_y, test_x, test_y = fashion
    assert train_x.shape == (60000, 28, 28) and train_x.dtype == torch.uint8
    assert test_x.shape == (10000, 28, 28) and test_x.dtype == torch.uint8
    assert train_y.shape == (60000,) and test_y.shape == (10000,) and train_y.dtype == torch.long
    assert train_y.min() == 0 and train_y.max() == 9
    assert torch.bincount(test_y).tolist() == [1000] * 10  # Fashion-MNIST's test set is balanced
    assert train_x.float().std() > 50  # real images, not zeros


@needs_fashion
def test_datamodule_split_is_deterministic_and_normalized() -> None:
    dms = [FashionMNISTDataModule(train_subset=500, test_subset=300, val_size=1000, seed=s) for s in (0, 0, 1)]
    for dm in dms:
        dm.setup("fit")
    a, b, c = dms
    assert a.train_set is not None and b.train_set is not None and c.train_set is not None
    assert a.val_set is not None and a.test_set is not None
    x, y = a.train_set.tensors
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert len(a.val_set) == 1000 and len(a.test_set) == 300
    assert torch.equal(x, b.train_set.tensors[0])
    assert torch.equal(x, c.train_set.tensors[0])  # the split does not depend on the shuffle seed
    full = FashionMNISTDataModule(val_size=5000)
    full.setup("fit")
    assert full.train_set is not None and len(full.train_set) == 55000
    assert abs(float(full.train_set.tensors[0].mean())) < 0.05
    assert abs(float(full.train_set.tensors[0].std()) - 1.0) < 0.05


@needs_fashion
def test_train_order_depends_on_seed_and_epoch_only() -> None:
    def first_labels(seed: int, epoch: int) -> list[int]:
        dm = FashionMNISTDataModule(train_subset=256, batch_size=64, seed=seed)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return next(iter(loader))[1].tolist()

    assert first_labels(0, 0) == first_labels(0, 0)
    assert first_labels(0, 0) != first_labels(1, 0)
    assert first_labels(0, 0) != first_labels(0, 1)


class _RecordFirstBatch(Callback):
    """Records the labels of the first training batch of every epoch."""

    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.labels.append(batch[1].tolist())


@needs_fashion
def test_trainer_sees_the_same_order_in_two_runs(tmp_path: Path) -> None:
    def run() -> list[list[int]]:
        recorder = _RecordFirstBatch()
        trainer = Trainer(
            max_epochs=2,
            limit_train_batches=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[recorder],
            default_root_dir=tmp_path,
        )
        trainer.fit(ImageClassifier(arch="mlp"), datamodule=FashionMNISTDataModule(train_subset=256, batch_size=32))
        return recorder.labels

    first, second = run(), run()
    assert first == second  # same seed, same order, epoch by epoch
    assert first[0] != first[1]  # Lightning calls `set_epoch`, so epochs differ


def test_epoch_seeded_sampler_is_a_permutation() -> None:
    sampler = EpochSeededSampler(100, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(100)) and len(sampler) == 100
    sampler.set_epoch(2)
    again = EpochSeededSampler(100, seed=3)
    again.set_epoch(2)
    assert list(sampler) == list(again) != epoch0  # the epoch changes the order, deterministically


def test_missing_files_error_names_path_and_install_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path / FILES[0]) in str(info.value)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fallback='digits'"):
        dm.setup("fit")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`fallback` must be one of 'digits', got 'mnist'"):
        FashionMNISTDataModule(fallback="mnist")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        FashionMNISTDataModule(batch_size=0)


def _fake_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Install a stand-in ``sklearn.datasets.load_digits`` returning 1797 random 8x8 images in 0..16."""
    rng = np.random.default_rng(0)
    bunch = types.SimpleNamespace(images=rng.integers(0, 17, (1797, 8, 8)).astype(float), target=np.arange(1797) % 10)
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: bunch  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)


@pytest.mark.parametrize(
    "real", [pytest.param(True, marks=pytest.mark.skipif(not HAS_SKLEARN, reason="no sklearn")), False]
)
def test_digits_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real: bool) -> None:
    if not real:
        _fake_sklearn(monkeypatch)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), fallback="digits", batch_size=32)
    with pytest.warns(UserWarning, match="fallback='digits'"):
        dm.setup("fit")
    assert dm.source == "digits"
    assert dm.train_set is not None and dm.val_set is not None and dm.test_set is not None
    assert len(dm.train_set) == 1200 and len(dm.val_set) == 300 and len(dm.test_set) == 297
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y.min()) <= int(y.max()) <= 9


def test_digits_fallback_without_sklearn_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError (both names: an earlier test may have imported them)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), fallback="digits")
    with pytest.warns(UserWarning), pytest.raises(ImportError, match="pip install scikit-learn"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("arch", "n_params"), [("mlp", 266_610), ("lenet5", 61_706), ("resnet", 209_850), ("resnetish", 696_042)]
)
def test_models_output_shapes(arch: str, n_params: int) -> None:
    net = build_model(arch)
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in net.parameters()) == n_params


def test_unknown_model_and_optimizer() -> None:
    with pytest.raises(ValueError, match="`arch` must be one of 'mlp', 'lenet5', 'resnet', 'resnetish', got 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="`optimizer` must be one of 'adam', 'sgd', got 'rmsprop'"):
        ImageClassifier(optimizer="rmsprop")


@needs_fashion
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_image_classifier_smoke_fit_logs_metrics(tmp_path: Path, optimizer: str) -> None:
    model = ImageClassifier(arch="lenet5", optimizer=optimizer)
    dm = FashionMNISTDataModule(batch_size=16, train_subset=64, val_size=200, test_subset=32)
    trainer = Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert {"test_acc", "test_loss"} <= set(result)
    logits = trainer.predict(model, datamodule=dm)
    assert logits is not None and logits[0].shape == (16, 10)  # type: ignore[union-attr]


def test_image_classifier_checkpoint_round_trip(tmp_path: Path) -> None:
    model = ImageClassifier(arch="mlp", lr=0.01, optimizer="sgd")
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams["arch"] == "mlp" and loaded.hparams["lr"] == 0.01
    assert torch.equal(loaded.state_dict()["net.fc1.weight"], model.state_dict()["net.fc1.weight"])


def test_cosine_lr_schedule_decays_to_zero_over_the_fit() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    model = ImageClassifier(arch="mlp", lr=0.01, lr_schedule="cosine")
    trainer = Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == 4 and scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="`lr_schedule` must be one of 'constant', 'cosine', got 'step'"):
        ImageClassifier(lr_schedule="step")
