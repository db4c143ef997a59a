"""Sparsity schedules: pure functions of the optimizer step.

Every schedule gives an *absolute* target sparsity (the fraction of selected weights that are zero), never a
"fraction of what remains", so targets never compound. The shape between ``start_step`` and ``end_step``:

* ``cubic`` (Zhu & Gupta 2017, the default): ``s_t = s_f + (s_i - s_f) * (1 - p)^3`` with ``p`` the progress in
  [0, 1]: prunes fast while there are many redundant weights and slowly near the target.
* ``linear``: ``s_t = s_i + (s_f - s_i) * p``.
* ``exponential``: the density ``1 - s`` decays geometrically, ``1 - s_t = (1 - s_i) * ((1 - s_f) / (1 - s_i))^p``,
  i.e. the same fraction of the remaining weights is pruned per unit of progress.
* ``constant``: one shot to ``s_f`` at ``start_step``.

Before ``start_step`` nothing is pruned (0.0); from ``end_step`` on the target is exactly ``s_f``. In between, the
target only changes every ``frequency`` steps (counted from ``start_step``), so masks are recomputed at most that
often.
"""

from __future__ import annotations

from typing import get_args

from lightning_compress.engine.config import Schedule

SCHEDULES: tuple[str, ...] = get_args(Schedule)


def sparsity_at_step(
    step: int,
    *,
    final_sparsity: float,
    start_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    schedule: str = "cubic",
    frequency: int = 1,
) -> float:
    """Target sparsity after ``step`` optimizer steps.

    Args:
        step: Optimizer steps taken so far (``trainer.global_step``).
        final_sparsity: Target reached at ``end_step`` and kept afterwards, in [0, 1).
        start_step: First step at which weights are pruned (to ``initial_sparsity``).
        end_step: Step at which ``final_sparsity`` is reached; must be > ``start_step``.
        initial_sparsity: Target at ``start_step``.
        schedule: ``"cubic"``, ``"linear"``, ``"exponential"`` or ``"constant"``.
        frequency: The target changes only every ``frequency`` steps after ``start_step`` (and at ``end_step``).

    Returns:
        The absolute target sparsity in [0, ``final_sparsity``].

    Examples:
        >>> sparsity_at_step(50, final_sparsity=0.9, start_step=0, end_step=100)
        0.7875
    """
    if step < start_step:
        return 0.0
    if step >= end_step or schedule == "constant":
        return final_sparsity
    quantized_step = start_step + (step - start_step) // frequency * frequency
    progress = (quantized_step - start_step) / (end_step - start_step)
    s_i, s_f = initial_sparsity, final_sparsity
    if schedule == "cubic":
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3
    if schedule == "linear":
        return s_i + (s_f - s_i) * progress
    if schedule == "exponential":
        return 1.0 - (1.0 - s_i) * ((1.0 - s_f) / (1.0 - s_i)) ** progress
    raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}.")
