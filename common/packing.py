"""Packing many fixed-point values into one Paillier plaintext (BatchCrypt-style).

A packed stream puts ``k`` coordinates into each plaintext, ``slot_bits`` = ``w`` bits
apart, so a record of dimension ``d`` costs ``ceil(d / k)`` encryptions instead of ``d``.

- **Offsets.** Each coordinate ``i`` has a per-record fixed-point range ``[lo_i, hi_i]``
  (``StreamPolicy.coordinate_ranges(1)``). The slot holds ``v_i - lo_i``, in
  ``[0, hi_i - lo_i]``: never negative, so slots never borrow from each other.
- **Width.** ``w = bit_length(max_i (hi_i - lo_i) · max_window_records)``: a slot holds the
  sum of the largest window of honest records, so adding ciphertexts adds slot by slot and
  no slot ever carries into the next. Nothing else is needed: overflow is impossible by
  construction for honest producers.
- **Slots.** ``k = min(d, floor((paillier_bits - 3) / w))``. A plaintext, and every window
  total of them, stays below ``2^(paillier_bits - 3) <= n / 4`` (``n`` has exactly
  ``paillier_bits`` bits, so ``n >= 2^(paillier_bits - 1)``): below ``n``, so the total never
  wraps; below ``n / 2``, so the enclave's signed reading of a decrypted total leaves it
  alone; and below phe's ``max_int = n // 3 - 1``, the largest plaintext phe's ``encrypt``
  accepts.
- **Layout.** Coordinate ``i`` is slot ``i mod k`` of ciphertext ``i div k``, at bit
  ``w · (i mod k)``: plaintext ``j`` is ``Σ_s (v_(jk+s) - lo_(jk+s)) · 2^(w·s)``. The last
  ciphertext may have fewer than ``k`` slots in use.

The enclave folds packed ciphertexts exactly like unpacked ones, decrypts each packed
total once, reads the slots back and adds ``count · lo_i`` (the offsets are linear, so
the window's record count is all it needs, also when the totals of two key epochs are
added around a rotation). The noise of the release follows unchanged, per coordinate.

A dishonest producer can encrypt any plaintext, and a slot value above the honest range
would carry into the neighbouring slot of the window's total (bits above the last slot
would wrap it). That is why the enclave checks every record before it counts
(``sealedsum.sidecar.enclave.validity``): each slot within ``[0, hi_i - lo_i]``, nothing above
the last slot, and the ciphertexts encrypting exactly the stated plaintexts. A record that
fails is dead-lettered ``out_of_range``; the width above then holds for every total.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from sealedsum.common.errors import LayoutError

# Bits of the modulus a packed plaintext leaves unused (see the module docstring).
MARGIN_BITS = 3

MAPPING_KEYS = ("slot_bits", "slots_per_ciphertext", "ciphertexts_per_record")


@dataclass(frozen=True, slots=True)
class PackingLayout:
    """How one stream's coordinates sit in Paillier plaintexts.

    Only the three integers are part of the policy bytes; ``lows`` and ``spans`` (``lo_i`` and
    ``hi_i - lo_i`` of one record) follow from the stream's bounds.
    """

    slot_bits: int
    slots_per_ciphertext: int
    ciphertexts_per_record: int
    lows: tuple[int, ...] = field(repr=False)
    spans: tuple[int, ...] = field(repr=False)

    @classmethod
    def derive(cls, ranges: Sequence[tuple[int, int]], max_window_records: int, paillier_bits: int) -> "PackingLayout":
        """The layout for per-record ``ranges`` ``[(lo_i, hi_i)]``.

        :raises LayoutError: not even one slot fits a plaintext.
        """
        if not ranges:
            raise LayoutError("a packed stream needs at least one coordinate")
        lows = tuple(lo for lo, _ in ranges)
        spans = tuple(hi - lo for lo, hi in ranges)
        if min(spans) < 0:
            raise LayoutError("a coordinate's range is empty")
        # bit_length(x) = b means x < 2^b: a slot of b bits holds every honest window total.
        # (A range that rounds to one fixed-point value still needs a slot: one bit.)
        width = max(1, (max(spans) * max_window_records).bit_length())
        usable = paillier_bits - MARGIN_BITS
        if width > usable:
            raise LayoutError(f"a slot needs {width} bits; a {paillier_bits}-bit plaintext has {usable}")
        slots = min(len(ranges), usable // width)
        ciphertexts = -(-len(ranges) // slots)
        return cls(width, slots, ciphertexts, lows, spans)

    @property
    def dimension(self) -> int:
        return len(self.lows)

    def to_mapping(self) -> dict[str, int]:
        """The policy's ``packing`` table."""
        return {"slot_bits": self.slot_bits, "slots_per_ciphertext": self.slots_per_ciphertext,
                "ciphertexts_per_record": self.ciphertexts_per_record}

    def matches(self, declared: Mapping[str, Any]) -> bool:
        """Whether a ``packing`` table read from policy bytes is exactly this layout."""
        return (set(declared) == set(MAPPING_KEYS)
                and all(type(declared[k]) is int for k in MAPPING_KEYS)
                and dict(declared) == self.to_mapping())

    def pack(self, values: Sequence[int]) -> list[int]:
        """One record's fixed-point values as ``ciphertexts_per_record`` plaintexts.

        Each value is offset by its coordinate's ``lo_i`` and kept inside its slot: the
        encoder never produces a value outside ``[lo_i, hi_i]``, and this makes certain that
        one coordinate cannot spill into its neighbour.
        """
        if len(values) != self.dimension:
            raise ValueError(f"{len(values)} values for a layout of dimension {self.dimension}")
        w, k = self.slot_bits, self.slots_per_ciphertext
        out = []
        for start in range(0, self.dimension, k):
            plaintext = 0
            for i in range(min(start + k, self.dimension) - 1, start - 1, -1):  # highest slot first
                plaintext = (plaintext << w) | min(max(values[i] - self.lows[i], 0), self.spans[i])
            out.append(plaintext)
        return out

    def unpack(self, plaintexts: Sequence[int]) -> list[int]:
        """The slot values of decrypted packed plaintexts (each in ``[0, n)``), offsets not
        removed: for a window total, ``Σ (v_i - lo_i)`` over its records. Bits above the last
        slot (only a dishonest producer can set them) are ignored."""
        if len(plaintexts) != self.ciphertexts_per_record:
            raise ValueError(f"{len(plaintexts)} plaintexts, the layout has {self.ciphertexts_per_record}")
        w, k, mask = self.slot_bits, self.slots_per_ciphertext, (1 << self.slot_bits) - 1
        out = []
        for j, plaintext in enumerate(plaintexts):
            if plaintext < 0:
                raise ValueError("a packed plaintext is read in [0, n)")
            for s in range(min(k, self.dimension - j * k)):
                out.append((plaintext >> (w * s)) & mask)
        return out

    def totals(self, slot_sums: Sequence[int], count: int) -> list[int]:
        """Fixed-point coordinate totals of ``count`` records from their slot sums."""
        return [s + count * lo for s, lo in zip(slot_sums, self.lows, strict=True)]
