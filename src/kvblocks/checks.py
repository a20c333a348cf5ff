"""Argument checks shared across the package; each raises naming the argument."""

from __future__ import annotations

from collections.abc import Sequence

from kvblocks.errors import BlockIdOutOfRangeError, InvalidArgumentError


def positive_int(value: object, argument: str) -> int:
    """Return ``value`` if it is an int >= 1 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(argument, f"must be a positive int, got {value!r}")
    return value


def non_negative_int(value: object, argument: str) -> int:
    """Return ``value`` if it is an int >= 0 (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(argument, f"must be an int >= 0, got {value!r}")
    return value


def seconds_or_none(value: object, argument: str) -> float | None:
    """Return ``value`` if it is None or a finite number of seconds > 0."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")
    ):
        raise InvalidArgumentError(argument, f"must be > 0 seconds or None, got {value!r}")
    return float(value)


def positive_number(value: object, argument: str) -> float:
    """Return ``value`` if it is an int or float > 0 (not NaN; bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidArgumentError(argument, f"must be a positive number, got {value!r}")
    return value


def index_in_range(value: object, limit: int, argument: str) -> int:
    """Return ``value`` if it is an int in ``[0, limit)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(argument, f"must be an int, got {value!r}")
    if not 0 <= value < limit:
        raise BlockIdOutOfRangeError(argument, f"must be in [0, {limit}), got {value}")
    return value


def first_repeat(values: Sequence[int]) -> int | None:
    """The first value that occurs a second time, or None when all differ."""
    if len(set(values)) == len(values):
        return None
    seen = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None
