"""Argument checks shared by the engine and the callbacks.

Every error names the argument in backticks, states the rule, shows the value received and what is allowed, e.g.
"`target_sparsity` must be in [0, 1), got 1.5."
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError`` listing the choices."""
    allowed = tuple(allowed)
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def check_fraction(name: str, value: float, *, include_one: bool = False) -> float:
    """Check that ``value`` lies in [0, 1) (or [0, 1] with ``include_one``)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (value >= 0.0 and (value <= 1.0 if include_one else value < 1.0)):
        interval = "[0, 1]" if include_one else "[0, 1)"
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")
    return float(value)


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """Check that ``value`` is an ``int`` greater than 0 (or at least 0 with ``allow_zero``)."""
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        rule = "a non-negative integer" if allow_zero else "a positive integer"
        raise ValueError(f"`{name}` must be {rule}, got {value!r}.")
    return value


def check_optional_step(name: str, value: Any) -> int | None:
    """Check an optional optimizer-step index (``None`` or an ``int`` >= 0)."""
    if value is None:
        return None
    return check_positive_int(name, value, allow_zero=True)
