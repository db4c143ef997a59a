"""Thin Lightning callbacks over :mod:`lightning_compress.engine`."""

from lightning_compress.callbacks.pruning import IterativePruningCallback

__all__ = ["IterativePruningCallback"]
