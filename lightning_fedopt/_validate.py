"""Argument checks shared by every public constructor: each error names the argument and the range.

A check returns the value it accepted (converted to ``int``/``float``), so a constructor reads
``self.every = check_int("sync_every", every, low=1)``. Booleans are refused where a number is
expected (``True`` is an ``int`` in Python, but ``sync_every=True`` is a mistake, not a 1), and
NaN/Inf are refused where a float is expected unless the check says otherwise.

Example:
    >>> check_int("sync_every", 8, low=1)
    8
    >>> check_float("mixing", 0.5, low=0.0, high=1.0)
    0.5
    >>> check_int("sync_every", 0, low=1)
    Traceback (most recent call last):
    ...
    ValueError: `sync_every` must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_float", "check_int", "describe_range"]


def describe_range(
    kind: str,
    low: float | None,
    high: float | None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> str:
    """``"an integer >= 1"``, ``"a finite number in (0, 1]"``, ...: the allowed range in words."""
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def _in_range(x: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (x < low or (low_open and x == low)):
        return False
    return not (high is not None and (x > high or (high_open and x == high)))


def check_int(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> Any:
    """``value`` as an ``int`` in ``[low, high]``; ``ValueError`` naming ``name`` otherwise.

    Integral numbers of other types (NumPy integers) are accepted; ``bool`` is not.
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not _in_range(int(value), low, high, False, False)
    ):
        what = describe_range("an integer", low, high)
        raise ValueError(f"`{name}` must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> Any:
    """``value`` as a finite ``float`` in the range; ``ValueError`` naming ``name`` otherwise.

    ``low_open``/``high_open`` exclude the bound itself (``low=0, low_open=True``: ``> 0``).
    ``allow_inf`` accepts ``+-inf`` where the range admits it (NaN never).
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        x = float(value)
        ok = (
            not math.isnan(x)
            and (allow_inf or math.isfinite(x))
            and _in_range(x, low, high, low_open, high_open)
        )
    if not ok:
        what = describe_range(
            "a number" if allow_inf else "a finite number", low, high, low_open=low_open, high_open=high_open
        )
        raise ValueError(f"`{name}` must be {what}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``; ``ValueError`` listing them otherwise."""
    options = tuple(choices)
    # by type too: True is not the choice 1, nor 1.0 the choice 1
    if not any(type(value) is type(c) and value == c for c in options):
        raise ValueError(f"`{name}` must be one of {options}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``; ``ValueError`` otherwise (``"False"`` is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return value
