"""Quantization-aware training of LeNet-5 on Fashion-MNIST, ending with a real int8 model, logged to TensorBoard.

    python examples/qat_fashion_mnist.py --epochs 6
    python examples/qat_fashion_mnist.py --quick          # a 1-minute look: small subsets, 2 epochs
    tensorboard --logdir lightning_logs/qat

The first epoch trains in float; fake quantization (int8 weights per channel, uint8 inputs per tensor) starts at
epoch 1, observers freeze for the last epoch. At fit end a copy is converted through torchao pt2e, saved as
``qat_int8.pt2`` next to the TensorBoard events, and measured with the module's own validation: fake-quant vs int8
``val_acc``, their top-1 agreement, per-layer SQNR, size and latency.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (the setup script installs it); without it,
``--fallback digits`` uses scikit-learn's 8x8 digits instead.
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import QATCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="small subsets and 2 epochs, to see it work")
    parser.add_argument("--latency", default="compiled", choices=["compiled", "eager", "off"])
    parser.add_argument("--fallback", default=None, choices=["digits"], help="data to use without Fashion-MNIST")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args()
    epochs = 2 if args.quick else args.epochs

    L.seed_everything(0)
    data = FashionMNISTDataModule(
        train_subset=3000 if args.quick else None,
        val_size=1000 if args.quick else 5000,
        test_subset=1000 if args.quick else None,
        fallback=args.fallback,
    )
    model = ImageClassifier(arch="lenet5")
    qat = QATCallback(
        module="net",  # quantize the network; the LightningModule's metrics stay untouched
        start=1,  # one float epoch first
        freeze_observers_at=max(1, epochs - 1),  # freeze the activation ranges for the last epoch
        schedule_unit="epoch",
        monitor="val_acc",
        latency="off" if args.quick else args.latency,
    )
    logger = TensorBoardLogger(args.logdir, name="qat", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[qat], logger=logger, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)  # the fake-quant model, as trained

    r = qat.results
    print("\nQAT results (LeNet-5, Fashion-MNIST)")
    print(f"  fake-quant val_acc: {r['fake_quant_val_acc']:.4f}   int8 val_acc: {r['int8_val_acc']:.4f}")
    print(f"  top-1 agreement int8 vs fake-quant: {r['top1_agreement']:.4f}")
    print(
        f"  size: float {r['float_bytes'] / 1024:.1f} KiB -> int8 {r['int8_bytes'] / 1024:.1f} KiB "
        f"({r['size_ratio']:.2f}x; the int8 file carries graph metadata, large for a 61k-parameter net)"
    )
    for key in sorted(k for k in r if k.startswith(("speedup", "int8_ms", "float_ms"))):
        print(f"  {key}: {r[key]:.3f}")
    print(f"  int8 program: {r['saved_to']}  (load it with lightning_compress.load_quantized)")
    print(f"\nTensorBoard logs: {logger.log_dir}\nOpen them with:  tensorboard --logdir {args.logdir}/qat")


if __name__ == "__main__":
    main()
