"""The enclave facade: bytes in, outcomes out. No broker, no disk, no clock of its own.

The runtime (``sealedsum.sidecar.runtime``) feeds it deliveries, RPC requests and ticks and
carries out what it returns: persist the sealed state when :attr:`Enclave.dirty`,
then dead-letter a record with a reason or acknowledge it, and publish what is pending.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
from dataclasses import dataclass, field
from typing import Callable

from sealedsum.common import wire
from sealedsum.common.errors import InvalidMessage, RecordRejected, RejectReason
from sealedsum.common.policy import EnclavePolicy, StreamPolicy
from sealedsum.common.results import PAYLOADS
from sealedsum.sidecar.enclave.aggregate import StreamState, Window
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.ledger import StreamLedger
from sealedsum.sidecar.enclave.records import check_age, max_record_bytes, open_record
from sealedsum.sidecar.enclave.release import Publication, budget_report, exhausted_notice, noised_release, rotation_notice

log = logging.getLogger("sealedsum.enclave")

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What to do with one delivery: dead-letter it (``rejection``) or acknowledge it,
    and publish ``releases`` (releases and notices this record caused)."""

    rejection: RecordRejected | None = None
    releases: tuple[Publication, ...] = ()


@dataclass(frozen=True, slots=True)
class OpenedRecord:
    """A record whose sealed box opened and whose envelope fits the keys and the policy;
    not yet checked against the enclave's state (duplicates, windows, budget)."""

    envelope: wire.Envelope
    stream: StreamPolicy
    keys: EnclaveKeys


@dataclass(frozen=True, slots=True)
class Closing:
    """A closed window whose release is charged to the ledger but not drawn yet. Its totals
    are ciphertexts, safe in the sealed state, until :meth:`Enclave.finish` decrypts,
    noises and signs them. ``budget`` is the ledger's summary after this release's charge;
    ``exhausts``: no release of the stream fits the budget after this one."""

    key: str
    window: Window
    budget: dict
    closed_at_ms: int
    exhausts: bool

    def to_json(self) -> dict:
        return {"stream": self.window.stream, "window": self.window.to_json(), "budget": self.budget,
                "closed_at_ms": self.closed_at_ms, "exhausts": self.exhausts}


@dataclass(slots=True)
class Stats:
    accepted: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    windows_released: int = 0
    windows_withheld: int = 0
    attestations: int = 0

    def to_json(self, decryptions: int) -> dict:
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "windows_released": self.windows_released,
            "windows_withheld": self.windows_withheld,
            "attestations": self.attestations,
            "decryptions": decryptions,
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
    ) -> None:
        self.keyring = keys if isinstance(keys, Keyring) else Keyring.single(keys)
        self.policy = policy
        self.policy_bytes = policy_bytes
        self.code_digest = code_digest
        self.measurement = measurement
        self._quote = quote
        self.streams = {name: StreamState(p) for name, p in policy.streams.items()}
        self.ledgers = {name: StreamLedger(p) for name, p in policy.streams.items()}
        self.exhausted: set[str] = set()
        self.size_limit = max_record_bytes(policy, self.keys)
        self.stats = Stats()
        # Signed messages not yet confirmed by the broker, by Publication.key.
        self.pending: dict[str, Publication] = {}
        # With defer_releases, closed windows wait here for the runtime to have them drawn
        # (finish, on another thread) and stored (complete); otherwise both happen at once.
        self.defer_releases = False
        self.closing: dict[str, Closing] = {}
        # Set when something the sealed state holds changed; the runtime persists and clears it.
        self.dirty = False
        # Set when the keyring changed (rotation, retirement); the runtime reseals the keys first.
        self.keys_dirty = False
        # Record ids accepted since the last checkpoint: (stream, id, forget_at_ms).
        self._new_seen: list[tuple[str, bytes, int]] = []
        if state is not None:
            self._restore(state)
        for name, ledger in self.ledgers.items():
            if name not in self.exhausted and not ledger.allows():
                self._exhaust(name, now_ms)

    @property
    def keys(self) -> EnclaveKeys:
        """The current key epoch: what attestation hands out and what new records use."""
        return self.keyring.current

    @property
    def decryptions(self) -> int:
        return self.keyring.decryptions

    def rotate(self, now_ms: int) -> EnclaveKeys:
        """New encryption keys; the old epoch drains for ``key_grace_seconds``.

        Also signs a ``key_rotated`` notice for producers and keeps it in :attr:`pending`
        (so it is sealed with the state and sent again after a crash or a broker loss
        until the broker confirms it); :meth:`announcements` lists it for the runtime.
        """
        old = self.keyring.current_epoch
        new = self.keyring.rotate(self.policy.paillier_bits, now_ms, int(self.policy.key_grace_seconds * 1000))
        notice = rotation_notice(new, old, self.keyring.retire_at[old], self.measurement, now_ms)
        self.pending[notice.key] = notice
        self.keys_dirty = self.dirty = True
        log.info("keys rotated", extra={"fields": {"from_epoch": old, "to_epoch": new.epoch,
                                                   "old_epoch_retires_in_s": self.policy.key_grace_seconds}})
        return new

    def announcements(self) -> tuple[Publication, ...]:
        """The key-rotation notices not yet confirmed by the broker."""
        return tuple(p for p in self.pending.values() if p.announce)

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
    def on_record(self, body: bytes, now_ms: int) -> RecordOutcome:
        return self.accept(self.open(body, now_ms), now_ms)

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

    def open(self, body: bytes, now_ms: int) -> OpenedRecord | RecordRejected:
        """Open the sealed box and validate the record against keys and policy.

        Thread-safe as long as no key rotation or retirement runs at the same time.
        Returns the rejection instead of raising it, so batches can be opened at once.
        """
        try:
            return OpenedRecord(*open_record(body, self.keyring, self.policy, now_ms, self.size_limit))
        except RecordRejected as rejection:
            return rejection
        except Exception as err:  # noqa: BLE001 - the enclave must never die on input
            log.exception("unexpected error opening a record; dead-lettering it")
            return RecordRejected(RejectReason.MALFORMED, f"internal error: {type(err).__name__}")

    def accept(self, opened: OpenedRecord | RecordRejected, now_ms: int) -> RecordOutcome:
        """Count an opened record into its window (or refuse it); what ``open`` returned."""
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
            closed = state.accept(envelope, keys.paillier_public, forget_at, now_ms)
            self._new_seen.append((stream.name, envelope.record_id, forget_at))
            self.dirty = True
        except RecordRejected as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            return RecordOutcome(rejection=rejection)
        except Exception as err:  # noqa: BLE001 - the enclave must never die on input
            log.exception("unexpected error on a record; dead-lettering it")
            rejection = RecordRejected(RejectReason.MALFORMED, f"internal error: {type(err).__name__}")
            self.stats.rejected[rejection.reason.value] += 1
            return RecordOutcome(rejection=rejection)
        self.stats.accepted += 1
        return RecordOutcome(releases=self._close([closed], now_ms) if closed else ())

    def on_tick(self, now_ms: int) -> tuple[Publication, ...]:
        """Close windows whose time is up; forget record ids past the replay horizon."""
        closed = []
        for state in self.streams.values():
            w = state.due(now_ms)
            if w is not None:
                closed.append(w)
            state.forget_expired(now_ms)
        released = self._close(closed, now_ms)
        in_use = {e for st in self.streams.values() for e in st.current.totals}
        in_use |= {e for c in self.closing.values() for e in c.window.totals}  # still to be decrypted
        if self.keyring.retire_due(now_ms, in_use):
            self.keys_dirty = self.dirty = True
        return released

    def confirm_published(self, publication: Publication) -> None:
        if self.pending.pop(publication.key, None) is not None:
            self.dirty = True

    def _close(self, windows: list[Window], now_ms: int) -> tuple[Publication, ...]:
        out = []
        for w in windows:
            self.dirty = True  # the stream's window index moved on
            policy = self.policy.streams[w.stream]
            if w.count < policy.min_batch:
                self.stats.windows_withheld += 1
                log.info("window withheld", extra={"fields": {
                    "stream": w.stream, "window": w.index, "reason": "below min_batch",
                    "min_batch": policy.min_batch}})
                continue
            ledger = self.ledgers[w.stream]
            ledger.charge(w.index)  # before the draw: a failure below may waste budget, never overspend it
            closing = Closing(f"{w.stream}/{w.index}", w, ledger.summary(), now_ms, not ledger.allows())
            if closing.exhausts:
                self.exhausted.add(w.stream)  # refuse records from now on; the notice follows the release
            if self.defer_releases:
                self.closing[closing.key] = closing
                continue
            try:
                outcome: Publication | Exception = self.finish(closing)
            except Exception as err:  # noqa: BLE001 - one bad window must not stop the enclave
                outcome = err
            out += self.complete(closing, outcome, now_ms)
        return tuple(out)

    def finish(self, closing: Closing) -> Publication:
        """Decrypt a closing window's totals once, add noise, sign. Reads keys and policy only,
        so the runtime may run it on another thread; :meth:`complete` stores what it returns.

        :raises Exception: whatever the release failed with (``complete`` withholds the window).
        """
        policy = self.policy.streams[closing.window.stream]
        return noised_release(closing.window, policy, self.keyring, self.measurement, closing.closed_at_ms,
                              closing.budget)

    def complete(self, closing: Closing, outcome: Publication | BaseException, now_ms: int) -> tuple[Publication, ...]:
        """Store a closing window's release (or withhold the window if drawing it failed) as
        pending, with the budget notice when this release spent the budget."""
        self.closing.pop(closing.key, None)
        self.dirty = True
        w = closing.window
        out = []
        if isinstance(outcome, BaseException):
            log.error("release failed; the window is withheld", exc_info=outcome, extra={"fields": {
                "stream": w.stream, "window": w.index}})
            self.stats.windows_withheld += 1
        else:
            self.pending[outcome.key] = outcome
            self.stats.windows_released += 1
            log.info("window released", extra={"fields": {
                "stream": w.stream, "window": w.index, "releases": closing.budget.get("releases")}})
            out.append(outcome)
        if closing.exhausts:
            out.append(self._exhaust(w.stream, now_ms))
        return tuple(out)

    def _exhaust(self, stream: str, now_ms: int) -> Publication:
        """The next release would exceed the budget: say so, once, and accept nothing more."""
        self.exhausted.add(stream)
        ledger = self.ledgers[stream]
        notice = exhausted_notice(self.policy.streams[stream], self.keys, self.measurement, now_ms, ledger.summary())
        self.pending[notice.key] = notice
        self.dirty = True
        log.warning("privacy budget exhausted; the stream accepts no more records", extra={"fields": {
            "stream": stream, "releases": ledger.releases}})
        return notice

    # -- sealed state ------------------------------------------------------------------
    # What must survive a crash: open windows (ciphertext totals, counts, contributors),
    # record ids within the replay horizon, ledgers, window numbers, exhaustion, and
    # signed but unconfirmed publications (so a retry never draws new noise).
    def _core(self) -> dict:
        return {
            "version": STATE_VERSION,
            "key_epoch": self.keys.epoch,
            "streams": {
                name: {"window": self.streams[name].current.to_json(), "ledger": self.ledgers[name].to_json(),
                       "exhausted": name in self.exhausted}
                for name in self.policy.streams
            },
            "pending": {key: {"stream": p.stream, "body": base64.b64encode(p.body).decode()}
                        for key, p in self.pending.items()},
        } | ({"closing": {key: c.to_json() for key, c in self.closing.items()}} if self.closing else {})

    def snapshot(self) -> dict:
        """The whole state, for a fresh checkpoint base."""
        self._new_seen.clear()
        return {"core": self._core(), "seen": {
            name: [[rid.hex(), t] for rid, t in st.seen.items()] for name, st in self.streams.items()}}

    def journal_entry(self) -> dict:
        """The change since the last checkpoint: the (small) core, and the new record ids."""
        new, self._new_seen = self._new_seen, []
        seen: dict[str, list] = {}
        for stream, rid, t in new:
            seen.setdefault(stream, []).append([rid.hex(), t])
        return {"core": self._core(), "seen": seen}

    def _restore(self, checkpoints: list[dict]) -> None:
        """Apply a base snapshot and the journal entries after it, in order."""
        for checkpoint in checkpoints:
            for name, ids in checkpoint["seen"].items():
                for rid, t in ids:
                    self.streams[name].remember(bytes.fromhex(rid), int(t))
        core = checkpoints[-1]["core"]
        if core.get("version") != STATE_VERSION:
            raise ValueError("sealed state has an unknown version")
        public_keys = {e: k.paillier_public for e, k in self.keyring.epochs.items()}
        for name, raw in core["streams"].items():
            policy = self.policy.streams[name]
            self.ledgers[name] = StreamLedger.from_json(policy, raw["ledger"])
            self.streams[name].current = Window.from_json(policy, raw["window"], public_keys)
            if raw["exhausted"]:
                self.exhausted.add(name)
        for key, raw in core.get("closing", {}).items():
            policy = self.policy.streams[raw["stream"]]
            window = Window.from_json(policy, raw["window"], public_keys)
            self.closing[key] = Closing(key, window, raw["budget"], int(raw["closed_at_ms"]), bool(raw["exhausts"]))
        for key, raw in core["pending"].items():
            body = base64.b64decode(raw["body"])
            payload = wire.SignedMessage.from_bytes(body).payload
            kind = json.loads(payload)["kind"]
            self.pending[key] = Publication(key, raw["stream"], body, PAYLOADS[kind].from_payload(payload))
