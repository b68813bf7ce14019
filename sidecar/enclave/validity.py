"""Per-record validity: a record counts only if its plaintexts are exactly what an honest
producer could have sent, and its ciphertexts encrypt exactly those plaintexts.

Why: a window's release is calibrated to the change one *honest* record can make. Without
this check a dishonest producer picks any plaintext (a value far outside the bounds, one
near n/2 that the signed reading of a total wraps, a packed slot that carries into its
neighbour) and moves the decrypted total by far more than the sensitivity, or pins it where
one honest record's presence shows through the noise.

Two checks, both before a record touches any total:

1. :class:`RecordCheck` reads the plaintexts the envelope states (one per ciphertext, in
   ``[0, n)``) as the record's fixed-point values and checks them against the stream: every
   coordinate in its per-record range ``[lo_i, hi_i]``; a histogram record one-hot; a vector
   within its L2 bound (with the rounding slack the sensitivity allows for); every packed
   slot within its range and nothing above the last slot, so no carry can cross a slot.
2. :func:`mismatched` checks, for a set of records about to be counted together, that the
   product of their ciphertexts decrypts to the sum of their stated plaintexts, coordinate
   by coordinate. The window total is exactly such a product, so what the enclave decrypts
   at the window's close is exactly the sum of checked plaintexts (exact arithmetic: no
   probability of a miss). One decryption per ciphertext slot covers a whole batch; a set
   that fails is bisected to find the records that lie, which only a dishonest producer
   makes the enclave pay for.

Single records are thus in clear, transiently, inside the attested enclave's memory; what
stays encrypted is everything on the broker and on disk (records, checkpoints, partial
totals). Zero-knowledge range proofs would avoid even that (the known next step).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

import gmpy2

from sealedsum.common import privacy
from sealedsum.common.errors import RecordRejected, RejectReason
from sealedsum.common.packing import PackingLayout
from sealedsum.common.policy import StreamKind, StreamPolicy


def _reject(detail: str) -> RecordRejected:
    return RecordRejected(RejectReason.OUT_OF_RANGE, detail)


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """What one record of a stream may hold, in fixed-point units (built once per stream)."""

    ranges: tuple[tuple[int, int], ...]
    one_hot: bool
    # Vectors with an L2 bound: the squared norm (exact rational) and the L1 norm a
    # record may reach, the same numbers the sensitivity is computed from.
    l2_squared: Fraction | None
    l1: int | None
    packing: PackingLayout | None

    @classmethod
    def of(cls, stream: StreamPolicy) -> "RecordCheck":
        l2_squared = l1 = None
        if stream.l2_bound is not None:
            l1, l2 = privacy.l2_ball_sensitivity(stream.l2_bound, stream.fraction_bits, stream.dimension)
            l2_squared = Fraction(l2) ** 2
        return cls(tuple(stream.coordinate_ranges(1)), stream.kind == StreamKind.HISTOGRAM, l2_squared, l1,
                   stream.packing)

    def values(self, plaintexts: Sequence[int], n: int) -> list[int]:
        """The record's fixed-point values.

        :raises RecordRejected: ``out_of_range``, saying which check failed.
        """
        if any(not 0 <= m < n for m in plaintexts):
            raise _reject("a plaintext is not below the Paillier modulus")
        values = self._unpacked(plaintexts) if self.packing is not None else self._signed(plaintexts, n)
        for i, (v, (lo, hi)) in enumerate(zip(values, self.ranges)):
            if not lo <= v <= hi:
                raise _reject(f"coordinate {i} is {v}, outside [{lo}, {hi}]")
        if self.one_hot and sum(values) != 1:
            raise _reject(f"a histogram record has {sum(values)} buckets set, not one")
        if self.l2_squared is not None:
            if sum(v * v for v in values) > self.l2_squared or sum(abs(v) for v in values) > self.l1:
                raise _reject("the vector is longer than the stream's L2 bound")
        return values

    @staticmethod
    def _signed(plaintexts: Sequence[int], n: int) -> list[int]:
        # Negative values travel as n + v, as every Paillier encoder writes them.
        half = n // 2
        return [m - n if m > half else m for m in plaintexts]

    def _unpacked(self, plaintexts: Sequence[int]) -> list[int]:
        layout = self.packing
        w, k, mask = layout.slot_bits, layout.slots_per_ciphertext, (1 << layout.slot_bits) - 1
        values: list[int] = []
        for j, m in enumerate(plaintexts):
            used = min(k, layout.dimension - j * k)
            if m >> (w * used):
                raise _reject(f"packed plaintext {j} has bits above its last slot")
            for s in range(used):
                i = j * k + s
                slot = (m >> (w * s)) & mask
                if slot > layout.spans[i]:
                    raise _reject(f"packed slot {i} holds {slot}, above its range {layout.spans[i]}")
                values.append(slot + layout.lows[i])
        return values


# ``decrypt(ciphertext) -> plaintext in [0, n)``, the enclave's private key at work.
Decrypt = Callable[[int], int]


@dataclass(frozen=True, slots=True)
class Member:
    """One counted record in a check: its ciphertexts, the plaintexts it states, and its
    record id, whose bits alone decide which part of a failing set it is looked for in."""

    ciphertexts: Sequence[int]
    plaintexts: Sequence[int]
    record_id: bytes


def mismatched(members: Sequence[Member], n: int, nsquare: int, decrypt: Decrypt) -> list[int]:
    """Which of these records (under one key, of one stream) must be taken out: indices, ascending.

    A set of records *agrees* when, for every ciphertext slot, the product of its
    ciphertexts decrypts to the sum of its stated plaintexts mod n; a window's total is such
    a product, so if the counted records agree the window decrypts to exactly the sum of
    checked plaintexts. An honest set costs one decryption per slot. A set that does not
    agree is split by the bits of the record ids (a binary trie: the record ids are unique
    in a window), and each part is checked again, down to single records, which are taken
    out. Splitting by record id rather than by position is what makes the outcome for a
    dishonest record independent of the honest records around it (their errors are zero,
    so no part's verdict changes with them, and no split point moves with them): whether
    an honest record was there cannot show in what was refused. Dishonest records whose
    errors cancel within a part that agrees stay in, which is harmless: their part adds
    exactly the sum of their checked plaintexts.
    """
    slots = len(members[0].ciphertexts) if members else 0
    id_bits = 8 * len(members[0].record_id) if members else 0

    def agrees(part: list[int]) -> bool:
        for j in range(slots):
            product, total = gmpy2.mpz(1), 0
            for i in part:
                product = gmpy2.f_mod(product * members[i].ciphertexts[j], nsquare)
                total += members[i].plaintexts[j]
            if decrypt(int(product)) != total % n:
                return False
        return True

    def bit(i: int, depth: int) -> int:
        rid = members[i].record_id
        return (rid[depth // 8] >> (7 - depth % 8)) & 1

    def search(part: list[int], depth: int, known_bad: bool = False) -> list[int]:
        if not known_bad and agrees(part):
            return []
        if len(part) == 1 or depth == id_bits:
            return part
        zeros = [i for i in part if not bit(i, depth)]
        ones = [i for i in part if bit(i, depth)]
        if not zeros or not ones:  # the same set one bit further down: no need to decrypt again
            return search(part, depth + 1, known_bad=True)
        found = search(zeros, depth + 1)
        # If the zeros agree, the ones hold all of the error: known to fail.
        return found + search(ones, depth + 1, known_bad=not found)

    return sorted(search(list(range(len(members))), 0)) if members else []


def fits_noise_domain(totals: Sequence[int], ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether decrypted totals lie where checked records can put them (always, unless the
    enclave itself is wrong): the release refuses to noise anything else."""
    return all(lo <= t <= hi for t, (lo, hi) in zip(totals, ranges))


__all__ = ["RecordCheck", "mismatched", "fits_noise_domain"]
