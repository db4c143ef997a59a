"""Small image classifiers for 1x28x28 inputs and a ``LightningModule`` that trains them.

The networks are plain ``nn.Module`` objects (``MLP``, ``LeNet5``, ``ResidualCNN``, ``ResNetish``);
``ImageClassifier`` holds one as ``self.net``, so a compression callback can target the submodule ``net`` (parameter
names ``net.fc1.weight``, ...).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.engine.validation import check_choice

NUM_CLASSES = 10


class MLP(nn.Module):
    """The classic 784-300-100-10 multilayer perceptron with ReLU (LeCun et al. 1998)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, 1, 28, 28]`` images to ``[B, num_classes]`` logits."""
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 1→6 (5x5, pad 2), conv 6→16 (5x5), then 400→120→84→10."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, 1, 28, 28]`` images to ``[B, num_classes]`` logits."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 6x14x14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 16x5x5
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class ConvBNReLU(nn.Sequential):
    """3x3 convolution (no bias), batch norm, optionally ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))`` with a body of two 3x3 Conv-BN and a 1x1 Conv-BN shortcut when shapes change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, stride=stride),
            ConvBNReLU(out_channels, out_channels, relu=False),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block."""
        return F.relu(self.body(x) + self.shortcut(x))


class ResidualCNN(nn.Module):
    """A small ResNet: a stride-2 stem, one residual block per stage, global average pooling, a linear head.

    With the default ``widths=(16, 32, 128)`` the stages run at 14x14, 7x7 and 4x4: 210k parameters, most of them in
    the cheap last stage, and about 12 s per Fashion-MNIST epoch on one CPU thread.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 128), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, widths[0], stride=2)
        self.stage1 = ResidualBlock(widths[0], widths[0])
        self.stage2 = ResidualBlock(widths[0], widths[1], stride=2)
        self.stage3 = ResidualBlock(widths[1], widths[2], stride=2)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, 1, 28, 28]`` images to ``[B, num_classes]`` logits."""
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class ResNetish(nn.Module):
    """A ResNet large enough for int8 and channel pruning to pay off on a CPU: a 3x3 Conv-BN-ReLU stem, 3 stages x 2
    residual blocks of widths 32/64/128 (stride 2 between stages: 28x28, 14x14, 7x7), global average pooling and a
    linear head. 0.7M parameters and 87M multiply-accumulates per image.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, widths[0])
        blocks: list[nn.Module] = []
        previous = widths[0]
        for i, width in enumerate(widths):
            blocks += [ResidualBlock(previous, width, stride=1 if i == 0 else 2), ResidualBlock(width, width)]
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[B, 1, 28, 28]`` images to ``[B, num_classes]`` logits."""
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


#: Architecture names accepted by ``build_model`` and ``ImageClassifier(arch=...)``.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    "resnet": ResidualCNN,
    "resnetish": ResNetish,
}


def build_model(name: str) -> nn.Module:
    """Create a freshly initialized network by name.

    Args:
        name: ``"mlp"``, ``"lenet5"``, ``"resnet"`` (``ResidualCNN``) or ``"resnetish"``.

    Raises:
        ValueError: For an unknown name; the message lists the known ones.
    """
    check_choice("arch", name, ARCHITECTURES)
    return ARCHITECTURES[name]()


class ImageClassifier(pl.LightningModule):
    """Trains one of the demo networks with cross-entropy and logs loss and accuracy.

    Logs ``train_loss`` (every step), ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` (per epoch);
    ``predict_step`` returns logits. The network is ``self.net``.

    Args:
        arch: Network name, one of ``"mlp"``, ``"lenet5"``, ``"resnet"``, ``"resnetish"``.
        lr: Learning rate.
        weight_decay: Weight decay (L2 for ``"adam"`` and ``"sgd"``).
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        lr_schedule: ``"constant"``, or ``"cosine"``: the learning rate decays to zero over the fit's optimizer steps
            (``trainer.estimated_stepping_batches``), which steadies the final accuracy of short runs.

    Examples:
        >>> model = ImageClassifier(arch="mlp", lr=1e-3)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        arch: str = "lenet5",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, ("adam", "sgd"))
        check_choice("lr_schedule", lr_schedule, ("constant", "cosine"))
        self.save_hyperparameters()
        self.net = build_model(arch)
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``self.net``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train_loss``."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc`` (epoch averages)."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc`` (epoch averages)."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits for the images of ``batch`` (an ``(x, y)`` pair or just ``x``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        """Adam, or SGD with momentum 0.9, over all parameters; with ``lr_schedule="cosine"`` a per-step cosine
        decay."""
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
