"""Bad input and broken trust on the real broker: every fault gets its typed error or
dead-letter reason, nothing else is lost or counted, and nothing is sent to an enclave
that failed attestation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time

import pika
import pytest
from nacl.public import PrivateKey, PublicKey, SealedBox

from sealedsum.common import amqp, wire
from sealedsum.common.errors import (
    NonceMismatch,
    ReportDataMismatch,
    StaleQuote,
    UnknownMeasurement,
    UntrustedPlatform,
)
from sealedsum.common.topology import ATTEST_ROUTING_KEY, RECORD_ROUTING_KEY, Topology
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.integration.test_end_to_end import STREAM, _take, capture_queue, drain

pytestmark = pytest.mark.integration


def test_bad_records_are_dead_lettered_with_reasons_and_nothing_else_is_lost(sidecar_factory):
    # "v" is wider, so a two-value record for "s" fits the size limit and fails on its dimension.
    sc = sidecar_factory({"s": STREAM, "v": dict(STREAM, dimension=3)})
    t = sc.config.broker.topology
    rejected_conn, rejected_q = capture_queue(sc, t.rejected_exchange, "")
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as producer:
        good = producer.sealer.seal("s", [42.0])
        sealer = producer.sealer
        x25519 = PublicKey(producer.enclave.keys.x25519)

        def envelope(**changes) -> bytes:
            base = wire.Envelope("s", os.urandom(16), producer.enclave.keys.epoch, int(time.time() * 1000), 0,
                                 producer.enclave.keys.ciphertext_width, (1,))
            env = dataclasses.replace(base, **changes)
            env = dataclasses.replace(env, plaintexts=(0,) * len(env.ciphertexts))  # checked after these
            return SealedBox(x25519).encrypt(env.to_bytes())

        real_ct = sealer.seal("s", [1.0])  # a valid ciphertext to reuse in crafted envelopes
        ct = _ciphertext_of(sc, real_ct.body)
        bad = {
            "undecryptable": [b"garbage bytes that are no sealed box" * 3, good.body[:-1] + bytes([good.body[-1] ^ 1]),
                              SealedBox(PrivateKey.generate().public_key).encrypt(b"x" * 100)],
            "malformed": [SealedBox(x25519).encrypt(b"SSE\x01 too short")],
            "unknown_stream": [envelope(stream="nope", ciphertexts=(ct,))],
            "wrong_dimension": [envelope(ciphertexts=(ct, ct))],
            "bad_ciphertext": [envelope(ciphertexts=(0,))],
            "too_large": [b"\x00" * 200_000],
            "duplicate": [good.body],  # the second copy of `good`
        }
        producer.publish(good)
        for bodies in bad.values():
            for body in bodies:
                producer._transport.publish(body)  # as any client could: the broker sees only bytes
        for i in range(19):
            producer.send("s", [float(i)])
        (release,) = _take(consumer, 1)
    dead = drain(rejected_conn, rejected_q, expect=sum(map(len, bad.values())))
    reasons = sorted(props.headers["x-sealedsum-reason"] for props, _ in dead)
    assert reasons == sorted(r for r, bodies in bad.items() for _ in bodies)
    for props, _ in dead:
        assert props.headers["x-sealedsum-detail"] is not None
    # The dead letters keep the original bytes, so nothing is lost.
    assert {b for _, b in dead} >= set(bad["undecryptable"]) | set(bad["too_large"])
    sc.stop()
    stats = sc.events("stats")[-1]
    assert stats["accepted"] == 20  # good + 19, each once; nothing bad was counted
    assert sum(stats["rejected"].values()) == len(dead)
    assert release.window == 1
    assert sc.process.returncode == 0 and not sc.events("enclave exited; restarting")


def _ciphertext_of(sc, body: bytes) -> int:
    from tests.integration.test_end_to_end import unsealed_keys

    keys = unsealed_keys(sc)
    return wire.Envelope.from_bytes(SealedBox(keys._x25519).decrypt(body)).ciphertexts[0]


class AttestationRelay:
    """A man in the middle on the attestation RPC: forwards requests to the real enclave
    and alters the replies. Producers pointed at its prefix must refuse to send."""

    def __init__(self, sc, mode: str) -> None:
        self.sc, self.mode = sc, mode
        self.settings = dataclasses.replace(sc.config.broker, topology=Topology(f"{sc.config.broker.topology.prefix}-mitm"))
        self.conn = amqp.connect(self.settings)
        ch = self.conn.channel()
        t = self.settings.topology
        ch.queue_declare(t.attest_queue, auto_delete=True)
        ch.exchange_declare(t.attest_exchange, "direct", auto_delete=True)
        ch.queue_bind(t.attest_queue, t.attest_exchange, ATTEST_ROUTING_KEY)
        ch.exchange_declare(self.settings.topology.records_exchange, "direct", auto_delete=True)
        self.capture = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(self.capture, self.settings.topology.records_exchange, RECORD_ROUTING_KEY)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        upstream = amqp.connect(self.sc.config.broker)
        ch = self.conn.channel()
        while not self.stop:
            method, props, body = ch.basic_get(self.settings.topology.attest_queue, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            nonce = wire.AttestRequest.from_bytes(body).nonce
            if self.mode == "nonce":
                nonce = os.urandom(32)  # replay of an attestation made for someone else
            reply = wire.AttestReply.from_bytes(amqp.request_attestation(upstream, self.sc.config.broker, nonce))
            if self.mode == "keys":
                keys = wire.KeyBundle.from_bytes(reply.keys)
                attacker = bytes(PrivateKey.generate().public_key)
                reply = dataclasses.replace(reply, keys=dataclasses.replace(keys, x25519=attacker).to_bytes())
            elif self.mode == "policy":
                policy = json.loads(reply.policy)
                policy["streams"]["s"]["epsilon"] = 50.0
                reply = dataclasses.replace(reply, policy=json.dumps(policy, sort_keys=True, separators=(",", ":")).encode())
            ch.basic_publish("", props.reply_to, reply.to_bytes(),
                             pika.BasicProperties(correlation_id=props.correlation_id))
        upstream.close()

    def sent_records(self) -> int:
        return len(drain(self.conn, self.capture, expect=0, timeout=1.0))

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=10)
        self.conn.close()


# One hash covers keys, policy and nonce together, so the message names all three; an
# altered policy is caught by that hash before the measurement check would name it.
@pytest.mark.parametrize("mode, error, message", [
    ("keys", ReportDataMismatch, "keys, policy or nonce differ from what the quote covers"),
    ("policy", ReportDataMismatch, "keys, policy or nonce differ from what the quote covers"),
    ("nonce", NonceMismatch, "the reply answers another nonce: a replayed or misrouted attestation"),
])
def test_producer_refuses_a_tampered_attestation(sidecar_factory, mode, error, message):
    sc = sidecar_factory({"s": STREAM})
    relay = AttestationRelay(sc, mode)
    try:
        cfg = dataclasses.replace(sc.config, broker=relay.settings)
        with pytest.raises(error) as info:
            with Producer(cfg) as producer:
                producer.send("s", [1.0])
        assert type(info.value) is error and str(info.value) == message
        assert relay.sent_records() == 0
    finally:
        relay.close()


@pytest.mark.parametrize("case, error", [("platform", UntrustedPlatform), ("measurement", UnknownMeasurement),
                                         ("stale", StaleQuote)])
def test_producer_refuses_an_untrusted_enclave_and_sends_nothing(sidecar_factory, case, error):
    sc = sidecar_factory({"s": STREAM})
    conn, q = capture_queue(sc, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY)
    trust = sc.config.trust
    if case == "platform":
        trust = dataclasses.replace(trust, platform_key=EmulatedPlatform.generate().public_key())
    elif case == "measurement":
        trust = dataclasses.replace(trust, measurements=frozenset({os.urandom(32)}))
    else:
        trust = dataclasses.replace(trust, max_quote_age_seconds=1e-6)
    with pytest.raises(error) as info:
        with Producer(dataclasses.replace(sc.config, trust=trust)) as producer:
            producer.send("s", [1.0])
    assert type(info.value) is error
    if case == "platform":
        assert str(info.value) == "quote: signature does not verify"
    elif case == "measurement":
        assert str(info.value) == f"measurement {sc.measurement.hex()} is not in trust.measurements"
    else:
        # The RPC takes at least a millisecond; the age is given to the millisecond.
        assert re.fullmatch(r"quote is \d+\.\d{3} s old \(limit 1e-06 s\)", str(info.value)), str(info.value)
    assert drain(conn, q, expect=0, timeout=1.0) == []


def altered_and_forged(genuine: bytes) -> tuple[bytes, bytes]:
    """A genuine signed result with its sum changed (old signature), and the genuine payload
    signed by a key that is not the enclave's."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sealedsum.common import signing

    message = wire.SignedMessage.from_bytes(genuine)
    payload = json.loads(message.payload)
    payload["sum"] = [payload["sum"][0] + 1000.0]
    altered = wire.SignedMessage(json.dumps(payload).encode(), message.signature).to_bytes()
    forged = wire.SignedMessage(message.payload, signing.sign(Ed25519PrivateKey.generate(), signing.RESULT,
                                                              message.payload)).to_bytes()
    return altered, forged


def test_consumer_rejects_forged_and_altered_results(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    conn, q = capture_queue(sc, t.results_exchange, "s")
    with Producer(sc.config) as producer:
        for i in range(20):
            producer.send("s", [float(i)])
    ((_, genuine),) = drain(conn, q, expect=1)
    altered, forged = altered_and_forged(genuine)
    flipped = genuine[:-10] + bytes([genuine[-10] ^ 0x40]) + genuine[-9:]
    with Consumer(sc.config, "s") as consumer:
        pub = conn.channel()
        for body in (altered, forged, flipped, b"not a result", genuine):
            pub.basic_publish(t.results_exchange, "s", body)
        (release,) = _take(consumer, 1, timeout=10)
        assert consumer.verifier.rejected == 4
    assert release.window == 1 and wire.SignedMessage.from_bytes(genuine).payload == release.to_payload()
