"""The consumer library: every result is checked against the attested enclave's key
before anyone reads a number from it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from sealedsum.common import wire
from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.config import Config
from sealedsum.common.errors import ChainContradiction, InvalidMessage, InvalidResultSignature, PolicyMismatch
from sealedsum.common.results import BudgetExhausted, Release, verify_signed
from sealedsum.consumers.chain_state import RETAINED, Admission, ChainKey, StreamChain, payload_digest, vhost_of
from sealedsum.consumers.chain_store import ChainStore

log = logging.getLogger("sealedsum.consumer")


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
        # Digests of what this run handed over, for the one case a repeat is handed over again
        # (a broker redelivery this run has not seen). The broker redelivers only what it gave
        # and was not acknowledged, at most the last message handed over when the connection
        # dropped, so the last RETAINED are plenty.
        self._handed: OrderedDict[bytes, None] = OrderedDict()

    def take(self, body: bytes, *, redelivered: bool = False) -> Release | BudgetExhausted | None:
        """The verified message for the application, or ``None``: refused (forged, altered or
        of another stream, logged as an error and counted in ``verifier.rejected``) or a repeat
        of one already handed over (logged at info and counted in ``repeats``).

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
            admission = self._follow_ledger(message, digest)
        except ChainContradiction as err:
            self.verifier.rejected += 1
            if self.store is not None:
                err.hint = f"{err.hint} ({self.store.path})"
            log.error("release contradicts the verified ledger chain", extra={"fields": {
                "stream": message.stream, "reason": str(err)}})
            raise
        if admission is Admission.REDELIVERY and not (redelivered and digest not in self._handed):
            self.repeats += 1
            log.info("release received again; dropped", extra={"fields": {
                "stream": message.stream, "release": message.budget["releases"],
                "window": getattr(message, "window", None), "redelivered": redelivered}})
            return None
        self._handed[digest] = None
        self._handed.move_to_end(digest)
        while len(self._handed) > RETAINED:
            self._handed.popitem(last=False)
        return message

    def _follow_ledger(self, message: Release | BudgetExhausted, digest: bytes) -> Admission:
        """Check a verified message against its stream's chain, and remember it."""
        chain = self.chains[message.stream]
        gaps = len(chain.gaps)
        admission = chain.admit(message, digest)
        if admission is Admission.LATE:  # e.g. held back by the enclave or a broker restart: still valid
            log.warning("release out of ledger order", extra={"fields": {
                "stream": message.stream, "release": message.budget["releases"]}})
        for first, last in chain.gaps[gaps:]:
            log.warning("releases missing from the ledger", extra={"fields": {
                "stream": message.stream, "first": first, "last": last}})
        if admission is not Admission.REDELIVERY and self.store is not None:
            self.store.save({self.keys[message.stream]: chain})
        return admission


_FROM_CONFIG = object()


class Consumer:
    """Attest, subscribe to one or more streams' results, yield verified releases.

    Forged or altered results are logged as errors and skipped; ``verifier.rejected``
    counts them. A release received again byte for byte (republished) is yielded once;
    ``repeats`` counts the copies dropped. Each stream's ledger chain is followed (``chains``),
    and remembered between runs in the chain-state file: releases that never arrived are logged as warnings and listed
    in its ``gaps``; a release that contradicts the chain verified before (the ledger started
    over, was forked, or a window is released again with another body) stops :meth:`releases`
    with a :class:`~sealedsum.common.errors.ChainContradiction` (docs/protocol.md section 15.5).

    :param chain_state: the chain-state file (default: ``config.chain_state``, i.e.
        ``[consumer] chain_state`` or the default path); ``None`` remembers nothing between runs.
    """

    def __init__(self, config: Config, streams: str | Sequence[str], *, queue: str | None = None,
                 chain_state: str | Path | None = _FROM_CONFIG) -> None:  # type: ignore[assignment]
        from sealedsum.consumers import transport

        self.streams = (streams,) if isinstance(streams, str) else tuple(streams)
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
        self._transport = transport.ResultSubscriber(config.broker, self.streams, queue=queue)
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
        for body, redelivered in self._transport.bodies(idle_timeout=idle_timeout):
            try:
                message = self._follower.take(body, redelivered=redelivered)
            except ChainContradiction:
                self._transport.refuse_last()
                raise
            if message is not None:
                yield message

    @property
    def repeats(self) -> int:
        """Messages received again, byte for byte, and dropped."""
        return self._follower.repeats

    def budget(self, stream: str):
        """The stream's signed ledger (:class:`sealedsum.common.results.BudgetReport`), freshly asked for."""
        return self._transport.budget(self.enclave, stream)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
