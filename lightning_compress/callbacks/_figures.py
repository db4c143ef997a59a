"""Matplotlib figures for TensorBoard's Images tab (rendered off-screen with the Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in worker processes

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def per_layer_bars(values: Mapping[str, float], *, title: str, xlabel: str, limit_one: bool = False) -> Figure:
    """Horizontal bars, one per layer in model order (per-layer sparsity, per-layer SQNR ...)."""
    names = list(values)
    fig, ax = _new_figure(7.0, 0.8 + 0.3 * max(len(names), 1))
    ax.barh(range(len(names)), [values[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    if limit_one:
        ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return fig


def metric_vs_sparsity(curves: Mapping[str, Sequence[tuple[float, float]]], *, metric: str) -> Figure:
    """Line plot of a metric against sparsity, one line per run or callback (points in recording order)."""
    fig, ax = _new_figure(6.0, 4.0)
    for label, points in curves.items():
        xs = [100.0 * p[0] for p in points]
        ax.plot(xs, [p[1] for p in points], marker="o", markersize=3, label=label)
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs sparsity")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return fig
