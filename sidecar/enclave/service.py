"""The enclave facade: bytes in, effects out. No broker, no disk, no clock of its own.

The enclave process's runtime (``sealedsum.sidecar.enclave_process.runtime``) feeds it
deliveries, RPC requests and ticks. Each call that changes anything answers with an
:class:`Effects` value saying what the runtime must carry out, in the order exactly-once
rests on (``sealedsum.sidecar.enclave_process.checkpoint.commit``): seal the keys, take
a checkpoint of the state, then acknowledge (or dead-letter) the input, then publish.
The runtime learns what to do from these values only, never from the core's attributes.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from sealedsum.common import wire
from sealedsum.common.errors import InvalidMessage, RecordRejected, RejectReason, RollbackDetected, StateIncompatible
from sealedsum.common.policy import EnclavePolicy, StreamPolicy
from sealedsum.sidecar.enclave import validity
from sealedsum.sidecar.enclave.aggregate import Window
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.lineage import Lineage
from sealedsum.sidecar.enclave.state import Checkpoint, Closing, EnclaveState
from sealedsum.sidecar.enclave.records import check_age, max_record_bytes, open_record
from sealedsum.sidecar.enclave.release import Notice, Publication, budget_report, exhausted_notice, noised_release, \
    receipts, refusal_notice, rotation_notice

if TYPE_CHECKING:
    from sealedsum.sidecar.enclave.frames import Increment

log = logging.getLogger("sealedsum.enclave")


@dataclass(frozen=True, slots=True)
class Effects:
    """What the runtime must carry out after one call into the core, in this order:

    1. ``seal_keys``: the keyring changed (a rotation, a retired epoch); seal it before any
       state that refers to it;
    2. ``checkpoint``: the sealed state changed; take a durable checkpoint
       (:meth:`Enclave.checkpoint`) before anything below;
    3. acknowledge the input, or dead-letter it with ``rejection`` (records only);
    4. ``publish`` these signed messages (kept pending by the core until
       :meth:`Enclave.confirm_published`);

    and hand every closing window in ``draw`` to :meth:`Enclave.draw` (on any thread),
    then its result to :meth:`Enclave.complete`. Effects of several calls combine with
    ``|`` (rejections are carried out per record and do not combine).

    ``record`` names the record one of :meth:`Enclave.accept_batch`'s effects is about, as
    (stream, record id), once its envelope opened: what a notice to its producer names
    (:meth:`Enclave.refusal_notice`, :meth:`Enclave.receipts`). The left operand's is kept.
    """

    seal_keys: bool = False
    checkpoint: bool = False
    rejection: RecordRejected | None = None
    publish: tuple[Publication, ...] = ()
    draw: tuple["Closing", ...] = ()
    record: tuple[str, bytes] | None = None

    def __or__(self, other: "Effects") -> "Effects":
        return Effects(self.seal_keys or other.seal_keys, self.checkpoint or other.checkpoint, None,
                       self.publish + other.publish, self.draw + other.draw, self.record)

    def __bool__(self) -> bool:
        return bool(self.seal_keys or self.checkpoint or self.rejection or self.publish or self.draw)


NOTHING = Effects()


@dataclass(frozen=True, slots=True)
class OpenedRecord:
    """A record whose sealed box opened and whose envelope fits the keys and the policy;
    not yet checked against the enclave's state (duplicates, windows, budget)."""

    envelope: wire.Envelope
    stream: StreamPolicy
    keys: EnclaveKeys


@dataclass(slots=True)
class Stats:
    accepted: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    windows_released: int = 0
    windows_withheld: int = 0
    attestations: int = 0

    def to_json(self, decryptions: int, checks: int) -> dict:
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "windows_released": self.windows_released,
            "windows_withheld": self.windows_withheld,
            "attestations": self.attestations,
            "decryptions": decryptions,
            "check_decryptions": checks,
        }


class Enclave:
    def __init__(
        self,
        keys: EnclaveKeys | Keyring,
        policy: EnclavePolicy,
        policy_bytes: bytes,
        code_digest: bytes,
        measurement: bytes,
        quote: Callable[[bytes], bytes],
        state: list[dict] | None = None,
        now_ms: int = 0,
        *,
        draw_inline: bool = True,
        ledger: dict | None = None,
    ) -> None:
        """:param state: a base checkpoint and the journal entries after it (:meth:`checkpoint`).
        :param ledger: the sealed ledger's contents (:meth:`sealed_ledger` of an enclave of
            the same code, under this policy or another), if there is one: the spend it
            holds outlives the measurement that charged it (:mod:`.lineage`).
        :param draw_inline: draw a window's release as soon as it closes (one thread); with
            ``False`` closed windows come back as :attr:`Effects.draw` for the runtime to draw
            on a thread of its own.
        :raises StateIncompatible: ``state`` or ``ledger`` is not one this code can read.
        :raises RollbackDetected: ``keys`` are older than the epoch ``state`` was written under.
        :raises InheritedSpendMismatch: ``ledger`` holds spend of a stream of this policy
            charged under other privacy parameters.
        """
        self.keyring = keys if isinstance(keys, Keyring) else Keyring.single(keys)
        self.policy = policy
        self.policy_bytes = policy_bytes
        self.code_digest = code_digest
        self.measurement = measurement
        self._quote = quote
        # What the sealed state holds (windows, ledgers, pending publications...), and views of it.
        self.state = EnclaveState.fresh(policy)
        self.streams, self.ledgers, self.exhausted = self.state.streams, self.state.ledgers, self.state.exhausted
        # Signed messages not yet confirmed by the broker, by Publication.key.
        self.pending = self.state.pending
        # Closed windows charged to the ledger whose draw is not stored yet (see complete()).
        self._closing = self.state.closing
        self._size_limit = max_record_bytes(policy, self.keys)
        self._checks = {name: validity.RecordCheck.of(stream) for name, stream in policy.streams.items()}
        self._draw_inline = draw_inline
        self.stats = Stats()
        if state is not None:
            recorded = state[-1].get("core", {}).get("key_epoch", 0)
            if recorded > self.keyring.current_epoch:
                # The keys are sealed before any state that names their epoch (checkpoint.commit),
                # so an older key file than the state is one put back: it would undo a rotation.
                raise RollbackDetected(f"the sealed keys are at epoch {self.keyring.current_epoch} but the sealed "
                                       f"state was written under epoch {recorded}: an older key file was put back")
            self.state.restore(state, {e: k.paillier_public for e, k in self.keyring.epochs.items()})
        try:
            self.lineage = Lineage(measurement, ledger)
        except (ValueError, KeyError, TypeError) as err:
            raise StateIncompatible(f"the sealed ledger does not fit this code: {type(err).__name__}: {err}") from err
        # Before the exhaustion check below: an inherited spend may have used up a budget.
        self.lineage.apply(self.state, restored=state is not None)
        for name, ledger in self.ledgers.items():
            if name not in self.exhausted and not ledger.allows():
                self._exhaust(name, now_ms)
        for name in policy.burnable_streams():
            log.warning("one producer can spend this stream's whole privacy budget as fast as it sends records",
                        extra={"fields": {
                            "stream": name, "window_records": policy.streams[name].window_records,
                            "hint": "set min_release_interval_seconds on the stream, or require identities "
                                    "([identities] required = true) with max_records_per_producer below window_records"}})

    @property
    def keys(self) -> EnclaveKeys:
        """The current key epoch: what attestation hands out and what new records use."""
        return self.keyring.current

    @property
    def decryptions(self) -> int:
        return self.keyring.decryptions

    def start(self) -> Effects:
        """What a freshly started enclave owes: a checkpoint (every start begins a new base),
        every signed but unconfirmed publication the sealed state held (the same bytes, never
        a new draw), and the windows a crash left closing."""
        return Effects(checkpoint=True, publish=tuple(self.pending.values()), draw=tuple(self._closing.values()))

    @property
    def size_limit(self) -> int:
        """The largest sealed record any stream of this policy can produce; larger ones are
        refused ``too_large`` before anything else is done with them."""
        return self._size_limit

    def max_delivery_bytes(self) -> int:
        """The largest delivery worth taking: one sealed record, or a record batch."""
        return max(self._size_limit, wire.MAX_BATCH_BYTES)

    def sealed_ledger(self) -> dict:
        """What the sealed ledger must hold now (for the runtime to seal and write with every
        checkpoint that changed it, after the state and before anything is published)."""
        return self.lineage.to_json(self.state)

    def sealed_keys(self, sealing_key: bytes) -> bytes:
        """The keyring sealed for this measurement (for the runtime to write, on ``seal_keys``)."""
        return self.keyring.seal(sealing_key, self.measurement)

    def stats_json(self) -> dict:
        return self.stats.to_json(self.decryptions, self.keyring.checks)

    def rotate(self, now_ms: int) -> Effects:
        """New encryption keys; the old epoch drains for ``key_grace_seconds``.

        Also signs a ``key_rotated`` notice for producers and keeps it pending (so it is
        sealed with the state and sent again after a crash or a broker loss until the broker
        confirms it); the effects publish it.
        """
        old = self.keyring.current_epoch
        new = self.keyring.rotate(self.policy.paillier_bits, now_ms, int(self.policy.key_grace_seconds * 1000))
        notice = rotation_notice(new, old, self.keyring.retire_at[old], self.measurement, now_ms)
        self.pending[notice.key] = notice
        log.info("keys rotated", extra={"fields": {"from_epoch": old, "to_epoch": new.epoch,
                                                   "old_epoch_retires_in_s": self.policy.key_grace_seconds}})
        return Effects(seal_keys=True, checkpoint=True, publish=(notice,))

    def rotation_due(self, now_ms: int) -> bool:
        every = self.policy.rotate_keys_every_seconds
        return every is not None and now_ms - self.keyring.rotated_at_ms >= every * 1000

    # -- RPC ------------------------------------------------------------------------------
    def attest(self, request: bytes) -> bytes:
        """Answer an attestation request.

        :raises InvalidMessage: the request is not one.
        """
        nonce = wire.AttestRequest.from_bytes(request).nonce
        keys = self.keys.bundle_bytes
        quote = self._quote(wire.report_data(keys, self.policy_bytes, nonce))
        self.stats.attestations += 1
        return wire.AttestReply(nonce, self.code_digest, keys, self.policy_bytes, quote).to_bytes()

    def budget(self, request: bytes, now_ms: int) -> bytes:
        """Answer a budget request with the stream's signed ledger.

        :raises InvalidMessage: not a budget request, or an unknown stream.
        """
        req = wire.BudgetRequest.from_bytes(request)
        policy = self.policy.streams.get(req.stream)
        if policy is None:
            raise InvalidMessage(f"budget request for unknown stream {req.stream!r}")
        return budget_report(policy, self.keys, self.measurement, now_ms, req.nonce,
                             req.stream in self.exhausted, self.ledgers[req.stream].summary())

    def answer(self, request: bytes, now_ms: int) -> bytes:
        """Dispatch an RPC request by its magic."""
        if request[:4] == wire.BUDGET_REQUEST_MAGIC:
            return self.budget(request, now_ms)
        return self.attest(request)

    # -- records ----------------------------------------------------------------------
    # A record goes through two steps. ``open`` reads only keys and policy, so the runtime
    # may run it on another thread (libsodium releases the GIL); ``accept`` changes state
    # and runs on the runtime's thread, in delivery order. ``on_record`` does both.
    def on_record(self, body: bytes, now_ms: int) -> Effects:
        return self.accept(self.open(body), now_ms)

    def records_in(self, body: bytes, kind: str | None) -> tuple[bytes, ...] | RecordRejected:
        """The sealed records one delivery carries: itself, or those of a record batch
        (AMQP type ``records``). A batch that does not parse is refused whole."""
        if kind != wire.RECORD_BATCH_TYPE:
            return (body,)
        try:
            return wire.RecordBatch.from_bytes(body).records
        except InvalidMessage as err:
            reason = RejectReason.TOO_LARGE if len(body) > wire.MAX_BATCH_BYTES else RejectReason.MALFORMED
            self.stats.rejected[reason.value] += 1
            return RecordRejected(reason, str(err))

    def oversized(self, size: int) -> RecordRejected:
        """The refusal of a delivery of ``size`` bytes, more than :meth:`max_delivery_bytes`: it
        is refused unread (the runtime keeps only a prefix of it)."""
        self.stats.rejected[RejectReason.TOO_LARGE.value] += 1
        return RecordRejected(RejectReason.TOO_LARGE, f"{size} bytes > {self.max_delivery_bytes()}")

    def open(self, body: bytes) -> OpenedRecord | RecordRejected:
        """Open the sealed box and validate the record against keys and policy.

        Thread-safe as long as no key rotation or retirement runs at the same time.
        Returns the rejection instead of raising it, so batches can be opened at once.
        """
        try:
            envelope, stream, keys = open_record(body, self.keyring, self.policy, self._size_limit)
            try:
                self._checks[stream.name].values(envelope.plaintexts, keys.paillier_public.n)
            except RecordRejected as rejection:
                rejection.record = (envelope.stream, envelope.record_id)
                raise
            return OpenedRecord(envelope, stream, keys)
        except RecordRejected as rejection:
            return rejection
        except Exception as err:  # noqa: BLE001 - the enclave must never die on input
            log.exception("unexpected error opening a record; dead-lettering it")
            return RecordRejected(RejectReason.MALFORMED, f"internal error: {type(err).__name__}")

    def accept(self, opened: OpenedRecord | RecordRejected, now_ms: int) -> Effects:
        """Count one opened record into its window (or refuse it): :meth:`accept_batch` of one."""
        return self.accept_batch([opened], now_ms)[0]

    def accept_batch(self, opened: Sequence[OpenedRecord | RecordRejected], now_ms: int) -> list[Effects]:
        """Count opened records (what ``open`` returned) into their windows in order, or
        refuse them; one :class:`Effects` per record.

        A counted record's effects ask for a checkpoint (its id and contribution must be
        durable before its delivery is acknowledged); a refused one's carry the rejection
        (and may carry other effects too, such as a window another record closed). Records
        are counted, then checked together (:func:`validity.mismatched`: their ciphertexts
        must encrypt the plaintexts ``open`` checked) before a window closes and at the end
        of the batch; a record that lies is taken out again and refused ``out_of_range``,
        as if it had never come.
        """
        results: list[Effects] = []
        unchecked: list[tuple[int, OpenedRecord, int]] = []  # (index, record, forget_at)
        # Time-closed windows whose span is over close first: a record counts in the window of
        # the enclave's clock when it is counted, never in one whose scheduled end has passed.
        rolled = self._close([w for st in self.streams.values() if st.policy.window_ms
                              for w in [st.due(now_ms)] if w is not None], now_ms)
        for item in opened:
            i = len(results)
            counted = self._count(item, now_ms)
            if isinstance(counted, Effects):
                results.append(counted)
                continue
            results.append(Effects(checkpoint=True))
            unchecked.append((i, item, counted))
            state = self.streams[item.stream.name]
            if state.ready(now_ms):
                self._settle(unchecked, results)
                if state.ready(now_ms):  # record i was not the liar, or the window would not be full
                    results[i] |= self._close([state.close(now_ms)], now_ms)
        self._settle(unchecked, results)
        if rolled and results:  # owed whatever becomes of the first record
            results[0] = dataclasses.replace(results[0] | rolled, rejection=results[0].rejection)
        return [dataclasses.replace(r, record=(o.stream.name, o.envelope.record_id) if isinstance(o, OpenedRecord)
                                    else o.record) for r, o in zip(results, opened)]

    def refusal_notice(self, token: str, effects: Effects, batch_index: int | None, now_ms: int) -> Notice:
        """The signed notice for the producer whose token a record carried that ``effects``
        (one record's, from :meth:`accept_batch`, or a refusal from :meth:`oversized` or
        :meth:`records_in` wrapped in Effects) dead-letter it; the runtime publishes it with
        the dead letter."""
        return refusal_notice(self.keys, self.measurement, now_ms, token, effects.rejection, effects.record,
                              batch_index)

    def receipts(self, counted: dict[str, list[tuple[str, bytes]]], now_ms: int) -> list[Notice]:
        """One signed receipt per token for the counted records (``Effects.record`` of each)
        a checkpoint now holds; the runtime publishes them after that checkpoint."""
        return receipts(self.keys, self.measurement, now_ms, counted)

    def _count(self, opened: OpenedRecord | RecordRejected, now_ms: int) -> Effects | int:
        """Count a record into its window unchecked: its replay horizon (``forget_at``), or
        the effects of its refusal."""
        try:
            if isinstance(opened, RecordRejected):
                raise opened
            envelope, stream, keys = opened.envelope, opened.stream, opened.keys
            state = self.streams[stream.name]
            state.check_duplicate(envelope)
            if stream.name in self.exhausted:
                raise RecordRejected(RejectReason.BUDGET_EXHAUSTED,
                                     f"stream {stream.name!r} has spent its privacy budget")
            check_age(envelope, self.policy, now_ms)
            forget_at = envelope.sent_at_ms + int((self.policy.max_record_age_seconds + 1) * 1000)
            state.accept(envelope, keys.paillier_public, forget_at, now_ms)
            self.state.new_seen.append((stream.name, envelope.record_id, forget_at))
        except RecordRejected as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            return Effects(rejection=rejection)
        except Exception as err:  # noqa: BLE001 - the enclave must never die on input
            log.exception("unexpected error on a record; dead-lettering it")
            rejection = RecordRejected(RejectReason.MALFORMED, f"internal error: {type(err).__name__}")
            self.stats.rejected[rejection.reason.value] += 1
            return Effects(rejection=rejection)
        self.stats.accepted += 1
        return forget_at

    def _settle(self, unchecked: list[tuple[int, OpenedRecord, int]], results: list[Effects]) -> None:
        """Check the records counted since the last check, per stream and key epoch (their
        ciphertexts against their plaintexts, coordinate by coordinate), and take out the
        ones that lie."""
        groups: dict[tuple[str, int], list[tuple[int, OpenedRecord, int]]] = {}
        for member in unchecked:
            groups.setdefault((member[1].stream.name, member[1].keys.epoch), []).append(member)
        unchecked.clear()
        for members in groups.values():
            keys = members[0][1].keys
            liars = validity.mismatched(
                [validity.Member(m.envelope.ciphertexts, m.envelope.plaintexts, m.envelope.record_id)
                 for _, m, _ in members], keys.paillier_public.n, keys.nsquare, keys.decrypt_product)
            for k in liars:
                i, record, forget_at = members[k]
                self._withdraw(record, forget_at)
                rejection = RecordRejected(RejectReason.OUT_OF_RANGE,
                                           "its ciphertexts do not encrypt the plaintexts it states")
                results[i] = dataclasses.replace(results[i], rejection=rejection)

    def _withdraw(self, record: OpenedRecord, forget_at: int) -> None:
        envelope = record.envelope
        self.streams[record.stream.name].withdraw(envelope, record.keys.paillier_public)
        entry = (record.stream.name, envelope.record_id, forget_at)
        for k in range(len(self.state.new_seen) - 1, -1, -1):  # it is near the end: this batch's
            if self.state.new_seen[k] == entry:
                del self.state.new_seen[k]
                break
        self.stats.accepted -= 1
        self.stats.rejected[RejectReason.OUT_OF_RANGE.value] += 1

    # -- replicas: the release holder's part -----------------------------------------------
    # Replicas ([cluster]) open and check records (checks 1 to 11 and 19 of docs/protocol.md
    # section 11.1) and send the holder increments: the Paillier sum of a batch, per stream and
    # key epoch, with each record's id, producer, age and window. The holder makes the checks
    # that need the state (12 to 18) here, against the one state every replica's records meet.
    def parks(self, increment: "Increment", close_ms: int) -> bool:
        """Whether ``increment`` was read in a time-closed window later than the open one (the
        holder is still waiting for the other replicas to report the open one): it waits
        until that window opens, so a record counts in the window its replica read it in."""
        for group in increment.groups:
            state = self.streams.get(group.stream)
            span = state.policy.window_ms if state is not None else None
            if span is not None and increment.read_ms // span > (state.current.index or close_ms // span):
                return True
        return False

    def merge(self, increment: "Increment", now_ms: int, close_ms: int | None = None
              ) -> tuple[Effects, tuple[tuple[int, RecordRejected], ...]]:
        """Count a replica's increment into the open windows, all of it or nothing.

        :param close_ms: the clock time-closed windows close by (``now_ms`` less what the
            holder still waits for replicas to report; ``now_ms`` by default).
        :returns: the effects, and the refused records (by index in ``increment.members``) with
            their reasons: when there are any, nothing of the increment is counted (its
            replica takes the refused ones out of its partial total and sends the rest again).
        """
        close_ms = now_ms if close_ms is None else close_ms
        effects = self._close([w for st in self.streams.values() if st.policy.window_ms
                               for w in [st.due(close_ms)] if w is not None], now_ms)
        refused: list[tuple[int, RecordRejected]] = []
        pending: collections.Counter = collections.Counter()
        from_producer: collections.Counter = collections.Counter()
        taken: set[tuple[str, bytes]] = set()
        for i, (group, member) in enumerate(increment.members):
            try:
                state = self.streams.get(group.stream)
                keys = self.keyring.epochs.get(group.epoch)
                if state is None or keys is None or len(group.delta) != state.policy.ciphertexts_per_record \
                        or not all(0 < c < keys.nsquare for c in group.delta):
                    raise RecordRejected(RejectReason.MALFORMED, "an increment that does not fit this policy and keys")
                if member.record_id in state.seen or (group.stream, member.record_id) in taken:
                    raise RecordRejected(RejectReason.DUPLICATE, f"record id {member.record_id.hex()} seen already")
                if group.stream in self.exhausted:
                    raise RecordRejected(RejectReason.BUDGET_EXHAUSTED,
                                         f"stream {group.stream!r} has spent its privacy budget")
                check_age(member, self.policy, now_ms)
                state.admission(member.window, member.producer_id, pending[group.stream],
                                from_producer[(group.stream, member.producer_id)])
            except RecordRejected as rejection:
                rejection.record = (group.stream, member.record_id)
                self.stats.rejected[rejection.reason.value] += 1
                refused.append((i, rejection))
                continue
            pending[group.stream] += 1
            from_producer[(group.stream, member.producer_id)] += 1
            taken.add((group.stream, member.record_id))
        if refused:
            return effects, tuple(refused)
        horizon = int((self.policy.max_record_age_seconds + 1) * 1000)
        for group in increment.groups:
            state = self.streams[group.stream]
            members = [(m.record_id, m.producer_id, m.sent_at_ms + horizon) for m in group.members]
            state.admit(group.epoch, self.keyring.epochs[group.epoch].paillier_public, group.delta, members, now_ms)
            self.state.new_seen.extend((group.stream, rid, forget_at) for rid, _, forget_at in members)
            self.stats.accepted += len(members)
            if state.ready(now_ms):
                effects |= self._close([state.close(now_ms)], now_ms)
        return effects | Effects(checkpoint=True), ()

    def on_tick(self, now_ms: int) -> Effects:
        """Close windows whose time is up; forget record ids past the replay horizon; retire
        key epochs past their grace period."""
        closed = []
        for state in self.streams.values():
            w = state.due(now_ms)
            if w is not None:
                closed.append(w)
            state.forget_expired(now_ms)
        effects = self._close(closed, now_ms)
        in_use = {e for st in self.streams.values() for e in st.current.totals}
        in_use |= {e for c in self._closing.values() for e in c.window.totals}  # still to be decrypted
        if self.keyring.retire_due(now_ms, in_use):
            effects |= Effects(seal_keys=True, checkpoint=True)
        return effects

    def confirm_published(self, publication: Publication) -> Effects:
        """The broker took ``publication``: it leaves the pending set (a checkpoint records that)."""
        if self.pending.pop(publication.key, None) is not None:
            return Effects(checkpoint=True)
        return NOTHING

    def _close(self, windows: list[Window], now_ms: int) -> Effects:
        """Charge and draw each closed window, or withhold it.

        A count-closed window below ``min_batch`` is withheld uncharged: its count is public by
        construction (replace-one), so the decision reveals nothing. A time-closed window is
        charged whatever it holds, even nothing, and whether it is released is decided on the
        noised count its release draws anyway (:meth:`complete`): post-processing, so the
        decision costs no budget and no released field is an exact function of the count.
        """
        effects = NOTHING
        for w in windows:
            effects |= Effects(checkpoint=True)  # the stream's window index moved on
            policy = self.policy.streams[w.stream]
            if w.stream in self.exhausted:
                continue  # its windows still pass; none is drawn (exhaustion is public)
            if policy.count_closed and w.count < policy.min_batch:
                self.stats.windows_withheld += 1
                log.info("window withheld", extra={"fields": {
                    "stream": w.stream, "window": w.index, "reason": "below min_batch",
                    "min_batch": policy.min_batch}})
                continue
            ledger = self.ledgers[w.stream]
            ledger.charge(w.index)  # before the draw: a failure below may waste budget, never overspend it
            closed_at = self.streams[w.stream].closes_at(w, now_ms)
            closing = Closing(f"{w.stream}/{w.index}", w, ledger.summary(), closed_at, not ledger.allows())
            if closing.exhausts:
                self.exhausted.add(w.stream)  # refuse records from now on; the notice follows the release
            self._closing[closing.key] = closing
            effects |= self._exhaust_peers(ledger, closed_at)
            if not self._draw_inline:
                effects |= Effects(draw=(closing,))
                continue
            try:
                outcome: Publication | Exception = self.draw(closing)
            except Exception as err:  # noqa: BLE001 - one bad window must not stop the enclave
                outcome = err
            effects |= self.complete(closing, outcome, now_ms)
        return effects

    def draw(self, closing: Closing) -> Publication:
        """Decrypt a closing window's totals once, add noise, sign. Reads keys and policy only,
        so the runtime may run it on another thread; :meth:`complete` stores what it returns.
        Call it once per closing window: a second call would draw fresh noise for the same total.

        :raises Exception: whatever the release failed with (``complete`` withholds the window).
        """
        policy = self.policy.streams[closing.window.stream]
        return noised_release(closing.window, policy, self.keyring, self.measurement, closing.closed_at_ms,
                              closing.budget)

    def complete(self, closing: Closing, outcome: Publication | BaseException, now_ms: int) -> Effects:
        """Store a closing window's release (or withhold the window if drawing it failed) as
        pending, with the budget notice when this release spent the budget; the effects
        checkpoint them before they are published."""
        # The stored closing, not the caller's copy: a charge to a stream of the same budget
        # group may have marked it exhausting since it was handed out (_exhaust_peers).
        stored = self._closing.pop(closing.key, None)
        if stored is None:
            return NOTHING  # completed already: never store a second draw
        w = closing.window
        out = []
        policy = self.policy.streams[w.stream]
        if isinstance(outcome, BaseException):
            log.error("release failed; the window is withheld", exc_info=outcome, extra={"fields": {
                "stream": w.stream, "window": w.index}})
            self.stats.windows_withheld += 1
        elif not policy.count_closed and outcome.message.count < policy.min_batch:
            # Decided on the noised count (post-processing); the budget stays charged.
            self.stats.windows_withheld += 1
            log.info("window withheld", extra={"fields": {
                "stream": w.stream, "window": w.index, "reason": "noised count below min_batch",
                "min_batch": policy.min_batch, "releases": closing.budget.get("releases")}})
        else:
            self.pending[outcome.key] = outcome
            self.stats.windows_released += 1
            log.info("window released", extra={"fields": {
                "stream": w.stream, "window": w.index, "releases": closing.budget.get("releases")}})
            out.append(outcome)
        if stored.exhausts:
            # Dated by the window, not by when its draw finished (a drawing thread finishes later):
            # the notice's at_ms is the closed_at_ms of the release it follows (section 13.4).
            out.append(self._exhaust(w.stream, stored.closed_at_ms))
        return Effects(checkpoint=True, publish=tuple(out))

    def _exhaust_peers(self, ledger, closed_at_ms: int) -> Effects:
        """A charge to a stream of a budget group spends the other streams' budget too: each
        one that now has no room for a release is exhausted. Its notice comes at once, or,
        when a window of it is charged but not yet drawn, right after that release (a
        consumer takes the notice as the stream's last message)."""
        out = []
        for peer in ledger.peers:
            if peer in self.exhausted or self.ledgers[peer].allows():
                continue
            drawing = [c for c in self._closing.values() if c.window.stream == peer]
            if drawing:
                self.exhausted.add(peer)
                last = max(drawing, key=lambda c: c.window.index)
                self._closing[last.key] = dataclasses.replace(last, exhausts=True)
            else:
                out.append(self._exhaust(peer, closed_at_ms))  # when the window just charged closed
        return Effects(publish=tuple(out)) if out else NOTHING

    def _exhaust(self, stream: str, at_ms: int) -> Publication:
        """The next release would exceed the budget: say so, once, and accept nothing more.

        :param at_ms: the notice's ``at_ms``: the closing time of the window whose charge spent
            the budget, or the enclave's clock at start for a ledger found spent then."""
        self.exhausted.add(stream)
        ledger = self.ledgers[stream]
        notice = exhausted_notice(self.policy.streams[stream], self.keys, self.measurement, at_ms, ledger.summary())
        self.pending[notice.key] = notice
        log.warning("privacy budget exhausted; the stream accepts no more records", extra={"fields": {
            "stream": stream, "releases": ledger.releases}})
        return notice

    # -- sealed state ------------------------------------------------------------------
    def checkpoint(self, base: bool) -> Checkpoint:
        """The state to make durable (:meth:`EnclaveState.checkpoint`); changes nothing."""
        return self.state.checkpoint(base, self.keys.epoch)

    def checkpointed(self, checkpoint: Checkpoint) -> None:
        """``checkpoint`` is durable: the record ids it holds need not go into the next one."""
        self.state.checkpointed(checkpoint)
