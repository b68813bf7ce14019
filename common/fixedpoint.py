"""Clipping and fixed-point encoding, shared so producer and enclave agree to the bit.

A value x is clipped to [lower, upper] and encoded as round(x · 2**fraction_bits),
Python's round-half-to-even. Rounding is monotone, so a clipped value's encoding lies
between the encodings of the bounds: that is what the sensitivity is computed from.
Vectors with an L2 bound are scaled down to it; histogram values become one-hot
bucket indicators.
"""

from __future__ import annotations

import bisect
import math

from sealedsum.common.errors import PolicyMismatch


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


def clip_box(values: list[float], box: list[tuple[float, float]]) -> tuple[list[float], int]:
    """Clip each coordinate to its own [lower, upper]."""
    out, clipped = [], 0
    for v, (lo, hi) in zip(values, box, strict=True):
        (c,), n = clip([v], lo, hi)
        out.append(c)
        clipped += n
    return out, clipped


def clip_l2(values: list[float], bound: float) -> tuple[list[float], int]:
    """Scale the vector down to L2 norm ``bound`` if it is longer; count 1 if it was."""
    checked, _ = clip(values, -math.inf, math.inf)
    norm = math.sqrt(math.fsum(v * v for v in checked))
    if norm <= bound:
        return checked, 0
    factor = bound / norm
    return [v * factor for v in checked], 1


def one_hot(value: float, edges: tuple[float, ...]) -> tuple[list[int], int]:
    """The bucket indicator of ``value`` for these edges: [edges[i], edges[i+1]), the last
    bucket closed on the right. Values outside the edges count in the nearest bucket."""
    (v,), clipped = clip([value], edges[0], edges[-1])
    buckets = len(edges) - 1
    index = min(max(bisect.bisect_right(edges, v) - 1, 0), buckets - 1)
    return [1 if i == index else 0 for i in range(buckets)], clipped


def encode(values: list[float], fraction_bits: int) -> list[int]:
    scale = 1 << fraction_bits
    return [round(v * scale) for v in values]


def decode(value: int | float, fraction_bits: int) -> float:
    return value / (1 << fraction_bits)
