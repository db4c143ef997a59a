"""Lightning callbacks that compress a model while it trains and log the trade-off to TensorBoard."""

__version__ = "0.1.0"
