"""Lightning callbacks that compress a model while it trains and log the trade-off to TensorBoard."""

from lightning_compress.callbacks import IterativePruningCallback, PostTrainingQuantCallback, QATCallback
from lightning_compress.callbacks.report import CompressionReport
from lightning_compress.engine.convert import load_quantized
from lightning_compress.engine.structured import load_compact

__all__ = [
    "CompressionReport",
    "IterativePruningCallback",
    "PostTrainingQuantCallback",
    "QATCallback",
    "load_compact",
    "load_quantized",
]
__version__ = "0.1.0"
