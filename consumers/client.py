"""The consumer library: every result is checked against the attested enclave's key
before anyone reads a number from it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from sealedsum.common import wire
from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.config import Config
from sealedsum.common.errors import (
    ChainContradiction,
    ConfigError,
    InvalidMessage,
    InvalidResultSignature,
    PolicyMismatch,
)
from sealedsum.common.results import BudgetExhausted, Release, verify_signed
from sealedsum.consumers.chain_state import RETAINED, Admission, ChainKey, Gap, StreamChain, payload_digest, vhost_of
from sealedsum.consumers.chain_store import ChainStore

log = logging.getLogger("sealedsum.consumer")

# Where a consumer starts in the release stream (docs/protocol.md section 2.1), besides an offset.
STARTS = ("first", "last", "next")
Start = str | int


def parse_start(text: str) -> Start:
    """``--from``: ``first``, ``last``, ``next`` or an offset (a non-negative integer).

    :raises ConfigError: anything else."""
    if text in STARTS:
        return text
    if text.isascii() and text.isdigit():
        return int(text)
    raise ConfigError(f"--from {text!r} is not first, last, next or an offset (a whole number from 0)")


def resume_point(chains: Iterable[StreamChain]) -> Start:
    """The default start: right after the lowest of the offsets the chains' memories admitted
    last (a stream of several remembered further on skips or drops what it has read), or
    ``next`` when none has read the stream."""
    offsets = [c.offset for c in chains if c.offset is not None]
    return min(offsets) + 1 if offsets else "next"


class NewestAtStart:
    """``last``: of what the release stream held up to offset ``tail`` when the consumer
    started, only each stream's newest message goes on (in offset order, once ``tail`` is
    read); everything after it goes on as it comes. The broker's own ``last`` is a chunk,
    which may hold several releases, or none of a stream whose newest is further back.

    :param tail: the newest offset at start, or ``None`` for an empty stream (all goes on).
    """

    def __init__(self, tail: int | None, streams: Iterable[str]) -> None:
        self.tail = tail
        self.streams = set(streams)
        self._newest: dict = {}  # stream -> its newest delivery so far

    def feed(self, delivery):
        """What goes on now of ``delivery`` (a ``consumers.transport.Delivery``) and what was kept."""
        if self.tail is None:
            return [delivery]
        if delivery.offset is None or delivery.offset > self.tail:
            return self.flush() + [delivery]
        if delivery.routing_key in self.streams:
            self._newest[delivery.routing_key] = delivery
        return self.flush() if delivery.offset == self.tail else []

    def flush(self):
        """What was kept, in offset order; from now on everything goes on."""
        kept = sorted(self._newest.values(), key=lambda d: d.offset)
        self._newest.clear()
        self.tail = None
        return kept


def reaches(tail: int | None, resume: int) -> bool:
    """Whether a stream whose newest offset is ``tail`` (``None``: empty) is long enough to
    resume at ``resume``: every offset before it exists. A shorter one was deleted and declared
    again since (offsets start at 0 again), and the broker would wait for ``resume`` to come."""
    return tail is not None and tail + 1 >= resume


@dataclass(slots=True)
class ResultVerifier:
    """Verifies results for one attested enclave and counts what it refused."""

    enclave: AttestedEnclave
    rejected: int = 0

    def verify(self, body: bytes) -> Release | BudgetExhausted:
        """:raises InvalidResultSignature: forged or altered (the counter goes up)."""
        try:
            return verify_signed(body, self.enclave)
        except (InvalidResultSignature, InvalidMessage):
            self.rejected += 1
            raise


class LedgerFollower:
    """What :class:`Consumer` does with each result body, without the broker: verify it, check
    it against its stream's chain (remembering it in the chain-state file, if any) and decide
    whether the application gets it.

    A release already handed over is not handed over again (``repeats`` counts those dropped):
    anyone who may publish to the results exchange can republish genuine release bytes, and the
    enclave itself republishes a release the broker had not confirmed when it reconnects. Only
    a message the broker itself redelivers (its ``redelivered`` flag: given to this queue
    before and never acknowledged, as when a consumer was killed with it in hand) that this
    run has not handed over yet is handed over again, since the run before may not have
    finished with it; publishers cannot set that flag.

    :param chains: each stream's remembered chain (:meth:`ChainStore.load`, or new ones).
    :param keys: each stream's :class:`ChainKey`, for ``store``.
    :param store: the chain-state file, or ``None`` to remember nothing between runs.
    """

    def __init__(self, verifier: ResultVerifier, chains: dict[str, StreamChain], keys: Mapping[str, ChainKey],
                 store: ChainStore | None) -> None:
        self.verifier = verifier
        self.chains = chains
        self.keys = keys
        self.store = store
        self.repeats = 0
        #: (stream, gap) for every run of releases noticed missing, in order
        self.gaps: list[tuple[str, Gap]] = []
        # Digests of what this run handed over, for the one case a repeat is handed over again
        # (a broker redelivery this run has not seen). The broker redelivers only what it gave
        # and was not acknowledged, at most the last message handed over when the connection
        # dropped, so the last RETAINED are plenty.
        self._handed: OrderedDict[bytes, None] = OrderedDict()

    def take(self, body: bytes, *, redelivered: bool = False,
             offset: int | None = None) -> Release | BudgetExhausted | None:
        """The verified message for the application, or ``None``: refused (forged, altered or
        of another stream, logged as an error and counted in ``verifier.rejected``) or a repeat
        of one already handed over, or read before from the release stream (logged at info and
        counted in ``repeats``).

        :param offset: its offset in the release stream, if read from there.

        :raises ChainContradiction: it contradicts the stream's chain (counted in ``verifier.rejected``).
        :raises ChainStateError: the chain-state file cannot be written.
        """
        try:
            message = self.verifier.verify(body)
        except (InvalidResultSignature, InvalidMessage) as err:
            log.error("result rejected", extra={"fields": {"reason": str(err)}})
            return None
        if message.stream not in self.chains:
            self.verifier.rejected += 1
            log.error("result rejected", extra={"fields": {"reason": f"for stream {message.stream!r}"}})
            return None
        digest = payload_digest(wire.SignedMessage.from_bytes(body).payload)
        try:
            admission = self._follow_ledger(message, digest, offset)
        except ChainContradiction as err:
            self.verifier.rejected += 1
            if self.store is not None:
                err.hint = f"{err.hint} ({self.store.path})"
            log.error("release contradicts the verified ledger chain", extra={"fields": {
                "stream": message.stream, "reason": str(err)}})
            raise
        if admission is Admission.ALREADY_READ or (admission is Admission.REDELIVERY
                                                   and not (redelivered and digest not in self._handed)):
            self.repeats += 1
            log.info("release received again; dropped", extra={"fields": {
                "stream": message.stream, "release": message.budget["releases"],
                "window": getattr(message, "window", None), "redelivered": redelivered, "offset": offset}})
            return None
        self._handed[digest] = None
        self._handed.move_to_end(digest)
        while len(self._handed) > RETAINED:
            self._handed.popitem(last=False)
        return message

    def _follow_ledger(self, message: Release | BudgetExhausted, digest: bytes, offset: int | None) -> Admission:
        """Check a verified message against its stream's chain, and remember it."""
        chain = self.chains[message.stream]
        gaps = len(chain.gaps)
        admission = chain.admit(message, digest, offset)
        if admission is Admission.LATE:  # e.g. held back by the enclave or a broker restart: still valid
            log.warning("release out of ledger order", extra={"fields": {
                "stream": message.stream, "release": message.budget["releases"]}})
        for gap in chain.gaps[gaps:]:
            self.gaps.append((message.stream, gap))
            log.warning("releases missing from the ledger", extra={"fields": {
                "stream": message.stream, "first": gap.first, "last": gap.last, "window_after": gap.after_window,
                "window_before": gap.before_window, "missing": gap.describe(message.stream)}})
        if admission not in (Admission.REDELIVERY, Admission.ALREADY_READ) and self.store is not None:
            self.store.save({self.keys[message.stream]: chain})
        return admission


_FROM_CONFIG = object()


class Consumer:
    """Attest, read one or more streams' releases, yield verified releases.

    By default releases are read from the release stream ``PREFIX.releases`` (docs/protocol.md
    section 2.1), which takes nothing away from any other consumer; with ``queue`` from a
    durable queue of that name bound for the streams (for clients that cannot read streams).

    Forged or altered results are logged as errors and skipped; ``verifier.rejected``
    counts them. A release received again byte for byte (republished, or reread) is yielded
    once; ``repeats`` counts the copies dropped. Each stream's ledger chain is followed (``chains``),
    and remembered between runs in the chain-state file: releases that never arrived are logged
    as warnings naming the windows around them and listed in ``gaps``; a release that contradicts
    the chain verified before (the ledger started over, was forked, or a window is released again
    with another body) stops :meth:`releases` with a
    :class:`~sealedsum.common.errors.ChainContradiction` (docs/protocol.md section 15.5).

    :param chain_state: the chain-state file (default: ``config.chain_state``, i.e.
        ``[consumer] chain_state`` or the default path); ``None`` remembers nothing between runs.
    :param start: where to start in the release stream: ``"first"`` (everything it holds),
        ``"last"`` (each stream's newest release, then what follows), ``"next"`` (only what is
        published from now on) or an offset. Default: right after the offset the chain memory
        admitted last, or ``"next"`` when it has none. Not with ``queue``.
    :raises ConfigError: ``start`` with ``queue``, or not one of the above.
    """

    def __init__(self, config: Config, streams: str | Sequence[str], *, queue: str | None = None,
                 chain_state: str | Path | None = _FROM_CONFIG,  # type: ignore[assignment]
                 start: Start | None = None) -> None:
        from sealedsum.consumers import transport

        self.streams = (streams,) if isinstance(streams, str) else tuple(streams)
        if start is not None and queue is not None:
            raise ConfigError("a start in the release stream (--from) does not apply to a queue (--queue)",
                              hint="a durable queue holds what was routed to it since it was bound; drop one of them")
        if start is not None and not (start in STARTS or (isinstance(start, int) and not isinstance(start, bool)
                                                           and start >= 0)):
            raise ConfigError(f"start {start!r} is not first, last, next or an offset (a whole number from 0)")
        trust = config.require_trust()
        path = config.chain_state if chain_state is _FROM_CONFIG else chain_state
        self.chain_store = ChainStore(path) if path is not None else None
        # Keyed by the pinned platform key, not the measurement: the chain must continue across
        # a policy change. Read before connecting, so a damaged file fails before anything else.
        t = config.broker.topology
        self._keys = {s: ChainKey(trust.root_id(), vhost_of(config.broker.url), t.prefix, s)
                      for s in self.streams}
        remembered = self.chain_store.load(self._keys.values()) if self.chain_store else {}
        self.chains: dict[str, StreamChain] = {
            s: remembered.get(key) or StreamChain(s) for s, key in self._keys.items()}
        self._newest: NewestAtStart | None = None
        if queue is not None:
            self.start: Start | None = None
            #: where the releases come from, for people
            self.source = f"queue {queue}"
            self._transport = transport.ResultSubscriber(config.broker, self.streams, queue=queue)
        else:
            self.start = resume_point(self.chains.values()) if start is None else start
            resuming = start is None and isinstance(self.start, int)
            tail = transport.stream_tail(config.broker) if resuming or self.start == "last" else None
            if resuming and not reaches(tail, self.start):
                # The broker would wait for that offset to come: this stream is not the one memory read.
                log.warning("the release stream is shorter than this consumer's memory of it: it was deleted "
                            "and declared again; reading it from its start", extra={"fields": {
                                "stream": t.releases_stream, "resume_at": self.start, "newest": tail}})
                for chain in self.chains.values():
                    chain.offset = None  # offsets of a stream that is gone: nothing to skip by
                self.start = "first"
            if self.start == "last":
                self._newest = NewestAtStart(tail, self.streams)
            self.source = f"release stream {t.releases_stream} from {self.start}"
            # Subscribed here, not when releases() is first called: "next" means from now on.
            self._transport = transport.ReleaseReader(config.broker, "first" if self.start == "last" else self.start)
        try:
            self.enclave = self._transport.attest(trust)
        except BaseException:
            self._transport.close()
            raise
        unknown = [s for s in self.streams if s not in self.enclave.policy.streams]
        if unknown:
            self._transport.close()
            raise PolicyMismatch(f"the attested enclave has no stream {unknown[0]!r}",
                                 hint=f"its streams: {', '.join(sorted(self.enclave.policy.streams))}")
        self.verifier = ResultVerifier(self.enclave)
        self._follower = LedgerFollower(self.verifier, self.chains, self._keys, self.chain_store)

    def releases(self, *, idle_timeout: float | None = None) -> Iterator[Release | BudgetExhausted]:
        """Verified releases, and the one :class:`BudgetExhausted` notice a stream sends when
        its budget is spent (nothing follows it for that stream), each once: a message received
        again byte for byte is acknowledged and dropped (``repeats``; see
        :class:`LedgerFollower` for the one exception). Each is remembered in the chain-state
        file before it is yielded.

        :raises ChainContradiction: a release contradicts the stream's chain verified before;
            it is counted in ``verifier.rejected`` and left unacknowledged.
        :raises ChainStateError: the chain-state file cannot be written.
        """
        for delivery in self._transport.bodies(idle_timeout=idle_timeout):
            yield from self._take(self._newest.feed(delivery) if self._newest else (delivery,))
        if self._newest is not None:  # the stream ended before its tail (retention dropped it)
            yield from self._take(self._newest.flush())

    def _take(self, deliveries) -> Iterator[Release | BudgetExhausted]:
        for delivery in deliveries:
            # The release stream holds every stream of the prefix: the others are not ours to check.
            if delivery.offset is not None and delivery.routing_key not in self.chains:
                continue
            try:
                message = self._follower.take(delivery.body, redelivered=delivery.redelivered,
                                              offset=delivery.offset)
            except ChainContradiction:
                self._transport.refuse_last()
                raise
            if message is not None:
                yield message

    @property
    def repeats(self) -> int:
        """Messages received again, byte for byte, or reread from the stream, and dropped."""
        return self._follower.repeats

    @property
    def gaps(self) -> list[tuple[str, Gap]]:
        """``(stream, gap)`` for each run of releases noticed missing in this run, in order."""
        return self._follower.gaps

    def budget(self, stream: str):
        """The stream's signed ledger (:class:`sealedsum.common.results.BudgetReport`), freshly asked for."""
        return self._transport.budget(self.enclave, stream)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
