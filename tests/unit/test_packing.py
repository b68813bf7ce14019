"""Packing (issue 5): many fixed-point values per Paillier plaintext.

The arithmetic of the layout, the worst case of the largest window (no slot can carry),
the packed and the unpacked paths giving the same totals, every kind with packing, the
record shape the enclave insists on, and the policy bytes that pin the layout.
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
from nacl.public import PublicKey, SealedBox
from phe import EncryptedNumber, PaillierPublicKey

from sealedsum.common import wire
from sealedsum.common.attestation import verify_attestation
from sealedsum.common.errors import ConfigError, InvalidMessage, RejectReason
from sealedsum.common.fixedpoint import decode
from sealedsum.common.errors import LayoutError
from sealedsum.common.packing import MARGIN_BITS, PackingLayout
from sealedsum.common.policy import HARD_MAX_WINDOW_RECORDS
from sealedsum.common.policy_parse import policy_from_bytes
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave.aggregate import Window
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.records import max_record_bytes
from sealedsum.sidecar.enclave.release import decrypted_totals
from tests.conftest import TEST_BITS, make_policy, make_world, now_ms, stream_table

HUGE_EPS = 1e7  # noise negligible next to the totals
NOW = now_ms()

BOX = dict(kind="vector", dimension=50, lower=[-3.5 + i / 8 for i in range(50)],
           upper=[7.25 - i / 16 for i in range(50)])
L2 = dict(kind="vector", dimension=200, l2_bound=1.5, lower=None, upper=None)
HIST = dict(kind="histogram", dimension=None, edges=[0, 1, 2, 5, 10, 20, 50, 100], lower=None, upper=None)


def stream(packing: bool = True, bits: int = TEST_BITS, **table):
    return make_policy({"s": stream_table(packing=packing, **table)}, paillier_bits=bits,
                       insecure_test_keys=bits < 2048).streams["s"]


def random_record(policy, rng: random.Random) -> list[float]:
    if policy.kind == "histogram":
        return [rng.uniform(policy.edges[0] - 5, policy.edges[-1] + 5)]
    if policy.l2_bound is not None:
        return [rng.gauss(0, 0.2) for _ in range(policy.dimension)]
    return [rng.uniform(lo - 1, hi + 1) for lo, hi in policy._box()]


# -- the layout and its arithmetic ----------------------------------------------------------
@pytest.mark.parametrize("table", [BOX, L2, HIST, dict(dimension=4, lower=-100.0, upper=100.0)],
                         ids=["box", "l2", "histogram", "sum"])
@pytest.mark.parametrize("window", [dict(window_records=7), dict(window_records=None, window_seconds=60.0)])
def test_layout_is_the_tightest_that_holds_the_largest_window(table, window):
    p = stream(**table, **window, min_batch=1)
    layout = p.packing
    ranges = p.coordinate_ranges(1)
    widest = max(hi - lo for lo, hi in ranges) * p.max_window_records
    # bit_length: the largest honest slot total fits in w bits, and not in w - 1.
    assert widest < 1 << layout.slot_bits and widest >= 1 << (layout.slot_bits - 1)
    k = layout.slots_per_ciphertext
    assert k == min(p.dimension, (TEST_BITS - MARGIN_BITS) // layout.slot_bits)
    assert layout.slot_bits * k <= TEST_BITS - MARGIN_BITS
    assert layout.ciphertexts_per_record == math.ceil(p.dimension / k) == p.ciphertexts_per_record
    assert layout.lows == tuple(lo for lo, _ in ranges)


@pytest.mark.parametrize("table", [BOX, L2, HIST], ids=["box", "l2", "histogram"])
def test_pack_unpack_round_trips(table):
    p = stream(**table, window_records=1000, min_batch=1)
    layout, rng = p.packing, random.Random(5)
    ranges = p.coordinate_ranges(1)
    records = [p.encode(random_record(p, rng))[0] for _ in range(200)]
    records.append([lo for lo, _ in ranges])  # all at the bottom: every slot 0
    records.append([hi for _, hi in ranges])  # all at the top: every slot its full span
    for v in records:
        plaintexts = layout.pack(v)
        assert len(plaintexts) == layout.ciphertexts_per_record
        assert all(0 <= m < 1 << (layout.slot_bits * layout.slots_per_ciphertext) for m in plaintexts)
        slots = layout.unpack(plaintexts)
        assert slots == [x - lo for x, (lo, _) in zip(v, ranges)]
        assert layout.totals(slots, 1) == v
    assert layout.unpack(layout.pack(records[-2])) == [0] * p.dimension
    # Slot sums of many records come back exactly (the plaintexts added as integers).
    total = [sum(col) for col in zip(*(layout.pack(v) for v in records))]
    assert layout.totals(layout.unpack(total), len(records)) == [sum(col) for col in zip(*records)]


def test_pack_keeps_a_value_inside_its_slot():
    layout = PackingLayout.derive([(-4, 4), (0, 10)], 3, 512)
    # Outside the per-record range (no honest encoder does this): clamped, never spilled.
    assert layout.unpack(layout.pack([100, -7])) == [8, 0]


def test_layout_errors():
    with pytest.raises(LayoutError, match="needs 70 bits"):
        PackingLayout.derive([(0, (1 << 69) - 1)], 2, 64)
    one = PackingLayout.derive([(0, 0), (3, 3)], 10, 512)  # ranges that round to one value
    assert one.slot_bits == 1 and one.unpack(one.pack([0, 3])) == [0, 0]


def test_real_encryption_round_trip(small_keys):
    p = stream(**L2, window_records=1000, min_batch=1)
    pub = small_keys.paillier_public
    v = p.encode(random_record(p, random.Random(1)))[0]
    cts = [pub.encrypt(m).ciphertext() for m in p.plaintexts(v)]
    assert p.packing.totals(p.packing.unpack([small_keys.decrypt_total(c) for c in cts]), 1) == v


# -- overflow: impossible at the largest window ------------------------------------------
@pytest.mark.parametrize("table", [BOX, L2, HIST], ids=["box", "l2", "histogram"])
def test_largest_window_all_at_the_top_cannot_overflow(small_keys, table):
    """max_window_records records, every coordinate at its upper bound: the worst case."""
    p = stream(**table, window_records=None, window_seconds=60.0, min_batch=1)
    layout, pub = p.packing, small_keys.paillier_public
    count = p.max_window_records
    assert count == HARD_MAX_WINDOW_RECORDS
    top = [hi for _, hi in p.coordinate_ranges(1)]
    plaintexts = p.plaintexts(top)
    # The window total of `count` such records, folded homomorphically: c^count.
    folded = [EncryptedNumber(pub, pub.encrypt(m).ciphertext(), 0) * count for m in plaintexts]
    limit = 1 << (layout.slot_bits * layout.slots_per_ciphertext)
    assert limit <= 1 << (TEST_BITS - MARGIN_BITS) and limit < pub.n // 3 - 1
    for m, total in zip(plaintexts, folded):
        plain = small_keys.decrypt_total(total.ciphertext(be_secure=False))
        assert plain == m * count < limit  # exactly the integer sum: nothing wrapped
    # Through the enclave's own release path: exactly count · hi in every coordinate.
    window = Window("s", 1, {small_keys.epoch: [t.ciphertext(be_secure=False) for t in folded]}, count)
    assert decrypted_totals(window, p, Keyring.single(small_keys)) == [count * hi for hi in top]
    assert [count * hi for hi in top] == [hi for _, hi in p.coordinate_ranges(count)]
    # And the bottom: all slots zero, totals count · lo.
    bottom = [lo for lo, _ in p.coordinate_ranges(1)]
    folded = [EncryptedNumber(pub, pub.encrypt(m).ciphertext(), 0) * count for m in p.plaintexts(bottom)]
    window = Window("s", 2, {small_keys.epoch: [t.ciphertext(be_secure=False) for t in folded]}, count)
    assert decrypted_totals(window, p, Keyring.single(small_keys)) == [count * lo for lo in bottom]


# -- packed and unpacked give the same totals ----------------------------------------------
@pytest.mark.parametrize("table", [BOX, L2, HIST], ids=["box", "l2", "histogram"])
def test_packed_and_unpacked_totals_are_identical(small_keys, table):
    worlds = {packing: make_world(small_keys, make_policy({"s": stream_table(
        **table, packing=packing, window_records=100, min_batch=1, epsilon=HUGE_EPS)})) for packing in (True, False)}
    packed = worlds[True].enclave.policy.streams["s"]
    assert packed.ciphertexts_per_record < packed.dimension
    rng = random.Random(11)
    records = [random_record(packed, rng) for _ in range(12)]
    expected = [sum(col) for col in zip(*(packed.encode(v)[0] for v in records))]
    totals = {}
    for packing, world in worlds.items():
        for v in records:
            assert world.enclave.on_record(world.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
        e = world.enclave
        window = e.streams["s"].current
        assert len(window.totals[small_keys.epoch]) == e.policy.streams["s"].ciphertexts_per_record
        before = e.decryptions
        totals[packing] = decrypted_totals(window, e.policy.streams["s"], e.keyring)
        assert e.decryptions - before == e.policy.streams["s"].ciphertexts_per_record
    assert totals[True] == totals[False] == expected


# -- every kind, released through the enclave ----------------------------------------------
def test_packed_histogram_release_counts_buckets(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="histogram", dimension=None, edges=[0, 10, 20, 50], lower=None, upper=None, packing=True,
        epsilon=HUGE_EPS, window_records=6, min_batch=1)}))
    assert world.enclave.policy.streams["s"].ciphertexts_per_record == 1
    outs = [world.enclave.on_record(world.sealer.seal("s", [v]).body, now_ms()) for v in (3, 12, 15, 49.9, 50, 500)]
    r = outs[-1].publish[0].message
    assert r.sum == [1.0, 2.0, 3.0] and r.count == 6 and r.dimension == 3 and r.aggregate == "histogram"


def test_packed_l2_vector_release(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="vector", dimension=300, l2_bound=1.0, lower=None, upper=None, packing=True,
        epsilon=HUGE_EPS, window_records=4, min_batch=1)}))
    p = world.enclave.policy.streams["s"]
    assert p.ciphertexts_per_record == math.ceil(300 / p.packing.slots_per_ciphertext) < 300
    rng = random.Random(3)
    records = [[rng.gauss(0, 0.1) for _ in range(300)] for _ in range(4)]
    records[0] = [3.0] + [0.0] * 299  # clipped to norm 1
    outs = [world.enclave.on_record(world.sealer.seal("s", v).body, now_ms()) for v in records]
    r = outs[-1].publish[0].message
    truth = [decode(sum(col), 16) for col in zip(*(p.encode(v)[0] for v in records))]
    assert r.count == 4 and len(r.sum) == 300
    assert r.sum == pytest.approx(truth, abs=1e-3)  # noise scale ~1e-5 here


def test_packed_box_vector_and_mean_release(small_keys):
    world = make_world(small_keys, make_policy({
        "v": stream_table(**BOX, packing=True, epsilon=HUGE_EPS, window_records=3, min_batch=1),
        "m": stream_table(kind="mean", dimension=5, lower=-10.0, upper=10.0, packing=True, epsilon=HUGE_EPS,
                          window_records=2, min_batch=1)}))
    rng = random.Random(8)
    p = world.enclave.policy.streams["v"]
    records = [random_record(p, rng) for _ in range(3)]
    outs = [world.enclave.on_record(world.sealer.seal("v", v).body, now_ms()) for v in records]
    truth = [decode(sum(col), 16) for col in zip(*(p.encode(v)[0] for v in records))]
    assert outs[-1].publish[0].message.sum == pytest.approx(truth, abs=1e-3)
    for v in ([1.0, -2.0, 3.0, 40.0, -0.5], [2.0, 2.0, -3.0, 0.0, 0.5]):
        out = world.enclave.on_record(world.sealer.seal("m", v).body, now_ms())
    r = out.publish[0].message
    assert world.enclave.policy.streams["m"].ciphertexts_per_record == 1
    assert r.sum == pytest.approx([3.0, 0.0, 0.0, 10.0, 0.0], abs=1e-3) and r.count == 2


def test_a_window_spanning_a_key_rotation_unpacks_both_epochs(small_keys):
    """The offsets are linear: count · lo_i over the whole window is right for the sum of
    both epochs' totals, whatever each epoch holds."""
    policy = make_policy({"s": stream_table(**L2, packing=True, window_records=10, min_batch=1, epsilon=HUGE_EPS)},
                         key_grace_seconds=60)
    world = make_world(EnclaveKeys.generate(TEST_BITS), policy)
    e, p, rng = world.enclave, policy.streams["s"], random.Random(4)
    records = [random_record(p, rng) for _ in range(5)]
    for v in records[:2]:
        assert e.on_record(world.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
    e.rotate(NOW)
    nonce = os.urandom(32)
    new = RecordSealer(verify_attestation(e.attest(wire.AttestRequest(nonce).to_bytes()), nonce, world.trust, now_ms()))
    for sealer, v in zip((new, world.sealer, new), records[2:], strict=True):
        assert e.on_record(sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
    window = e.streams["s"].current
    assert set(window.totals) == {1, 2} and window.count == 5
    expected = [sum(col) for col in zip(*(p.encode(v)[0] for v in records))]
    assert decrypted_totals(window, p, e.keyring) == expected


def test_packed_window_checkpoint_round_trip(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(**L2, packing=True, window_records=50,
                                                                  min_batch=1)}))
    e, p = world.enclave, world.enclave.policy.streams["s"]
    e.on_record(world.sealer.seal("s", [0.01] * 200, now_ms=NOW).body, NOW)
    raw = e.streams["s"].current.to_json()
    keys = {small_keys.epoch: small_keys.paillier_public}
    restored = Window.from_json(p, raw, keys)
    assert restored.ciphertexts() == e.streams["s"].current.ciphertexts()
    unpacked = make_policy({"s": stream_table(**L2, window_records=50, min_batch=1)}).streams["s"]
    with pytest.raises(ValueError, match="wrong dimension"):
        Window.from_json(unpacked, raw, keys)
    with pytest.raises(ValueError, match="key epoch"):  # totals no key in the keyring can decrypt
        Window.from_json(p, raw, {})
    big = dict(raw, totals={e: [format(small_keys.nsquare, "x")] * len(cts) for e, cts in raw["totals"].items()})
    with pytest.raises(ValueError, match="out of range"):
        Window.from_json(p, big, keys)


# -- the record shape ----------------------------------------------------------------------
def test_producer_encrypts_once_per_packed_plaintext(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(**L2, packing=True, window_records=10,
                                                                  min_batch=1)}))
    p = world.enclave.policy.streams["s"]
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def encrypt(self, m: int) -> int:
            calls.append(m)
            return self.inner.encrypt(m)

    world.sealer.encryptor = Counting(world.sealer.encryptor)
    sealed = world.sealer.seal("s", [0.05] * 200, now_ms=NOW)
    assert len(calls) == p.ciphertexts_per_record == math.ceil(200 / p.packing.slots_per_ciphertext)
    assert calls == p.plaintexts(p.encode([0.05] * 200)[0])
    width = world.attested.keys.ciphertext_width
    per_ciphertext = width + wire.plaintext_width(width)  # and its plaintext
    assert len(sealed.body) == wire.SEALED_BOX_OVERHEAD + 61 + 1 + p.ciphertexts_per_record * per_ciphertext


def test_wrong_number_of_packed_ciphertexts_is_wrong_dimension(small_keys):
    world = make_world(small_keys, make_policy({
        "s": stream_table(**L2, packing=True, window_records=10, min_batch=1),
        "u": stream_table(dimension=200, lower=0.0, upper=1.0)}))  # so the size limit admits 200
    p, keys = world.enclave.policy.streams["s"], world.attested.keys
    c = p.ciphertexts_per_record
    ct = PaillierPublicKey(keys.paillier_n).encrypt(1).ciphertext()
    for n_cts in (c - 1, c + 1, p.dimension):  # one short, one extra, or unpacked
        env = wire.Envelope("s", os.urandom(16), keys.epoch, NOW, 0, keys.ciphertext_width, (ct,) * n_cts, bytes(16),
                            (1,) * n_cts)
        out = world.enclave.on_record(SealedBox(PublicKey(keys.x25519)).encrypt(env.to_bytes()), NOW)
        assert out.rejection.reason is RejectReason.WRONG_DIMENSION
        assert out.rejection.detail == f"{n_cts} ciphertexts, packed stream takes {c}"
    assert world.enclave.streams["s"].current.count == 0
    assert world.enclave.on_record(world.sealer.seal("s", [0.0] * 200, now_ms=NOW).body, NOW).rejection is None


def test_size_limit_follows_the_largest_ciphertexts_per_record(small_keys):
    packed = make_policy({"s": stream_table(**L2, packing=True)})
    unpacked = make_policy({"s": stream_table(**L2)})
    width = small_keys.ciphertext_width + wire.plaintext_width(small_keys.ciphertext_width)
    assert max_record_bytes(unpacked, small_keys) - max_record_bytes(packed, small_keys) \
        == (200 - packed.streams["s"].ciphertexts_per_record) * width


# -- the policy bytes ------------------------------------------------------------------------
def test_packing_is_in_the_policy_bytes_only_when_on():
    off = make_policy({"s": stream_table(**L2)})
    explicit_off = make_policy({"s": stream_table(**L2, packing=False)})
    on = make_policy({"s": stream_table(**L2, packing=True)})
    assert off.to_bytes() == explicit_off.to_bytes() and b"packing" not in off.to_bytes()
    assert off.streams["s"].packing is None and off.streams["s"].ciphertexts_per_record == 200
    layout = on.streams["s"].packing
    table = on.to_mapping()["streams"]["s"]["packing"]
    assert table == {"slot_bits": layout.slot_bits, "slots_per_ciphertext": layout.slots_per_ciphertext,
                     "ciphertexts_per_record": layout.ciphertexts_per_record}
    assert policy_from_bytes(on.to_bytes()) == on
    assert policy_from_bytes(on.to_bytes()).to_bytes() == on.to_bytes()


def test_the_layout_depends_on_the_key_size_and_the_window():
    small = stream(**L2, bits=2048, window_records=100, min_batch=1).packing
    large = stream(**L2, bits=3072, window_records=100, min_batch=1).packing
    assert small.slot_bits == large.slot_bits and small.slots_per_ciphertext < large.slots_per_ciphertext
    wide = stream(**L2, bits=2048, window_records=100_000, min_batch=1).packing
    assert wide.slot_bits == small.slot_bits + 10  # 100 000 / 100 ≈ 2^10


@pytest.mark.parametrize("change", [
    {"slot_bits": 1}, {"slots_per_ciphertext": 1}, {"ciphertexts_per_record": 200}, {"extra": 1},
    {"slot_bits": 20.0},
])
def test_policy_bytes_with_another_layout_are_refused(change):
    on = make_policy({"s": stream_table(**L2, packing=True)})
    assert on.streams["s"].packing.slot_bits == 20  # window_records 5: 196608·5 < 2^20
    doc = on.to_mapping()
    doc["streams"]["s"]["packing"] = {**doc["streams"]["s"]["packing"], **change}
    with pytest.raises(InvalidMessage, match="packing does not match"):
        policy_from_bytes(json.dumps(doc).encode())


def test_a_layout_table_matches_with_integers_only():
    layout = PackingLayout.derive([(0, 1)] * 3, 1, 512)
    assert layout.to_mapping() == {"slot_bits": 1, "slots_per_ciphertext": 3, "ciphertexts_per_record": 1}
    assert layout.matches({"slot_bits": 1, "slots_per_ciphertext": 3, "ciphertexts_per_record": 1})
    assert not layout.matches({"slot_bits": True, "slots_per_ciphertext": 3, "ciphertexts_per_record": 1})


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_packing_must_be_a_boolean(value):
    with pytest.raises(ConfigError, match="packing must be true or false"):
        make_policy({"s": {**stream_table(**L2), "packing": value}})
