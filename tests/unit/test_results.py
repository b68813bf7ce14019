"""Released results as consumers see them: a real release verifies, and nothing else does."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import signing, wire
from sealedsum.common.errors import InvalidMessage, InvalidResultSignature
from sealedsum.common.results import Release, verify_result
from sealedsum.consumers.client import ResultVerifier
from sealedsum.sidecar.enclave.release import Publication
from tests.conftest import World, make_policy, make_world, now_ms, stream_table

NOW = now_ms()


def release_one(world: World, values=None, stream: str = "s") -> Publication:
    """Drive the real enclave until it releases a window."""
    values = values or [[float(i)] for i in range(1, 100)]
    for v in values:
        out = world.enclave.on_record(world.sealer.seal(stream, v, now_ms=NOW).body, NOW)
        assert out.rejection is None
        if out.publish:
            return out.publish[0]
    raise AssertionError("no window was released")


@pytest.fixture
def released(world) -> Publication:
    return release_one(world)


def resign(world: World, payload: bytes, key=None, label: str = signing.RESULT) -> bytes:
    sig = signing.sign(key, label, payload) if key is not None else world.enclave.keys.sign(label, payload)
    return wire.SignedMessage(payload, sig).to_bytes()


def test_real_release_verifies(world, released):
    rel = verify_result(released.body, world.attested)
    assert rel == released.message
    assert rel.stream == "s" and rel.window == 1 and rel.dimension == 1
    assert rel.measurement == world.measurement.hex()
    assert rel.key_epoch == world.attested.keys.epoch
    assert rel.mechanism == "laplace" and rel.epsilon == 1.0 and rel.delta == 0.0 and rel.rho is None
    plan = world.enclave.policy.streams["s"].noise_plan()
    assert rel.sum_noise_scale == plan.sum_scale and rel.count_noise_scale == plan.count_scale
    assert rel.sum == [v / 2**16 for v in rel.sum_fixed]
    doc = rel.to_json()
    assert doc["sum"] == rel.sum[0] and doc["sum_noise_scale"] == pytest.approx(plan.sum_scale / 2**16)


def test_gaussian_vector_release_verifies(small_keys):
    w = make_world(small_keys, make_policy({"g": stream_table(dimension=2, mechanism="gaussian", delta=1e-6,
                                                               lower=-1.0, upper=1.0)}))
    signed = release_one(w, [[0.5, -0.5]] * 5, stream="g")
    rel = verify_result(signed.body, w.attested)
    assert rel.dimension == 2 and len(rel.sum) == 2 and rel.rho is not None
    assert rel.rho == pytest.approx(w.enclave.policy.streams["g"].noise_plan().rho)
    assert isinstance(rel.to_json()["sum"], list)


def test_every_byte_flip_is_refused(world, released):
    body = released.body
    verifier = ResultVerifier(world.attested)
    flips = 0
    for i in range(len(body)):
        for mask in (0x01, 0x80):
            t = bytearray(body)
            t[i] ^= mask
            with pytest.raises((InvalidResultSignature, InvalidMessage)) as exc:
                verifier.verify(bytes(t))
            # The signature covers everything, so a flip is always a signature failure.
            assert type(exc.value) is InvalidResultSignature, (i, mask)
            flips += 1
    assert verifier.rejected == flips
    assert verifier.verify(body) == released.message
    assert verifier.rejected == flips


@pytest.mark.parametrize("body", [b"", b"SSS\x01", b"\x00" * 200])
def test_garbage_is_refused(world, body):
    verifier = ResultVerifier(world.attested)
    with pytest.raises(InvalidResultSignature):
        verifier.verify(body)
    assert verifier.rejected == 1


def test_truncated_and_extended(world, released):
    for bad in (released.body[:-1], released.body + b"\x00", released.body[:20]):
        with pytest.raises(InvalidResultSignature):
            verify_result(bad, world.attested)


def test_signed_by_another_key(world, released):
    payload = wire.SignedMessage.from_bytes(released.body).payload
    with pytest.raises(InvalidResultSignature):
        verify_result(resign(world, payload, key=Ed25519PrivateKey.generate()), world.attested)


def test_result_from_another_enclave(world, other_keys):
    other = make_world(other_keys)
    body = release_one(other).body
    verify_result(body, other.attested)
    with pytest.raises(InvalidResultSignature):
        verify_result(body, world.attested)


def test_signed_under_another_label(world, released):
    """Domain separation: the enclave's signature over the same bytes as a quote is no result."""
    payload = wire.SignedMessage.from_bytes(released.body).payload
    with pytest.raises(InvalidResultSignature):
        verify_result(resign(world, payload, label=signing.QUOTE), world.attested)


def _altered(released: Publication, **changes) -> bytes:
    raw = json.loads(wire.SignedMessage.from_bytes(released.body).payload)
    raw.update(changes)
    return json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()


def test_right_key_but_another_measurement(world, released):
    payload = _altered(released, measurement="00" * 32)
    with pytest.raises(InvalidResultSignature):
        verify_result(resign(world, payload), world.attested)
    # The same re-signing with the right measurement is accepted: the check above is the measurement.
    assert verify_result(resign(world, _altered(released)), world.attested) == released.message


def test_altered_payload_without_resigning(world, released):
    msg = wire.SignedMessage.from_bytes(released.body)
    forged = wire.SignedMessage(_altered(released, count=released.message.count + 1000), msg.signature)
    with pytest.raises(InvalidResultSignature):
        verify_result(forged.to_bytes(), world.attested)


@pytest.mark.parametrize("payload", [
    b"not json",
    b"\xff\xfe",
    b"[]",
    b'{"kind": "notice"}',
])
def test_signed_but_not_a_result(world, payload):
    verifier = ResultVerifier(world.attested)
    with pytest.raises(InvalidMessage):
        verifier.verify(resign(world, payload))
    assert verifier.rejected == 1


@pytest.mark.parametrize("changes", [
    {"count": "12"},
    {"count": True},
    {"sum": [1.0, 2.0]},
    {"sum": "1.0"},
    {"sum_fixed": [1.5]},
    {"window": 1.0},
    {"stream": "bad name"},
    {"mean": [1.0, 2.0]},
    {"rho": "x"},
    {"extra": 1},
], ids=lambda c: next(iter(c)))
def test_signed_but_malformed_result(world, released, changes):
    verifier = ResultVerifier(world.attested)
    with pytest.raises(InvalidMessage):
        verifier.verify(resign(world, _altered(released, **changes)))
    assert verifier.rejected == 1


def test_missing_field(world, released):
    raw = json.loads(wire.SignedMessage.from_bytes(released.body).payload)
    del raw["epsilon"]
    with pytest.raises(InvalidMessage):
        verify_result(resign(world, json.dumps(raw).encode()), world.attested)


def test_payload_round_trip_is_canonical(released):
    rel = released.message
    assert Release.from_payload(rel.to_payload()) == rel
    assert wire.SignedMessage.from_bytes(released.body).payload == rel.to_payload()


@pytest.mark.parametrize("change", [
    lambda text: text.replace('{"aggregate"', '{"kind":"result","aggregate"', 1),  # a duplicate key
    lambda text: text.replace('"budget":{', '"budget":{"releases":1,', 1),  # inside the budget object
    lambda text: text.replace('"epsilon":1.0', '"epsilon":NaN', 1),
    lambda text: text.replace('"epsilon":1.0', '"epsilon":Infinity', 1),
    lambda text: text.replace('"epsilon":1.0', '"epsilon":1e400', 1),  # overflows a double
], ids=["duplicate key", "nested duplicate", "NaN", "Infinity", "1e400"])
def test_signed_payloads_are_strict_json(world, released, change):
    """Section 1: a duplicate key, NaN, Infinity or a number beyond the doubles is refused,
    signed or not; the first key of a duplicate pair would otherwise win in some parsers and
    the last in others."""
    text = released.message.to_payload().decode("ascii")
    altered = change(text)
    assert altered != text
    with pytest.raises(InvalidMessage):
        verify_result(resign(world, altered.encode("ascii")), world.attested)
    assert verify_result(resign(world, text.encode("ascii")), world.attested) == released.message


def test_integers_beyond_a_double_are_read_exactly():
    assert wire.strict_json('{"a":[9007199254740993,-4611686018427387905]}') == \
        {"a": [2**53 + 1, -(2**62) - 1]}
