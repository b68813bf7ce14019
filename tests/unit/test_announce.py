"""Key-rotation notices without a broker: the enclave signs one when it rotates and keeps it
pending until the broker confirms it on PREFIX.announce; a producer re-attests when a notice
verifies and names a newer epoch, and ignores (with a warning) one that does not verify."""

from __future__ import annotations

import dataclasses
import logging
import os
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import signing, wire
from sealedsum.common.attestation import verify_attestation
from sealedsum.common.config import BrokerSettings, Config
from sealedsum.common.errors import InvalidMessage
from sealedsum.common.results import ROTATED_KIND, KeyRotated, verify_key_rotated, verify_signed
from sealedsum.producers import transport
from sealedsum.producers.client import Producer
from sealedsum.sidecar.enclave.keyring import EnclaveKeys
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave_process.runtime import EnclaveRuntime
from tests.conftest import TEST_BITS, make_policy, make_world, now_ms, stream_table, checkpoint

T0 = now_ms()
GRACE_S = 60


def rotating_world():
    policy = make_policy({"s": stream_table(window_records=6, min_batch=1)}, key_grace_seconds=GRACE_S)
    return make_world(EnclaveKeys.generate(TEST_BITS), policy)


class RecordingChannel:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, bytes, object, bool]] = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        self.published.append((exchange, routing_key, body, properties, mandatory))


def test_rotation_signs_a_notice_that_is_pending_until_published_on_announce():
    world = rotating_world()
    e = world.enclave
    (notice,) = e.rotate(T0).publish
    assert notice.key == "key_rotated/2" and notice.stream == "" and notice.announce and notice.window is None
    # Verified with the key attested under epoch 1: the signing key survives rotation.
    parsed = verify_key_rotated(notice.body, world.attested)
    assert parsed == KeyRotated(2, 1, T0 + GRACE_S * 1000, world.measurement.hex(), T0)
    assert parsed.previous_retires_at_ms == e.keyring.retire_at[1]
    with pytest.raises(InvalidMessage):  # consumers of PREFIX.results do not take it
        verify_signed(notice.body, world.attested)
    # Sealed with the state: a restarted enclave still has it to send.
    restored = Enclave(e.keyring, e.policy, e.policy_bytes, e.code_digest, world.measurement,
                       lambda rd: b"", [checkpoint(e, base=True)], T0)
    assert [p.body for p in restored.start().publish] == [notice.body]

    runtime = EnclaveRuntime(restored, BrokerSettings(), start=restored.start())
    runtime._publish = RecordingChannel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    runtime.republish_unconfirmed()
    ((exchange, key, body, props, mandatory),) = runtime._publish.published
    assert (exchange, key, body, mandatory) == ("sealedsum.announce", "", notice.body, False)
    assert props.type == "announce" and props.delivery_mode == 2
    assert restored.pending == {} and runtime._owed.checkpoint  # the confirmation is checkpointed next


def test_the_runtime_publishes_the_notice_on_the_tick_that_rotates(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    runtime._publish, runtime._channel = RecordingChannel(), SimpleNamespace()
    runtime.request_rotation()
    runtime._tick()
    ((exchange, _, body, _, mandatory),) = runtime._publish.published
    assert exchange == "sealedsum.announce" and not mandatory
    assert verify_key_rotated(body, world.attested).key_epoch == world.enclave.keys.epoch == 2
    assert world.enclave.pending == {}


def test_a_notice_payload_is_strict():
    good = KeyRotated(3, 2, 2000, "ab" * 32, 1000)
    assert KeyRotated.from_payload(good.to_payload()) == good and good.kind == ROTATED_KIND
    fields = {f.name: getattr(good, f.name) for f in dataclasses.fields(KeyRotated)}
    for bad in (dict(key_epoch=4), dict(previous_epoch=0, key_epoch=1), dict(previous_retires_at_ms=999),
                dict(at_ms=True)):
        with pytest.raises(InvalidMessage):
            KeyRotated.from_payload(KeyRotated(**{**fields, **bad}).to_payload())
    with pytest.raises(InvalidMessage):
        KeyRotated.from_payload(good.to_payload().replace(b'"at_ms":1000,', b""))


# -- the producer ----------------------------------------------------------------------------

class FakeTransport:
    """Stands in for producers.transport.RecordPublisher: attests against the in-memory enclave
    and hands out whatever notices the test puts in."""

    def __init__(self, world) -> None:
        self.world = world
        self.attestations = 0
        self.notices: list[bytes] = []
        self.record_notices: list[bytes] = []
        self.sessions = 1

    def listen(self, timeout: float) -> bool:
        return True

    def attest(self, trust):
        self.attestations += 1
        nonce = os.urandom(wire.NONCE_SIZE)
        reply = self.world.enclave.attest(wire.AttestRequest(nonce).to_bytes())
        return verify_attestation(reply, nonce, trust, now_ms())

    def take_notices(self) -> list[bytes]:
        out, self.notices = self.notices, []
        return out

    def take_record_notices(self) -> list[bytes]:
        out, self.record_notices = self.record_notices, []
        return out

    def wait_record_notices(self, timeout: float) -> bool:
        return bool(self.record_notices)

    hearing_records = True

    def budget(self, enclave, stream):
        nonce = os.urandom(wire.NONCE_SIZE)
        reply = self.world.enclave.budget(wire.BudgetRequest(nonce, stream).to_bytes(), now_ms())
        return verify_signed(reply, enclave, ("budget",))

    def close(self) -> None:
        pass


@pytest.fixture
def producer(monkeypatch):
    world = rotating_world()
    fake = FakeTransport(world)
    monkeypatch.setattr(transport, "RecordPublisher", lambda settings, max_unconfirmed, token=None: fake)
    p = Producer(Config(BrokerSettings(), world.trust, None, reattest_seconds=1e9))
    assert fake.attestations == 1
    yield p, fake, world
    p.sealer.encryptor.close()


def _signed(payload: bytes, key: Ed25519PrivateKey) -> bytes:
    return wire.SignedMessage(payload, signing.sign(key, signing.RESULT, payload)).to_bytes()


def test_a_forged_notice_does_not_make_the_producer_attest_again(producer, caplog):
    p, fake, world = producer
    (real,) = world.enclave.rotate(T0).publish  # a real rotation happened, but the producer hears only forgeries
    payload = wire.SignedMessage.from_bytes(real.body).payload
    forged_key = _signed(payload, Ed25519PrivateKey.generate())  # the right notice, another key
    tampered = bytearray(real.body)
    tampered[12] ^= 1  # a payload byte
    elsewhere = KeyRotated(2, 1, T0 + 1, "00" * 32, T0).to_payload()  # the enclave's key, another measurement
    other_measurement = wire.SignedMessage(elsewhere, world.enclave.keys.sign(signing.RESULT, elsewhere)).to_bytes()
    fake.notices = [forged_key, bytes(tampered), b"not a signed message", real.body[:-1], other_measurement]
    with caplog.at_level(logging.WARNING, logger="sealedsum.producer"):
        p.seal_current("s", [1.0])
    assert fake.attestations == 1 and p.enclave.keys.epoch == 1
    assert p.notices_refused == 5
    assert len([r for r in caplog.records if "does not verify" in r.getMessage()]) == 5


def test_a_genuine_notice_makes_the_producer_attest_again_before_the_next_record(producer, caplog):
    p, fake, world = producer
    (real,) = world.enclave.rotate(T0).publish
    fake.notices = [real.body]
    with caplog.at_level(logging.INFO, logger="sealedsum.producer"):
        record = p.seal_current("s", [1.0])
    assert fake.attestations == 2 and p.enclave.keys.epoch == 2
    assert any("announced a key rotation" in r.getMessage() for r in caplog.records)
    assert world.enclave.on_record(record.body, now_ms()).rejection is None
    # Heard again (the enclave republishes until confirmed): nothing new, no attestation.
    fake.notices = [real.body]
    p.seal_current("s", [1.0])
    assert fake.attestations == 2 and p.notices_refused == 0


def test_the_producer_attests_again_after_a_reconnect(producer):
    p, fake, _ = producer
    p.seal_current("s", [1.0])
    assert fake.attestations == 1
    fake.sessions += 1  # the transport's connection was lost and came back
    p.seal_current("s", [1.0])
    p.seal_current("s", [1.0])
    assert fake.attestations == 2


def test_without_a_broker_the_producer_fails_at_once_not_after_waiting_to_listen(world):
    import socket
    import time

    from sealedsum.common.errors import TransportError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(BrokerSettings(url=f"amqp://guest:guest@127.0.0.1:{port}/%2F"), world.trust, None)
    started = time.monotonic()
    with pytest.raises(TransportError, match="cannot reach the broker"):
        Producer(config)
    assert time.monotonic() - started < 5  # not attest_timeout_seconds (10) spent waiting for a binding


def test_broker_trouble_when_attesting_again_defers_it_and_records_are_still_sealed(producer, caplog):
    """After a broker restart the attest queue exists only once the sidecar declared it again:
    the producer seals with the keys it attested meanwhile and tries again later."""
    from sealedsum.common.errors import TransportError

    p, fake, world = producer
    (real,) = world.enclave.rotate(T0).publish
    attest = fake.attest
    fake.attest = lambda trust: (_ for _ in ()).throw(TransportError("no enclave request queue"))
    fake.notices, fake.sessions = [real.body], fake.sessions + 1
    with caplog.at_level(logging.WARNING, logger="sealedsum.producer"):
        record = p.seal_current("s", [1.0])  # not raised: epoch 1 still drains
    assert p.enclave.keys.epoch == 1 and any("could not attest again" in r.getMessage() for r in caplog.records)
    assert world.enclave.on_record(record.body, now_ms()).rejection is None
    fake.attest = attest
    p.seal_current("s", [1.0])  # too soon to try again
    assert fake.attestations == 1
    p._retry_at = 0.0  # the retry time has come
    p.seal_current("s", [1.0])
    assert fake.attestations == 2 and p.enclave.keys.epoch == 2
    p.seal_current("s", [1.0])
    assert fake.attestations == 2  # nothing owed any more


def test_attesting_again_after_broker_trouble_backs_off_as_the_shared_policy_says(producer, caplog):
    """0.5 s after the first failure, then twice as long each time (common.backoff.Backoff), and
    from 0.5 s again once an attestation succeeded."""
    from sealedsum.common.errors import TransportError

    p, fake, world = producer
    attest = fake.attest
    fake.attest = lambda trust: (_ for _ in ()).throw(TransportError("no enclave request queue"))
    fake.sessions += 1
    with caplog.at_level(logging.WARNING, logger="sealedsum.producer"):
        for _ in range(3):
            p.seal_current("s", [1.0])
            p._retry_at = 0.0  # the retry time has come
        fake.attest = attest
        p.seal_current("s", [1.0])  # attests
        fake.attest = lambda trust: (_ for _ in ()).throw(TransportError("no enclave request queue"))
        fake.sessions += 1
        p.seal_current("s", [1.0])
    waits = [r.fields["retry_in_s"] for r in caplog.records if "could not attest again" in r.getMessage()]
    assert waits == [0.5, 1.0, 2.0, 0.5] and fake.attestations == 2
