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

__all__ = [
    "SEED_LIMIT",
    "check_bool",
    "check_choice",
    "check_finite_values",
    "check_float",
    "check_int",
    "check_seed",
    "check_str",
    "describe_range",
]

#: seeds are non-negative and below this (they must fit a signed 64-bit generator seed)
SEED_LIMIT = 2**63


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


def check_seed(name: str, value: Any) -> int:
    """``value`` as an ``int`` seed in ``[0, 2**63 - 1]`` (what ``torch.Generator.manual_seed``
    and NumPy both accept); ``ValueError`` naming ``name`` otherwise (negative, fractional, bool)."""
    return check_int(name, value, low=0, high=SEED_LIMIT - 1)


def check_str(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` if it is a ``str`` (or None where allowed); ``ValueError`` naming ``name`` otherwise."""
    if (value is None and allow_none) or isinstance(value, str):
        return value
    raise ValueError(f"`{name}` must be a string{' or None' if allow_none else ''}, got {value!r}")


def check_finite_values(name: str, value: Any) -> Any:
    """``value`` (a tensor, array or sequence of numbers) as a non-empty, finite, 1-D float64
    ``torch.Tensor``; ``ValueError`` naming ``name`` otherwise."""
    import numpy as np
    import torch

    try:
        if isinstance(value, (str, bytes, dict)) or value is None:
            raise TypeError
        t = torch.as_tensor(
            np.asarray(value, dtype=np.float64) if not isinstance(value, torch.Tensor) else value
        )
        t = t.to(torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"`{name}` must be a non-empty sequence of finite numbers, got {value!r}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` must be a non-empty sequence of finite numbers, got {value!r}")
    return t


def check_timeout(name: str, value: Any, *, allow_none: bool = True) -> Any:
    """``value`` if it is a positive ``datetime.timedelta`` (or None where allowed); ``ValueError``
    naming ``name`` otherwise (a number of seconds is refused: the unit would be a guess)."""
    import datetime

    if value is None and allow_none:
        return None
    if not isinstance(value, datetime.timedelta) or value <= datetime.timedelta(0):
        raise ValueError(
            f"`{name}` must be a positive datetime.timedelta{' or None' if allow_none else ''}, got {value!r}"
        )
    return value
