"""Writing to the Trainer's loggers: scalars to all of them, figures, text and layouts to TensorBoard.

Scalars go through ``logger.log_metrics`` of every logger in ``trainer.loggers`` (so CSV, W&B, MLflow ... all get
them, and this works in hooks where ``self.log`` is not allowed, such as ``on_fit_end``). The richer TensorBoard
objects (figures, markdown text, the custom-scalars layout, hparams) go to each ``TensorBoardLogger``'s
``SummaryWriter``. Loggers in Lightning are already rank-zero-only, so nothing here is written twice under DDP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

#: Every key this package logs starts with this prefix, so its charts group together in TensorBoard.
PREFIX = "compress"


class HasDashboard(Protocol):
    """A callback that contributes categories to the TensorBoard custom-scalars layout."""

    def dashboard_categories(self) -> dict[str, list[tuple[str, list[str]]]]:
        """Return ``{category title: [(chart title, [tag regex, ...]), ...]}``."""
        ...


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Log plain numbers to every logger of ``trainer`` at ``step``."""
    if not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer: pl.Trainer) -> list[SummaryWriter]:
    """The ``SummaryWriter`` of every ``TensorBoardLogger`` attached to ``trainer`` (rank zero only)."""
    if trainer.global_rank != 0:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_figure(trainer: pl.Trainer, tag: str, figure: Figure, step: int) -> None:
    """Render a matplotlib figure into TensorBoard's Images tab."""
    for writer in tensorboard_writers(trainer):
        writer.add_figure(tag, figure, global_step=step, close=False)


def log_text(trainer: pl.Trainer, tag: str, markdown: str, step: int) -> None:
    """Write markdown to TensorBoard's Text tab."""
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, markdown, global_step=step)


# TensorBoard keeps only the first custom-scalars layout written to a run, so one layout gathering the categories
# of every callback of the trainer is written once per log directory.
_layout_written: set[str] = set()


def write_dashboard_layout(trainer: pl.Trainer, callbacks: Iterable[Any] | None = None) -> None:
    """Write one custom-scalars layout with the categories of every compression callback on ``trainer``."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    merged: dict[str, list[tuple[str, list[str]]]] = {}
    for cb in callbacks if callbacks is not None else getattr(trainer, "callbacks", []):
        if hasattr(cb, "dashboard_categories"):
            for title, charts in cb.dashboard_categories().items():
                existing = merged.setdefault(title, [])
                existing.extend(c for c in charts if c not in existing)
    if not merged:
        return
    layout = {title: {chart: ["Multiline", tags] for chart, tags in charts} for title, charts in merged.items()}
    for writer in writers:
        if writer.log_dir in _layout_written:
            continue
        writer.add_custom_scalars(layout)
        writer.flush()
        _layout_written.add(writer.log_dir)


@rank_zero_only
def log_hparams(trainer: pl.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Record compression settings with their final results in TensorBoard's HParams tab (and other loggers)."""
    clean_params = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(clean_params, metrics=dict(metrics))
        else:
            logger.log_hyperparams(clean_params)
