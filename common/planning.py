"""What a stream's releases will look like, from its policy alone (``sealedsum plan``).

Every scale comes from :meth:`StreamPolicy.noise_plan`, the call the enclave makes before it
draws a release's noise (sidecar/enclave/release.py), and every budget figure from the
functions its ledger charges with (:mod:`sealedsum.common.privacy`), so a plan cannot drift
from what is released. What is added here is only the reading of those figures: standard
deviations in value units and the relative errors they mean for a window of a given size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from sealedsum.common import privacy
from sealedsum.common.errors import ConfigError
from sealedsum.common.policy import EnclavePolicy, StreamKind, StreamPolicy
from sealedsum.common.privacy import Mechanism


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """The noise, accuracy and budget of one stream. Scales named ``*_fixed`` are in the
    fixed-point units of the release's ``sum_noise_scale``; everything else is in the units of
    the values (records for counts and histogram buckets). Relative errors are one standard
    deviation over the expected true figure; ``None`` where that figure is 0 or unknown."""

    stream: str
    kind: str
    mechanism: str
    neighbouring: str
    privacy_unit_records: int
    epsilon: float
    delta: float
    rho: float | None
    count_share: float
    fraction_bits: int
    dimension: int
    sensitivity_l1_fixed: int
    sensitivity_l2_fixed: float
    sum_noise_scale_fixed: float
    sum_noise_scale: float
    sum_std: float
    count_noise_scale: float | None
    count_std: float
    records_per_window: int | None
    typical_value: list[float] | None
    assumption: str
    sum_relative_error: list[float | None] | None
    count_relative_error: float | None
    mean_std: list[float] | None
    mean_relative_error: list[float | None] | None
    releases: int
    budget_epsilon: float
    budget_delta: float
    budget_group: str | None
    window_seconds: float | None
    budget_lasts_seconds: float | None
    min_release_interval_seconds: float | None
    budget_lasts_at_least_seconds: float | None
    one_producer_can_spend_budget: bool
    min_batch: int
    publish_probability: float | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sampler_std(mechanism: Mechanism, scale: float) -> float:
    """Standard deviation of the noise the enclave draws at this scale: OpenDP's discrete
    Laplace (P(z) ∝ exp(-|z|/scale), variance 2q/(1 - q)² with q = exp(-1/scale)) or discrete
    Gaussian (P(z) ∝ exp(-z²/(2·scale²))). For scales well above 1 it is
    :func:`privacy.noise_std`, the continuous one; below, the discrete noise is narrower."""
    if scale <= 0:
        return 0.0
    if mechanism == Mechanism.LAPLACE:
        q = math.exp(-1 / scale)
        return math.sqrt(2 * q) / -math.expm1(-1 / scale)
    if scale >= 10:  # the discrete Gaussian's variance is scale² to within a factor exp(-2π²·scale²)
        return scale
    span = math.ceil(40 * scale) + 2
    weights = [math.exp(-z * z / (2 * scale * scale)) for z in range(1, span)]
    return math.sqrt(2 * math.fsum(z * z * w for z, w in zip(range(1, span), weights)) / (1 + 2 * math.fsum(weights)))


def ratio_std(numerator_std: float, denominator_std: float, numerator: float, denominator: float) -> float:
    """Approximate standard deviation of (x + X)/(n + N) for independent zero-mean noises X, N
    (first-order delta method): sqrt(σ_X² + (x/n)²·σ_N²)/n. How far a release's mean (noised sum
    over noised count) strays, good while the count's noise is small against ``denominator``."""
    if denominator <= 0:
        raise ValueError("need a positive denominator")
    ratio = numerator / denominator
    return math.sqrt(numerator_std ** 2 + (ratio * denominator_std) ** 2) / denominator


def _typical(s: StreamPolicy, typical: Sequence[float] | None) -> tuple[list[float] | None, str]:
    """Each coordinate's assumed true value, and the words saying where it came from."""
    if s.kind == StreamKind.HISTOGRAM:
        if typical is not None:
            raise ConfigError(f"stream {s.name!r} is a histogram: --typical-value does not apply",
                              hint="its buckets' errors assume records spread evenly over the buckets")
        return None, "records spread evenly over the buckets"
    if typical is not None:
        values = list(typical) * s.dimension if len(typical) == 1 else list(typical)
        if len(values) != s.dimension:
            raise ConfigError(f"--typical-value takes 1 or {s.dimension} value(s) for stream {s.name!r}, "
                              f"got {len(typical)}")
        if s.l2_bound is not None:
            outside = math.sqrt(sum(v * v for v in values)) > s.l2_bound
        else:
            outside = any(not lo <= v <= hi for v, (lo, hi) in zip(values, s.box))
        if outside:
            raise ConfigError(f"--typical-value {values} is outside stream {s.name!r}'s bounds: "
                              "producers would clip it", hint="give a value the bounds keep as it is")
        return values, "every record holds the --typical-value"
    if s.l2_bound is not None:
        return None, "an L2 ball's midpoint is 0: pass --typical-value"
    return [(lo + hi) / 2 for lo, hi in s.box], "every record holds the midpoint of [lower, upper]"


def _releases(policy: EnclavePolicy, s: StreamPolicy) -> int:
    """The releases the budget allows in all, as the enclave's ledger counts them; for a stream
    of a budget group, when it alone spends the group's budget."""
    if s.budget_group is None:
        return privacy.max_releases(s.mechanism, s.epsilon, s.delta, s.budget_epsilon, s.budget_delta)
    group = policy.budget_groups[s.budget_group]
    members = {name: (policy.streams[name].cost, 0) for name in group.streams}
    return privacy.group_remaining(members, s.name, group.budget_epsilon, group.budget_delta)


# Beyond this many values of a negative binomial the exact sum of Laplace noises is slow to add up,
# and its normal approximation as good as exact.
_EXACT_SPAN = 2_000_000


def laplace_sum_at_least(scale: float, terms: int, k: int) -> float | None:
    """P(Z_1 + ... + Z_terms >= k) for independent discrete Laplace Z_i of ``scale``
    (P(z) ∝ exp(-|z|/scale), OpenDP's), exactly; ``None`` when too long to add up. Each Z_i is
    the difference of two geometric variables, so the sum is the difference of two independent
    negative binomials A - B: P(A - B >= k) = Σ_j P(B = j)·P(A >= k + j)."""
    t = math.exp(-1 / scale)
    if terms == 1:  # docs/protocol.md section 12
        return t ** k / (1 + t) if k >= 1 else 1 - t ** (1 - k) / (1 + t)
    mean, sd = terms * t / (1 - t), math.sqrt(terms * t) / (1 - t)
    top = math.ceil(mean + 40 * sd + 50)
    if top > _EXACT_SPAN:
        return None
    base = terms * math.log1p(-t) - math.lgamma(terms)
    pmf = [math.exp(base + math.lgamma(j + terms) - math.lgamma(j + 1) + j * math.log(t)) for j in range(top + 1)]
    tail = [0.0] * (top + 2)  # tail[m] = P(A >= m)
    for m in range(top, -1, -1):
        tail[m] = tail[m + 1] + pmf[m]
    return min(1.0, math.fsum(p * (1.0 if k + j <= 0 else tail[k + j] if k + j <= top else 0.0)
                              for j, p in enumerate(pmf)))


def _at_least(s: StreamPolicy, count_scale: float | None, count_std: float, k: int) -> tuple[float, bool]:
    """P(Z >= k) for the noise Z on a release's count, and whether that is exact: exact for
    discrete Laplace noise (one count noise, or a histogram's sum of bucket noises), else the
    normal approximation with continuity correction (discrete Gaussian noise)."""
    if s.mechanism == Mechanism.LAPLACE:
        scale, terms = (count_scale, 1) if count_scale is not None else (s.noise_plan().sum_scale, s.dimension)
        exact = laplace_sum_at_least(scale, terms, k)
        if exact is not None:
            return exact, True
    return 0.5 * math.erfc((k - 0.5) / (count_std * math.sqrt(2))), False


def _relative(std: float, expected: float) -> float | None:
    return None if expected == 0 else std / abs(expected)


def stream_plan(policy: EnclavePolicy, name: str, records_per_window: int | None = None,
                typical_value: Sequence[float] | None = None) -> StreamPlan:
    """The plan of stream ``name``: ``records_per_window`` defaults to a count-closed stream's
    ``window_records``; a time-closed stream has no relative errors without it."""
    s = policy.stream(name)
    if records_per_window is not None and records_per_window < 1:
        raise ConfigError("--records-per-window must be at least 1")
    noise = s.noise_plan()
    unit = 2.0 ** -s.fraction_bits
    sum_std = sampler_std(s.mechanism, noise.sum_scale) * unit
    notes: list[str] = []
    if noise.count_scale is None:
        # The count is the sum of the d noised buckets: d independent noises add up.
        count_std = math.sqrt(s.dimension) * sum_std
        notes.append("the count is the sum of the noised buckets (no count noise of its own)")
    else:
        count_std = sampler_std(s.mechanism, noise.count_scale)
    n = records_per_window if records_per_window is not None else s.window_records
    if n is None:
        notes.append("time-closed: pass --records-per-window for the relative errors")
    elif s.count_closed and s.min_release_interval_seconds is not None and records_per_window is None:
        notes.append("a window waiting for its release interval may hold more records than window_records")
    typical, assumption = _typical(s, typical_value)
    sum_rel = count_rel = mean_std = mean_rel = None
    if n is not None:
        count_rel = count_std / n
        if s.kind == StreamKind.HISTOGRAM:
            sum_rel = [_relative(sum_std, n / s.dimension)] * s.dimension
        elif typical is not None:
            sum_rel = [_relative(sum_std, n * v) for v in typical]
            mean_std = [ratio_std(sum_std, count_std, n * v, n) for v in typical]
            mean_rel = [_relative(m, v) for m, v in zip(mean_std, typical)]
        else:
            mean_std = None
    if typical is not None and n is not None and 0 in typical:
        notes.append("a relative error is n/a where the assumed value is 0: pass --typical-value")
    publish = None
    if not s.count_closed and n is not None:
        publish, exact = _at_least(s, noise.count_scale, count_std, s.min_batch - n)
        if not exact:
            notes.append("the probability of publishing a window is a normal approximation")
    releases = _releases(policy, s)
    lasts = at_least = None
    if not s.count_closed:
        lasts = releases * s.window_ms / 1000
    elif s.min_release_interval_seconds is not None:
        at_least = max(releases - 1, 0) * s.min_release_interval_ms / 1000
    if s.budget_group is not None:
        notes.append(f"budget group {s.budget_group!r}: the releases are this stream's if it alone spends "
                     "the group's budget; the other streams' releases take from the same budget")
    burnable = s.name in policy.burnable_streams()
    if burnable:
        notes.append("count-closed with no min_release_interval_seconds: one producer can spend the whole "
                     "budget as fast as it sends records")
    return StreamPlan(
        stream=s.name, kind=s.kind.value, mechanism=s.mechanism.value, neighbouring=s.neighbouring,
        privacy_unit_records=s.contributions, epsilon=s.epsilon,
        delta=s.delta if s.mechanism == Mechanism.GAUSSIAN else 0.0, rho=noise.rho,
        count_share=noise.count_share, fraction_bits=s.fraction_bits, dimension=s.dimension,
        sensitivity_l1_fixed=noise.sensitivity_l1, sensitivity_l2_fixed=noise.sensitivity_l2,
        sum_noise_scale_fixed=noise.sum_scale, sum_noise_scale=noise.sum_scale * unit, sum_std=sum_std,
        count_noise_scale=noise.count_scale, count_std=count_std, records_per_window=n,
        typical_value=typical, assumption=assumption, sum_relative_error=sum_rel,
        count_relative_error=count_rel, mean_std=mean_std, mean_relative_error=mean_rel,
        releases=releases, budget_epsilon=s.budget_epsilon, budget_delta=s.budget_delta,
        budget_group=s.budget_group, window_seconds=None if s.count_closed else s.window_seconds,
        budget_lasts_seconds=lasts, min_release_interval_seconds=s.min_release_interval_seconds,
        budget_lasts_at_least_seconds=at_least, one_producer_can_spend_budget=burnable,
        min_batch=s.min_batch, publish_probability=publish, notes=notes,
    )


def plans(policy: EnclavePolicy, stream: str | None = None, records_per_window: int | None = None,
          typical_value: Sequence[float] | None = None) -> list[StreamPlan]:
    """The plan of one stream, or of every stream in name order."""
    names = [stream] if stream is not None else sorted(policy.streams)
    if typical_value is not None and len(names) > 1:
        raise ConfigError("--typical-value is one stream's typical record", hint="name the stream with --stream")
    return [stream_plan(policy, n, records_per_window, typical_value) for n in names]
