import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_compress.engine.schedules import SCHEDULES, sparsity_at_step


@st.composite
def schedules(draw):
    final = draw(st.floats(0.0, 0.99))
    initial = draw(st.floats(0.0, final))
    start = draw(st.integers(0, 1000))
    end = draw(st.integers(start + 1, start + 2000))
    return {
        "schedule": draw(st.sampled_from(SCHEDULES)),
        "initial_sparsity": initial,
        "final_sparsity": final,
        "start_step": start,
        "end_step": end,
        "frequency": draw(st.integers(1, 200)),
    }


@given(schedules(), st.integers(0, 4000), st.integers(0, 4000))
def test_monotone(kwargs, a, b):
    lo, hi = sorted((a, b))
    assert sparsity_at_step(lo, **kwargs) <= sparsity_at_step(hi, **kwargs) + 1e-12


@given(schedules(), st.integers(0, 4000))
def test_bounded_by_endpoints(kwargs, step):
    value = sparsity_at_step(step, **kwargs)
    if step < kwargs["start_step"]:
        assert value == 0.0
    else:
        assert kwargs["initial_sparsity"] - 1e-12 <= value <= kwargs["final_sparsity"] + 1e-12


@given(schedules(), st.integers(0, 1000))
def test_exact_at_start_and_end_and_constant_after(kwargs, extra):
    start_value = sparsity_at_step(kwargs["start_step"], **kwargs)
    expected_start = kwargs["final_sparsity"] if kwargs["schedule"] == "constant" else kwargs["initial_sparsity"]
    assert start_value == pytest.approx(expected_start, abs=1e-12)
    assert sparsity_at_step(kwargs["end_step"], **kwargs) == kwargs["final_sparsity"]
    assert sparsity_at_step(kwargs["end_step"] + extra, **kwargs) == kwargs["final_sparsity"]


def test_cubic_matches_zhu_gupta_formula():
    s = sparsity_at_step(25, final_sparsity=0.9, start_step=0, end_step=100, initial_sparsity=0.1)
    assert s == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 0.25) ** 3)


def test_frequency_holds_target_between_updates():
    kwargs = {"final_sparsity": 0.9, "start_step": 10, "end_step": 110, "frequency": 20, "schedule": "linear"}
    assert sparsity_at_step(30, **kwargs) == sparsity_at_step(49, **kwargs) != sparsity_at_step(50, **kwargs)
    assert sparsity_at_step(9, **kwargs) == 0.0


def test_targets_are_absolute_not_compounding():
    # Exponential: density decays geometrically but the endpoint is the absolute target, not 1 - (1-s)^k.
    kwargs = {"final_sparsity": 0.5, "start_step": 0, "end_step": 3, "schedule": "exponential"}
    assert sparsity_at_step(3, **kwargs) == 0.5
    assert sparsity_at_step(100, **kwargs) == 0.5
