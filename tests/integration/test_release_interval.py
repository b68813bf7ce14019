"""Issue 11, one producer burning a stream's budget, over the real broker and a real sidecar:
with ``min_release_interval_seconds`` a flood of records from one producer into a count-closed
stream spends the budget no faster than one release per interval, and an honest record sent
after the flood is still counted, not refused ``budget_exhausted``."""

from __future__ import annotations

import time

import pytest

from sealedsum.common.results import Release
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = pytest.mark.integration

INTERVAL_S = 0.5
RELEASES = 10  # budget_epsilon / epsilon: the budget lasts at least (RELEASES - 1) × INTERVAL_S
EPS = 1e9  # noise far below one fixed-point unit: the sums come out exact
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 2, "min_batch": 1,
          "mechanism": "laplace", "epsilon": EPS, "budget_epsilon": RELEASES * EPS,
          "min_release_interval_seconds": INTERVAL_S}
FLOOD = 60  # what the audit sent in 5 s: 30 windows' worth, three times the budget
HONEST = 10.0


def test_a_flood_from_one_producer_spends_no_faster_than_the_interval(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    dead_conn, dead_q = capture_queue(sc, t.rejected_exchange, "")
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as flooder:
            flooder.send_many("s", [[0.0]] * FLOOD)  # pipelined: as fast as the broker takes them
        flood_end_ms = int(time.time() * 1000)
        report = consumer.budget("s")
        assert not report.exhausted
        with Producer(sc.config) as honest:  # two, so that they fill a window even on their own
            honest.send("s", [HONEST])
            honest.send("s", [HONEST])
        releases: list[Release] = []
        for message in consumer.releases(idle_timeout=10):
            assert isinstance(message, Release), message
            releases.append(message)
            if sum(r.count for r in releases) >= FLOOD + 2:
                break
    # Every record counted, the honest ones included, and none refused.
    assert sum(r.count for r in releases) == FLOOD + 2
    assert sum(r.sum[0] for r in releases) == pytest.approx(2 * HONEST, abs=1e-3)
    assert drain(dead_conn, dead_q, expect=0, timeout=1.0) == []
    # The enclave's own signed close times: one release per interval at most.
    closes = [r.closed_at_ms for r in releases]
    assert all(b - a >= INTERVAL_S * 1000 for a, b in zip(closes, closes[1:]))
    during = [c for c in closes if c <= flood_end_ms]
    assert len(during) <= (flood_end_ms - closes[0]) // (INTERVAL_S * 1000) + 1
    assert report.budget["releases"] <= (flood_end_ms - closes[0]) // (INTERVAL_S * 1000) + 2
    assert len(releases) < RELEASES and max(r.count for r in releases) > STREAM["window_records"]
