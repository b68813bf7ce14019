"""Windows: Paillier folding of records into running ciphertext totals.

No record is ever decrypted here. A window's totals are ciphertexts until
``release`` decrypts them once, when the window closes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import gmpy2
from phe import PaillierPublicKey

from sealedsum.common import wire
from sealedsum.common.errors import RecordRejected, RejectReason
from sealedsum.common.policy import StreamPolicy

ANONYMOUS = bytes(wire.PRODUCER_ID_SIZE)


@dataclass(slots=True)
class Window:
    """One window of one stream: the folded ciphertexts and how many records they hold.

    ``totals`` has one list of ciphertexts per key epoch that contributed: normally one,
    two around a key rotation (records sealed under the draining epoch are folded under
    its own Paillier key; the release decrypts each and adds the plaintext totals).
    """

    stream: str
    index: int
    # Ciphertexts as integers below n². Folding is Paillier addition: a product mod n²
    # (done with gmpy2 directly; phe's EncryptedNumber objects cost more than the product).
    totals: dict[int, list[int]] = field(default_factory=dict)
    count: int = 0
    opened_at_ms: int | None = None
    # Records per producer id, kept only when the stream bounds contributions.
    contributors: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def empty(cls, stream: StreamPolicy, index: int) -> "Window":
        return cls(stream.name, index)

    def ciphertexts(self) -> tuple[int, ...]:
        """Every folded total, flattened (for comparisons in tests and audits)."""
        return tuple(int(t) for e in sorted(self.totals) for t in self.totals[e])

    def to_json(self) -> dict:
        """Checkpoint form. Totals are ciphertexts: safe to write, they reveal nothing."""
        return {
            "index": self.index, "count": self.count, "opened_at_ms": self.opened_at_ms,
            "totals": {str(e): [format(int(t), "x") for t in ts] for e, ts in self.totals.items()},
            "contributors": {pid.hex(): n for pid, n in self.contributors.items()},
        }

    @classmethod
    def from_json(cls, stream: StreamPolicy, raw: dict, public_keys: dict[int, PaillierPublicKey]) -> "Window":
        totals = {}
        for e, cts in raw["totals"].items():
            key = public_keys.get(int(e))
            if key is None:  # its totals could never be decrypted
                raise ValueError(f"checkpointed window has totals under key epoch {e}, which the keyring lacks")
            totals[int(e)] = [gmpy2.mpz(int(c, 16)) for c in cts]
            if len(cts) != stream.ciphertexts_per_record:
                raise ValueError("checkpointed window has the wrong dimension")
            if not all(0 < c < key.nsquare for c in totals[int(e)]):
                raise ValueError("checkpointed window has a total out of range")
        return cls(stream.name, int(raw["index"]), totals, int(raw["count"]), raw["opened_at_ms"],
                   {bytes.fromhex(pid): int(n) for pid, n in raw["contributors"].items()})

    def fold(self, epoch: int, public_key: PaillierPublicKey, ciphertexts: tuple[int, ...], now_ms: int) -> None:
        nsquare = public_key.nsquare
        # 1 is the ciphertext of 0 with randomness 1: the identity of Paillier addition.
        current = self.totals.get(epoch) or [gmpy2.mpz(1)] * len(ciphertexts)
        self.totals[epoch] = [gmpy2.f_mod(t * c, nsquare) for t, c in zip(current, ciphertexts)]
        self.count += 1
        if self.opened_at_ms is None:
            self.opened_at_ms = now_ms

    def fold_total(self, epoch: int, public_key: PaillierPublicKey, delta: tuple[int, ...], records: int,
                   now_ms: int) -> None:
        """Fold the Paillier sum of ``records`` records (another replica's partial total)."""
        nsquare = public_key.nsquare
        current = self.totals.get(epoch) or [gmpy2.mpz(1)] * len(delta)
        self.totals[epoch] = [gmpy2.f_mod(t * gmpy2.mpz(c), nsquare) for t, c in zip(current, delta)]
        self.count += records
        if self.opened_at_ms is None:
            self.opened_at_ms = now_ms

    def unfold(self, epoch: int, public_key: PaillierPublicKey, ciphertexts: tuple[int, ...]) -> None:
        """Take a folded record out again (its ciphertexts turned out not to encrypt what
        it stated): multiply by their inverses, which exist since each is a unit mod n²."""
        nsquare = public_key.nsquare
        self.totals[epoch] = [gmpy2.f_mod(t * gmpy2.invert(c, nsquare), nsquare)
                              for t, c in zip(self.totals[epoch], ciphertexts)]
        if all(t == 1 for t in self.totals[epoch]):  # the identity: as if the epoch had added nothing
            del self.totals[epoch]
        self.count -= 1
        if self.count == 0:
            self.opened_at_ms = None


@dataclass(slots=True)
class StreamState:
    """The open window of one stream, the record ids seen within the replay horizon, and
    when the stream's previous window closed (what its release interval counts from)."""

    policy: StreamPolicy
    current: Window = field(init=False)
    seen: dict[bytes, int] = field(default_factory=dict)
    _expiry: list[tuple[int, bytes]] = field(default_factory=list)
    last_close_ms: int | None = None

    def __post_init__(self) -> None:
        # Count-closed windows are numbered 1, 2, ... as they close; time-closed ones by the
        # clock, from the first time the enclave has one (index 0 until then: not started).
        self.current = Window.empty(self.policy, 0 if self.policy.window_ms else 1)

    def check_duplicate(self, envelope: wire.Envelope) -> None:
        """Checked before age and window: a counted record that comes back (a lost ack,
        a replay) is recognised as such, whatever else has changed since.

        :raises RecordRejected: ``duplicate``.
        """
        if envelope.record_id in self.seen:
            raise RecordRejected(RejectReason.DUPLICATE, f"record id {envelope.record_id.hex()} seen already")

    def accept(self, envelope: wire.Envelope, public_key: PaillierPublicKey, forget_at_ms: int,
               now_ms: int) -> None:
        """Fold one validated envelope into the open window. Call :meth:`check_duplicate`
        first; when the window is :attr:`full`, :meth:`close` it (the enclave checks the
        records it holds first, and may :meth:`withdraw` some).

        :raises RecordRejected: a window other than the open one, or a producer over its bound.
        """
        self.admission(envelope.window, envelope.producer_id)
        if self.policy.max_records_per_producer is not None:
            self.current.contributors[envelope.producer_id] = self.current.contributors.get(envelope.producer_id, 0) + 1
        self.remember(envelope.record_id, forget_at_ms)
        self.current.fold(envelope.key_epoch, public_key, envelope.ciphertexts, now_ms)

    def admission(self, window: int, producer_id: bytes, pending: int = 0, pending_from_producer: int = 0) -> None:
        """Whether the open window takes one more record asking for ``window`` from ``producer_id``
        (checks 16 to 18 of docs/protocol.md section 11.1), with ``pending`` records (of them
        ``pending_from_producer`` from the same producer) about to be folded in ahead of it.

        :raises RecordRejected: a window other than the open one, a full window, or a producer
            over its bound.
        """
        if not self.current.index:
            raise RecordRejected(RejectReason.FUTURE_WINDOW, "no window of this stream is open yet")
        if window and window < self.current.index:
            raise RecordRejected(RejectReason.LATE_WINDOW,
                                 f"window {window} is closed; open window is {self.current.index}")
        if window > self.current.index:
            raise RecordRejected(RejectReason.FUTURE_WINDOW,
                                 f"window {window} is not open yet; open window is {self.current.index}")
        if self.current.count + pending >= self.policy.max_window_records:
            # Closing early would make the close time a function of the count (time-closed), or
            # spend the budget before the release interval allows (count-closed).
            raise RecordRejected(RejectReason.FUTURE_WINDOW,
                                 f"window {self.current.index} holds {self.current.count + pending} records, the most a "
                                 "window can; the next window opens "
                                 + ("on schedule" if not self.policy.count_closed else "when the release interval ends"))
        limit = self.policy.max_records_per_producer
        if limit is not None:
            if producer_id == ANONYMOUS:
                raise RecordRejected(RejectReason.CONTRIBUTION_LIMIT,
                                     "anonymous records are refused where contributions are bounded per producer")
            already = self.current.contributors.get(producer_id, 0) + pending_from_producer
            if already >= limit:
                raise RecordRejected(RejectReason.CONTRIBUTION_LIMIT,
                                     f"the producer already has {already} record(s) in this window (limit {limit})")

    def admit(self, epoch: int, public_key: PaillierPublicKey, delta: tuple[int, ...],
              members: list[tuple[bytes, bytes, int]], now_ms: int) -> None:
        """Fold a replica's partial total of ``members`` (record id, producer id, forget-at) into
        the open window, each of them admitted already (:meth:`admission`)."""
        for record_id, producer_id, forget_at in members:
            if self.policy.max_records_per_producer is not None:
                self.current.contributors[producer_id] = self.current.contributors.get(producer_id, 0) + 1
            self.remember(record_id, forget_at)
        self.current.fold_total(epoch, public_key, delta, len(members), now_ms)

    def withdraw(self, envelope: wire.Envelope, public_key: PaillierPublicKey) -> None:
        """Undo :meth:`accept` of a record of the open window: as if it had never come."""
        self.current.unfold(envelope.key_epoch, public_key, envelope.ciphertexts)
        self.seen.pop(envelope.record_id, None)  # its expiry entry finds nothing to drop later
        if self.policy.max_records_per_producer is not None:
            left = self.current.contributors[envelope.producer_id] - 1
            if left:
                self.current.contributors[envelope.producer_id] = left
            else:
                del self.current.contributors[envelope.producer_id]

    def ready(self, now_ms: int) -> bool:
        """A count-closed window that must close now: it holds ``window_records`` records and
        the release interval has passed. (A time-closed one closes only by the clock: at the
        record cap it refuses further records instead, see :meth:`accept`.)"""
        return (self.policy.count_closed and self.current.count >= self.policy.window_records
                and self.interval_passed(now_ms))

    def interval_passed(self, now_ms: int) -> bool:
        """Whether the stream's release interval (if it has one) has passed since its previous
        close. The first close of a stream needs no wait: one release is what any interval allows."""
        gap = self.policy.min_release_interval_ms
        return gap is None or self.last_close_ms is None or now_ms - self.last_close_ms >= gap

    def remember(self, record_id: bytes, forget_at_ms: int) -> None:
        """Count ``record_id`` as seen until ``forget_at_ms`` (also used to restore a checkpoint)."""
        self.seen[record_id] = forget_at_ms
        heapq.heappush(self._expiry, (forget_at_ms, record_id))

    def due(self, now_ms: int) -> Window | None:
        """Close the open window if its time is up: a time-closed one at the end of its clock
        span; a count-closed one once its release interval has passed, if it holds its count
        by then (records stop coming: a trickle must not wait for the next one) or if
        ``window_seconds`` (when set) have passed since its first record."""
        w = self.current
        span = self.policy.window_ms
        if span is not None:
            return self.roll(now_ms, span)
        if self.ready(now_ms):
            return self.close(now_ms)
        if (self.policy.window_seconds is not None and w.opened_at_ms is not None
                and now_ms - w.opened_at_ms >= self.policy.window_seconds * 1000 and self.interval_passed(now_ms)):
            return self.close(now_ms)
        return None

    def roll(self, now_ms: int, span: int) -> Window | None:
        """A time-closed stream at ``now_ms``: the open window, closed, if the clock has passed
        its end (whatever it holds, even nothing); the next open window is the clock's own, so
        windows whose whole span passed while the enclave was not running are skipped (that
        depends on the enclave's uptime, never on the records)."""
        clock = now_ms // span
        if self.current.index == 0:  # not started: open the clock's window
            self.current.index = clock
            return None
        if clock <= self.current.index:
            return None
        closed = self.current
        self.current = Window.empty(self.policy, clock)
        return closed

    def closes_at(self, window: Window, now_ms: int) -> int:
        """When ``window`` closed, as releases state it: a time-closed window's scheduled end
        (the same whatever arrived), a count-closed window's actual close."""
        span = self.policy.window_ms
        return (window.index + 1) * span if span is not None else now_ms

    def forget_expired(self, now_ms: int) -> None:
        """Drop ids whose records would now be rejected as expired anyway."""
        while self._expiry and self._expiry[0][0] <= now_ms:
            at, rid = heapq.heappop(self._expiry)
            if self.seen.get(rid) == at:  # not a withdrawn record's entry for an id seen again since
                del self.seen[rid]

    def close(self, now_ms: int) -> Window:
        """Close a count-closed stream's open window at ``now_ms`` and open the next."""
        closed = self.current
        self.current = Window.empty(self.policy, closed.index + 1)
        self.last_close_ms = now_ms
        return closed
