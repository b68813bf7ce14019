"""The queues the sidecar declares, as the broker holds them: the records queue and the
dead-letter queue are quorum queues (replicated, durable), and the records queue's
delivery limit (``sealedsum.common.topology.DELIVERY_LIMIT``) takes a message that keeps coming back
unacknowledged, as one that kills the enclave each time it is read would, off the queue
and into ``PREFIX.rejected`` instead of letting it loop forever."""

from __future__ import annotations

import dataclasses
import time
import uuid

import pika
import pika.exceptions as pe
import pytest

from sealedsum.common import amqp
from sealedsum.common.config import BrokerSettings, Topology
from sealedsum.common.errors import TransportError
from sealedsum.common.topology import DELIVERY_LIMIT, RECORD_ROUTING_KEY
from sealedsum.sidecar.enclave_process.runtime import declare_topology
from tests.integration.test_end_to_end import STREAM, drain

pytestmark = [pytest.mark.integration]


class RecordingChannel:
    """Takes the sidecar's declarations without a broker: queue name -> arguments."""

    def __init__(self) -> None:
        self.queues: dict[str, dict] = {}

    def queue_declare(self, queue, durable=False, arguments=None, **_kw):
        self.queues[queue] = dict(arguments or {})

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def refusal(conn: pika.BlockingConnection, queue: str, arguments: dict) -> str:
    """Declare ``queue`` with ``arguments``; the broker must refuse (406); its reason."""
    ch = conn.channel()
    with pytest.raises(pe.ChannelClosedByBroker) as err:
        ch.queue_declare(queue, durable=True, arguments=arguments)
    assert err.value.reply_code == 406, err.value
    return err.value.reply_text


def test_records_go_to_quorum_queues_whose_delivery_limit_stops_a_poison_message(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    declared = RecordingChannel()
    declare_topology(declared, sc.config.broker)
    records, rejected = declared.queues[t.records_queue], declared.queues[t.rejected_queue]
    assert records["x-queue-type"] == rejected["x-queue-type"] == "quorum"
    assert records["x-delivery-limit"] == DELIVERY_LIMIT and records["x-dead-letter-exchange"] == t.rejected_exchange

    conn = amqp.connect(sc.config.broker)
    try:
        # Redeclared with these arguments the queues the running sidecar declared are
        # accepted; with another type or delivery limit refused, naming the value held.
        for queue, arguments in ((t.records_queue, records), (t.rejected_queue, rejected)):
            conn.channel().queue_declare(queue, durable=True, arguments=arguments)
            reason = refusal(conn, queue, dict(arguments, **{"x-queue-type": "classic"}))
            assert "inequivalent arg 'x-queue-type'" in reason and "current is 'quorum'" in reason, reason
        reason = refusal(conn, t.records_queue, dict(records, **{"x-delivery-limit": DELIVERY_LIMIT + 1}))
        assert "inequivalent arg 'x-delivery-limit'" in reason and f"current is '{DELIVERY_LIMIT}'" in reason, reason

        # A message that keeps coming back is dead-lettered at the delivery limit.
        assert sc.stop() == 0  # nobody else reads the records queue now
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(t.records_exchange, RECORD_ROUTING_KEY, b"poison",
                         pika.BasicProperties(delivery_mode=2), mandatory=True)
        # Read it without acknowledging and drop the connection, as an enclave that dies
        # on it does: the broker takes it back and counts one more delivery each time.
        counts, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline:
            reader = amqp.connect(sc.config.broker)
            try:
                method, props, body = reader.channel().basic_get(t.records_queue, auto_ack=False)
            finally:
                reader.close()
            if method is None:
                if len(counts) > DELIVERY_LIMIT:
                    break
                time.sleep(0.05)
                continue
            assert body == b"poison"
            counts.append(int((props.headers or {}).get("x-delivery-count", -1)))
            if len(counts) > DELIVERY_LIMIT + 3:
                break  # no limit: it would come back forever
        assert counts == list(range(DELIVERY_LIMIT + 1)), counts  # delivered 1 + DELIVERY_LIMIT times
        (dead,) = drain(conn, t.rejected_queue, expect=1, timeout=15)
        props, body = dead
        assert body == b"poison"
        assert props.headers["x-first-death-reason"] == "delivery_limit"
        assert props.headers["x-first-death-queue"] == t.records_queue
        assert conn.channel().queue_declare(t.records_queue, passive=True).method.message_count == 0
    finally:
        conn.close()


def test_an_enclave_request_without_a_running_sidecar(amqp_url):
    """Section 8's outcomes for a client when no enclave answers, on a prefix of this test's own:
    no sidecar ever started (no PREFIX.attest exchange: 404 closes the channel at once), the
    exchange without its queue (as after a broker restart, the queue is not durable: returned
    at once), and the queue with nobody consuming it (the request waits: a timeout). The
    default-exchange path, also answered by the enclave, is returned where no queue exists."""
    settings = dataclasses.replace(BrokerSettings(url=amqp_url), topology=Topology(f"rpc-{uuid.uuid4().hex[:12]}"),
                                   attest_timeout_seconds=1.5)
    t = settings.topology
    conn = amqp.connect(settings)
    try:
        def attest() -> tuple[str, float]:
            start = time.monotonic()
            with pytest.raises(TransportError) as err:
                amqp.request_attestation(conn, settings, bytes(32))
            return str(err.value), time.monotonic() - start

        text, took = attest()
        assert "refused: the broker has no exchange" in text and "NOT_FOUND" in text and took < 1.0, (text, took)
        ch = conn.channel()
        ch.confirm_delivery()
        with pytest.raises(pe.UnroutableError):  # basic.return (312 NO_ROUTE), then the ack
            ch.basic_publish("", t.attest_queue, b"SSA\x01" + bytes(32), mandatory=True)
        ch.close()

        declare_topology(conn.channel(), settings)  # as a sidecar does, which then stops
        text, took = attest()
        assert text.startswith("no reply to attest-request") and took >= 1.5, (text, took)

        conn.channel().queue_delete(t.attest_queue)
        text, took = attest()
        assert text.startswith("no enclave request queue behind") and took < 1.0, (text, took)
    finally:
        ch = conn.channel()
        for queue in t.queues:
            ch.queue_delete(queue)
        for exchange in t.exchanges:
            ch.exchange_delete(exchange)
        conn.close()
