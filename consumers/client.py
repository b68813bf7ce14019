"""The consumer library: every result is checked against the attested enclave's key
before anyone reads a number from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from sealedsum.common import wire
from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.config import Config
from sealedsum.common.errors import ChainContradiction, InvalidMessage, InvalidResultSignature, PolicyMismatch
from sealedsum.common.results import BudgetExhausted, Release, verify_signed
from sealedsum.consumers.chain_state import Admission, ChainKey, StreamChain, payload_digest, vhost_of
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


_FROM_CONFIG = object()


class Consumer:
    """Attest, subscribe to one or more streams' results, yield verified releases.

    Forged or altered results are logged as errors and skipped; ``verifier.rejected``
    counts them. Each stream's ledger chain is followed (``chains``), and remembered between
    runs in the chain-state file: releases that never arrived are logged as warnings and listed
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
        self._keys = {s: ChainKey(trust.platform_key.hex(), vhost_of(config.broker.url), t.prefix, s)
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

    def releases(self, *, idle_timeout: float | None = None) -> Iterator[Release | BudgetExhausted]:
        """Verified releases, and the one :class:`BudgetExhausted` notice a stream sends when
        its budget is spent (nothing follows it for that stream). Each is remembered in the
        chain-state file before it is yielded.

        :raises ChainContradiction: a release contradicts the stream's chain verified before;
            it is counted in ``verifier.rejected`` and left unacknowledged.
        :raises ChainStateError: the chain-state file cannot be written.
        """
        for body in self._transport.bodies(idle_timeout=idle_timeout):
            try:
                release = self.verifier.verify(body)
            except (InvalidResultSignature, InvalidMessage) as err:
                log.error("result rejected", extra={"fields": {"reason": str(err)}})
                continue
            if release.stream not in self.streams:
                self.verifier.rejected += 1
                log.error("result rejected", extra={"fields": {"reason": f"for stream {release.stream!r}"}})
                continue
            try:
                self._follow_ledger(release, payload_digest(wire.SignedMessage.from_bytes(body).payload))
            except ChainContradiction as err:
                self.verifier.rejected += 1
                self._transport.refuse_last()
                if self.chain_store is not None:
                    err.hint = f"{err.hint} ({self.chain_store.path})"
                log.error("release contradicts the verified ledger chain", extra={"fields": {
                    "stream": release.stream, "reason": str(err)}})
                raise
            yield release

    def _follow_ledger(self, message: Release | BudgetExhausted, digest: bytes) -> None:
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
        if admission is not Admission.REDELIVERY and self.chain_store is not None:
            self.chain_store.save({self._keys[message.stream]: chain})

    def budget(self, stream: str):
        """The stream's signed ledger (:class:`sealedsum.common.results.BudgetReport`), freshly asked for."""
        return self._transport.budget(self.enclave, stream)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
