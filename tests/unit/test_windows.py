"""Time-closed windows (issue 10): numbered by the clock, closed on schedule, charged whatever
they hold, and released only when their *noised* count reaches min_batch, with the
probability docs/protocol.md section 12 computes."""

from __future__ import annotations

import math

import pytest

from sealedsum.common.policy import StreamKind
from tests.conftest import make_policy, make_world, stream_table

WINDOW_MS = 1_000
T0 = 1_767_225_600_000  # a window boundary (ms since the Unix epoch)


def time_world(keys, **table):
    table = {"window_records": None, "window_seconds": WINDOW_MS / 1000, **table}
    return make_world(keys, make_policy({"s": stream_table(**table)}))


def run_windows(w, records_per_window: list[int], *, offset_ms: int = 300) -> list:
    """Send each window its records (at ``offset_ms`` into it), tick past its end; return what
    was published."""
    e = w.enclave
    e.on_tick(T0)
    out = []
    for i, n in enumerate(records_per_window):
        t = T0 + i * WINDOW_MS + offset_ms
        for _ in range(n):
            assert e.on_record(w.sealer.seal("s", [5.0], now_ms=t).body, t).rejection is None
        out += e.on_tick(T0 + (i + 1) * WINDOW_MS).publish
    return out


def test_window_numbers_and_close_times_do_not_depend_on_the_records(small_keys):
    """The same clock, different records (none at all in one world, records at other times in
    the other): the same windows are charged, in the same order, and every release says the
    window's scheduled end."""
    busy, idle = time_world(small_keys, min_batch=1, epsilon=1e9), time_world(small_keys, min_batch=1, epsilon=1e9)
    counts = [3, 0, 1, 5, 0, 0, 2, 1]
    releases = run_windows(busy, counts, offset_ms=700)
    assert run_windows(idle, [0] * len(counts), offset_ms=100) == []  # nothing arrived, nothing shows
    first = T0 // WINDOW_MS
    for e in (busy.enclave, idle.enclave):
        assert e.ledgers["s"].releases == len(counts)  # every window charged, even empty ones
        assert e.streams["s"].current.index == first + len(counts)
    assert busy.enclave.ledgers["s"].head == idle.enclave.ledgers["s"].head  # same windows, same order
    assert [r.window for r in releases] == [first + i for i, n in enumerate(counts) if n]
    for r in releases:
        assert r.message.closed_at_ms == (r.window + 1) * WINDOW_MS
        assert r.message.count == counts[r.window - first]  # epsilon 1e9: no noise
    # Withheld windows are those whose noised count (here the true one) is below min_batch = 1.
    assert busy.enclave.stats.windows_withheld == counts.count(0)


def test_a_record_counts_in_the_window_of_its_arrival(small_keys):
    """A record counted after a window's end goes into the next window, even before any tick."""
    w = time_world(small_keys, min_batch=1, epsilon=1e9)
    e = w.enclave
    e.on_tick(T0 + 10)
    t = T0 + WINDOW_MS + 5  # past the first window's end, no tick since
    out = e.on_record(w.sealer.seal("s", [5.0], now_ms=t).body, t)
    assert out.rejection is None and e.streams["s"].current.index == T0 // WINDOW_MS + 1
    assert e.ledgers["s"].releases == 1  # the empty first window closed first, charged


def _binomial_tails(n: int, p: float, k: int) -> tuple[float, float]:
    """P(X <= k) and P(X >= k) for X ~ Binomial(n, p), exactly (in log space)."""
    def pmf(i: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + i * math.log(p) + (n - i) * math.log1p(-p))
    return math.fsum(pmf(i) for i in range(0, k + 1)), math.fsum(pmf(i) for i in range(k, n + 1))


def discrete_laplace_at_least(scale: float, k: int) -> float:
    """P(Z >= k) for OpenDP's discrete Laplace, P(z) ∝ exp(-|z| / scale) (protocol section 12)."""
    t = math.exp(-1 / scale)
    return t ** k / (1 + t) if k >= 1 else 1 - t ** (1 - k) / (1 + t)


def sum_of_laplace_at_least(scale: float, terms: int, k: int, span: int = 400) -> float:
    """P(Z_1 + ... + Z_terms >= k), the Z_i independent discrete Laplace: by convolution."""
    t = math.exp(-1 / scale)
    one = {z: (1 - t) / (1 + t) * t ** abs(z) for z in range(-span, span + 1)}
    dist = {0: 1.0}
    for _ in range(terms):
        nxt: dict[int, float] = {}
        for a, pa in dist.items():
            for b, pb in one.items():
                if pb > 1e-18:
                    nxt[a + b] = nxt.get(a + b, 0.0) + pa * pb
        dist = nxt
    return math.fsum(p for z, p in dist.items() if z >= k)


ALPHA = 1e-6  # the probability that a correct enclave fails one of these checks


@pytest.mark.slow
@pytest.mark.parametrize("kind, per_window, windows", [("sum", 0, 3000), ("sum", 3, 600), ("histogram", 0, 2000)])
def test_a_window_below_min_batch_is_released_with_the_documented_probability(small_keys, kind, per_window, windows):
    """min_batch 5, Laplace ε = 1. A sum stream's count noise has scale b = 1 / (ε·c) = 2
    (c = count_share 0.5): a window of ``n`` records is released with probability
    P(n + Z >= 5) = P(Z >= 5 - n). A histogram's count is the sum of its 3 noised buckets
    (each of scale 1/ε = 1 for add/remove): P(n + Z_1 + Z_2 + Z_3 >= 5). The number released
    out of ``windows`` is tested exactly against Binomial(windows, p), two-sided, at ALPHA."""
    table = dict(min_batch=5, epsilon=1.0)
    if kind == "histogram":
        table.update(kind="histogram", dimension=None, edges=[0, 1, 10, 100], lower=None, upper=None)
    w = time_world(small_keys, **table)
    plan = w.enclave.policy.streams["s"].noise_plan()
    if kind == StreamKind.HISTOGRAM:
        assert plan.count_scale is None and plan.sum_scale == 1.0
        p = sum_of_laplace_at_least(plan.sum_scale, 3, 5 - per_window)
    else:
        assert plan.count_scale == 2.0
        p = discrete_laplace_at_least(plan.count_scale, 5 - per_window)
    released = run_windows(w, [per_window] * windows)
    assert w.enclave.ledgers["s"].releases == windows  # each window charged, released or not
    assert all(r.message.count >= 5 for r in released)  # released only at a noised count >= min_batch
    lower, upper = _binomial_tails(windows, p, len(released))
    assert lower >= ALPHA / 2 and upper >= ALPHA / 2, (len(released), windows, p)
