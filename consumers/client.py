"""The consumer library: every result is checked against the attested enclave's key
before anyone reads a number from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.config import Config
from sealedsum.common.errors import (InvalidMessage, InvalidResultSignature, LedgerChainError, PolicyMismatch,
                           ReleaseOutOfOrder)
from sealedsum.common.results import BudgetExhausted, Release, verify_signed
from sealedsum.consumers.chain_audit import ChainVerifier

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


class Consumer:
    """Attest, subscribe to one or more streams' results, yield verified releases.

    Forged or altered results are logged as errors and skipped; ``verifier.rejected``
    counts them. Each stream's ledger chain is followed from the first release received
    (``chains``): releases that never arrived are logged as warnings and listed in its
    ``gaps``; a release whose ledger head contradicts the chain is rejected like a forgery.
    """

    def __init__(self, config: Config, streams: str | Sequence[str], *, queue: str | None = None) -> None:
        from sealedsum.consumers import transport

        self.streams = (streams,) if isinstance(streams, str) else tuple(streams)
        self._transport = transport.ResultSubscriber(config.broker, self.streams, queue=queue)
        try:
            self.enclave = self._transport.attest(config.require_trust())
        except BaseException:
            self._transport.close()
            raise
        unknown = [s for s in self.streams if s not in self.enclave.policy.streams]
        if unknown:
            self._transport.close()
            raise PolicyMismatch(f"the attested enclave has no stream {unknown[0]!r}",
                                 hint=f"its streams: {', '.join(sorted(self.enclave.policy.streams))}")
        self.verifier = ResultVerifier(self.enclave)
        self.chains: dict[str, ChainVerifier] = {}

    def releases(self, *, idle_timeout: float | None = None) -> Iterator[Release | BudgetExhausted]:
        """Verified releases, and the one :class:`BudgetExhausted` notice a stream sends when
        its budget is spent (nothing follows it for that stream)."""
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
            if not self._follow_ledger(release):
                continue
            yield release

    def _follow_ledger(self, message: Release | BudgetExhausted) -> bool:
        """Extend the stream's chain by a verified message; ``False``: reject it."""
        chain = self.chains.get(message.stream)
        if chain is None:
            self.chains[message.stream] = ChainVerifier.joining(message)
            return True
        gaps = len(chain.gaps)
        try:
            chain.add(message, allow_gaps=True)
        except ReleaseOutOfOrder as err:  # e.g. held back by a broker restart: still signed and valid
            log.warning("release out of ledger order", extra={"fields": {"reason": str(err)}})
        except LedgerChainError as err:
            self.verifier.rejected += 1
            log.error("result rejected", extra={"fields": {"reason": str(err)}})
            return False
        for first, last in chain.gaps[gaps:]:
            log.warning("releases missing from the ledger", extra={"fields": {
                "stream": message.stream, "first": first, "last": last}})
        return True

    def budget(self, stream: str):
        """The stream's signed ledger (:class:`sealedsum.common.results.BudgetReport`), freshly asked for."""
        return self._transport.budget(self.enclave, stream)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
