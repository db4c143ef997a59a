"""Lightning callbacks that compress a model while it trains and log the trade-off to TensorBoard."""

from lightning_compress.callbacks import IterativePruningCallback, QATCallback

__all__ = ["IterativePruningCallback", "QATCallback"]
__version__ = "0.1.0"
