"""The runtime's promises that need no broker to check: dead letters before acks, and a
release whose publish failed is republished byte for byte, never re-drawn."""

from __future__ import annotations

from types import SimpleNamespace

import pika.exceptions as pe
import pytest

from common.config import BrokerSettings
from common.errors import TransportError
from sidecar.runtime import EnclaveRuntime


class RecordingChannel:
    """Stands in for a pika channel; fails the next ``fail`` publishes like a lost connection."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.published: list[tuple[str, str, bytes, dict]] = []
        self.acked: list[int] = []
        self.log: list[str] = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if self.fail:
            self.fail -= 1
            raise pe.StreamLostError("connection lost")
        self.published.append((exchange, routing_key, body, dict(properties.headers or {})))
        self.log.append(f"publish {exchange}")

    def basic_ack(self, tag, multiple=False):
        new = [t for t in range(1, tag + 1) if t not in self.acked] if multiple else [tag]
        self.acked.extend(new)
        self.log.append(f"ack {tag}" + (" multiple" if multiple else ""))


def deliver(runtime, channel, body, tag, redelivered=False):
    runtime._on_record(channel, SimpleNamespace(delivery_tag=tag, redelivered=redelivered), None, body)
    runtime.ingest()


def test_a_failed_release_is_republished_with_the_same_noise(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume = RecordingChannel()
    runtime._publish = RecordingChannel(fail=1)
    bodies = [world.sealer.seal("s", [10.0]).body for _ in range(5)]  # window_records = 5
    for tag, body in enumerate(bodies[:4], start=1):
        deliver(runtime, consume, body, tag)
    with pytest.raises(TransportError):
        deliver(runtime, consume, bodies[4], 5)  # closes the window; the publish is lost
    assert consume.acked == []  # nothing is acknowledged before its release is out
    (pending,) = world.enclave.pending.values()

    runtime._publish, consume = RecordingChannel(), RecordingChannel()  # after the reconnect
    runtime._unacked.clear()  # as _connect does: the old channel's deliveries come again
    runtime.republish_pending()
    for tag, body in enumerate(bodies, start=1):  # the broker redelivers all five
        deliver(runtime, consume, body, tag, redelivered=True)
    (published,) = runtime._publish.published
    assert published[2] == pending.body
    assert world.enclave.pending == {}
    assert world.enclave.stats.accepted == 5 and world.enclave.stats.windows_released == 1
    assert sorted(consume.acked) == [1, 2, 3, 4, 5] and runtime._publish.published == [published]


def test_dead_letter_is_confirmed_before_the_ack(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._publish.log = consume.log  # one timeline for both channels
    deliver(runtime, consume, b"not a sealed box" * 4, 7)
    assert consume.log == ["publish sealedsum.rejected", "ack 7"]
    (_, _, body, headers) = runtime._publish.published[0]
    assert body == b"not a sealed box" * 4 and headers["x-sealedsum-reason"] == "undecryptable"


def test_a_lost_dead_letter_leaves_the_record_unacknowledged(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel(fail=1)
    with pytest.raises(TransportError):
        deliver(runtime, consume, b"garbage" * 10, 3)
    assert consume.acked == []  # the broker will redeliver it


class UnboundChannel(RecordingChannel):
    """The broker confirms but no queue is bound: pika raises UnroutableError."""

    def __init__(self, unroutable: int) -> None:
        super().__init__()
        self.unroutable = unroutable

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if mandatory and self.unroutable:
            self.unroutable -= 1
            raise pe.UnroutableError([])
        super().basic_publish(exchange, routing_key, body, properties, mandatory)


def test_a_release_nobody_is_bound_to_receive_is_held_not_dropped(world, monkeypatch):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), UnboundChannel(unroutable=2)
    for tag in range(1, 6):
        deliver(runtime, consume, world.sealer.seal("s", [10.0]).body, tag)
    assert consume.acked == [1, 2, 3, 4, 5]  # the record is counted either way
    (held,) = world.enclave.pending.values()
    runtime._tick()  # too soon to retry
    assert runtime._publish.published == []
    runtime._last_held_retry -= 60
    runtime._tick()  # still nobody bound
    runtime._last_held_retry -= 60
    runtime._tick()
    (published,) = runtime._publish.published
    assert published[2] == held.body and world.enclave.pending == {}
