"""Fashion-MNIST from the local Debian package, as tensors and as a ``LightningDataModule``.

The data comes from ``apt-get install -y dataset-fashion-mnist``, which puts the four original ``idx.gz`` files in
``/usr/share/datasets/fashion-mnist/``. They are parsed here with ``gzip`` and ``numpy``: nothing is downloaded and
torchvision is not needed. When the files are absent, ``fallback="digits"`` uses scikit-learn's 1797 real 8x8
handwritten digits, upsampled to 28x28, so demos and tests still run on real images.

Shuffling is deterministic and resumable: the training order of epoch ``e`` depends only on ``seed`` and ``e``
(Lightning calls ``set_epoch`` on the sampler before every epoch, also after resuming from a checkpoint).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_compress.engine.validation import check_choice, check_positive_int

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
#: File names of the original distribution: (train images, train labels, test images, test labels).
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
#: Mean and standard deviation of the Fashion-MNIST training pixels, scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
#: Class names of Fashion-MNIST, by label.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: The validation split is drawn with this seed, whatever the run's ``seed``, so every run validates on the same images.
SPLIT_SEED = 1234
#: Number of the 1797 scikit-learn digits used as the test set by the ``"digits"`` fallback.
DIGITS_TEST_SIZE = 297

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzip-compressed IDX file (the MNIST format): big-endian header, then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # third byte 0x08 = unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic number {magic:#010x}).")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(data_dir: str | Path = DEFAULT_DIR) -> Arrays:
    """Read the Fashion-MNIST files of ``data_dir``.

    Args:
        data_dir: Folder holding the four ``*-ubyte.gz`` files.

    Returns:
        ``(train_x, train_y, test_x, test_y)``: ``uint8`` images of shape ``[60000, 28, 28]`` and ``[10000, 28, 28]``,
        and ``int64`` labels in ``0..9``.

    Raises:
        FileNotFoundError: If a file is missing; the message names it and the command that installs the data.
    """
    paths = [Path(data_dir) / name for name in FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed: missing {', '.join(missing)}. Install it with `{INSTALL_HINT}`, "
            "or use `fallback='digits'` (scikit-learn's 8x8 digits) in `FashionMNISTDataModule`."
        )
    train_x, train_y, test_x, test_y = (torch.from_numpy(_read_idx(p).copy()) for p in paths)
    return train_x, train_y.long(), test_x, test_y.long()


def load_digits_28x28() -> Arrays:
    """scikit-learn's 1797 handwritten 8x8 digits, upsampled to 28x28 ``uint8``, split 1500 train / 297 test.

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("`fallback='digits'` needs scikit-learn: `pip install scikit-learn`.") from None
    digits = load_digits()
    images = torch.as_tensor(np.asarray(digits.images), dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    x = (images.squeeze(1) * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    y = torch.as_tensor(np.asarray(digits.target), dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return x[train], y[train], x[test], y[test]


def normalize(images: Tensor, mean: float, std: float) -> Tensor:
    """``uint8 [N, 28, 28]`` → ``float32 [N, 1, 28, 28]`` computed as ``(x / 255 - mean) / std``."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


class EpochSeededSampler(Sampler[int]):
    """A random permutation that depends only on ``seed`` and the epoch set by ``set_epoch``.

    Two runs with the same seed see the same order in every epoch, and a run resumed from a checkpoint sees the
    same order as one that was never interrupted.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch`` (Lightning calls this before each epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST (60k train, 10k test, 10 classes of 28x28 grey clothing images) for Lightning.

    ``val_size`` images are split off the 60k training images with a fixed seed (the same for every run); the test
    set is the 10k ``t10k`` images. Batches are ``(x, y)`` with ``x`` a normalized ``float32 [B, 1, 28, 28]`` and
    ``y`` an ``int64 [B]`` label.

    Args:
        data_dir: Folder with the ``*-ubyte.gz`` files (``apt-get install -y dataset-fashion-mnist``).
        batch_size: Batch size of every dataloader.
        val_size: Number of training images held out for validation.
        train_subset: If set, train on only the first ``train_subset`` of the remaining training images.
        test_subset: If set, test (and predict) on only the first ``test_subset`` test images.
        num_workers: ``DataLoader`` worker processes.
        seed: Seed of the training shuffle.
        fallback: What to use when the files are missing: ``None`` (raise ``FileNotFoundError``) or ``"digits"``
            (scikit-learn's 1797 8x8 digits upsampled to 28x28; 1500 train / 297 test, ``val_size`` capped at 300).

    Examples:
        >>> dm = FashionMNISTDataModule(batch_size=64, train_subset=1000)  # doctest: +SKIP
        >>> trainer.fit(ImageClassifier(arch="lenet5"), datamodule=dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str = DEFAULT_DIR,
        batch_size: int = 128,
        val_size: int = 5000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        fallback: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("val_size", val_size)
        check_positive_int("num_workers", num_workers, allow_zero=True)
        for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None:
                check_positive_int(name, value)
        if fallback is not None:
            check_choice("fallback", fallback, ("digits",))
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.num_workers = num_workers
        self.seed = seed
        self.fallback = fallback
        self.source = ""  # "fashion-mnist" or "digits", set by `setup`
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _load(self) -> tuple[Arrays, float, float]:
        """The raw data and its normalization constants, from the files or the fallback."""
        try:
            arrays = load_fashion_mnist(self.data_dir)
            self.source = "fashion-mnist"
            return arrays, FASHION_MNIST_MEAN, FASHION_MNIST_STD
        except FileNotFoundError as err:
            if self.fallback is None:
                raise
            rank_zero_warn(f"{err} Using the `fallback={self.fallback!r}` data instead.")
        arrays = load_digits_28x28()
        self.source = "digits"
        pixels = arrays[0].float() / 255.0
        return arrays, float(pixels.mean()), float(pixels.std())

    def setup(self, stage: str | None = None) -> None:
        """Load, split and normalize the data (once; later calls do nothing)."""
        if self.train_set is not None:
            return
        (train_x, train_y, test_x, test_y), mean, std = self._load()
        val_size = self.val_size
        if self.source == "digits":
            val_size = min(val_size, len(train_x) // 5)
        if val_size >= len(train_x):
            raise ValueError(f"`val_size` must be smaller than the {len(train_x)} training images, got {val_size}.")
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_idx, train_idx = order[:val_size], order[val_size:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        test_idx = torch.arange(len(test_x))[: self.test_subset]
        self.train_set = TensorDataset(normalize(train_x[train_idx], mean, std), train_y[train_idx])
        self.val_set = TensorDataset(normalize(train_x[val_idx], mean, std), train_y[val_idx])
        self.test_set = TensorDataset(normalize(test_x[test_idx], mean, std), test_y[test_idx])

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("Call `setup()` before asking for a dataloader (the Trainer does this for you).")
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (order fixed by ``seed`` and the epoch)."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (the 10k ``t10k`` images), in a fixed order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The test batches, for ``trainer.predict``."""
        return self._loader(self.test_set, shuffle=False)
