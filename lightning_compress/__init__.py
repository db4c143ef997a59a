"""Lightning callbacks that compress a model while it trains and log the trade-off to TensorBoard."""

from lightning_compress.callbacks import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.callbacks.report import CompressionReport

__all__ = ["CompressionReport", "IterativePruningCallback", "PostTrainingQuantCallback", "QATCallback"]
__version__ = "0.1.0"
