"""Real data and small models for demos, tests and benchmarks: Fashion-MNIST (offline) and MLP/LeNet-5/ResNets."""

from lightning_compress.demos.data import FashionMNISTDataModule, load_fashion_mnist
from lightning_compress.demos.models import MLP, ImageClassifier, LeNet5, ResidualCNN, ResNetish, build_model

__all__ = [
    "MLP",
    "FashionMNISTDataModule",
    "ImageClassifier",
    "LeNet5",
    "ResNetish",
    "ResidualCNN",
    "build_model",
    "load_fashion_mnist",
]
