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


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a real ``bool`` (``"no"`` or ``0`` are refused, not read as truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_optional_str(name: str, value: Any) -> str | None:
    """Check an optional non-empty string (e.g. a metric or module name)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"`{name}` must be a non-empty string or None, got {value!r}.")
    return value


def check_weight(name: str, value: Any) -> float:
    """Check a weight in (0, 1] (e.g. the share of the newest batch in a moving average)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {value!r}.")
    return float(value)


def check_percentile(name: str, value: Any) -> float:
    """Check a clipping percentile in (50, 100] (the share of values kept on each side of a range, in percent)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 50.0 < value <= 100.0:
        raise ValueError(f"`{name}` must be in (50, 100], got {value!r}.")
    return float(value)


def check_batch_sizes(name: str, value: Any) -> list[int] | None:
    """Check an optional list of batch sizes (positive integers); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"`{name}` must be a list of positive integers or None, got {value!r}.")
    if any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in value):
        raise ValueError(f"`{name}` must hold positive integers, got {value!r}.")
    return list(value)


# --- quantization callbacks ---


def check_optional_path(name: str, value: Any) -> str | None:
    """Check an optional file path (a non-empty string or ``os.PathLike``); returned as a string."""
    import os

    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{name}` must be a file path (a string) or None, got {value!r}.")
    return value
