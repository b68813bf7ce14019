"""Per-record validity (issue 10): a dishonest producer's record never touches a total.

Each test writes the dishonest input first: a record whose plaintexts no honest producer
could send (stated as they are), or one whose ciphertexts encrypt such a plaintext while it
states honest ones (a lie the batch check must catch). Every one is refused ``out_of_range``
and the window's decrypted totals, before any noise, are exactly those of the honest records
alone; so one honest record moves them by exactly its own value, never by more than the
sensitivity the noise is calibrated for.
"""

from __future__ import annotations

import os
import random

import pytest
from nacl.public import PublicKey, SealedBox
from phe import PaillierPublicKey

from sealedsum.common import wire
from sealedsum.common.errors import RejectReason
from sealedsum.sidecar.enclave.release import decrypted_totals
from sealedsum.sidecar.enclave.validity import Member, RecordCheck, mismatched
from tests.conftest import World, make_policy, make_world, now_ms, stream_table

NOW = now_ms()
SUM = dict(kind="sum", dimension=1, lower=-100.0, upper=100.0)
BOX = dict(kind="vector", dimension=3, lower=[-1.0, 0.0, 2.0], upper=[1.0, 5.0, 3.0])
L2 = dict(kind="vector", dimension=4, l2_bound=1.0, lower=None, upper=None)
HIST = dict(kind="histogram", dimension=None, edges=[0, 1, 2, 3, 4, 5, 6], lower=None, upper=None)
KINDS = {"sum": SUM, "box": BOX, "l2": L2, "histogram": HIST}


def world_of(keys, table: dict, packing: bool = False, **over) -> World:
    over = {"window_records": 1000, "min_batch": 1, **over}
    return make_world(keys, make_policy({"s": stream_table(**table, packing=packing, **over)}))


def forged(w: World, stated: list[int], encrypted: list[int] | None = None, *, rid: bytes | None = None) -> bytes:
    """A sealed record stating Paillier plaintexts ``stated`` whose ciphertexts encrypt
    ``encrypted`` (the same, unless the producer lies), as anyone with the public keys can make."""
    keys = w.attested.keys
    pub = PaillierPublicKey(keys.paillier_n)
    encrypted = stated if encrypted is None else encrypted
    cts = tuple(pub.raw_encrypt(m % pub.n) for m in encrypted)
    env = wire.Envelope("s", rid or os.urandom(16), keys.epoch, NOW, 0, keys.ciphertext_width, cts,
                        w.sealer.producer_id, tuple(m % pub.n for m in stated))
    return SealedBox(PublicKey(keys.x25519)).encrypt(env.to_bytes())


def honest_plaintexts(w: World, values: list[float]) -> list[int]:
    s = w.enclave.policy.streams["s"]
    n = w.attested.keys.paillier_n
    return [m % n for m in s.plaintexts(s.encode(values)[0])]


def honest_values(table: dict, rng: random.Random) -> list[float]:
    if table is HIST:
        return [rng.uniform(-1, 7)]
    if table is L2:
        return [rng.gauss(0, 0.8) for _ in range(4)]
    box = list(zip(*(([t] * table["dimension"]) if not isinstance(t, list) else t
                     for t in (table["lower"], table["upper"]))))
    return [rng.uniform(lo - 1, hi + 1) for lo, hi in box]


def totals_of(w: World) -> tuple[int, list[int]]:
    """The open window's count and decrypted fixed-point totals, before any noise."""
    e = w.enclave
    window = e.streams["s"].current
    return window.count, decrypted_totals(window, e.policy.streams["s"], e.keyring)


def dishonest_records(w: World, kind: str, packing: bool) -> dict[str, list[int]]:
    """Plaintexts no honest producer of this stream could send, by what is wrong with them."""
    s = w.enclave.policy.streams["s"]
    n = w.attested.keys.paillier_n
    ranges = s.coordinate_ranges(1)
    d = s.dimension
    out: dict[str, list[int]] = {}

    def values(v: list[int]) -> list[int]:
        return s.plaintexts(v) if not packing else _pack_unchecked(s.packing, v)

    lo0, hi0 = ranges[0]
    out["above the upper bound"] = values([hi0 + 1] + [lo for lo, _ in ranges[1:]])
    out["below the lower bound"] = values([lo0 - 1] + [lo for lo, _ in ranges[1:]])
    if not packing:
        out["near n/2"] = [n // 2] + s.plaintexts([lo for lo, _ in ranges[1:]]) if d > 1 else [n // 2]
        out["n/2 + 1 (reads as -n/2)"] = [n // 2 + 1] * s.ciphertexts_per_record
    if kind == "histogram":
        out["two buckets"] = values([1, 1] + [0] * (d - 2))
        out["no bucket"] = values([0] * d)
    if kind == "l2":
        m = ranges[0][1]
        out["over the L2 norm"] = values([m] * d)  # each coordinate in range, the vector too long
    if packing:
        layout = s.packing
        w_bits, k = layout.slot_bits, layout.slots_per_ciphertext
        top = [(layout.spans[i] << (w_bits * (i % k))) for i in range(min(k, d))]
        used_bits = w_bits * min(k, d)
        out["bits above the last slot"] = [sum(top) | (1 << used_bits)] + [0] * (s.ciphertexts_per_record - 1)
        out["slot all ones (carry)"] = [(1 << used_bits) - 1] + [0] * (s.ciphertexts_per_record - 1)
    return {label: [m % n for m in ms] for label, ms in out.items()}


def _pack_unchecked(layout, values: list[int]) -> list[int]:
    """What a dishonest packer writes: each offset slot as it is, no clamping."""
    w, k = layout.slot_bits, layout.slots_per_ciphertext
    out = []
    for start in range(0, layout.dimension, k):
        m = 0
        for i in range(min(start + k, layout.dimension) - 1, start - 1, -1):
            slot = values[i] - layout.lows[i]
            m = (m << w) + slot
        out.append(m)
    return out


CASES = [(kind, packing) for kind in KINDS for packing in (False, True)]


@pytest.mark.parametrize("kind,packing", CASES, ids=[f"{k}-{'packed' if p else 'plain'}" for k, p in CASES])
def test_dishonest_records_are_refused_and_change_nothing(small_keys, kind, packing):
    table = KINDS[kind]
    liar, honest = world_of(small_keys, table, packing), world_of(small_keys, table, packing)
    rng = random.Random(7)
    records = [honest_values(table, rng) for _ in range(6)]
    bad = dishonest_records(liar, kind, packing)
    assert bad
    for i, v in enumerate(records):
        assert honest.enclave.on_record(honest.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
        assert liar.enclave.on_record(liar.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
        if i == 2:
            truthful = honest_plaintexts(liar, records[0])
            for label, plaintexts in bad.items():
                # Stated as they are: the plaintext check refuses them.
                out = liar.enclave.on_record(forged(liar, plaintexts), NOW)
                assert out.rejection is not None and out.rejection.reason is RejectReason.OUT_OF_RANGE, label
                # Encrypted while an honest record's plaintexts are stated: the batch check does.
                out = liar.enclave.on_record(forged(liar, truthful, plaintexts), NOW)
                assert out.rejection is not None and out.rejection.reason is RejectReason.OUT_OF_RANGE, label
                assert "do not encrypt" in out.rejection.detail
    assert totals_of(liar) == totals_of(honest)
    assert liar.enclave.stats.accepted == honest.enclave.stats.accepted == len(records)
    assert liar.enclave.stats.rejected == {"out_of_range": 2 * len(bad)}


def test_liars_inside_a_batch_are_found_and_taken_out(small_keys):
    """The runtime's path: one batch, the check once over all of it, bisected where it fails."""
    liar, honest = world_of(small_keys, SUM), world_of(small_keys, SUM)
    rng = random.Random(3)
    records = [[rng.uniform(-100, 100)] for _ in range(40)]
    n = liar.attested.keys.paillier_n
    bodies, expected = [], []
    for i, v in enumerate(records):
        bodies.append(liar.sealer.seal("s", v, now_ms=NOW).body)
        expected.append(None)
        assert honest.enclave.on_record(honest.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
        if i in (0, 17, 18, 39):  # at the edges and side by side
            stated = honest_plaintexts(liar, v)
            bodies.append(forged(liar, stated, [n // 2]))
            expected.append(RejectReason.OUT_OF_RANGE)
    checks_before, decryptions_before = liar.enclave.keys.checks, liar.enclave.keys.decryptions
    results = liar.enclave.accept_batch([liar.enclave.open(b) for b in bodies], NOW)
    assert [r.rejection.reason if r.rejection else None for r in results] == expected
    assert liar.enclave.keys.decryptions == decryptions_before  # no window total: checks are counted apart
    assert totals_of(liar) == totals_of(honest)
    assert liar.enclave.keys.checks > checks_before
    # The records taken out are forgotten: the honest ones behind them are not duplicates.
    assert liar.enclave.stats.accepted == len(records)


def test_an_honest_batch_costs_one_check_per_ciphertext(small_keys):
    w = world_of(small_keys, BOX)
    bodies = [w.sealer.seal("s", [0.5, 1.0, 2.5], now_ms=NOW).body for _ in range(30)]
    before = w.enclave.keys.checks
    results = w.enclave.accept_batch([w.enclave.open(b) for b in bodies], NOW)
    assert all(r.rejection is None for r in results)
    assert w.enclave.keys.checks - before == 3  # one per coordinate for the whole batch


def test_a_liar_cannot_close_a_count_window(small_keys):
    """The window is checked before it closes: a lying record taken out leaves it open, and
    the record that fills it afterwards closes it with the honest totals only."""
    liar, honest = world_of(small_keys, SUM, window_records=4), world_of(small_keys, SUM, window_records=4)
    n = liar.attested.keys.paillier_n
    values = [[10.0], [20.0], [30.0], [40.0]]
    for w in (liar, honest):
        for v in values[:3]:
            assert w.enclave.on_record(w.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
    stated = honest_plaintexts(liar, [50.0])
    batch = [forged(liar, stated, [n // 2]), liar.sealer.seal("s", values[3], now_ms=NOW).body]
    out = liar.enclave.accept_batch([liar.enclave.open(b) for b in batch], NOW)
    assert out[0].rejection.reason is RejectReason.OUT_OF_RANGE and out[1].rejection is None
    released = [p for e in out for p in e.publish]
    reference = honest.enclave.on_record(honest.sealer.seal("s", values[3], now_ms=NOW).body, NOW).publish
    assert len(released) == len(reference) == 1 and released[0].window == reference[0].window == 1
    assert liar.enclave.stats.windows_released == 1
    # Same totals decrypted: the draws differ only by their noise, so compare the windows.
    assert liar.enclave.streams["s"].current.index == honest.enclave.streams["s"].current.index == 2


# -- the audit's attacks, reproduced: an honest record's effect is its own value ----------------
def neighbouring_totals(keys, table: dict, attack: list[tuple[list[int], list[int]]], victim: list[float],
                        others: list[list[float]], packing: bool = False) -> tuple[list[int], list[int]]:
    """Decrypted totals with and without the victim's record, the attacker's records sent both times."""
    out = []
    for with_victim in (True, False):
        w = world_of(keys, table, packing)
        for v in others + ([victim] if with_victim else []):
            assert w.enclave.on_record(w.sealer.seal("s", v, now_ms=NOW).body, NOW).rejection is None
        for stated, encrypted in attack:
            n = w.attested.keys.paillier_n
            out_ = w.enclave.on_record(forged(w, [m % n for m in stated], [m % n for m in encrypted]), NOW)
            assert out_.rejection.reason is RejectReason.OUT_OF_RANGE
        out.append(totals_of(w)[1])
    return out[0], out[1]


def victim_effect(keys, table, victim, packing=False) -> list[int]:
    w = world_of(keys, table, packing)
    s = w.enclave.policy.streams["s"]
    return s.encode(victim)[0]


def test_attack_clamp_edge_histogram(small_keys):
    """The audit's histogram attack: a record of huge negative and positive bucket values pinned
    every total at an edge of the clamp, where the victim's presence moved all six buckets."""
    n = small_keys.paillier_public.n
    attack = [([n - 10**6] * 3 + [10**6] * 3, [n - 10**6] * 3 + [10**6] * 3),
              ([1, 0, 0, 0, 0, 0], [n - 10**6] * 3 + [10**6] * 3)]
    with_v, without = neighbouring_totals(small_keys, HIST, attack, [2.5], [[0.5], [4.5], [5.5]])
    assert [a - b for a, b in zip(with_v, without)] == victim_effect(small_keys, HIST, [2.5]) == [0, 0, 1, 0, 0, 0]


def test_attack_wrap_at_n_over_2(small_keys):
    """Sum over [-100, 100]: a plaintext near n/2 wrapped the signed reading of the total
    depending on whether the victim's record was there."""
    n = small_keys.paillier_public.n
    attack = [([n // 2 - 100], [n // 2 - 100]), ([0], [n // 2 - 100]), ([5 << 16], [n // 2])]
    with_v, without = neighbouring_totals(small_keys, SUM, attack, [99.0], [[-50.0], [12.5]])
    assert [a - b for a, b in zip(with_v, without)] == victim_effect(small_keys, SUM, [99.0]) == [99 << 16]


def test_attack_packed_slot_carry(small_keys):
    """A packed federated stream: slots filled to the brim carried into their neighbours, so
    the victim's update showed in every slot."""
    w = world_of(small_keys, L2, packing=True)
    layout = w.enclave.policy.streams["s"].packing
    used = layout.slot_bits * min(layout.slots_per_ciphertext, layout.dimension)
    brim = (1 << used) - 1
    honest_zero = _pack_unchecked(layout, [0] * layout.dimension)
    attack = [([brim] + [0] * (layout.ciphertexts_per_record - 1), [brim] + [0] * (layout.ciphertexts_per_record - 1)),
              (honest_zero, [brim] + [0] * (layout.ciphertexts_per_record - 1)),
              ([honest_zero[0] | (1 << used)] + honest_zero[1:], [honest_zero[0] | (1 << used)] + honest_zero[1:])]
    victim = [0.5, -0.5, 0.25, 0.0]
    with_v, without = neighbouring_totals(small_keys, L2, attack, victim, [[0.1, 0.2, 0.3, 0.4]], packing=True)
    assert [a - b for a, b in zip(with_v, without)] == victim_effect(small_keys, L2, victim, packing=True)


# -- the check itself ------------------------------------------------------------------------
def test_record_check_edges(small_keys):
    """The bounds are exactly the encoder's: its extremes pass, one unit beyond does not."""
    n = small_keys.paillier_public.n
    s = make_policy({"s": stream_table(**SUM)}).streams["s"]
    check = RecordCheck.of(s)
    lo, hi = s.coordinate_ranges(1)[0]
    assert check.values([s.encode([-1e9])[0][0] % n], n) == [lo]
    assert check.values([s.encode([1e9])[0][0] % n], n) == [hi]
    for bad in (hi + 1, lo - 1, n // 2, n // 2 + 1):
        with pytest.raises(Exception, match="outside"):
            check.values([bad % n], n)
    with pytest.raises(Exception, match="not below the Paillier modulus"):
        check.values([n], n)
    l2 = make_policy({"s": stream_table(**L2)}).streams["s"]
    check = RecordCheck.of(l2)
    rng = random.Random(5)
    for _ in range(200):  # honest vectors at and beyond the bound, after clipping and rounding
        v = [rng.choice([-1, 1]) * rng.uniform(0, 2) for _ in range(4)]
        check.values([m % n for m in l2.encode(v)[0]], n)


def test_mismatched_is_exact(small_keys):
    pub = small_keys.paillier_public
    rid = [bytes([i]) * 16 for i in range(20)]
    members = [Member((pub.raw_encrypt(m),), (m,), rid[m]) for m in range(20)]
    assert mismatched(members, pub.n, pub.nsquare, small_keys.decrypt_product) == []
    members[5] = Member((pub.raw_encrypt(7),), (5,), rid[5])
    assert mismatched(members, pub.n, pub.nsquare, small_keys.decrypt_product) == [5]
    # Errors +2 and -2 cancel in the sum of all: the set adds exactly its stated plaintexts,
    # so both stay in, harmlessly (their sum is that of two checked plaintexts).
    members[9] = Member((pub.raw_encrypt(7),), (9,), rid[9])
    assert mismatched(members, pub.n, pub.nsquare, small_keys.decrypt_product) == []
    # With a third liar the set fails, and the trie separates the two (ids 0x05.. and 0x09..).
    members[12] = Member((pub.raw_encrypt(1),), (12,), rid[12])
    assert mismatched(members, pub.n, pub.nsquare, small_keys.decrypt_product) == [5, 9, 12]


def test_what_is_refused_does_not_depend_on_honest_records(small_keys):
    """The verdict on each dishonest record is the same whichever honest records sit beside it
    (the trie splits by record id, not by position), also for liars whose errors cancel."""
    pub = small_keys.paillier_public
    rng = random.Random(9)

    def liar(m: int, error: int) -> Member:
        return Member((pub.raw_encrypt(m + error),), (m,), rng.randbytes(16))

    liars = [liar(1, 5), liar(2, -5), liar(3, 1), liar(4, 2), liar(5, -3)]
    verdicts = set()
    for trial in range(12):
        honest = [Member((pub.raw_encrypt(m),), (m,), rng.randbytes(16)) for m in range(rng.randrange(0, 30))]
        members = honest + liars
        rng.shuffle(members)
        found = mismatched(members, pub.n, pub.nsquare, small_keys.decrypt_product)
        verdicts.add(frozenset(members[i].record_id for i in found))
    assert len(verdicts) == 1
    (refused,) = verdicts
    assert refused <= {m.record_id for m in liars}
