"""Replicas without a broker: frames, the key handshake, a replica's increments and the
release holder's merge (sidecar/cluster, Enclave.merge)."""

from __future__ import annotations

import base64
import os

import pytest

from sealedsum.common import wire
from sealedsum.common.errors import InvalidMessage, RejectReason, ReportDataMismatch, UnknownMeasurement, \
    UntrustedPlatform
from sealedsum.common.policy_parse import enclave_policy
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.cluster import join, worker
from sealedsum.sidecar.enclave import frames
from sealedsum.sidecar.enclave.keyring import Keyring
from sealedsum.sidecar.enclave.service import Enclave, OpenedRecord
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import TEST_BITS, make_world, now_ms, stream_table

SPAN_S = 3600.0  # one window for the whole test


def cluster_policy(platforms, streams=None, peers=()):
    return enclave_policy({"paillier_bits": TEST_BITS, "insecure_test_keys": True},
                          streams or {"s": stream_table(window_records=None, window_seconds=SPAN_S, min_batch=1)},
                          cluster={"shards": 3, "platform_keys": [base64.b64encode(p.public_key()).decode()
                                                                  for p in platforms],
                                   "peer_measurements": [m.hex() for m in peers]})


@pytest.fixture
def replicas(small_keys):
    """A holder and a worker replica of one deployment (the same keys and policy) and a sealer."""
    platform = EmulatedPlatform.generate()
    policy = cluster_policy([platform])
    holder = make_world(small_keys, policy)
    return holder, holder.platform


def sealed(world, n, value=1.0, **kw):
    return [world.sealer.seal("s", [value], **kw).body for _ in range(n)]


def test_a_frame_opens_only_under_its_cluster_key_and_unchanged(small_keys):
    key = Keyring.single(small_keys).cluster_key()
    beat = frames.Heartbeat(os.urandom(16), 123)
    body = frames.seal(key, beat)
    assert frames.open_frame(key, body) == beat
    assert b"123" not in body  # encrypted
    with pytest.raises(InvalidMessage):
        frames.open_frame(os.urandom(32), body)
    tampered = bytearray(body)
    tampered[-1] ^= 1
    with pytest.raises(InvalidMessage):
        frames.open_frame(key, bytes(tampered))


def test_increments_merge_into_the_holders_window_and_a_duplicate_on_another_shard_is_refused(replicas):
    world, _ = replicas
    enclave = world.enclave
    bodies = sealed(world, 6)
    opened = worker.checked([enclave.open(b) for b in bodies])
    assert all(isinstance(o, OpenedRecord) for o in opened)
    t = now_ms()
    a, _ = worker.increment(os.urandom(16), 1, opened[:3], t, t)
    b, _ = worker.increment(os.urandom(16), 1, opened[3:], t, t)
    effects, refused = enclave.merge(a, t)
    assert refused == () and effects.checkpoint
    effects, refused = enclave.merge(b, t)
    assert refused == ()
    state = enclave.streams["s"]
    assert state.current.count == 6
    # The same record published again, read by another replica: refused, and nothing counted.
    again = worker.checked([enclave.open(bodies[0]), enclave.open(world.sealer.seal("s", [1.0]).body)])
    c, index = worker.increment(os.urandom(16), 1, again, t, t)
    _, refused = enclave.merge(c, t)
    assert [(i, r.reason) for i, r in refused] == [(0, RejectReason.DUPLICATE)]
    assert state.current.count == 6
    # Sent again without it, the other record counts.
    d, _ = worker.increment(c.worker, 2, [again[1]], t, t)
    assert enclave.merge(d, t)[1] == ()
    assert state.current.count == 7
    # The merged total decrypts to the sum of the seven records (fixed point).
    keys = enclave.keys
    (total,) = state.current.totals[keys.epoch]
    f = enclave.policy.streams["s"].fraction_bits
    assert keys.decrypt_total(int(total)) == 7 * round(1.0 * 2 ** f)


def test_a_liar_is_refused_by_its_replica_before_anything_reaches_the_holder(replicas):
    world, _ = replicas
    enclave = world.enclave
    honest = enclave.open(world.sealer.seal("s", [2.0]).body)
    liar = enclave.open(world.sealer.seal("s", [3.0]).body)
    forged = OpenedRecord(wire.Envelope(**{**{f: getattr(liar.envelope, f) for f in wire.Envelope.__dataclass_fields__},
                                           "ciphertexts": honest.envelope.ciphertexts}), liar.stream, liar.keys)
    out = worker.checked([honest, forged])
    assert isinstance(out[0], OpenedRecord)
    assert out[1].reason == RejectReason.OUT_OF_RANGE


def test_keys_go_only_to_a_replica_that_attests_and_come_only_from_one(small_keys):
    platform = EmulatedPlatform.generate()
    policy = cluster_policy([platform])
    digest, measurement = measure.measure(policy.to_bytes())
    keyring = Keyring.single(small_keys)
    holder = Enclave(keyring, policy, policy.to_bytes(), digest, measurement, lambda rd: platform.quote(measurement, rd))
    req, box = join.request(lambda rd: platform.quote(measurement, rd), digest, policy.to_bytes())
    assert join.check_request(join.JoinRequest.from_bytes(req.to_bytes()), policy.cluster, measurement, now_ms()) \
        == measurement
    reply = join.JoinReply.from_bytes(join.answer(req, keyring, holder.attest).to_bytes())
    got = join.accept(reply, req, box, policy.cluster, measurement, now_ms())
    assert got.current.bundle_bytes == keyring.current.bundle_bytes
    assert got.cluster_key() == keyring.cluster_key()

    # Another policy is another measurement: refused unless listed.
    other = cluster_policy([platform], {"s": stream_table(window_records=None, window_seconds=SPAN_S, min_batch=2)})
    odigest, omeasurement = measure.measure(other.to_bytes())
    bad, _ = join.request(lambda rd: platform.quote(omeasurement, rd), odigest, other.to_bytes())
    with pytest.raises(UnknownMeasurement):
        join.check_request(bad, policy.cluster, measurement, now_ms())
    # A platform the policy does not list.
    rogue = EmulatedPlatform.generate()
    forged, _ = join.request(lambda rd: rogue.quote(measurement, rd), digest, policy.to_bytes())
    with pytest.raises(UntrustedPlatform):
        join.check_request(forged, policy.cluster, measurement, now_ms())
    # A quote that binds another box key (a request rebuilt around someone else's quote).
    swapped = join.JoinRequest(req.nonce, bytes(32), digest, policy.to_bytes(), req.quote)
    with pytest.raises(ReportDataMismatch):
        join.check_request(swapped, policy.cluster, measurement, now_ms())
    # The joiner refuses keys that are not the attested ones.
    impostor = Keyring.single(type(small_keys).generate(TEST_BITS))
    mixed = join.JoinReply(reply.attestation, join.answer(req, impostor, holder.attest).keys)
    with pytest.raises(ReportDataMismatch):
        join.accept(mixed, req, box, policy.cluster, measurement, now_ms())


def test_the_per_producer_bound_holds_across_replicas(small_keys):
    """Two replicas each see part of one producer's records: the holder counts them together."""
    platform = EmulatedPlatform.generate()
    policy = cluster_policy([platform], {"s": stream_table(window_records=None, window_seconds=SPAN_S, min_batch=1,
                                                           max_records_per_producer=2)})
    world = make_world(small_keys, policy)
    enclave = world.enclave
    sealer = RecordSealer(world.attested, producer_id=b"\x01" * 16)
    t = now_ms()
    first = worker.checked([enclave.open(sealer.seal("s", [1.0]).body) for _ in range(2)])
    second = worker.checked([enclave.open(sealer.seal("s", [1.0]).body)])
    assert enclave.merge(worker.increment(os.urandom(16), 1, first, t, t)[0], t)[1] == ()
    _, refused = enclave.merge(worker.increment(os.urandom(16), 1, second, t, t)[0], t)
    assert [r.reason for _, r in refused] == [RejectReason.CONTRIBUTION_LIMIT]
    assert enclave.streams["s"].current.count == 2
    # Within one increment too: the third of three is refused, and nothing of it counts.
    other = RecordSealer(world.attested, producer_id=b"\x02" * 16)
    three = worker.checked([enclave.open(other.seal("s", [1.0]).body) for _ in range(3)])
    _, refused = enclave.merge(worker.increment(os.urandom(16), 2, three, t, t)[0], t)
    assert [(i, r.reason) for i, r in refused] == [(2, RejectReason.CONTRIBUTION_LIMIT)]
    assert enclave.streams["s"].current.count == 2


def test_a_late_increment_never_changes_a_closed_window(small_keys):
    """An increment read in a window the holder has closed counts in the open one (window 0)
    or is refused late_window (its records asked for the closed one); one read ahead of the
    holder's open window waits (parks)."""
    platform = EmulatedPlatform.generate()
    span = 1000
    policy = cluster_policy([platform], {"s": stream_table(window_records=None, window_seconds=span / 1000,
                                                           min_batch=1, epsilon=1e6)})
    world = make_world(small_keys, policy)
    enclave = world.enclave
    w = now_ms() // span
    start = w * span + 100
    enclave.on_tick(start)
    assert enclave.streams["s"].current.index == w
    early = worker.checked([enclave.open(world.sealer.seal("s", [5.0], now_ms=start).body)])
    ahead, _ = worker.increment(os.urandom(16), 1, early, start + span, start + span)
    assert enclave.parks(ahead, start)  # read in w + 1 while the holder still has w open
    assert enclave.merge(worker.increment(os.urandom(16), 1, early, start, start)[0], start)[1] == ()
    # The holder moves on to w + 1: window w closes with one record, and is drawn.
    enclave.on_tick(start + span)
    assert enclave.streams["s"].current.index == w + 1
    # A replica that was slow: read in w, arriving now. Its window-0 record counts in w + 1,
    # its record that asked for window w is refused; window w's total is what it was.
    late_records = worker.checked([enclave.open(world.sealer.seal("s", [1.0], now_ms=start).body),
                                   enclave.open(world.sealer.seal("s", [1.0], now_ms=start, window=w).body)])
    late, _ = worker.increment(os.urandom(16), 2, late_records, start, start)
    assert not enclave.parks(late, start + span)
    _, refused = enclave.merge(late, start + span)
    assert [(i, r.reason) for i, r in refused] == [(1, RejectReason.LATE_WINDOW)]
    again, _ = worker.increment(late.worker, 3, late_records[:1], start, start)
    assert enclave.merge(again, start + span)[1] == ()
    assert enclave.streams["s"].current.count == 1
    (release,) = [p.message for p in enclave.pending.values() if p.message.kind == "result"]
    assert (release.window, release.count) == (w, 1) and release.sum[0] == pytest.approx(5.0, abs=0.01)


def test_the_state_stream_is_read_along_one_line_of_entries():
    from sealedsum.sidecar.cluster.runtime import state_line

    def entry(writer, v, prev, base, state):
        return {"writer": writer, "v": v, "prev": list(prev) if prev else None, "base": base, "state": state}

    a1 = entry("a", 1, None, True, {"n": 1})
    a2 = entry("a", 2, ("a", 1), False, {"n": 2})
    # b took over after a2: a base that follows a's head.
    b3 = entry("b", 3, ("a", 2), True, {"n": 3})
    # a, deposed and not knowing it yet, writes one more entry after its own a2: off the line.
    a3 = entry("a", 3, ("a", 2), False, {"n": "late"})
    b4 = entry("b", 4, ("b", 3), False, {"n": 4})
    state, head = state_line([a1, {"marker": "x"}, a2, b3, a3, b4])
    assert state == [{"n": 3}, {"n": 4}] and head == ("b", 4)
    # a's late write landing before b's first base: b's base follows a2, which is on the line,
    # and cuts a3 off (a3 landed after b took the lock, so it was never confirmed to a).
    state, head = state_line([a1, a2, a3, b3, b4])
    assert state == [{"n": 3}, {"n": 4}] and head == ("b", 4)
    # A late journal entry that follows nothing on the line is skipped wherever it lands.
    assert state_line([a1, a2, b3, a3, b4]) == ([{"n": 3}, {"n": 4}], ("b", 4))
    # Without a new holder, a's own entries are the line.
    assert state_line([a1, a2, a3]) == ([{"n": 1}, {"n": 2}, {"n": "late"}], ("a", 3))
    assert state_line([]) == (None, None)
    assert state_line([a2]) == (None, None)  # a journal entry with nothing before it
