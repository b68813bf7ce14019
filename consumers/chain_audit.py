"""Auditing a stream's privacy ledger from its releases (docs/protocol.md section 15.4).

Every release carries ``budget.releases`` (its sequence number n in the stream's ledger)
and ``budget.ledger_head`` (head_n). Recomputing head_n from head_(n-1) and the release's
own charge, one release after the other, shows that none is missing or out of order and
that the heads the enclave signed form one chain; a ``budget_exhausted`` notice and a
fresh budget report must carry the last head. The chain is :mod:`sealedsum.common.ledger_chain`'s.

Only verified messages (:class:`sealedsum.consumers.client.ResultVerifier`) belong here: the chain
proves nothing about a release whose signature was not checked.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from sealedsum.common import ledger_chain as chain
from sealedsum.common.errors import LedgerChainError, LedgerHeadMismatch, MissingRelease, ReleaseOutOfOrder
from sealedsum.common.results import BudgetExhausted, BudgetReport, Release

__all__ = ["ChainVerifier", "verify_chain"]


def _position(message: Release | BudgetExhausted | BudgetReport) -> tuple[int, bytes]:
    return message.budget["releases"], bytes.fromhex(message.budget["ledger_head"])


def _missing(first: int, last: int) -> str:
    return f"release {first}" if first == last else f"releases {first} to {last}"


class ChainVerifier:
    """One stream's ledger chain, as far as its releases have been seen.

    ``ChainVerifier(stream)`` starts at genesis, to audit a stream from its first release;
    :meth:`joining` starts at the first message a consumer received, whose own link cannot
    be checked (the releases before it are not known).
    """

    def __init__(self, stream: str, releases: int = 0, head: bytes | None = None) -> None:
        if releases and head is None:
            raise ValueError("a chain started after genesis needs the head it starts from")
        self.stream = stream
        self.releases = releases
        self.head = chain.genesis(stream) if head is None else head
        self.exhausted = False
        #: ranges of releases skipped with ``allow_gaps`` (first, last), in order
        self.gaps: list[tuple[int, int]] = []
        self._seen: dict[int, tuple[bytes, bytes]] = {}  # n -> (head_n, digest of the release)

    @classmethod
    def joining(cls, message: Release | BudgetExhausted) -> "ChainVerifier":
        """A chain that starts at ``message``: checked from genesis if it is release 1."""
        n, head = _position(message)
        if isinstance(message, Release) and n == 1:
            verifier = cls(message.stream)
            verifier.add(message)
            return verifier
        verifier = cls(message.stream, n, head)
        if isinstance(message, BudgetExhausted):
            verifier.exhausted = True
        else:
            verifier._seen[n] = (head, _digest(message))
        return verifier

    def add(self, message: Release | BudgetExhausted, *, allow_gaps: bool = False) -> bool:
        """Extend the chain by the next verified release (or the stream's notice).

        :param allow_gaps: record releases that never came in :attr:`gaps` and continue
            after them (their links cannot be checked), instead of raising.
        :returns: ``False`` for the same release again (a redelivery), else ``True``.
        :raises MissingRelease: a release before this one was not seen.
        :raises ReleaseOutOfOrder: this release comes after a later one.
        :raises LedgerHeadMismatch: the head is not the one the chain gives.
        :raises LedgerChainError: another stream's message, two different releases with one
            sequence number, or a release after the budget_exhausted notice.
        """
        if message.stream != self.stream:
            raise LedgerChainError(f"a message of stream {message.stream!r} is not in the ledger of {self.stream!r}")
        n, head = _position(message)
        if isinstance(message, BudgetExhausted):
            if n > self.releases and allow_gaps:
                self.gaps.append((self.releases + 1, n))
                self.releases, self.head = n, head
            self._check_last(n, head, "the budget_exhausted notice")
            self.exhausted = True
            return True
        digest = _digest(message)
        if n <= self.releases:
            known = self._seen.get(n)
            if known is None:
                raise ReleaseOutOfOrder(f"release {n} of stream {self.stream!r} came after release {self.releases}")
            if known == (head, digest):
                return False
            if known[0] == head:
                raise LedgerChainError(f"two different releases of stream {self.stream!r} are both release {n}")
            raise LedgerHeadMismatch(f"release {n} of stream {self.stream!r} names another ledger head than "
                                     "the release with that number seen before")
        if self.exhausted:
            raise LedgerChainError(f"release {n} of stream {self.stream!r} comes after its budget_exhausted notice")
        if n > self.releases + 1:
            if not allow_gaps:
                raise MissingRelease(f"{_missing(self.releases + 1, n - 1)} of stream {self.stream!r} "
                                     f"missing before release {n} (window {message.window})")
            self.gaps.append((self.releases + 1, n - 1))
        else:
            expected = chain.next_head(self.head, chain.charge_bytes(
                message.stream, message.window, n, message.mechanism, message.epsilon, message.delta, message.rho))
            if head != expected:
                raise LedgerHeadMismatch(
                    f"release {n} of stream {self.stream!r} (window {message.window}) does not extend the ledger: "
                    f"its head is {head.hex()[:16]}..., its charge gives {expected.hex()[:16]}...")
        self.releases, self.head = n, head
        self._seen[n] = (head, digest)
        return True

    def check_report(self, report: BudgetReport) -> int:
        """Compare a fresh, verified budget report with the releases seen.

        :returns: how many releases the ledger has beyond those seen (0: none is missing).
        :raises LedgerHeadMismatch: the report's ledger disagrees with the releases, or has
            fewer releases than were seen (the enclave's ledger went back).
        """
        if report.stream != self.stream:
            raise LedgerChainError(f"a budget report of stream {report.stream!r} is not about {self.stream!r}")
        n, head = _position(report)
        if n > self.releases:
            return n - self.releases
        self._check_last(n, head, "the budget report")
        return 0

    def _check_last(self, n: int, head: bytes, what: str) -> None:
        if n > self.releases:
            raise MissingRelease(f"{what} counts {n} releases of stream {self.stream!r}: "
                                 f"{_missing(self.releases + 1, n)} not seen")
        if n < self.releases or head != self.head:
            raise LedgerHeadMismatch(f"{what} has ledger head {head.hex()[:16]}... after {n} release(s); the "
                                     f"releases of stream {self.stream!r} give {self.head.hex()[:16]}... after "
                                     f"{self.releases}")


def _digest(release: Release) -> bytes:
    return hashlib.sha256(release.to_payload()).digest()


def verify_chain(messages: Iterable[Release | BudgetExhausted], stream: str | None = None) -> ChainVerifier:
    """Recompute a stream's ledger from genesis over all its verified releases, in the order
    received (exact repeats are skipped), and its ``budget_exhausted`` notice if given.

    :param stream: the stream's name (default: that of the first message).
    :returns: the chain; ``.head`` is its head and ``.releases`` its length.
    :raises MissingRelease: a release is not among ``messages``.
    :raises ReleaseOutOfOrder: every release is there, but one comes after a later one.
    :raises LedgerHeadMismatch, LedgerChainError: see :meth:`ChainVerifier.add`.
    """
    messages = list(messages)
    if stream is None:
        if not messages:
            raise ValueError("verify_chain: no messages, and no stream named")
        stream = messages[0].stream
    verifier = ChainVerifier(stream)
    for i, message in enumerate(messages):
        try:
            verifier.add(message)
        except MissingRelease:
            wanted = verifier.releases + 1
            if any(isinstance(m, Release) and m.stream == stream and m.budget["releases"] == wanted
                   for m in messages[i + 1:]):
                later = (f"release {message.budget['releases']}" if isinstance(message, Release)
                         else "the budget_exhausted notice")
                raise ReleaseOutOfOrder(f"release {wanted} of stream {stream!r} comes after {later}") from None
            raise
    return verifier
