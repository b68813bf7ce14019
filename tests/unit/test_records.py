"""The enclave's record path: every bad record ends as a ``RecordRejected`` with the
right reason, nothing else is lost or counted, and only window totals are decrypted."""

from __future__ import annotations

import os
import struct

import pytest
from nacl.public import PublicKey, SealedBox
from phe import PaillierPublicKey

from sealedsum.common import wire
from sealedsum.common.errors import RecordRejected, RejectReason
from sealedsum.sidecar.enclave.service import Effects, Enclave
from tests.conftest import World, make_policy, make_world, now_ms, stream_table

NOW = now_ms()


# -- helpers ------------------------------------------------------------------------
def valid_ct(world: World, value: int = 7) -> int:
    return PaillierPublicKey(world.attested.keys.paillier_n).encrypt(value).ciphertext(be_secure=False)


def envelope(world: World, **fields) -> wire.Envelope:
    keys = world.attested.keys
    base = dict(stream="s", record_id=os.urandom(wire.RECORD_ID_SIZE), key_epoch=keys.epoch,
                sent_at_ms=NOW, window=0, width=keys.ciphertext_width, ciphertexts=(valid_ct(world),))
    base.update(fields)
    # What valid_ct encrypts, one per ciphertext: tests of other checks state the truth.
    base.setdefault("plaintexts", (7,) * len(base["ciphertexts"]))
    return wire.Envelope(**base)


def seal_bytes(world: World, plaintext: bytes) -> bytes:
    """Seal arbitrary bytes to the attested X25519 key, as any holder of the public key can."""
    return SealedBox(PublicKey(world.attested.keys.x25519)).encrypt(plaintext)


def seal_env(world: World, **fields) -> bytes:
    return seal_bytes(world, envelope(world, **fields).to_bytes())


def valid_body(world: World, value: float = 1.0, **kw) -> bytes:
    return world.sealer.seal("s", [value], now_ms=kw.pop("now_ms", NOW), **kw).body


def totals(enclave: Enclave, stream: str = "s") -> tuple[int, ...]:
    return enclave.streams[stream].current.ciphertexts()


def snapshot(enclave: Enclave, stream: str = "s") -> tuple:
    state = enclave.streams[stream]
    return (enclave.stats.accepted, state.current.index, state.current.count, totals(enclave, stream),
            dict(state.seen), enclave.stats.windows_released, enclave.stats.windows_withheld,
            enclave.keys.decryptions)


def assert_rejected(world: World, body: bytes, reason: RejectReason, now: int = NOW) -> Effects:
    """``body`` is rejected for ``reason`` and nothing but the rejection counter moved;
    a valid record afterwards is still accepted and counted."""
    enclave = world.enclave
    before = snapshot(enclave)
    rejected_before = dict(enclave.stats.rejected)
    pending_before = dict(enclave.pending)
    outcome = enclave.on_record(body, now)
    assert isinstance(outcome.rejection, RecordRejected)
    assert outcome.rejection.reason is reason, outcome.rejection
    assert not outcome.rejection.detail.startswith("internal error")
    assert outcome.publish == ()
    assert snapshot(enclave) == before
    expected = dict(rejected_before)
    expected[reason.value] = expected.get(reason.value, 0) + 1
    assert {k: v for k, v in enclave.stats.rejected.items() if v} == expected  # only this counter moved
    assert enclave.pending == pending_before
    # The stream still works: a valid record is accepted and counted.
    state = enclave.streams["s"]
    count = state.current.count
    ok = enclave.on_record(valid_body(world, now_ms=now), now)
    assert ok.rejection is None
    assert enclave.stats.accepted == before[0] + 1
    assert state.current.count == count + 1 or (ok.publish and state.current.count == 0)
    return outcome


def accept(world: World, body: bytes, now: int = NOW) -> Effects:
    outcome = world.enclave.on_record(body, now)
    assert outcome.rejection is None, outcome.rejection
    return outcome


@pytest.fixture
def big_window(small_keys) -> World:
    """A stream whose window never closes during a test (no releases to account for)."""
    return make_world(small_keys, make_policy({"s": stream_table(window_records=1000, min_batch=1)}))


# -- sealed box ---------------------------------------------------------------------
def test_valid_record_is_accepted_and_counted(world):
    before = totals(world.enclave)
    outcome = accept(world, valid_body(world))
    assert outcome.publish == ()
    assert world.enclave.stats.accepted == 1
    assert world.enclave.streams["s"].current.count == 1
    assert totals(world.enclave) != before
    assert world.enclave.keys.decryptions == 0


@pytest.mark.parametrize("position", [0, 1, 31, 32, 47, 48, 100, -2, -1])
def test_tampered_sealed_box_is_undecryptable(world, position):
    body = bytearray(valid_body(world))
    body[position] ^= 0x01
    assert_rejected(world, bytes(body), RejectReason.UNDECRYPTABLE)


@pytest.mark.parametrize("body", [b"", b"\x00", os.urandom(47), os.urandom(48), os.urandom(300)],
                         ids=["empty", "one-byte", "short", "overhead-only", "garbage"])
def test_garbage_is_undecryptable(world, body):
    assert_rejected(world, body, RejectReason.UNDECRYPTABLE)


def test_truncated_and_extended_boxes_are_undecryptable(world):
    body = valid_body(world)
    assert_rejected(world, body[:-1], RejectReason.UNDECRYPTABLE)
    assert_rejected(world, body[1:], RejectReason.UNDECRYPTABLE)
    assert_rejected(world, body + b"\x00", RejectReason.UNDECRYPTABLE)


def test_record_sealed_to_another_enclave_is_undecryptable(world, other_keys):
    other = make_world(other_keys)
    body = other.sealer.seal("s", [1.0], now_ms=NOW).body
    # The same body is fine for the enclave it was sealed to ...
    assert other.enclave.on_record(body, NOW).rejection is None
    # ... and opaque to ours.
    assert_rejected(world, body, RejectReason.UNDECRYPTABLE)


def test_oversized_body_is_too_large(world):
    limit = world.enclave.size_limit
    assert len(valid_body(world)) <= limit
    assert_rejected(world, os.urandom(limit + 1), RejectReason.TOO_LARGE)
    assert_rejected(world, b"\x00" * (10 * limit), RejectReason.TOO_LARGE)
    # At the limit, size is not the reason.
    assert_rejected(world, os.urandom(limit), RejectReason.UNDECRYPTABLE)


# -- envelope -----------------------------------------------------------------------
def _raw_envelope(world: World, *, count: int = 1, width: int | None = None, name: bytes = b"s",
                  cts: bytes | None = None) -> bytes:
    keys = world.attested.keys
    width = keys.ciphertext_width if width is None else width
    cts = valid_ct(world).to_bytes(keys.ciphertext_width, "big") if cts is None else cts
    return (wire.ENVELOPE_MAGIC + os.urandom(16) + bytes(16) + struct.pack(">IQQB", keys.epoch, NOW, 0, len(name)) + name
            + struct.pack(">HH", count, width) + cts)


def test_sealed_non_envelopes_are_malformed(world):
    good = envelope(world).to_bytes()
    cases = {
        "arbitrary": b"hello, enclave",
        "empty": b"",
        "truncated": good[:-1],
        "header-only": good[:46],
        "trailing": good + b"\x00",
        "bad-magic": b"SSX\x01" + good[4:],
        "bad-version": b"SSE\x01" + good[4:],
        "count-zero": _raw_envelope(world, count=0, cts=b""),
        "width-zero": _raw_envelope(world, width=0, cts=b""),
        "non-ascii-name": _raw_envelope(world, name="é".encode()),
        "bad-name": _raw_envelope(world, name=b"a b"),
        "empty-name": _raw_envelope(world, name=b""),
    }
    for label, plaintext in cases.items():
        outcome = assert_rejected(world, seal_bytes(world, plaintext), RejectReason.MALFORMED)
        assert outcome.rejection.reason is RejectReason.MALFORMED, label


def test_unknown_stream(world):
    assert_rejected(world, seal_env(world, stream="nope"), RejectReason.UNKNOWN_STREAM)
    assert_rejected(world, seal_env(world, stream="S"), RejectReason.UNKNOWN_STREAM)


def test_wrong_dimension(small_keys):
    # Two streams, so the size limit admits three ciphertexts and dimension is what fails.
    w = make_world(small_keys, make_policy({"s": stream_table(), "v": stream_table(dimension=3)}))
    ct = valid_ct(w)
    assert_rejected(w, seal_env(w, ciphertexts=(ct, ct)), RejectReason.WRONG_DIMENSION)
    assert_rejected(w, seal_env(w, ciphertexts=(ct, ct, ct)), RejectReason.WRONG_DIMENSION)
    for cts in [(ct,), (ct, ct)]:
        out = w.enclave.on_record(seal_env(w, stream="v", ciphertexts=cts), NOW)
        assert out.rejection.reason is RejectReason.WRONG_DIMENSION
        assert w.enclave.streams["v"].current.count == 0
    assert w.enclave.on_record(w.sealer.seal("v", [1, 2, 3], now_ms=NOW).body, NOW).rejection is None
    assert w.enclave.streams["v"].current.count == 1


def test_more_values_than_any_stream_takes_is_too_large(world):
    """The size limit follows the widest stream, so extra ciphertexts fail on size first."""
    ct = valid_ct(world)
    assert_rejected(world, seal_env(world, ciphertexts=(ct, ct)), RejectReason.TOO_LARGE)


@pytest.mark.parametrize("epoch", [0, 2, 2**32 - 1])
def test_wrong_epoch(world, epoch):
    assert world.attested.keys.epoch != epoch
    assert_rejected(world, seal_env(world, key_epoch=epoch), RejectReason.WRONG_EPOCH)


def test_bad_ciphertexts(world):
    keys = world.enclave.keys
    n, nsq, width = keys.paillier_public.n, keys.nsquare, keys.ciphertext_width
    p = keys._paillier.p
    for c in (0, nsq, nsq + 1, (1 << (8 * width)) - 1, p, n, 2 * n, p * p, keys._paillier.q):
        assert_rejected(world, seal_env(world, ciphertexts=(c,)), RejectReason.BAD_CIPHERTEXT)
    # Wrong width, even for an otherwise valid ciphertext.
    assert_rejected(world, seal_env(world, width=width + 1), RejectReason.BAD_CIPHERTEXT)
    assert_rejected(world, seal_env(world, width=width + 1, ciphertexts=(1,)), RejectReason.BAD_CIPHERTEXT)
    assert_rejected(world, seal_env(world, width=width - 1, ciphertexts=(1,)), RejectReason.BAD_CIPHERTEXT)
    # The edges of the valid range are accepted: 1 and n²-1 = (-1)^n, both encryptions of 0.
    accept(world, seal_env(world, ciphertexts=(1,), plaintexts=(0,)))
    accept(world, seal_env(world, ciphertexts=(nsq - 1,), plaintexts=(0,)))


def test_one_bad_coordinate_rejects_the_whole_record(small_keys):
    w = make_world(small_keys, make_policy({"s": stream_table(dimension=3)}))
    good = valid_ct(w)
    body = seal_env(w, ciphertexts=(good, 0, good))
    out = w.enclave.on_record(body, NOW)
    assert out.rejection.reason is RejectReason.BAD_CIPHERTEXT
    assert w.enclave.streams["s"].current.count == 0 and w.enclave.stats.accepted == 0


def test_duplicate_record_id(world):
    rid = os.urandom(16)
    accept(world, valid_body(world, record_id=rid))
    # Same id, different content and a fresh sealed box: still a replay.
    assert_rejected(world, valid_body(world, 50.0, record_id=rid), RejectReason.DUPLICATE)
    assert_rejected(world, valid_body(world, 1.0, record_id=rid), RejectReason.DUPLICATE)


def test_exact_replay_of_a_body_is_duplicate(world):
    body = valid_body(world)
    accept(world, body)
    assert_rejected(world, body, RejectReason.DUPLICATE)


def test_duplicate_across_window_close(world):
    rid = os.urandom(16)
    accept(world, valid_body(world, record_id=rid))
    released = ()
    while not released:
        released = accept(world, valid_body(world)).publish
    assert world.enclave.streams["s"].current.index == 2
    assert_rejected(world, valid_body(world, record_id=rid), RejectReason.DUPLICATE)


def test_rejected_record_does_not_burn_its_id(world):
    rid = os.urandom(16)
    assert_rejected(world, valid_body(world, record_id=rid, window=2), RejectReason.FUTURE_WINDOW)
    assert_rejected(world, valid_body(world, record_id=rid, now_ms=NOW - 901_000), RejectReason.EXPIRED)
    accept(world, valid_body(world, record_id=rid))


def test_expired_and_from_future(world):
    policy = world.enclave.policy
    age_ms, skew_ms = int(policy.max_record_age_seconds * 1000), int(policy.max_clock_skew_seconds * 1000)
    assert_rejected(world, valid_body(world, now_ms=NOW - age_ms - 1), RejectReason.EXPIRED)
    assert_rejected(world, valid_body(world, now_ms=0), RejectReason.EXPIRED)
    assert_rejected(world, valid_body(world, now_ms=NOW + skew_ms + 1), RejectReason.FROM_FUTURE)
    assert_rejected(world, seal_env(world, sent_at_ms=2**64 - 1), RejectReason.FROM_FUTURE)
    # The limits themselves are inside.
    accept(world, valid_body(world, now_ms=NOW - age_ms))
    accept(world, valid_body(world, now_ms=NOW + skew_ms))


def test_replay_after_the_id_horizon_is_expired(world):
    body = valid_body(world)
    accept(world, body)
    later = NOW + int((world.enclave.policy.max_record_age_seconds + 2) * 1000)
    world.enclave.on_tick(later)
    assert world.enclave.streams["s"].seen == {}
    out = world.enclave.on_record(body, later)
    assert out.rejection.reason is RejectReason.EXPIRED


def test_late_and_future_windows(world):
    assert_rejected(world, valid_body(world, window=2), RejectReason.FUTURE_WINDOW)
    assert_rejected(world, valid_body(world, window=2**64 - 1), RejectReason.FUTURE_WINDOW)
    accept(world, valid_body(world, window=1))
    released = ()
    while not released:
        released = accept(world, valid_body(world)).publish
    assert world.enclave.streams["s"].current.index == 2
    assert_rejected(world, valid_body(world, window=1), RejectReason.LATE_WINDOW)
    assert_rejected(world, valid_body(world, window=3), RejectReason.FUTURE_WINDOW)
    accept(world, valid_body(world, window=2))
    accept(world, valid_body(world, window=0))


def test_rejection_counters_add_up(world):
    bodies = [b"", seal_bytes(world, b"x"), seal_env(world, stream="zz"), seal_env(world, key_epoch=9)]
    for b in bodies:
        world.enclave.on_record(b, NOW)
    assert dict(world.enclave.stats.rejected) == {
        "undecryptable": 1, "malformed": 1, "unknown_stream": 1, "wrong_epoch": 1}
    assert world.enclave.stats.accepted == 0


# -- tamper matrices ------------------------------------------------------------------
# A sealed box is ephemeral key (32) | MAC (16) | ciphertext; the ciphertext covers the
# envelope: magic 4 | record id 16 | producer id 16 | epoch 4 | sent_at 8 | window 8 | name length 1 |
# name | count 2 | width 2 | cts.
SEALED_REGIONS = {
    "ephemeral-key": (0, 32),
    "mac": (32, 48),
    "magic": (48, 52),
    "record-id": (52, 68),
    "producer-id": (68, 84),
    "epoch-time-window": (84, 104),
    "name-count-width": (104, 110),
    "ciphertext": (110, None),
}


@pytest.mark.parametrize("region", list(SEALED_REGIONS))
def test_tamper_matrix_sealed_box(big_window, region):
    w = big_window
    body = valid_body(w)
    start, end = SEALED_REGIONS[region]
    end = len(body) if end is None else end
    for i in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            t = bytearray(body)
            t[i] ^= mask
            out = w.enclave.on_record(bytes(t), NOW)
            assert out.rejection is not None and out.rejection.reason is RejectReason.UNDECRYPTABLE, (i, mask)
    assert w.enclave.stats.accepted == 0
    assert w.enclave.streams["s"].current.count == 0
    accept(w, body)  # the untampered original still counts, once
    assert w.enclave.stats.accepted == 1


ACCEPTED = None
# Plaintext offsets of the envelope fields (stream "s", one ciphertext) and what a
# producer who re-seals a flipped field may get. A sealed box proves nothing about its
# sender, so these are checked by the enclave's validation, not by the box.
ENVELOPE_FIELDS = {
    "magic": ((0, 4), {RejectReason.MALFORMED}),
    "record-id": ((4, 20), {ACCEPTED}),
    "producer-id": ((20, 36), {ACCEPTED}),
    "epoch": ((36, 40), {RejectReason.WRONG_EPOCH}),
    "sent-at": ((40, 48), {ACCEPTED, RejectReason.EXPIRED, RejectReason.FROM_FUTURE}),
    "window": ((48, 56), {ACCEPTED, RejectReason.FUTURE_WINDOW}),
    "name-length": ((56, 57), {RejectReason.MALFORMED}),
    "name": ((57, 58), {RejectReason.MALFORMED, RejectReason.UNKNOWN_STREAM}),
    "count": ((58, 60), {RejectReason.MALFORMED}),
    "width": ((60, 62), {RejectReason.MALFORMED}),
    # A changed ciphertext no longer encrypts the plaintext the record states (or is no unit).
    "ciphertext": ((62, 62 + 256), {RejectReason.OUT_OF_RANGE, RejectReason.BAD_CIPHERTEXT}),
    # A changed plaintext is out of the stream's range, or not what the ciphertext encrypts.
    "plaintext": ((62 + 256, None), {RejectReason.OUT_OF_RANGE}),
}


@pytest.mark.parametrize("field", list(ENVELOPE_FIELDS))
def test_tamper_matrix_resealed_envelope(big_window, field):
    w = big_window
    ct = valid_ct(w)
    (start, end), allowed = ENVELOPE_FIELDS[field]
    end = len(envelope(w).to_bytes()) if end is None else end
    seen = set()
    for i in range(start, end):
        for mask in (0x01, 0xFF):
            t = bytearray(envelope(w, ciphertexts=(ct,)).to_bytes())  # a fresh record id each time
            t[i] ^= mask
            before = (w.enclave.stats.accepted, w.enclave.streams["s"].current.count)
            out = w.enclave.on_record(seal_bytes(w, bytes(t)), NOW)
            reason = out.rejection.reason if out.rejection else ACCEPTED
            assert reason in allowed, (field, i, mask, out.rejection)
            if out.rejection:
                assert not out.rejection.detail.startswith("internal error")
                assert (w.enclave.stats.accepted, w.enclave.streams["s"].current.count) == before
            else:
                assert w.enclave.stats.accepted == before[0] + 1
            seen.add(reason)
    if len(allowed) == 1:
        assert seen == allowed
    # Every flipped record is accounted for: counted once or rejected with a reason.
    assert w.enclave.stats.accepted + sum(w.enclave.stats.rejected.values()) == (end - start) * 2


def test_tamper_matrix_resealed_specific_flips(big_window):
    """Flips whose outcome is known exactly."""
    w = big_window

    def flipped(i, mask):
        t = bytearray(envelope(w, ciphertexts=(1,), plaintexts=(0,)).to_bytes())  # fresh id; 1 = Enc(0)
        t[i] ^= mask
        return w.enclave.on_record(seal_bytes(w, bytes(t)), NOW)

    assert flipped(57, 0x01).rejection.reason is RejectReason.UNKNOWN_STREAM  # "s" -> "r"
    assert flipped(57, 0x80).rejection.reason is RejectReason.MALFORMED  # not ASCII
    assert flipped(55, 0x02).rejection.reason is RejectReason.FUTURE_WINDOW  # window 2
    assert flipped(55, 0x01).rejection is None  # window 1 is the open one
    assert flipped(40, 0x80).rejection.reason is RejectReason.FROM_FUTURE
    assert flipped(39, 0x04).rejection.reason is RejectReason.WRONG_EPOCH
    last_ct = 62 + w.attested.keys.ciphertext_width - 1
    assert flipped(last_ct, 0x01).rejection.reason is RejectReason.BAD_CIPHERTEXT  # 1 -> 0
    # 1 -> 3: a unit mod n², but not an encryption of the stated 0.
    assert flipped(last_ct, 0x02).rejection.reason is RejectReason.OUT_OF_RANGE
    assert flipped(len(envelope(w).to_bytes()) - 1, 0x01).rejection.reason is RejectReason.OUT_OF_RANGE  # states 1
    assert flipped(62 + w.attested.keys.ciphertext_width, 0x80).rejection.reason is RejectReason.OUT_OF_RANGE  # far out
    assert w.enclave.streams["s"].current.count == 1  # only the window-1 flip above


# -- windows and releases ----------------------------------------------------------------
def test_window_closes_at_window_records_and_releases_once(world):
    e = world.enclave
    for i in range(4):
        out = accept(world, valid_body(world, 10.0))
        assert out.publish == ()
        assert e.keys.decryptions == 0  # never per record
    out = accept(world, valid_body(world, 10.0))
    assert len(out.publish) == 1
    rel = out.publish[0]
    assert (rel.stream, rel.window) == ("s", 1)
    assert rel.message.window == 1 and rel.message.dimension == 1
    assert e.keys.decryptions == 1
    assert e.stats.windows_released == 1 and e.stats.accepted == 5
    assert e.streams["s"].current.index == 2 and e.streams["s"].current.count == 0
    # The stored release is what a retry republishes: the same bytes, no new noise.
    assert e.pending["s/1"] is rel
    assert e.on_tick(NOW + 3_600_000).publish == ()
    assert e.pending["s/1"].body == rel.body
    e.confirm_published(rel)
    assert e.pending == {}
    # Ticks release nothing more and decrypt nothing more.
    assert e.on_tick(NOW + 7_200_000).publish == ()
    assert e.keys.decryptions == 1 and e.stats.windows_released == 1


def test_released_sum_matches_the_records(small_keys):
    """With a negligible-noise budget the release equals the true total: folding is right."""
    policy = make_policy({"s": stream_table(dimension=2, lower=-10.0, upper=10.0, epsilon=1e6,
                                            window_records=4, min_batch=2)})
    w = make_world(small_keys, policy)
    values = [[1.5, -2.25], [3.0, 4.0], [-9.5, 0.25], [25.0, -30.0]]  # last one is clipped to [10, -10]
    releases = ()
    for v in values:
        releases = w.enclave.on_record(w.sealer.seal("s", v, now_ms=NOW).body, NOW).publish
    (rel,) = releases
    assert rel.message.count == 4
    assert rel.message.sum == pytest.approx([5.0, -8.0], abs=0.01)
    assert rel.message.mean == pytest.approx([1.25, -2.0], abs=0.01)


def test_decryptions_go_up_by_dimension_per_window(small_keys):
    policy = make_policy({"s": stream_table(dimension=3, window_records=4, min_batch=2)})
    w = make_world(small_keys, policy)
    start = w.enclave.keys.decryptions
    for window in (1, 2):
        for i in range(4):
            out = w.enclave.on_record(w.sealer.seal("s", [1, 2, 3], now_ms=NOW).body, NOW)
            assert out.rejection is None
            if i < 3:
                assert out.publish == ()
                assert w.enclave.keys.decryptions == start + 3 * (window - 1)
        assert len(out.publish) == 1
        assert w.enclave.keys.decryptions == start + 3 * window


def test_time_window_below_min_batch_is_withheld(small_keys):
    """Time-closed windows follow the clock: window w spans [w·10 s, (w+1)·10 s). Each is
    charged, and released only if its noised count reaches min_batch (here the noise is
    negligible, so the noised count is the true one)."""
    policy = make_policy({"s": stream_table(window_records=None, window_seconds=10, min_batch=3, epsilon=1e9)})
    w = make_world(small_keys, policy)
    e = w.enclave
    t0 = (NOW // 10_000) * 10_000 + 1_000  # one second into a window
    first = t0 // 10_000
    assert e.on_tick(t0).publish == () and e.streams["s"].current.index == first
    accept(w, valid_body(w, now_ms=t0), t0)
    accept(w, valid_body(w, now_ms=t0), t0)
    assert e.on_tick(t0 + 8_999).publish == ()
    assert e.on_tick(t0 + 9_000).publish == ()  # the window's end: 2 < 3, withheld
    assert e.stats.windows_withheld == 1 and e.stats.windows_released == 0
    assert e.ledgers["s"].releases == 1  # charged all the same
    assert e.pending == {}
    assert e.streams["s"].current.index == first + 1 and e.streams["s"].current.count == 0
    # Its records are not carried over; late ones for it are rejected.
    late = e.on_record(valid_body(w, window=first, now_ms=t0 + 9_000), t0 + 9_000)
    assert late.rejection.reason is RejectReason.LATE_WINDOW
    t = t0 + 10_000
    for _ in range(3):
        accept(w, valid_body(w, now_ms=t), t)
    assert e.on_tick(t + 8_999).publish == ()
    (rel,) = e.on_tick(t + 9_000).publish
    assert rel.window == first + 2 - 1 == e.streams["s"].current.index - 1
    assert rel.message.closed_at_ms == (first + 2) * 10_000  # the scheduled end, not the tick's time
    assert e.stats.windows_released == 1 and e.ledgers["s"].releases == 2
    # An empty window is charged and drawn too: whether anything arrived must not show.
    assert e.on_tick(t + 19_000).publish == ()
    assert e.ledgers["s"].releases == 3 and e.stats.windows_withheld == 2


def test_count_window_below_min_batch_is_withheld(small_keys):
    """Both limits set: the time limit closes a short window, which is withheld."""
    policy = make_policy({"s": stream_table(window_records=5, window_seconds=5, min_batch=3)})
    w = make_world(small_keys, policy)
    start = w.enclave.keys.decryptions
    accept(w, valid_body(w))
    accept(w, valid_body(w))
    assert w.enclave.on_tick(NOW + 4_999).publish == ()
    assert w.enclave.on_tick(NOW + 5_000).publish == ()
    assert w.enclave.stats.windows_withheld == 1
    assert w.enclave.stats.windows_released == 0
    assert w.enclave.keys.decryptions == start
    assert w.enclave.streams["s"].current.index == 2


def test_streams_are_independent(small_keys):
    policy = make_policy({"a": stream_table(), "b": stream_table(window_records=2, min_batch=1)})
    w = make_world(small_keys, policy)
    seal = lambda s: w.sealer.seal(s, [1.0], now_ms=NOW).body  # noqa: E731
    assert w.enclave.on_record(seal("a"), NOW).publish == ()
    assert w.enclave.on_record(seal("b"), NOW).publish == ()
    (rel,) = w.enclave.on_record(seal("b"), NOW).publish
    assert rel.stream == "b"
    assert w.enclave.streams["a"].current.count == 1 and w.enclave.streams["a"].current.index == 1


# -- the producer side of the same record ------------------------------------------------------
def test_sealer_refuses_what_the_policy_does_not_allow(world):
    from sealedsum.common.errors import PolicyMismatch

    for stream, values in [("nope", [1.0]), ("s", []), ("s", [1.0, 2.0]), ("s", [float("nan")]),
                           ("s", ["1"]), ("s", [10**400])]:
        with pytest.raises(PolicyMismatch):
            world.sealer.seal(stream, values, now_ms=NOW)
    rec = world.sealer.seal("s", [250.0], now_ms=NOW)
    assert rec.clipped == 1  # clipped to the declared bound, counted
    accept(world, rec.body)


def test_a_counted_record_replayed_after_its_window_closed_is_a_duplicate_not_late(world):
    """Duplicates are checked before windows, so a lost ack never turns a counted record
    into a dead letter that someone could later replay into a second count."""
    enclave = world.enclave
    first = world.sealer.seal("s", [10.0], window=1)
    assert enclave.on_record(first.body, now_ms()).rejection is None
    for _ in range(4):  # window_records = 5: close window 1
        enclave.on_record(world.sealer.seal("s", [10.0]).body, now_ms())
    assert enclave.streams["s"].current.index == 2
    outcome = enclave.on_record(first.body, now_ms())
    assert outcome.rejection.reason is RejectReason.DUPLICATE
    late = world.sealer.seal("s", [10.0], window=1)
    assert enclave.on_record(late.body, now_ms()).rejection.reason is RejectReason.LATE_WINDOW


def test_unit_check_by_factors_agrees_with_gcd(small_keys):
    """The enclave tests c mod p and c mod q instead of gcd(c, n): the same set."""
    import math
    import secrets

    n, nsq = small_keys.paillier_public.n, small_keys.nsquare
    p, q = small_keys._paillier.p, small_keys._paillier.q
    cases = [secrets.randbelow(nsq) for _ in range(2000)]
    cases += [k * p for k in range(1, 200)] + [k * q for k in range(1, 200)] + [n * k for k in range(1, 50)]
    cases += [0, 1, nsq - 1, nsq, -1, p * p, q * q, p * q * q]
    for c in cases:
        assert small_keys.is_ciphertext(c) == (0 < c < nsq and math.gcd(c, n) == 1), c


def test_two_thread_crt_decryption_agrees_with_phe(small_keys):
    """decrypt_total splits the CRT halves over two threads; it must equal phe's raw_decrypt,
    read as a signed integer, on every input."""
    import secrets

    pub = small_keys.paillier_public
    n = pub.n
    signed = lambda m: m - n if m > n // 2 else m  # noqa: E731
    for m in (0, 1, n - 1, 12345, n // 2, n // 2 + 1):
        assert small_keys.decrypt_total(pub.raw_encrypt(m)) == signed(m)
    for _ in range(200):
        c = secrets.randbelow(pub.nsquare - 1) + 1
        assert small_keys.decrypt_total(c) == signed(small_keys._paillier.raw_decrypt(c))
