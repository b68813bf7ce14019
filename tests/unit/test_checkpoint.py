"""Exactly-once accounting without a broker: what the journal holds after each
checkpoint is exactly what a restarted enclave continues from."""

from __future__ import annotations

import os
import shutil

import pytest

from sealedsum.common.errors import RejectReason, SealingError
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.common.errors import RollbackDetected
from sealedsum.sidecar.enclave_process.store import SealedStateStore
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import PlatformCounter, make_policy, make_world, now_ms, stream_table, checkpoint


Counter = PlatformCounter


@pytest.fixture
def setup(small_keys, tmp_path):
    policy = make_policy({"s": stream_table(window_records=10, min_batch=1, dimension=2, lower=-5.0, upper=5.0,
                                            epsilon=1e7)})
    world = make_world(small_keys, policy)
    platform = EmulatedPlatform.init(tmp_path / "platform")

    def store():
        return SealedStateStore(tmp_path, platform.sealing_key(world.measurement), world.measurement,
                                Counter(platform, world.measurement))

    def restart(checkpoints):
        e = world.enclave
        return Enclave(small_keys, policy, e.policy_bytes, e.code_digest, world.measurement,
                       lambda rd: platform.quote(world.measurement, rd), checkpoints, now_ms())

    return world, store, restart, tmp_path


def test_journal_checkpoints_restore_windows_and_seen_ids(setup):
    world, store, restart, _ = setup
    s = store()
    s.save(checkpoint(world.enclave, base=True))
    bodies = [world.sealer.seal("s", [1.0, -2.0]).body for _ in range(7)]
    for i, body in enumerate(bodies):
        assert world.enclave.on_record(body, now_ms()).rejection is None
        if i in (2, 5):
            s.append(checkpoint(world.enclave, base=False))  # checkpoints after records 3 and 6
    # The enclave dies here: record 7 was never checkpointed (so never acknowledged).
    loaded = store().load()
    assert len(loaded) == 3  # base + two journal chunks
    e2 = restart(loaded)
    window = e2.streams["s"].current
    assert window.count == 6 and window.index == 1
    # Redelivered: the six checkpointed records are duplicates, the seventh counts now.
    reasons = [e2.on_record(b, now_ms()).rejection for b in bodies]
    assert all(r.reason is RejectReason.DUPLICATE for r in reasons[:6]) and reasons[6] is None
    # The totals survived as ciphertexts: 7 records of [1, -2], noise negligible at this epsilon.
    for b in [world.sealer.seal("s", [1.0, -2.0]).body for _ in range(3)]:
        out = e2.on_record(b, now_ms())
    (pub,) = out.publish
    assert pub.message.sum == pytest.approx([10.0, -20.0], abs=1e-3)


def test_a_torn_last_chunk_is_cut_off(setup):
    world, store, restart, tmp = setup
    s = store()
    s.save(checkpoint(world.enclave, base=True))
    world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
    s.append(checkpoint(world.enclave, base=False))
    good = s.journal_path.stat().st_size
    world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
    entry = checkpoint(world.enclave, base=False)

    class Dies(Counter):
        def advance(self, value):
            raise KeyboardInterrupt

    dying = SealedStateStore(tmp, s._key, world.measurement, Dies(None, None))
    dying.version = s.version
    with pytest.raises(KeyboardInterrupt):
        dying.append(entry)  # written and fsynced, counter not advanced: still a valid checkpoint
    with open(s.journal_path, "ab") as f:
        f.write(b"\x00\x00\x00\x00\x00\x00\x00\x09\x00\x00\x01")  # and then a torn header
    loaded = store().load()
    assert len(loaded) == 3 and restart(loaded).streams["s"].current.count == 2
    assert s.journal_path.stat().st_size > good  # the valid chunk stays, the torn bytes went


def test_a_rolled_back_journal_is_refused(setup):
    world, store, _, tmp = setup
    s = store()
    s.save(checkpoint(world.enclave, base=True))
    world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
    s.append(checkpoint(world.enclave, base=False))
    shutil.copy(s.journal_path, tmp / "journal.old")
    world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
    s.append(checkpoint(world.enclave, base=False))
    shutil.copy(tmp / "journal.old", s.journal_path)
    with pytest.raises(RollbackDetected):
        store().load()


def test_a_damaged_chunk_in_the_middle_is_refused(setup):
    world, store, _, _ = setup
    s = store()
    s.save(checkpoint(world.enclave, base=True))
    for _ in range(2):
        world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
        s.append(checkpoint(world.enclave, base=False))
    data = bytearray(s.journal_path.read_bytes())
    data[20] ^= 1
    s.journal_path.write_bytes(bytes(data))
    with pytest.raises(SealingError, match="damaged"):
        store().load()


def test_a_new_base_empties_the_journal_and_leftovers_are_skipped(setup):
    world, store, restart, _ = setup
    s = store()
    s.save(checkpoint(world.enclave, base=True))
    world.enclave.on_record(world.sealer.seal("s", [1.0, 1.0]).body, now_ms())
    s.append(checkpoint(world.enclave, base=False))
    leftover = s.journal_path.read_bytes()
    s.save(checkpoint(world.enclave, base=True))
    assert s.journal_path.read_bytes() == b""
    s.journal_path.write_bytes(leftover)  # a crash between the base rename and the truncation
    loaded = store().load()
    assert len(loaded) == 1 and restart(loaded).streams["s"].current.count == 1
    assert not os.path.exists(str(s.base_path) + ".tmp")
