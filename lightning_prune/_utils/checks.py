"""Argument checks shared by the package: one numeric validator, one for allowed strings.

Numbers are accepted as Python numbers and as numpy scalars (``np.float32(0.5)``, ``np.int64(2)``),
never as ``bool``; a value of the wrong kind and a value out of range get different messages.

Example::

    >>> import numpy as np
    >>> check_fraction("sparsity", np.float32(0.5)), check_int("epoch", np.int64(2), minimum=0)
    (0.5, 2)
    >>> check_choice("scope", "local", ("local", "global"))
    'local'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar, get_args

__all__ = ["allowed", "check_choice", "check_fraction", "check_int", "check_number", "is_number"]

T = TypeVar("T")


def is_number(value: object) -> bool:
    """A real number (Python or numpy), not a ``bool``."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)`` if it is a real number in the given interval, else a ``ValueError`` naming ``name``."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else _fmt(low)}, {'inf' if high is None else _fmt(high)}{hi}"
    if not is_number(value) or math.isnan(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a number in {span}, got {value!r} ({type(value).__name__}).")
    x = float(value)  # type: ignore[arg-type]
    too_low = low is not None and (x < low or (low_open and x == low))
    too_high = high is not None and (x > high or (high_open and x == high))
    if too_low or too_high:
        raise ValueError(f"`{name}` must be in {span}, got {value!r}.")
    return x


def check_fraction(name: str, value: object, *, closed: bool = False) -> float:
    """A sparsity: a number in [0, 1), or [0, 1] with ``closed``."""
    return check_number(name, value, low=0.0, high=1.0, high_open=not closed)


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """An integer (Python or numpy, not ``bool``), at least ``minimum`` when given."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or type(value).__name__ == "bool_":
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"`{name}` must be an integer{bound}, got {value!r} ({type(value).__name__}).")
    if minimum is not None and int(value) < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def allowed(literal: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` type."""
    return get_args(literal)


def check_choice(name: str, value: T, choices: Sequence[Any]) -> T:
    """``value`` if it is one of ``choices`` (e.g. ``allowed(Scope)``), else "expected one of [...], got x"."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
