"""Overload: a full records queue pushes back on producers instead of growing without
bound, and a slow consumer never holds up ingestion or other consumers."""

from __future__ import annotations

import time

import pytest

from sealedsum.common.errors import TransportError
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.conftest import relaunch
from tests.integration.test_end_to_end import capture_queue

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 5, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def test_a_full_records_queue_pushes_back_and_loses_nothing(sidecar_factory):
    sc = sidecar_factory({"s": STREAM}, broker_extra="max_queued_records = 10\nreconnect_seconds = 2")
    with Producer(sc.config) as producer:  # attest while the enclave runs
        assert sc.stop() == 0  # now nothing consumes the records queue
        confirmed = 0
        with pytest.raises(TransportError, match="nack") as info:
            for i in range(20):
                started = time.monotonic()
                producer.send("s", [1.0])
                confirmed += 1
        # A quorum queue may take one message past its limit before it starts refusing.
        assert confirmed in (10, 11)
        assert time.monotonic() - started >= 1.0  # it waited and retried before giving up
        assert "max_queued_records" in info.value.hint
    relaunch(sc)  # the enclave drains the queue; producers get room again
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for i in range(15 - confirmed):
                producer.send("s", [1.0])
        releases = []
        for message in consumer.releases(idle_timeout=30):
            releases.append(message)
            if len(releases) == 3:
                break
    assert sorted(r.window for r in releases) == [1, 2, 3]
    assert sum(r.count for r in releases) == 15  # those queued while stopped, and the rest


def test_a_slow_consumer_does_not_hold_up_the_others(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    stuck_conn, stuck_q = capture_queue(sc, sc.config.broker.topology.results_exchange, "s")  # never read
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for i in range(40):
                producer.send("s", [1.0])
        got = []
        for message in consumer.releases(idle_timeout=30):
            got.append(message.window)
            if len(got) == 8:
                break
    assert sorted(got) == list(range(1, 9))
    depth = stuck_conn.channel().queue_declare(stuck_q, passive=True).method.message_count
    assert depth == 8  # the stuck consumer's own queue holds its copies; nothing waited for it
