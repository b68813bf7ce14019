"""The runtime's promises that need no broker to check: dead letters before acks, and a
release whose publish failed is republished byte for byte, never re-drawn."""

from __future__ import annotations

from types import SimpleNamespace

import pika.exceptions as pe
import pytest

from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError
from sealedsum.sidecar.enclave_process.runtime import DEAD_LETTER_PREFIX_BYTES, EnclaveRuntime


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

    def tx_commit(self):
        self.log.append("commit")

    def basic_ack(self, tag, multiple=False):
        new = [t for t in range(1, tag + 1) if t not in self.acked] if multiple else [tag]
        self.acked.extend(new)
        self.log.append(f"ack {tag}" + (" multiple" if multiple else ""))


def deliver(runtime, channel, body, tag, redelivered=False, props=None):
    runtime._on_record(channel, SimpleNamespace(delivery_tag=tag, redelivered=redelivered), props, body)
    runtime.ingest()
    runtime.release_closed(wait=True)
    runtime.flush()  # as the runtime's loop does after every ingest


def test_a_failed_release_is_republished_with_the_same_noise(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume = RecordingChannel()
    runtime._publish = RecordingChannel(fail=1)
    runtime._dead = runtime._publish  # dead letters on the same timeline
    bodies = [world.sealer.seal("s", [10.0]).body for _ in range(5)]  # window_records = 5
    for tag, body in enumerate(bodies[:4], start=1):
        deliver(runtime, consume, body, tag)
    with pytest.raises(TransportError):
        deliver(runtime, consume, bodies[4], 5)  # closes the window; the publish is lost
    # Acknowledged once the checkpoint held the window's release as pending: losing the
    # publish loses nothing, it goes out again after the reconnect.
    assert 5 in consume.acked
    (pending,) = world.enclave.pending.values()

    runtime._publish, consume = RecordingChannel(), RecordingChannel()  # after the reconnect
    runtime._unacked.clear()  # as _connect does: the old channel's deliveries come again
    runtime.republish_unconfirmed()
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
    runtime._dead = runtime._publish  # dead letters on the same timeline
    deliver(runtime, consume, b"not a sealed box" * 4, 7)
    assert consume.log == ["publish sealedsum.rejected", "commit", "ack 7 multiple"]
    (_, _, body, headers) = runtime._publish.published[0]
    assert body == b"not a sealed box" * 4 and headers["x-sealedsum-reason"] == "undecryptable"


def test_a_lost_dead_letter_leaves_the_record_unacknowledged(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel(fail=1)
    runtime._dead = runtime._publish  # dead letters on the same timeline
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
    runtime._dead = runtime._publish  # dead letters on the same timeline
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


# -- record batches: several sealed records in one delivery -------------------------------

def deliver_batch(runtime, channel, records, tag, redelivered=False):
    from sealedsum.common import wire

    body = wire.RecordBatch(tuple(records)).to_bytes()
    runtime._on_record(channel, SimpleNamespace(delivery_tag=tag, redelivered=redelivered),
                       SimpleNamespace(type=wire.RECORD_BATCH_TYPE), body)
    runtime.ingest()
    runtime.release_closed(wait=True)
    runtime.flush()
    return body


def test_a_batch_counts_each_record_and_dead_letters_only_the_bad_one(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._publish.log = consume.log
    runtime._dead = runtime._publish  # dead letters on the same timeline
    good = [world.sealer.seal("s", [float(v)]).body for v in (1, 2, 3)]
    bad = b"not a sealed box" * 4
    deliver_batch(runtime, consume, [good[0], bad, good[1], good[2]], 9)
    assert world.enclave.stats.accepted == 3 and dict(world.enclave.stats.rejected) == {"undecryptable": 1}
    (dead,) = runtime._publish.published
    assert dead[2] == bad  # the one record, not the batch
    assert dead[3]["x-sealedsum-reason"] == "undecryptable" and dead[3]["x-sealedsum-batch-index"] == 1
    assert consume.log == ["publish sealedsum.rejected", "commit", "ack 9 multiple"]  # one ack, after the dead letter


def test_a_batch_that_closes_a_window_releases_it_and_a_redelivery_counts_nothing_twice(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    records = [world.sealer.seal("s", [10.0]).body for _ in range(7)]  # window_records = 5
    deliver_batch(runtime, consume, records, 1)
    assert world.enclave.stats.windows_released == 1 and world.enclave.streams["s"].current.count == 2
    (release,) = [p for p in runtime._publish.published if p[0] == "sealedsum.results"]
    deliver_batch(runtime, consume, records, 2, redelivered=True)  # as after a lost ack
    assert world.enclave.stats.accepted == 7 and world.enclave.streams["s"].current.count == 2
    assert [p for p in runtime._publish.published if p[0] != "sealedsum.results"] == []  # no dead letters
    assert consume.acked == [1, 2]


@pytest.mark.parametrize("body, reason", [
    (b"SSB\x01\x00\x02\x00\x00\x00\x05abc", "malformed"),       # truncated
    (b"SSB\x01\x00\x00", "malformed"),                           # no records
    (b"SSX\x01\x00\x01\x00\x00\x00\x00", "malformed"),           # wrong magic
    (b"SSB\x01" + b"\x00" * (256 << 10), "too_large"),
])
def test_a_batch_that_does_not_parse_is_dead_lettered_whole(world, body, reason):
    from sealedsum.common import wire

    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    runtime._on_record(consume, SimpleNamespace(delivery_tag=4, redelivered=False),
                       SimpleNamespace(type=wire.RECORD_BATCH_TYPE), body)
    runtime.ingest()
    runtime.flush()
    (dead,) = runtime._publish.published
    assert dead[3]["x-sealedsum-reason"] == reason and "x-sealedsum-batch-index" not in dead[3]
    if len(body) > world.enclave.max_delivery_bytes():  # refused unread: only a prefix is kept, and the size
        assert dead[2] == body[:DEAD_LETTER_PREFIX_BYTES] and dead[3]["x-sealedsum-original-bytes"] == len(body)
    else:
        assert dead[2] == body and "x-sealedsum-original-bytes" not in dead[3]
    assert consume.log == ["ack 4 multiple"] and world.enclave.stats.accepted == 0
    assert dict(world.enclave.stats.rejected) == {reason: 1}


def test_a_sealed_record_is_never_read_as_a_batch(world):
    """Only the AMQP type makes a delivery a batch: a record whose random first bytes
    happen to spell the batch magic is still one record."""
    from sealedsum.common import wire

    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    body = world.sealer.seal("s", [1.0]).body
    runtime._on_record(consume, SimpleNamespace(delivery_tag=1, redelivered=False),
                       SimpleNamespace(type=wire.RECORD_TYPE), body)
    runtime.ingest()
    assert world.enclave.stats.accepted == 1
    assert world.enclave.records_in(wire.RECORD_BATCH_MAGIC + body, wire.RECORD_TYPE) == (wire.RECORD_BATCH_MAGIC + body,)
