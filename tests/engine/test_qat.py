"""The QAT schedule and its phases (lightning_compress.engine.qat) on plain modules, no Trainer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lightning_compress.engine.fake_quant import prepare_qat
from lightning_compress.engine.qat import QATPhase, QATSchedule, apply_phase


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _bn_frozen(model: nn.Module) -> bool:
    bn = model[1]
    return any(h.__name__ == "_keep_bn_in_eval" for h in bn._forward_pre_hooks.values())


def test_phase_at_each_point() -> None:
    schedule = QATSchedule(start=3, freeze_observers_at=6, freeze_bn_at=10)
    assert [schedule.phase(t) for t in (0, 2, 3, 5, 6, 9, 10, 100)] == [
        QATPhase(False, False, False),
        QATPhase(False, False, False),
        QATPhase(True, False, False),
        QATPhase(True, False, False),
        QATPhase(True, True, False),
        QATPhase(True, True, False),
        QATPhase(True, True, True),
        QATPhase(True, True, True),
    ]


def test_never_freezing_and_bn_freezing_before_start() -> None:
    assert QATSchedule().phase(10**6) == QATPhase(True, False, False)
    assert QATSchedule(start=5, freeze_bn_at=2).phase(3) == QATPhase(False, False, True)


def test_schedule_is_frozen_and_plain() -> None:
    schedule = QATSchedule(start=1, freeze_observers_at=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.start = 4  # type: ignore[misc]
    assert schedule.to_dict() == {"start": 1, "freeze_observers_at": 2, "freeze_bn_at": None}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": -1}, r"`start` must be a non-negative integer, got -1"),
        ({"start": 1.5}, r"`start` must be a non-negative integer, got 1.5"),
        ({"freeze_bn_at": True}, r"`freeze_bn_at` must be a non-negative integer, got True"),
        ({"freeze_observers_at": "3"}, r"`freeze_observers_at` must be a non-negative integer, got '3'"),
        ({"start": 5, "freeze_observers_at": 2}, r"`freeze_observers_at` must be >= `start` \(5\).*got 2"),
    ],
)
def test_bad_schedules(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        QATSchedule(**kwargs)


def test_apply_phase_sets_every_module_and_is_idempotent() -> None:
    model = _net()
    layers = prepare_qat(model)
    x = torch.randn(32, 8)
    apply_phase(model, QATPhase(False, False, False))
    assert not any(m.is_fake_quant_enabled for m in layers.values())
    model.train()
    model(x)
    assert not any(m.observer.is_initialized for m in layers.values())  # disabled: observers see nothing

    for _ in range(2):
        apply_phase(model, QATPhase(True, False, True))
    assert all(m.is_fake_quant_enabled and not m.observer.is_frozen for m in layers.values())
    assert _bn_frozen(model) and len(model[1]._forward_pre_hooks) == 1
    mean = model[1].running_mean.clone()
    model.train()
    model(x)
    assert torch.equal(model[1].running_mean, mean)  # BN statistics frozen
    assert all(m.observer.is_initialized for m in layers.values())

    apply_phase(model, QATPhase(True, True, False))
    ranges = [(float(m.observer.min_val), float(m.observer.max_val)) for m in layers.values()]
    model.train()
    model(x * 10.0)
    assert ranges == [(float(m.observer.min_val), float(m.observer.max_val)) for m in layers.values()]
    assert not _bn_frozen(model)
    assert not torch.equal(model[1].running_mean, mean)  # BN statistics move again
