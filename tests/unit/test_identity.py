"""Producer identity: envelopes signed with enrolled Ed25519 keys inside the sealed box;
unknown, revoked and forged signers are refused with their reasons."""

from __future__ import annotations

import base64
import dataclasses
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.public import PublicKey, SealedBox

from sealedsum.common import signing, wire
from sealedsum.common.errors import ConfigError, InvalidMessage, PolicyMismatch, RejectReason
from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
from sealedsum.producers import identity as identity_mod
from sealedsum.producers.client import RecordSealer
from tests.conftest import TEST_BITS, make_world, now_ms, stream_table

ALICE, BOB, MALLORY = (Ed25519PrivateKey.generate() for _ in range(3))


def b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


def policy(required=True, **stream):
    return enclave_policy(
        {"paillier_bits": TEST_BITS, "insecure_test_keys": True},
        {"s": stream_table(window_records=50, min_batch=1, **stream)},
        {"required": required, "enrolled": {"alice": b64(ALICE)}, "revoked": {"bob": b64(BOB)}},
    )


@pytest.fixture
def signed_world(small_keys):
    return make_world(small_keys, policy())


def reason(world, sealer, values=(1.0,)):
    out = world.enclave.on_record(sealer.seal("s", list(values)).body, now_ms())
    return out.rejection.reason if out.rejection else None


def test_an_enrolled_producer_is_counted_under_the_id_its_key_stands_for(signed_world):
    alice = RecordSealer(signed_world.attested, identity=ALICE)
    assert alice.producer_id == wire.producer_id_of(ALICE.public_key().public_bytes_raw())
    assert reason(signed_world, alice) is None
    assert signed_world.enclave.streams["s"].current.count == 1


@pytest.mark.parametrize("who, expected", [(BOB, RejectReason.REVOKED_PRODUCER), (MALLORY, RejectReason.UNKNOWN_PRODUCER),
                                           (None, RejectReason.UNKNOWN_PRODUCER)])
def test_revoked_unknown_and_unsigned_producers_are_refused(signed_world, who, expected):
    sealer = RecordSealer(signed_world.attested, identity=who, check_enrollment=False)
    assert reason(signed_world, sealer) is expected
    assert signed_world.enclave.stats.accepted == 0


def test_unsigned_records_pass_where_identity_is_not_required(small_keys):
    world = make_world(small_keys, policy(required=False))
    assert reason(world, RecordSealer(world.attested)) is None
    assert reason(world, RecordSealer(world.attested, identity=MALLORY, check_enrollment=False)) \
        is RejectReason.UNKNOWN_PRODUCER
    # The client library says so before sending anything.
    with pytest.raises(PolicyMismatch, match="identity key is unknown"):
        RecordSealer(world.attested, identity=MALLORY)


def _seal_wrapped(world, wrapped: bytes) -> bytes:
    return SealedBox(PublicKey(world.attested.keys.x25519)).encrypt(wrapped)


def test_forged_signatures_and_borrowed_ids_are_refused(signed_world):
    w = signed_world
    alice_pk = ALICE.public_key().public_bytes_raw()
    env = wire.Envelope("s", os.urandom(16), w.attested.keys.epoch, now_ms(), 0, w.attested.keys.ciphertext_width,
                        (1,), wire.producer_id_of(alice_pk), (0,)).to_bytes()
    # Mallory signs but claims Alice's key.
    forged = wire.SignedEnvelope(alice_pk, signing.sign(MALLORY, signing.ENVELOPE, env), env).to_bytes()
    # Alice's genuine signature, over an envelope altered afterwards.
    good_sig = signing.sign(ALICE, signing.ENVELOPE, env)
    altered = wire.SignedEnvelope(alice_pk, good_sig, env[:-1] + bytes([env[-1] ^ 2])).to_bytes()
    # Alice's key and signature, but someone else's producer id.
    other_env = wire.Envelope.from_bytes(env)
    other_env = dataclasses.replace(other_env, producer_id=b"X" * 16).to_bytes()
    borrowed = wire.SignedEnvelope(alice_pk, signing.sign(ALICE, signing.ENVELOPE, other_env), other_env).to_bytes()
    # A signature made for a result, replayed as an envelope signature.
    cross = wire.SignedEnvelope(alice_pk, signing.sign(ALICE, signing.RESULT, env), env).to_bytes()
    for wrapped in (forged, altered, borrowed, cross):
        out = w.enclave.on_record(_seal_wrapped(w, wrapped), now_ms())
        assert out.rejection.reason is RejectReason.BAD_SIGNATURE, out.rejection
    genuine = wire.SignedEnvelope(alice_pk, good_sig, env).to_bytes()
    assert w.enclave.on_record(_seal_wrapped(w, genuine), now_ms()).rejection is None


def test_per_producer_bound_uses_the_authenticated_id(small_keys):
    world = make_world(small_keys, policy(max_records_per_producer=1))
    alice = RecordSealer(world.attested, identity=ALICE)
    assert reason(world, alice) is None
    assert reason(world, alice) is RejectReason.CONTRIBUTION_LIMIT


@pytest.mark.parametrize("identities, message", [
    ({"enrolled": {"a": "not base64!"}}, "not base64"),
    ({"enrolled": {"a": base64.b64encode(b"short").decode()}}, "32-byte"),
    ({"enrolled": {"a": b64(ALICE)}, "revoked": {"a2": b64(ALICE)}}, "both enrolled and revoked"),
    ({"required": True}, "no key is enrolled"),
    ({"enroled": {}}, "unknown key"),
])
def test_identity_config_errors(identities, message):
    with pytest.raises(ConfigError, match=message):
        enclave_policy({"paillier_bits": TEST_BITS, "insecure_test_keys": True},
                                   {"s": stream_table()}, identities)


def test_identities_are_part_of_the_attested_policy():
    p = policy()
    assert policy_from_bytes(p.to_bytes()) == p
    assert json.loads(p.to_bytes())["identities"]["revoked"] == {"bob": b64(BOB)}
    plain = enclave_policy({"paillier_bits": TEST_BITS, "insecure_test_keys": True}, {"s": stream_table()})
    assert "identities" not in json.loads(plain.to_bytes())


def test_keygen_writes_a_private_file_once(tmp_path):
    path = tmp_path / "id.json"
    key = identity_mod.generate(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert identity_mod.load(path).private_bytes_raw() == key.private_bytes_raw()
    with pytest.raises(ConfigError, match="exists already"):
        identity_mod.generate(path)


@pytest.mark.parametrize("table", ["enrolled", "revoked"])
def test_small_order_keys_cannot_be_enrolled(table):
    """Section 4 (and 10.4): enrolled and revoked keys alike, in a configuration and in attested
    policy bytes; the identity point (small order) and a non-canonical encoding of it."""
    enclave = {"paillier_bits": TEST_BITS, "insecure_test_keys": True}
    good = base64.b64encode(ALICE.public_key().public_bytes_raw()).decode()
    for bad in (bytes([1] + [0] * 31), bytes([0xee] + [0xff] * 30 + [0x7f])):
        text = base64.b64encode(bad).decode()
        with pytest.raises(ConfigError, match="not a valid Ed25519 public key"):
            enclave_policy(enclave, {"s": stream_table()}, {"required": table == "enrolled", table: {"zero": text}})
        attested = enclave_policy(enclave, {"s": stream_table()}, {table: {"zero": good}}).to_bytes()
        with pytest.raises(InvalidMessage, match="not a valid Ed25519 public key"):
            policy_from_bytes(attested.replace(good.encode(), text.encode()))


def test_an_unsigned_record_cannot_claim_an_enrolled_id(small_keys):
    world = make_world(small_keys, policy(required=False))
    claimer = RecordSealer(world.attested, producer_id=wire.producer_id_of(ALICE.public_key().public_bytes_raw()))
    assert reason(world, claimer) is RejectReason.BAD_SIGNATURE


def test_dead_letter_details_name_no_producer(signed_world):
    out = signed_world.enclave.on_record(RecordSealer(signed_world.attested, identity=BOB, check_enrollment=False)
                                         .seal("s", [1.0]).body, now_ms())
    assert "bob" not in out.rejection.detail
