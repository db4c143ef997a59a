"""The accuracy-aware fallback search (lightning_compress.engine.fallback) with fake convert/evaluate callables."""

from __future__ import annotations

import dataclasses
import math

import pytest

from lightning_compress.engine.fallback import FallbackAttempt, find_float_layers, metric_drop


class FakeQuantizer:
    """``convert`` returns the float layers as the "model"; ``evaluate`` looks its metric up in a table."""

    def __init__(self, metrics: dict[tuple[str, ...], float | None]) -> None:
        self.metrics = metrics
        self.converted: list[tuple[str, ...]] = []

    def convert(self, float_layers: tuple[str, ...]) -> tuple[str, ...]:
        self.converted.append(float_layers)
        return float_layers

    def evaluate(self, model: tuple[str, ...]) -> float | None:
        return self.metrics[model]


RANKING = ["fc2", "fc1", "fc0"]


def test_stops_at_the_first_attempt_within_the_budget() -> None:
    fake = FakeQuantizer({(): 0.80, ("fc2",): 0.85, ("fc2", "fc1"): 0.899, ("fc2", "fc1", "fc0"): 0.9})
    seen: list[FallbackAttempt] = []
    result = find_float_layers(
        fake.convert, fake.evaluate, RANKING, budget=0.002, reference=0.90, on_attempt=seen.append
    )
    assert fake.converted == [(), ("fc2",), ("fc2", "fc1")]
    assert result.model == ("fc2", "fc1") and result.kept_index == 2 and result.budget_met
    assert [a.within_budget for a in result.attempts] == [False, False, True]
    assert result.attempts[0] == FallbackAttempt((), 0.80, pytest.approx(0.10), False)
    assert list(result.attempts) == seen


def test_the_budget_is_in_the_metrics_own_units_no_guessing() -> None:
    """A drop of 0.004 of an accuracy logged as a fraction is within 0.005, not 0.4 "points" above 0.2."""
    fake = FakeQuantizer({(): 0.906})
    result = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.005, reference=0.91)
    assert result.budget_met and len(result.attempts) == 1
    tight = find_float_layers(
        FakeQuantizer({(): 0.906, ("fc2",): 0.91}).convert,
        lambda m: 0.906 if not m else 0.91,
        RANKING,
        budget=0.001,
        reference=0.91,
    )
    assert tight.kept.float_layers == ("fc2",)


def test_a_budget_equal_to_the_drop_is_met() -> None:
    fake = FakeQuantizer({(): 0.7})
    assert find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.2, reference=0.9).budget_met


def test_budget_missed_keeps_the_smallest_drop_and_respects_max_float_layers() -> None:
    fake = FakeQuantizer({(): 0.5, ("fc2",): 0.7, ("fc2", "fc1"): 0.6})
    result = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.01, max_float_layers=2, reference=0.9)
    assert fake.converted == [(), ("fc2",), ("fc2", "fc1")]  # never 3 layers
    assert not result.budget_met and result.kept.float_layers == ("fc2",) and result.model == ("fc2",)


def test_equal_drops_keep_the_fewest_float_layers() -> None:
    fake = FakeQuantizer({(): 0.5, ("fc2",): 0.5, ("fc2", "fc1"): 0.5, ("fc2", "fc1", "fc0"): 0.5})
    result = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.0, reference=0.9)
    assert result.kept_index == 0 and len(result.attempts) == 4


def test_lower_is_better_metrics() -> None:
    fake = FakeQuantizer({(): 1.5, ("fc2",): 1.05})
    result = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.1, reference=1.0, higher_is_better=False)
    assert result.kept.float_layers == ("fc2",) and result.kept.drop == pytest.approx(0.05)
    assert metric_drop(1.0, 1.5, higher_is_better=False) == 0.5 and metric_drop(0.9, 0.8) == pytest.approx(0.1)


def test_no_budget_is_one_attempt_and_a_missing_metric_is_never_within_one() -> None:
    fake = FakeQuantizer({(): None, ("fc2",): None})
    one = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=None, reference=math.nan)
    assert len(one.attempts) == 1 and one.budget_met and one.kept.metric is None and one.kept.drop is None
    fake = FakeQuantizer({(): None, ("fc2",): None, ("fc2", "fc1"): None, ("fc2", "fc1", "fc0"): None})
    searched = find_float_layers(fake.convert, fake.evaluate, RANKING, budget=0.1, reference=0.9)
    assert not searched.budget_met and searched.kept_index == 0 and len(searched.attempts) == 4


def test_attempts_are_frozen_records() -> None:
    attempt = FallbackAttempt(("fc2",), 0.9, 0.0, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        attempt.metric = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": -0.1}, r"`budget` must be a number >= 0 or None, got -0.1"),
        ({"budget": "1"}, r"`budget` must be a number >= 0 or None, got '1'"),
        ({"budget": 0.1, "max_float_layers": -1}, r"`max_float_layers` must be a non-negative integer, got -1"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    fake = FakeQuantizer({(): 0.9})
    with pytest.raises(ValueError, match=match):
        find_float_layers(fake.convert, fake.evaluate, RANKING, reference=0.9, **kwargs)
