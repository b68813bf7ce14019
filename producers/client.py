"""The producer library.

``RecordSealer.seal`` is pure (values in, sealed bytes out); :class:`Producer` adds
the broker: attestation first (and again when the keys may be stale, in
:meth:`Producer.seal_current`), then confirmed publishing. Nothing is sent before the
enclave passed every attestation check.

.. warning::
   A sealed box hides the record from everyone but the attested enclave, but it does
   not prove who sent it. The privacy guarantee assumes producers clip to the
   declared bounds, which this library always does.
"""

from __future__ import annotations

import logging
import numbers
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Union

from nacl.public import PublicKey, SealedBox
from phe import PaillierPublicKey

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import signing, wire
from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.backoff import Backoff
from sealedsum.common.config import Config
from sealedsum.common.errors import InvalidMessage, InvalidResultSignature, PolicyMismatch, StreamExhausted, \
    TransportError
from sealedsum.common.policy import StreamPolicy
from sealedsum.common.requirements import Requirements
from sealedsum.common.results import KeyRotated, verify_key_rotated, verify_notice
from sealedsum.producers.confirms import Ticket
from sealedsum.producers.encryption import encryptor_from_env
from sealedsum.producers.outcomes import OutcomeBook, Outcomes

log = logging.getLogger("sealedsum.producer")


@dataclass(frozen=True, slots=True)
class SealedRecord:
    body: bytes
    record_id: bytes
    clipped: int
    stream: str = ""


# One record's values: a sequence, or a plain number for a 1-value stream (a sum, a histogram).
Values = Union[float, Iterable[float]]


def as_values(values: Values, stream: str) -> list[float]:
    """``values`` as the list :meth:`StreamPolicy.encode` takes.

    :raises PolicyMismatch: neither a number nor an iterable of them (a string is neither)."""
    if isinstance(values, numbers.Real):
        return [values]
    if isinstance(values, (str, bytes)):
        raise PolicyMismatch(f"stream {stream!r}: a record's values are numbers, not the text {values!r}")
    try:
        return list(values)
    except TypeError:
        raise PolicyMismatch(f"stream {stream!r}: a record's values are a number or a sequence of numbers, "
                             f"not {type(values).__name__}") from None


class RecordSealer:
    """Clip, encode, Paillier-encrypt and seal records for one attested enclave.

    :param requirements: the weakest policy accepted, per stream (default: any).
    :param producer_id: 16 bytes naming this producer in its envelopes, for streams that
        bound contributions per producer (default: random, one per sealer).
    :param identity: an Ed25519 identity key enrolled in the enclave's policy; each
        envelope is then signed with it inside the sealed box, and the producer id is
        the one the key stands for. A key the attested policy does not enroll is refused
        here, before anything is sent (``check_enrollment=False`` lets tests send such
        records to see the enclave refuse them).
    """

    def __init__(self, enclave: AttestedEnclave, requirements: Callable[[str], Requirements] | None = None,
                 producer_id: bytes | None = None, identity: Ed25519PrivateKey | None = None,
                 *, check_enrollment: bool = True) -> None:
        self.enclave = enclave
        self._requirements = requirements
        self._identity = identity
        if identity is not None:
            self._identity_public = identity.public_key().public_bytes_raw()
            status, _ = enclave.policy.identities.name_of(self._identity_public)
            if status != "enrolled" and check_enrollment:
                raise PolicyMismatch(f"this producer's identity key is {status} in the attested policy; "
                                     "the enclave would dead-letter every record",
                                     hint="enroll its public key under [identities.enrolled] (or use another key)")
            if producer_id is not None and producer_id != wire.producer_id_of(self._identity_public):
                raise ValueError("with an identity key the producer id is the key's; do not pass another")
            producer_id = wire.producer_id_of(self._identity_public)
        self.producer_id = producer_id if producer_id is not None else os.urandom(wire.PRODUCER_ID_SIZE)
        self._paillier = PaillierPublicKey(enclave.keys.paillier_n)
        self.encryptor = encryptor_from_env(self._paillier)  # logs once whether gmpy2 is in use
        self._box = SealedBox(PublicKey(enclave.keys.x25519))
        self._width = enclave.keys.ciphertext_width
        self._accepted: set[str] = set()

    def stream(self, name: str) -> StreamPolicy:
        """The attested policy of ``name``, once it met this producer's requirements.

        :raises PolicyMismatch: no such stream. :raises PolicyTooWeak: it promises too little.
        """
        policy = self.enclave.policy.streams.get(name)
        if policy is None:
            raise PolicyMismatch(f"the attested enclave has no stream {name!r}",
                                 hint=f"its streams: {', '.join(sorted(self.enclave.policy.streams))}")
        if name not in self._accepted and self._requirements is not None:
            self._requirements(name).check(policy)
            self._accepted.add(name)
        return policy

    def seal(self, stream: str, values: Values, *, now_ms: int | None = None,
             window: int = 0, record_id: bytes | None = None) -> SealedRecord:
        policy = self.stream(stream)
        encoded, n_clipped = policy.encode(as_values(values, policy.name))
        # One encryption per plaintext: per value, or per ciphertexts_per_record packed ones.
        # The enclave checks each plaintext against the stream's bounds, so it travels
        # (sealed) beside its ciphertext, read in [0, n) as Paillier reads it.
        plaintexts = tuple(q % self._paillier.n for q in policy.plaintexts(encoded))
        cts = tuple(self.encryptor.encrypt(q) for q in plaintexts)
        rid = record_id if record_id is not None else os.urandom(wire.RECORD_ID_SIZE)
        envelope = wire.Envelope(
            stream=stream, record_id=rid, key_epoch=self.enclave.keys.epoch,
            sent_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
            window=window, width=self._width, ciphertexts=cts, producer_id=self.producer_id,
            plaintexts=plaintexts,
        )
        plaintext = envelope.to_bytes()
        if self._identity is not None:
            plaintext = wire.SignedEnvelope(self._identity_public, signing.sign(self._identity, signing.ENVELOPE, plaintext),
                                            plaintext).to_bytes()
        return SealedRecord(self._box.encrypt(plaintext), rid, n_clipped, stream)


@dataclass(frozen=True, slots=True)
class PendingRecord:
    """A record handed to the broker by :meth:`Producer.submit`; ``confirmed`` once the broker took it."""

    record: SealedRecord
    ticket: Ticket

    @property
    def done(self) -> bool:
        return self.ticket.done

    @property
    def confirmed(self) -> bool:
        return self.ticket.confirmed

    @property
    def error(self):
        """The ``TransportError`` it failed with, or ``None``."""
        return self.ticket.error if self.ticket.failed else None


class MessageGroup:
    """Sealed records gathered for one broker message: at most ``per_message`` of them and
    ``wire.MAX_BATCH_BYTES`` as a record batch (a record too large for one goes alone)."""

    def __init__(self, per_message: int) -> None:
        if not 1 <= per_message <= wire.MAX_BATCH_RECORDS:
            raise ValueError(f"per_message must be 1..{wire.MAX_BATCH_RECORDS}")
        self.per_message = per_message
        self.records: list[SealedRecord] = []
        self._bytes = wire.RecordBatch.size(())

    def fits(self, record: SealedRecord) -> bool:
        """Whether ``record`` can join this message (anything joins an empty one)."""
        return not self.records or (len(self.records) < self.per_message
                                    and self._bytes + 4 + len(record.body) <= wire.MAX_BATCH_BYTES)

    def add(self, record: SealedRecord) -> None:
        self.records.append(record)
        self._bytes += 4 + len(record.body)

    @property
    def full(self) -> bool:
        return len(self.records) >= self.per_message

    def take(self) -> list[SealedRecord]:
        records, self.records, self._bytes = self.records, [], wire.RecordBatch.size(())
        return records

    def __len__(self) -> int:
        return len(self.records)


class Producer:
    """Attest, then publish sealed records with publisher confirms.

    Use as a context manager::

        with Producer(config) as p:
            p.send("purchases", [12.5])                    # returns once confirmed
            p.send_many("purchases", [[1.0], [2.5], [4.0]])  # pipelined; returns once all are

    :meth:`send` waits for each record's confirm: a record it returned is confirmed.
    :meth:`submit` and :meth:`send_many` pipeline: up to ``max_unconfirmed`` records (256 by
    default) await their confirms at once (one round trip per batch rather than per record),
    and each :class:`PendingRecord` says whether its record was confirmed. A record the broker
    refused (nack, after retrying for ``broker.reconnect_seconds``) or could not route
    raises its ``TransportError`` from the next ``submit``/``send``/``flush``. Leaving the
    ``with`` block normally flushes.

    **Key rotation.** Before it attests, the producer binds a queue of its own to
    ``PREFIX.announce``. When the enclave rotates its keys it publishes a signed
    ``key_rotated`` notice there; the producer checks the signature against the Ed25519 key
    it attested (a notice that does not verify is ignored, with a warning) and, for an epoch
    newer than its own, attests again before it seals its next record. It also attests again
    after its broker connection was lost (notices sent meanwhile are lost with the queue),
    and in any case every ``producer.reattest_seconds``. If that attestation fails for broker
    trouble, it seals with the keys it attested last and tries again after a backoff.

    **What became of each record.** The producer draws a random notice token per session,
    binds the same queue to ``PREFIX.notices`` with it, and sends it with every record
    message. The enclave tells that token, signed, which records it rejected and why, and
    which it counted once they are checkpointed: :meth:`outcomes` (now) and
    :meth:`wait_outcomes` (until none is unknown, or a timeout) sum them up. Notices are best
    effort, so a record can stay unknown. ``notices=False`` sends no token and hears nothing.

    **Spent streams.** Before the first record of a stream after each attestation, the producer
    asks the enclave for the stream's signed budget report; a stream that has spent its
    budget raises :class:`StreamExhausted` and nothing is sent (:meth:`check_stream`).
    """

    def __init__(self, config: Config, *, producer_id: bytes | None = None,
                 max_unconfirmed: int | None = None, notices: bool = True) -> None:
        # Imported here, not at the top: it loads pika, which importing the library must not.
        from sealedsum.producers import transport

        self.config = config
        self.token = os.urandom(16).hex() if notices else None
        self._transport = transport.RecordPublisher(
            config.broker, max_unconfirmed=max_unconfirmed or transport.DEFAULT_MAX_UNCONFIRMED, token=self.token)
        self.notices_refused = 0  # notices that did not verify
        self._book = OutcomeBook()
        self._streams_checked: set[str] = set()  # whose budget report this attestation has seen
        # A re-attestation is owed (told, reconnected or due) and, after broker trouble, not
        # before _retry_at, later after each failure: records are sealed with the attested keys
        # meanwhile, so there is no budget to run out.
        self._reattest_wanted = False
        self._reattest_backoff = Backoff(config.broker.reconnect_seconds)
        self._retry_at, self._retry_delays = 0.0, self._reattest_backoff.delays()
        try:
            # Listen first: a rotation after the attestation below cannot go unheard.
            self.listening = self._transport.listen(config.broker.attest_timeout_seconds)
            self._session = self._transport.sessions
            self.enclave = self._transport.attest(config.require_trust())
        except BaseException:
            self._transport.close()
            raise
        self._attested_at = time.monotonic()
        identity = None
        if config.identity_file is not None:
            from sealedsum.producers import identity as identity_mod

            identity = identity_mod.load(config.identity_file)
        self.sealer = RecordSealer(self.enclave, config.requirements, producer_id, identity)

    def reattest(self) -> AttestedEnclave:
        """Attest again (fresh nonce, every check); after a key rotation this picks up the
        enclave's new key epoch. The producer id and identity stay the same."""
        session = self._transport.sessions
        enclave = self._transport.attest(self.config.require_trust())
        self._session = session
        if enclave.keys != self.enclave.keys:
            log.info("enclave key epoch changed", extra={"fields": {
                "from_epoch": self.enclave.keys.epoch, "to_epoch": enclave.keys.epoch}})
            old = self.sealer
            self.sealer = RecordSealer(enclave, self.config.requirements, self.sealer.producer_id,
                                       self.sealer._identity)
            old.encryptor.close()
        self.enclave, self._attested_at = enclave, time.monotonic()
        self._streams_checked.clear()
        self._reattest_wanted = False
        self._retry_at, self._retry_delays = 0.0, self._reattest_backoff.delays()
        return enclave

    def seal_current(self, stream: str, values: Values, *, window: int = 0,
                     record_id: bytes | None = None) -> SealedRecord:
        """Seal one record with the enclave's current keys.

        Unlike :meth:`RecordSealer.seal` (the pure step, ``producer.sealer.seal``), this first
        attests the enclave again, over the broker, when it announced a newer key epoch, the
        broker connection was lost since the last attestation, or that is older than
        ``producer.reattest_seconds`` (see the class docstring): it may block on an attestation
        RPC. It publishes nothing (:meth:`publish` and :meth:`submit` do). ``record_id``
        (default random): the enclave counts a record id once within its replay horizon."""
        if self._reattest_due():
            try:
                self.reattest()
            except TransportError as err:
                # The broker or the sidecar is not back yet (after a broker restart the attest
                # queue exists only once the sidecar has declared it again). The keys attested
                # last are still good while their epoch drains: seal with them, try again later.
                if not err.retryable:
                    raise
                delay = next(self._retry_delays)
                log.warning("could not attest again yet; sealing with the keys attested last", extra={"fields": {
                    "key_epoch": self.enclave.keys.epoch, "error": str(err), "retry_in_s": delay}})
                self._retry_at = time.monotonic() + delay
        if stream not in self._streams_checked:
            self.check_stream(stream)
        return self.sealer.seal(stream, values, window=window, record_id=record_id)

    def check_stream(self, stream: str) -> None:
        """Ask the enclave for ``stream``'s signed budget report (verified with the key attested
        last); done once per stream and attestation by :meth:`seal_current`.

        :raises StreamExhausted: the stream has spent its privacy budget: the enclave would
            dead-letter every record (``budget_exhausted``). An enclave that does not answer
            (a retryable ``TransportError``) is logged and taken as no answer: records go out.
        :raises PolicyMismatch: no such stream in the attested policy.
        """
        self.sealer.stream(stream)
        try:
            report = self._transport.budget(self.enclave, stream)
        except TransportError as err:
            if not err.retryable:
                raise
            # The sidecar is down or busy: records wait for it in the broker as before, and a
            # spent stream's are still refused (and reported) by the enclave. Not asked again
            # before the next attestation, so a stopped sidecar costs one timeout, not one per record.
            log.warning("could not ask the enclave for the stream's budget; sending anyway", extra={"fields": {
                "stream": stream, "error": str(err)}})
            self._streams_checked.add(stream)
            return
        if report.exhausted:
            raise StreamExhausted(
                f"stream {stream!r} has spent its privacy budget ({report.budget['releases']} releases, epsilon "
                f"{report.budget['spent_epsilon']:g} of {report.budget['budget_epsilon']:g}): the enclave would "
                "reject every record (budget_exhausted), so nothing was sent",
                hint="a spent budget is final for this stream; define a new stream (a new measurement) for new data")
        self._streams_checked.add(stream)

    def _reattest_due(self) -> bool:
        self._hear_records()
        for body in self._transport.take_notices():
            if self._heard(body):
                self._reattest_wanted = True
        if self._transport.sessions != self._session and not self._reattest_wanted:
            log.info("attesting again after a broker reconnect", extra={"fields": {
                "key_epoch": self.enclave.keys.epoch}})
            self._reattest_wanted = True
        if time.monotonic() - self._attested_at > self.config.reattest_seconds:
            self._reattest_wanted = True
        return self._reattest_wanted and time.monotonic() >= self._retry_at

    def _heard(self, body: bytes) -> bool:
        """Whether a notice from PREFIX.announce, once verified, asks for a new attestation."""
        try:
            notice = verify_key_rotated(body, self.enclave)
        except (InvalidResultSignature, InvalidMessage) as err:
            self.notices_refused += 1
            log.warning("ignored a notice that does not verify against the attested enclave", extra={"fields": {
                "exchange": self.config.broker.topology.announce_exchange, "error": str(err)}})
            return False
        if notice.key_epoch <= self.enclave.keys.epoch:
            return False  # a notice sent again, or one this producer's attestation already covers
        log.info("enclave announced a key rotation; attesting again before the next record", extra={"fields": {
            "from_epoch": self.enclave.keys.epoch, "to_epoch": notice.key_epoch,
            "previous_retires_at_ms": notice.previous_retires_at_ms}})
        return True

    # -- what became of the records -------------------------------------------------------------
    def _hear_records(self) -> None:
        """Verify the notices about records that arrived and book them."""
        for body in self._transport.take_record_notices():
            try:
                notice = verify_notice(body, self.enclave, self.token)
                if isinstance(notice, KeyRotated):
                    raise InvalidMessage("a key-rotation notice on the notices exchange")
            except (InvalidResultSignature, InvalidMessage) as err:
                self.notices_refused += 1
                log.warning("ignored a notice that does not verify against the attested enclave", extra={"fields": {
                    "exchange": self.config.broker.topology.notices_exchange, "error": str(err)}})
                continue
            self._book.heard(notice)

    @property
    def hearing(self) -> bool:
        """Whether notices about this session's records can arrive now (the token is bound)."""
        return self.token is not None and self._transport.hearing_records

    def outcomes(self) -> Outcomes:
        """What the notices received so far say about the records published in this session."""
        self._hear_records()
        return self._book.outcomes(self.hearing)

    def wait_outcomes(self, timeout: float, *, progress: Callable[[Outcomes], None] | None = None) -> Outcomes:
        """Wait until no record published in this session is unknown (each counted or rejected),
        or ``timeout`` s; return the outcomes then. Returns at once when no notice can come
        (no token, or the notices queue is not bound). ``progress`` is called with the
        outcomes each time notices arrived."""
        deadline = time.monotonic() + timeout
        out = self.outcomes()
        while out.unknown and out.hearing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self._transport.wait_record_notices(min(remaining, 1.0)):
                out = self.outcomes()
                if progress is not None:
                    progress(out)
            else:
                out = self.outcomes()
        return out

    def _track(self, record: SealedRecord, ticket) -> None:
        if self.token is not None:
            self._book.track(record.record_id, record.stream, ticket)

    def send(self, stream: str, values: Values, *, window: int = 0) -> SealedRecord:
        """Seal and publish one record (``values``: a sequence, or a number for a 1-value stream);
        return once the broker confirmed it."""
        record = self.seal_current(stream, values, window=window)
        self.publish(record)
        return record

    def publish(self, record: SealedRecord) -> None:
        """Publish an already sealed record; return once the broker confirmed it."""
        self._transport.publish(record.body)
        self._track(record, None)

    def submit(self, record: SealedRecord) -> PendingRecord:
        """Publish an already sealed record without waiting for its confirm (blocks only while
        ``max_unconfirmed`` records await theirs).

        :raises TransportError: an earlier record failed (each failure is raised once).
        """
        ticket = self._transport.submit(record.body)
        self._track(record, ticket)
        return PendingRecord(record, ticket)

    def submit_batch(self, records: list[SealedRecord]) -> list[PendingRecord]:
        """Publish several sealed records in one broker message (a record batch, protocol
        section 10.7) without waiting for its confirm. The enclave still counts or
        dead-letters each record on its own; one confirm covers them all.

        :raises ValueError: the batch would exceed ``wire.MAX_BATCH_RECORDS`` records or
            ``wire.MAX_BATCH_BYTES`` bytes.
        """
        if len(records) == 1:
            return [self.submit(records[0])]
        body = wire.RecordBatch(tuple(r.body for r in records)).to_bytes()
        ticket = self._transport.submit(body, kind=wire.RECORD_BATCH_TYPE)
        for r in records:
            self._track(r, ticket)
        return [PendingRecord(r, ticket) for r in records]

    def send_many(self, stream: str, records: Iterable[Values], *, window: int = 0,
                  per_message: int = 1) -> list[SealedRecord]:
        """Seal and publish many records, pipelined; return them once the broker confirmed all.

        With ``per_message`` > 1, up to that many records share one broker message (a record
        batch, at most ``wire.MAX_BATCH_BYTES``; a record too large for one goes alone).

        :raises TransportError: a record failed; the records before it in the returned
            order may or may not have been confirmed (use :meth:`submit` to know per record).
        """
        pending = self.submit_many(stream, records, window=window, per_message=per_message)
        self.flush()
        return [p.record for p in pending]

    def submit_many(self, stream: str, records: Iterable[Values], *, window: int = 0,
                    per_message: int = 1) -> list[PendingRecord]:
        """Seal and submit many records (see :meth:`send_many`) without waiting for the confirms."""
        group = MessageGroup(per_message)
        pending: list[PendingRecord] = []
        for values in records:
            record = self.seal_current(stream, values, window=window)
            if not group.fits(record):
                pending += self.submit_batch(group.take())
            group.add(record)
        if group:
            pending += self.submit_batch(group.take())
        return pending

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted record is confirmed or failed.

        :raises TransportError: the first failure not raised before.
        """
        self._transport.flush(timeout)

    @property
    def outstanding(self) -> int:
        """Records submitted and not yet confirmed or failed."""
        return self._transport.outstanding

    def close(self) -> None:
        """Stop publishing (records still unconfirmed fail: :meth:`flush` first) and any
        background encryption work."""
        try:
            self._transport.close()
        finally:
            self.sealer.encryptor.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
