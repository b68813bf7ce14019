"""Checks on the values of one configuration table: known keys, finite numbers, bounded integers,
one of a set of names.

The configuration (:mod:`sealedsum.common.config`) and the policy, whether read from TOML or
from attested policy bytes, share them, so every table words a bad value the same way.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any, Mapping, TypeVar

from sealedsum.common.errors import ConfigError

Choice = TypeVar("Choice", bound=StrEnum)


def take(raw: Mapping[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    """A copy of the table ``raw``, named ``where`` in errors.

    :raises ConfigError: it is not a table, or it has a key outside ``allowed``.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                          hint=f"allowed keys: {', '.join(sorted(allowed))}")
    return dict(raw)


def number(value: Any, where: str) -> float:
    """``value`` as a finite float; booleans, strings, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a finite number")
    try:
        value = float(value)  # an integer beyond float range raises OverflowError
    except OverflowError:
        raise ConfigError(f"{where} must be a finite number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number")
    return value


def integer(value: Any, where: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a boolean) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer in [{lo}, {hi}]")
    return value


def one_of(choices: type[Choice], value: Any, where: str) -> Choice:
    """The member of ``choices`` whose value (its spelling in a table) is ``value``."""
    try:
        return choices(value)
    except ValueError:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}") from None
