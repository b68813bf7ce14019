"""Checks on the values of one configuration table: known keys, finite numbers, bounded integers.

The configuration (:mod:`sealedsum.common.config`) and the policy, whether read from TOML or
from attested policy bytes, share them, so every table words a bad value the same way.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from sealedsum.common.errors import ConfigError


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
