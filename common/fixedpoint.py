"""Clipping and fixed-point encoding, shared so producer and enclave agree to the bit.

A value x is clipped to [lower, upper] and encoded as round(x · 2**fraction_bits),
Python's round-half-to-even. Rounding is monotone, so a clipped value's encoding lies
between the encodings of the bounds: that is what the sensitivity is computed from.
"""

from __future__ import annotations

import math

from common.errors import PolicyMismatch


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large to convert to float
        return False


def clip(values: list[float], lower: float, upper: float) -> tuple[list[float], int]:
    """Clip each value to [lower, upper]; return the values and how many were changed."""
    out, clipped = [], 0
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite(v):
            shown = "an integer beyond float range" if type(v) is int else repr(v)
            raise PolicyMismatch(f"value {shown} is not a finite number")
        if v < lower:
            out.append(float(lower)); clipped += 1
        elif v > upper:
            out.append(float(upper)); clipped += 1
        else:
            out.append(float(v))
    return out, clipped


def encode(values: list[float], fraction_bits: int) -> list[int]:
    scale = 1 << fraction_bits
    return [round(v * scale) for v in values]


def decode(value: int | float, fraction_bits: int) -> float:
    return value / (1 << fraction_bits)
