"""Writing to the Trainer's loggers: scalars to all of them, figures, text and layouts to TensorBoard.

Scalars go through ``logger.log_metrics`` of every logger in ``trainer.loggers`` (so CSV, W&B, MLflow ... all get
them, and this works in hooks where ``self.log`` is not allowed, such as ``on_fit_end``). The richer TensorBoard
objects (figures, markdown text, the custom-scalars layout, hparams) go to each ``TensorBoardLogger``'s
``SummaryWriter``. Loggers in Lightning are already rank-zero-only, so nothing here is written twice under DDP.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_compress.callbacks import _figures

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

#: Every key this package logs starts with this prefix, so its charts group together in TensorBoard.
PREFIX = "compress"


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


# TensorBoard keeps only the first custom-scalars layout (and the first hparams session) written to a run, so each is
# written once per writer. The mark lives on the writer itself: a new logger (new run) starts unmarked, and nothing is
# kept process-wide.
_LAYOUT_MARK = "_lightning_compress_layout_written"
_HPARAMS_MARK = "_lightning_compress_hparams_started"
# Categories appear in this order whatever the order of the callbacks: pruning, quantization (QAT, PTQ), report.
_CATEGORY_ORDER = ("prun", "quantiz", "report")


def _category_rank(title: str) -> tuple[int, str]:
    ranks = [i for i, word in enumerate(_CATEGORY_ORDER) if word in title.lower()]
    return (ranks[0] if ranks else len(_CATEGORY_ORDER), title)


def dashboard_layout(callbacks: Iterable[Any]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars`` format) of the given callbacks.

    Every object with a ``dashboard_categories()`` method contributes; categories with the same title are merged
    (duplicate charts dropped) and ordered pruning, quantization, report, then the rest, so the layout does not
    depend on the order of the callbacks.
    """
    merged: dict[str, list[tuple[str, list[str]]]] = {}
    for cb in callbacks:
        if hasattr(cb, "dashboard_categories"):
            for title, charts in cb.dashboard_categories().items():
                existing = merged.setdefault(title, [])
                existing.extend(c for c in charts if c not in existing)
    return {
        title: {chart: ["Multiline", tags] for chart, tags in merged[title]}
        for title in sorted(merged, key=_category_rank)
    }


def write_dashboard_layout(trainer: pl.Trainer, callbacks: Iterable[Any] | None = None) -> None:
    """Write one custom-scalars layout with the categories of every compression callback on ``trainer``.

    Call it from any hook once the Trainer holds its callbacks (``setup``, ``on_fit_start`` ...): the first call per
    log directory writes the layout of all of them; later calls do nothing.
    """
    writers = [w for w in tensorboard_writers(trainer) if not getattr(w, _LAYOUT_MARK, False)]
    if not writers:
        return
    layout = dashboard_layout(callbacks if callbacks is not None else getattr(trainer, "callbacks", []))
    if not layout:
        return
    for writer in writers:
        writer.add_custom_scalars(layout)
        writer.flush()
        setattr(writer, _LAYOUT_MARK, True)


# The HParams plugin keeps the *first* experiment and session-start summaries of a run (TensorBoard stores the first
# metadata per tag). Lightning's ``TensorBoardLogger`` writes its own (the module's hparams and a placeholder
# ``hp_metric`` = -1) after the callbacks' ``setup`` when ``default_hp_metric=True``, so the compression settings are
# declared in ``setup`` (``start_hparams_session``) and their metric values logged at the end (``log_hparams``).


def _clean_params(params: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}


@rank_zero_only
def start_hparams_session(trainer: pl.Trainer, params: Mapping[str, Any], metric_tags: Iterable[str]) -> None:
    """Declare a run's settings and the tags of its metrics in TensorBoard's HParams tab (once per log dir).

    Call it early (a callback's ``setup``), before Lightning writes its own hparams session. The metric *values* are
    read by TensorBoard from the scalar summaries with these tags (their last value), logged later by
    ``log_hparams``.
    """
    from torch.utils.tensorboard.summary import hparams

    for writer in tensorboard_writers(trainer):
        if getattr(writer, _HPARAMS_MARK, False):
            continue
        experiment, session_start, _ = hparams(_clean_params(params), {tag: 0.0 for tag in metric_tags})
        file_writer = writer._get_file_writer()
        file_writer.add_summary(experiment)
        file_writer.add_summary(session_start)
        writer.flush()
        setattr(writer, _HPARAMS_MARK, True)


@rank_zero_only
def log_hparams(trainer: pl.Trainer, params: Mapping[str, Any], metrics: Mapping[str, float], step: int = 0) -> None:
    """Record settings with their final results: TensorBoard's HParams tab, and the hyperparameters of other loggers.

    The metrics are logged as scalars to every logger (TensorBoard's HParams tab reads them from there), the
    TensorBoard session is declared if ``start_hparams_session`` was not called earlier, and closed as
    successful.
    """
    from torch.utils.tensorboard.summary import hparams

    clean = _clean_params(params)
    start_hparams_session(trainer, clean, metrics)
    log_scalars(trainer, metrics, step)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            _, _, session_end = hparams(clean, {})
            logger.experiment._get_file_writer().add_summary(session_end)
            logger.experiment.flush()
        else:
            logger.log_hyperparams(clean)


def log_layer_figure(trainer: pl.Trainer, tag: str, values: dict[str, float], xlabel: str) -> None:
    """Per-layer bar chart (e.g. SQNR) into TensorBoard (only finite values: an exact layer has an infinite SQNR)."""
    values = {name: value for name, value in values.items() if math.isfinite(value)}
    if values and tensorboard_writers(trainer):
        figure = _figures.per_layer_bars(values, title=tag.rsplit("/", 1)[-1].replace("_", " "), xlabel=xlabel)
        log_figure(trainer, tag, figure, trainer.global_step)


#: Per-batch-size keys of the int8 results shown in the summaries (the others go to the loggers only).
HEADLINE_PREFIXES = ("speedup", "int8_ms", "float_ms", "float_compiled_ms", "onnxruntime_fp32_ms")


def markdown_summary(title: str, numbers: Mapping[str, float | str]) -> str:
    """A two-column markdown table of a report."""
    lines = [f"**{title}**", "", "| measure | value |", "|---|---:|"]
    for key, value in numbers.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)
