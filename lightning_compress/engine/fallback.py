"""Accuracy-aware fallback: keep the most sensitive layers in float until the metric drop is within a budget.

``find_float_layers`` is a pure search over two callables the caller supplies: ``convert(float_layers)`` builds
a quantized model with those layers kept in float, and ``evaluate(model)`` measures its metric. It tries no float
layer first, then the 1, 2, ... first layers of ``ranking`` (most sensitive first, e.g. by increasing per-layer
SQNR), and stops at the first attempt within the budget.

Examples:
    >>> accuracy = {(): 0.80, ("fc2",): 0.86, ("fc2", "fc1"): 0.90}
    >>> result = find_float_layers(
    ...     convert=tuple,  # the "model" is just the tuple of float layers here
    ...     evaluate=lambda model: accuracy[model],
    ...     ranking=["fc2", "fc1", "fc0"],
    ...     budget=0.05,
    ...     reference=0.90,
    ... )
    >>> result.kept.float_layers, round(result.kept.drop, 2), result.budget_met, len(result.attempts)
    (('fc2',), 0.04, True, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from lightning_compress.engine.validation import check_positive_int

__all__ = ["FallbackAttempt", "FallbackResult", "find_float_layers", "metric_drop"]

M = TypeVar("M")
#: Slack of the budget comparison (a drop equal to the budget, up to rounding, is within it).
_TOLERANCE = 1e-9


def metric_drop(reference: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``reference``, in the metric's own units (positive = worse)."""
    return reference - value if higher_is_better else value - reference


@dataclass(frozen=True)
class FallbackAttempt:
    """One conversion tried by ``find_float_layers``.

    Attributes:
        float_layers: The layers kept in float (most sensitive first).
        metric: The metric of the converted model (``None`` when ``evaluate`` gave none).
        drop: ``reference - metric`` (or ``metric - reference`` for a lower-is-better metric), in the metric's units;
            ``None`` without a metric.
        within_budget: Whether ``drop <= budget`` (always ``True`` without a budget).
    """

    float_layers: tuple[str, ...]
    metric: float | None
    drop: float | None
    within_budget: bool


@dataclass(frozen=True)
class FallbackResult(Generic[M]):
    """What ``find_float_layers`` found.

    Attributes:
        model: The converted model of the kept attempt.
        attempts: Every attempt, in the order tried (the first one keeps no layer in float).
        kept_index: Index in ``attempts`` of the kept one: the first within the budget, else the smallest drop.
    """

    model: M
    attempts: tuple[FallbackAttempt, ...]
    kept_index: int

    @property
    def kept(self) -> FallbackAttempt:
        """The attempt whose model is kept."""
        return self.attempts[self.kept_index]

    @property
    def budget_met(self) -> bool:
        """Whether the kept attempt is within the budget."""
        return self.kept.within_budget


def find_float_layers(
    convert: Callable[[tuple[str, ...]], M],
    evaluate: Callable[[M], float | None],
    ranking: Sequence[str],
    budget: float | None,
    max_float_layers: int | None = None,
    *,
    reference: float,
    higher_is_better: bool = True,
    on_attempt: Callable[[FallbackAttempt], None] | None = None,
) -> FallbackResult[M]:
    """Convert with no layer in float, then with the 1, 2, ... most sensitive ones, until the drop fits ``budget``.

    Args:
        convert: Builds the quantized model with the given layers kept in float.
        evaluate: The metric of a model built by ``convert`` (``None``: not measured, never within a budget).
        ranking: Candidate layers, most sensitive first.
        budget: The largest drop accepted, in the metric's own units, i.e. points of the metric as it is measured
            (for an accuracy logged as a fraction, ``0.005`` is half a percentage point). ``None``: no search, one
            attempt with no float layer.
        max_float_layers: At most this many layers in float (``None``: up to all of ``ranking``).
        reference: The metric of the float model, which the drop is measured from.
        higher_is_better: ``False`` for a metric such as a loss.
        on_attempt: Called with each attempt as soon as it is measured (e.g. to log progress).

    Returns:
        The kept model and every attempt. When no attempt meets the budget, the one with the smallest drop is kept
        (the fewest float layers among equal drops).

    Raises:
        ValueError: On a negative or non-numeric ``budget`` or a bad ``max_float_layers``.
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0):
        raise ValueError(f"`budget` must be a number >= 0 or None, got {budget!r}.")
    if max_float_layers is not None:
        check_positive_int("max_float_layers", max_float_layers, allow_zero=True)
    limit = 0 if budget is None else min(len(ranking), len(ranking) if max_float_layers is None else max_float_layers)
    models: list[M] = []
    attempts: list[FallbackAttempt] = []
    for k in range(limit + 1):
        float_layers = tuple(ranking[:k])
        model = convert(float_layers)
        metric = evaluate(model)
        drop = None if metric is None else metric_drop(reference, metric, higher_is_better)
        within = budget is None or (drop is not None and not math.isnan(drop) and drop <= budget + _TOLERANCE)
        attempt = FallbackAttempt(float_layers, metric, drop, within)
        models.append(model)
        attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt)
        if within:
            return FallbackResult(model, tuple(attempts), k)
    measured = [i for i, a in enumerate(attempts) if a.drop is not None and not math.isnan(a.drop)]
    best = min(measured, key=lambda i: (attempts[i].drop, i)) if measured else 0
    return FallbackResult(models[best], tuple(attempts), best)
