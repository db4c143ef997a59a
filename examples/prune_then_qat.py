"""Deep Compression on LeNet-5 / Fashion-MNIST: prune to 90% sparsity, then quantization-aware training, then a
sparse int8 model. Both callbacks run in one Trainer.

    python examples/prune_then_qat.py --epochs 8 --target-sparsity 0.9
    python examples/prune_then_qat.py --quick
    tensorboard --logdir lightning_logs/prune_qat

The pruning schedule (cubic, over optimizer steps) reaches the target at 60% of training; QAT starts there, on the
pruned weights. Pruned weights stay exactly zero during QAT (the pruning callback re-zeroes them after every step and
the fake quantizer maps 0 to 0), so they are zero int8 values in the converted model; the script counts them.
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import IterativePruningCallback, QATCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier
from lightning_compress.engine.convert import int8_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--quick", action="store_true", help="small subsets and 3 epochs, to see it work")
    parser.add_argument("--fallback", default=None, choices=["digits"], help="data to use without Fashion-MNIST")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs

    L.seed_everything(0)
    data = FashionMNISTDataModule(
        train_subset=3000 if args.quick else None,
        val_size=1000 if args.quick else 5000,
        test_subset=1000 if args.quick else None,
        fallback=args.fallback,
    )
    data.setup("fit")
    steps = epochs * len(data.train_dataloader())
    prune_end = int(0.6 * steps)
    pruning = IterativePruningCallback(target_sparsity=args.target_sparsity, end_step=prune_end, monitor="val_acc")
    # backend="inductor": the int8 weights are read from the pt2e program below (the default ORT backend has no program)
    qat = QATCallback(module="net", start=prune_end, monitor="val_acc", latency="off", backend="inductor")
    logger = TensorBoardLogger(args.logdir, name="prune_qat", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[pruning, qat], logger=logger, accelerator="cpu")
    trainer.fit(ImageClassifier(arch="lenet5"), datamodule=data)

    int8 = int8_weights(qat.quantized_program)
    zeros = sum(int((w == 0).sum()) for w in int8.values())
    total = sum(w.numel() for w in int8.values())
    r = qat.results
    print("\nPrune + QAT results (LeNet-5, Fashion-MNIST)")
    print(f"  pruned to {args.target_sparsity:.0%} by step {prune_end}, QAT from step {prune_end} to {steps}")
    print(f"  int8 weights that are zero: {zeros}/{total} = {zeros / total:.4f}")
    print(f"  fake-quant val_acc: {r['fake_quant_val_acc']:.4f}   int8 val_acc: {r['int8_val_acc']:.4f}")
    print(f"  top-1 agreement int8 vs fake-quant: {r['top1_agreement']:.4f}")
    print(f"  int8 program: {r['saved_to']}")
    print(f"\nTensorBoard logs: {logger.log_dir}\nOpen them with:  tensorboard --logdir {args.logdir}/prune_qat")


if __name__ == "__main__":
    main()
