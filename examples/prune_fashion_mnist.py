"""Train LeNet-5 (or the MLP) on Fashion-MNIST while pruning it gradually to 90% sparsity, with TensorBoard.

    python examples/prune_fashion_mnist.py --arch lenet5 --epochs 8 --target-sparsity 0.9
    tensorboard --logdir lightning_logs/prune

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (the setup script installs it). Without it,
``--fallback digits`` trains on scikit-learn's 8x8 digits instead (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_compress import IterativePruningCallback
from lightning_compress.demos import FashionMNISTDataModule, ImageClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="lenet5", choices=["lenet5", "mlp", "resnet"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--train-subset", type=int, default=None, help="train on fewer images, for a quick look")
    parser.add_argument("--fallback", default=None, choices=["digits"], help="data to use without Fashion-MNIST")
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    L.seed_everything(0)
    data = FashionMNISTDataModule(train_subset=args.train_subset, fallback=args.fallback)
    model = ImageClassifier(arch=args.arch)
    pruning = IterativePruningCallback(
        target_sparsity=args.target_sparsity,
        schedule="cubic",
        start_step=0,
        end_step=None,  # 75% of the training steps, then fine-tune at the target
        monitor="val_acc",
    )
    logger = TensorBoardLogger(args.logdir, name="prune", default_hp_metric=False)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[pruning], logger=logger, accelerator="cpu")
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    print(f"\nTensorBoard logs: {logger.log_dir}\nOpen them with:  tensorboard --logdir {args.logdir}/prune")


if __name__ == "__main__":
    main()
