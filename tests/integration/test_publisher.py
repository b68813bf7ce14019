"""The producer's pipelined publisher on a real broker: every record confirmed and counted
once, a nack surfaces on the record it belongs to (after back-pressure), an unroutable
record fails at once, and a lost connection is reopened with the unconfirmed records
published again."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid

import pytest

from sealedsum.common import amqp
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError, Unroutable
from sealedsum.common.results import Release
from sealedsum.common.topology import RECORD_ROUTING_KEY, Topology
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.producers.transport import RecordPublisher
from tests.integration.conftest import _no_broker

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 50, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def releases_of(consumer, windows: int, timeout: float = 60) -> dict[int, Release]:
    out: dict[int, Release] = {}
    for message in consumer.releases(idle_timeout=timeout):
        out[message.window] = Release.from_payload(message.to_payload())
        if len(out) == windows:
            break
    return out


def test_pipelined_records_are_all_confirmed_and_counted_once(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    values = [float(i % 10) for i in range(300)]
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config, max_unconfirmed=32) as producer:
            pending = []
            most = 0
            for v in values:
                pending.append(producer.submit(producer.seal_current("s", [v])))
                most = max(most, producer.outstanding)
            assert most <= 32  # max_unconfirmed bounds what awaits a confirm
            producer.flush()
            assert all(p.confirmed and p.error is None for p in pending)
            more = producer.send_many("s", [[1.0]] * 50)  # one more window, the convenience way
            assert len(more) == 50
        got = releases_of(consumer, 7)
    assert sorted(got) == list(range(1, 8))
    assert sum(r.count for r in got.values()) == 350
    assert sum(r.sum[0] for r in got.values()) == pytest.approx(sum(values) + 50, abs=1e-3)


def test_a_nack_surfaces_on_its_record_after_back_pressure(sidecar_factory):
    sc = sidecar_factory({"s": STREAM}, broker_extra="max_queued_records = 10\nreconnect_seconds = 2")
    records_queue = sc.config.broker.topology.records_queue
    with Producer(sc.config, max_unconfirmed=64) as producer:
        assert sc.stop() == 0  # nothing consumes the records queue any more
        # Fill the queue to its limit one record at a time (a quorum queue enforces the
        # limit late for a burst in flight, so a pipelined burst could overshoot it).
        conn = amqp.connect(sc.config.broker)
        ch = conn.channel()
        ch.confirm_delivery()
        filled = 0
        for _ in range(12):
            try:
                amqp.publish_confirmed(ch, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY,
                                       producer.seal_current("s", [1.0]).body, amqp.properties("record"))
                filled += 1
            except TransportError:
                break
        depth = ch.queue_declare(records_queue, passive=True).method.message_count
        assert depth == filled >= 10
        started = time.monotonic()
        pending = [producer.submit(producer.seal_current("s", [1.0])) for _ in range(20)]
        with pytest.raises(TransportError, match="nack") as info:
            producer.flush()
        waited = time.monotonic() - started
        assert "max_queued_records" in info.value.hint
        assert all(p.done and not p.confirmed for p in pending)
        assert all(isinstance(p.error, TransportError) and "nack" in str(p.error) for p in pending)
        assert waited >= 1.0  # nacked records were retried (back-pressure) before they failed
        # The other failures are raised once each, by the next calls; then it is clean again.
        raised = 1
        while True:
            try:
                producer.flush()
                break
            except TransportError:
                raised += 1
        assert raised == len(pending)
        assert ch.queue_declare(records_queue, passive=True).method.message_count == depth
        conn.close()


def test_an_unroutable_record_fails_without_retrying(amqp_url):
    settings = BrokerSettings(url=amqp_url, topology=Topology(f"t-{uuid.uuid4().hex[:10]}"), reconnect_seconds=30)
    exchange = settings.topology.records_exchange
    conn = amqp.connect(settings)
    conn.channel().exchange_declare(exchange, exchange_type="direct", durable=False, auto_delete=False)
    publisher = RecordPublisher(settings)
    try:
        started = time.monotonic()
        ticket = publisher.submit(b"no queue is bound" * 4)
        with pytest.raises(Unroutable, match="no queue takes messages"):
            publisher.wait(ticket)
        assert time.monotonic() - started < 5  # not retried for reconnect_seconds
        assert ticket.error is not None and not ticket.confirmed
        with pytest.raises(Unroutable):  # publish(): the same, synchronously
            publisher.publish(b"again" * 10)
    finally:
        publisher.close()
        conn.channel().exchange_delete(exchange)
        conn.close()


def _close_connections_from(local_ports: set[int]) -> int:
    """Close (broker side) the client connections coming from these local ports."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    closed = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in local_ports:
            subprocess.run(["rabbitmqctl", "close_connection", parts[0], "test: connection dropped"],
                           capture_output=True, timeout=60, check=True)
            closed += 1
    return closed


def test_a_dropped_connection_is_reopened_and_unconfirmed_records_republished(sidecar_factory, amqp_url):
    if shutil.which("rabbitmqctl") is None or ("127.0.0.1" not in amqp_url and "localhost" not in amqp_url):
        _no_broker("this test drops one connection with rabbitmqctl, for a broker on this machine")
    sc = sidecar_factory({"s": STREAM})
    values = [float(i % 10) for i in range(400)]
    errors: list[BaseException] = []
    with Consumer(sc.config, "s") as consumer:
        producer = Producer(sc.config, max_unconfirmed=64)
        try:
            publisher = producer._transport
            pending = []
            half = threading.Event()

            def produce():
                try:
                    for i, v in enumerate(values):
                        pending.append(producer.submit(producer.seal_current("s", [v])))
                        if i == 50:
                            half.set()
                        time.sleep(0.01)  # a steady stream, still going when the connection drops
                    producer.flush()
                except BaseException as err:  # noqa: BLE001 - reported below
                    errors.append(err)
                    half.set()

            worker = threading.Thread(target=produce, daemon=True)
            worker.start()
            assert half.wait(60)
            connection = publisher.driver._connection
            port = connection._transport._sock.getsockname()[1] if connection else None
            assert port is not None
            assert _close_connections_from({port}) == 1
            worker.join(120)
            assert not worker.is_alive() and not errors, errors
            assert all(p.confirmed for p in pending) and len(pending) == len(values)
            assert publisher.driver.reconnects >= 1
            assert len(pending) - 50 > 0  # records kept coming after the drop
        finally:
            producer.close()
        got = releases_of(consumer, 8)
    # Republished copies of records the broker had stored are counted once (same record id).
    assert sorted(got) == list(range(1, 9))
    assert sum(r.count for r in got.values()) == 400
    assert sum(r.sum[0] for r in got.values()) == pytest.approx(sum(values), abs=1e-3)
