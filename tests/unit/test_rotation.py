"""Key rotation: new encryption keys per epoch, the old epoch drains for a grace period
under its own Paillier key, then is refused; the signing key stays."""

from __future__ import annotations

import os

import pytest

from sealedsum.common import wire
from sealedsum.common.attestation import verify_attestation
from sealedsum.common.errors import ConfigError, RejectReason
from sealedsum.common.results import verify_result
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import TEST_BITS, make_policy, make_world, now_ms, stream_table, checkpoint

T0 = now_ms()
GRACE_S = 60


def rotating_world():
    policy = make_policy({"s": stream_table(window_records=6, min_batch=1, dimension=2, lower=-5.0, upper=5.0,
                                            epsilon=1e7)}, key_grace_seconds=GRACE_S)
    return make_world(EnclaveKeys.generate(TEST_BITS), policy)


def reattest(world):
    nonce = os.urandom(32)
    reply = world.enclave.attest(wire.AttestRequest(nonce).to_bytes())
    return verify_attestation(reply, nonce, world.trust, now_ms())


def test_records_of_both_epochs_fold_into_one_window_and_add_up(small_keys):
    world = rotating_world()
    e = world.enclave
    old_sealer = world.sealer
    for _ in range(2):
        assert e.on_record(old_sealer.seal("s", [1.0, -1.0], now_ms=T0).body, T0).rejection is None
    e.rotate(T0)
    new = reattest(world)
    assert new.keys.epoch == 2 and new.keys.ed25519 == world.attested.keys.ed25519  # same signing key
    assert new.keys.x25519 != world.attested.keys.x25519 and new.keys.paillier_n != world.attested.keys.paillier_n
    new_sealer = RecordSealer(new)
    # Within the grace period the old epoch still counts; the new one counts too.
    for sealer in (old_sealer, new_sealer, old_sealer):
        assert e.on_record(sealer.seal("s", [1.0, -1.0], now_ms=T0 + 1000).body, T0 + 1000).rejection is None
    window = e.streams["s"].current
    assert set(window.totals) == {1, 2} and window.count == 5
    assert e.decryptions == 0


def test_a_window_spanning_a_rotation_releases_the_sum_of_both_epochs():
    world = rotating_world()
    e = world.enclave
    old_sealer = world.sealer
    for _ in range(3):
        e.on_record(old_sealer.seal("s", [1.0, -2.0], now_ms=T0).body, T0)
    e.rotate(T0)
    new_sealer = RecordSealer(reattest(world))
    outs = [e.on_record(new_sealer.seal("s", [1.0, -2.0], now_ms=T0).body, T0) for _ in range(3)]
    (pub,) = outs[-1].publish
    assert pub.message.sum == pytest.approx([6.0, -12.0], abs=1e-3)
    assert e.decryptions == 2 * 2  # one per coordinate and epoch, never per record
    # Consumers that attested before the rotation still verify releases after it.
    assert verify_result(pub.body, world.attested).window == 1


def test_after_the_grace_period_the_old_epoch_is_refused_with_a_reason():
    world = rotating_world()
    e = world.enclave
    old_sealer = world.sealer
    e.rotate(T0)
    e.on_tick(T0 + GRACE_S * 1000 - 1)
    later = T0 + GRACE_S * 1000
    assert e.on_record(old_sealer.seal("s", [1.0, 1.0], now_ms=later).body, later - 1).rejection is None
    e.on_tick(later)
    out = e.on_record(old_sealer.seal("s", [1.0, 1.0], now_ms=later).body, later + 1)
    assert out.rejection.reason is RejectReason.WRONG_EPOCH and "attest again" in out.rejection.detail
    new_sealer = RecordSealer(reattest(world))
    assert e.on_record(new_sealer.seal("s", [1.0, 1.0], now_ms=later).body, later + 2).rejection is None


def test_an_envelope_naming_another_epoch_than_its_box_is_refused():
    world = rotating_world()
    e = world.enclave
    e.rotate(T0)
    new = reattest(world)
    sealer = RecordSealer(new)
    record = sealer.seal("s", [1.0, 1.0], now_ms=T0)
    from nacl.public import PublicKey, SealedBox

    inner = wire.Envelope("s", os.urandom(16), 1, T0, 0, new.keys.ciphertext_width, (1, 1), sealer.producer_id,
                         (0, 0))
    box = SealedBox(PublicKey(new.keys.x25519)).encrypt(inner.to_bytes())  # new key, old epoch number
    assert e.on_record(box, T0).rejection.reason is RejectReason.WRONG_EPOCH
    assert e.on_record(record.body, T0).rejection is None


def test_the_keyring_and_a_two_epoch_window_survive_a_restart(tmp_path):
    world = rotating_world()
    e = world.enclave
    e.on_record(world.sealer.seal("s", [1.0, 1.0], now_ms=T0).body, T0)
    e.rotate(T0)
    e.on_record(RecordSealer(reattest(world)).seal("s", [2.0, 2.0], now_ms=T0).body, T0)
    platform = EmulatedPlatform.generate()
    key = platform.sealing_key(world.measurement)
    keyring = Keyring.unseal(key, world.measurement, e.keyring.seal(key, world.measurement))
    assert sorted(keyring.epochs) == [1, 2] and keyring.current_epoch == 2 and keyring.retire_at == e.keyring.retire_at
    assert EnclaveKeys.unseal(key, world.measurement, e.keyring.seal(key, world.measurement)).epoch == 2
    restored = Enclave(keyring, e.policy, e.policy_bytes, e.code_digest, world.measurement,
                       lambda rd: b"", [checkpoint(e, base=True)], T0)
    w = restored.streams["s"].current
    assert set(w.totals) == {1, 2} and w.count == 2 and w.ciphertexts() == e.streams["s"].current.ciphertexts()


def test_old_retired_epochs_are_forgotten_but_not_while_a_window_uses_them():
    keyring = Keyring.single(EnclaveKeys.generate(TEST_BITS))
    for i in range(6):
        keyring.rotate(TEST_BITS, i, 0)
    assert keyring.retire_due(10, in_use={1})
    assert keyring.current_epoch == 7 and sorted(keyring.retired) == [1, 4, 5, 6]
    assert 1 in keyring.epochs and 2 not in keyring.epochs
    keyring.retire_due(11, in_use=set())
    assert 1 not in keyring.epochs and keyring.status(1) == "unknown"


def test_scheduled_rotation_must_leave_room_for_the_grace_period():
    with pytest.raises(ConfigError, match="must exceed key_grace_seconds"):
        make_policy(key_grace_seconds=600, rotate_keys_every_seconds=300)
    p = make_policy(key_grace_seconds=60, rotate_keys_every_seconds=3600)
    world = make_world(EnclaveKeys.generate(TEST_BITS), p)
    world.enclave.keyring.rotated_at_ms = T0
    assert not world.enclave.rotation_due(T0 + 3599_000) and world.enclave.rotation_due(T0 + 3600_000)
