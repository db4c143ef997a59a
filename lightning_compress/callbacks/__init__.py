"""Thin Lightning callbacks over ``lightning_compress.engine``."""

from lightning_compress.callbacks.pruning import IterativePruningCallback
from lightning_compress.callbacks.ptq import PostTrainingQuantCallback
from lightning_compress.callbacks.qat import QATCallback

__all__ = ["IterativePruningCallback", "PostTrainingQuantCallback", "QATCallback"]
