"""When quantization-aware training does what: a pure schedule, and one function that applies its phases.

``QATSchedule`` maps a point in training (an optimizer step or an epoch, as the caller counts) to a
``QATPhase``: whether fake quantization is on, whether the activation observers are frozen and whether the
BatchNorm statistics are frozen. ``apply_phase`` puts a model prepared by
``prepare_qat`` in that phase. The QAT callback only computes "now"
(``trainer.global_step`` or ``trainer.current_epoch``) and applies the phase when it changes.

Examples:
    >>> schedule = QATSchedule(start=2, freeze_observers_at=4, freeze_bn_at=3)
    >>> [tuple(schedule.phase(t)) for t in (0, 2, 3, 4)]
    [(False, False, False), (True, False, False), (True, False, True), (True, True, True)]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple, get_args

from torch import nn

from lightning_compress.engine.fake_quant import (
    freeze_batchnorm_stats,
    freeze_observers,
    set_fake_quant_enabled,
    sync_observers,
)
from lightning_compress.engine.validation import check_optional_step

__all__ = ["SCHEDULE_UNITS", "QATPhase", "QATSchedule", "ScheduleUnit", "apply_phase"]

#: What the schedule's numbers count: optimizer steps (``trainer.global_step``) or epochs.
ScheduleUnit = Literal["step", "epoch"]
SCHEDULE_UNITS: tuple[str, ...] = get_args(ScheduleUnit)


class QATPhase(NamedTuple):
    """The state of a QAT model at one point of training.

    Attributes:
        fake_quant_enabled: Fake quantization is on (off: the model computes exactly in float).
        observers_frozen: The activation ranges no longer move.
        bn_frozen: BatchNorm layers normalize with (and no longer update) their running statistics.
    """

    fake_quant_enabled: bool
    observers_frozen: bool
    bn_frozen: bool


@dataclass(frozen=True)
class QATSchedule:
    """When fake quantization starts, and when observers and BatchNorm statistics freeze (all in one unit).

    Args:
        start: From this step (or epoch) on, fake quantization is enabled; before it the model trains in float.
        freeze_observers_at: From this point on the activation ranges stop moving (``None``: never). Must be
            ``>= start`` so that the observers see data first. torchvision's recipe: epoch 4.
        freeze_bn_at: From this point on BatchNorm statistics are frozen (``None``: never). torchvision's recipe:
            epoch 3.

    Raises:
        ValueError: If a value is not a non-negative integer (or ``None`` where allowed), or
            ``freeze_observers_at < start``.
    """

    start: int = 0
    freeze_observers_at: int | None = None
    freeze_bn_at: int | None = None

    def __post_init__(self) -> None:
        check_optional_step("start", self.start)
        check_optional_step("freeze_observers_at", self.freeze_observers_at)
        check_optional_step("freeze_bn_at", self.freeze_bn_at)
        if self.freeze_observers_at is not None and self.freeze_observers_at < self.start:
            raise ValueError(
                f"`freeze_observers_at` must be >= `start` ({self.start}) so the observers see data first,"
                f" got {self.freeze_observers_at}."
            )

    def phase(self, now: int) -> QATPhase:
        """The phase at step (or epoch) ``now``."""
        return QATPhase(
            fake_quant_enabled=now >= self.start,
            observers_frozen=self.freeze_observers_at is not None and now >= self.freeze_observers_at,
            bn_frozen=self.freeze_bn_at is not None and now >= self.freeze_bn_at,
        )

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain values."""
        return asdict(self)


def apply_phase(model: nn.Module, phase: QATPhase) -> None:
    """Put a model prepared by ``prepare_qat`` in ``phase``.

    Enables or disables fake quantization, freezes (after making the ranges identical on every process of a
    distributed job) or unfreezes the observers, and freezes or unfreezes the BatchNorm statistics. Idempotent.

    Examples:
        >>> from torch import nn
        >>> from lightning_compress.engine.fake_quant import prepare_qat
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> layer = prepare_qat(model)["0"]
        >>> apply_phase(model, QATPhase(fake_quant_enabled=False, observers_frozen=False, bn_frozen=True))
        >>> layer.is_fake_quant_enabled, layer.observer.is_frozen
        (False, False)
    """
    set_fake_quant_enabled(model, phase.fake_quant_enabled)
    if phase.observers_frozen:
        sync_observers(model)
    freeze_observers(model, phase.observers_frozen)
    freeze_batchnorm_stats(model, phase.bn_frozen)
