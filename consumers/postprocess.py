"""Consumer-side post-processing of a verified release: feasible, rounded figures.

Noise can make a released count negative, a sum fall outside what ``count`` records within the
bounds can add up to, or a histogram bucket negative or fractional-looking. Anything computed
from a release alone is post-processing: it spends no budget and keeps the guarantee. This
module computes such a cleaned view as a new plain object; the signed :class:`Release` (what
was verified, and what the ledger chain covers) is never modified, so keep it for audit.

The rules, for a release of a stream with policy ``s``:

- histogram: each bucket rounded to the nearest integer, then raised to 0 if negative; the
  count is the sum of those buckets (as the release's count is the sum of its buckets);
- other kinds: the count rounded and raised to 0 if negative; each sum coordinate clamped to
  ``[count·lower_i, count·upper_i]`` for box bounds, or the sum vector scaled into the L2 ball of
  radius ``count·l2_bound``; the mean is that sum over that count, so it lies within the bounds
  (``None`` when the count is 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sealedsum.common.policy import StreamKind, StreamPolicy
from sealedsum.common.results import Release


@dataclass(frozen=True, slots=True)
class PostProcessed:
    """A release's figures made feasible. ``sum`` holds the buckets of a histogram (integers)."""

    stream: str
    window: int
    aggregate: str
    count: int
    sum: tuple[float, ...]
    mean: tuple[float, ...] | None

    def to_json(self, release: Release) -> dict[str, Any]:
        """``release.to_json()`` with these figures in place of the released ones, and
        ``"post_processed": true``."""
        view = release.to_json()
        scalar = len(self.sum) == 1 and self.aggregate != StreamKind.HISTOGRAM
        view["count"] = self.count
        key = "buckets" if self.aggregate == StreamKind.HISTOGRAM else "sum"
        view[key] = self.sum[0] if scalar else list(self.sum)
        if self.aggregate != StreamKind.HISTOGRAM:
            view["mean"] = None if self.mean is None else (self.mean[0] if scalar else list(self.mean))
        view["post_processed"] = True
        return view


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def post_process(release: Release, policy: StreamPolicy) -> PostProcessed:
    """The feasible figures of ``release`` (a verified release of the stream ``policy``, as
    attested); ``release`` is left as it is."""
    if release.stream != policy.name or release.aggregate != policy.kind or release.dimension != policy.dimension:
        raise ValueError(f"release of {release.stream!r} does not match the policy of {policy.name!r}")
    if policy.kind == StreamKind.HISTOGRAM:
        buckets = tuple(max(round(b), 0) for b in release.sum)
        return PostProcessed(release.stream, release.window, release.aggregate, sum(buckets), buckets, None)
    count = max(round(release.count), 0)
    if policy.l2_bound is not None:
        radius = count * policy.l2_bound
        norm = math.sqrt(math.fsum(v * v for v in release.sum))
        factor = 1.0 if norm <= radius else (radius / norm if norm > 0 else 0.0)
        sums = tuple(v * factor for v in release.sum)
    else:
        sums = tuple(_clamp(v, count * lo, count * hi) for v, (lo, hi) in zip(release.sum, policy.box))
    mean = None
    if count > 0:
        mean = tuple(s / count for s in sums)
        if policy.l2_bound is None:  # division can round a hair past a bound
            mean = tuple(_clamp(m, lo, hi) for m, (lo, hi) in zip(mean, policy.box))
    return PostProcessed(release.stream, release.window, release.aggregate, count, sums, mean)
