"""What a consumer remembers of each stream's ledger chain between runs, and what that memory
lets it refuse (docs/protocol.md section 15.5). No I/O here: :mod:`sealedsum.consumers.chain_store`
keeps it in a file.

Following a chain only in memory, from the first release received, a restarted consumer
accepts whatever comes next. Two things an operator who holds the sidecar's state directory
and the broker can do then go unseen: start the sidecar on a fresh state directory with a copy
of ``platform.key`` (same measurement, the ledger starts over from genesis with a fresh
budget), or put back an older copy of the sealed state and the monotonic counter (a window
is released again with other noise, and two draws of one total average the noise away).
:class:`StreamChain` remembers, per stream, the highest position verified, ``(n, head_n)``,
and the last :data:`RETAINED` releases received (position, window, head and the SHA-256 of the
signed payload), and refuses a release that contradicts them.

The memory is keyed by stream, broker vhost, topology prefix and pinned platform key
(:class:`ChainKey`), never by measurement: the ledger belongs to the data, so a release under
another measurement must continue the same chain, not open a new one.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from sealedsum.common import ledger_chain as chain
from sealedsum.common.errors import (
    ChainForked,
    ChainRestarted,
    ChainStateError,
    WindowRepeated,
)
from sealedsum.common.results import BudgetExhausted, Release

__all__ = ["RETAINED", "Admission", "ChainKey", "Gap", "Seen", "StreamChain", "payload_digest", "vhost_of"]

# How many releases of a stream are remembered. The number decides only whether a release at an
# old position can be recognised as a harmless redelivery, never whether a contradiction is
# caught: a release at a position that has dropped out of memory (at or below ``passed``) is
# refused whatever it is, so a rollback or restart further back than 64 releases is still
# refused. What legitimately comes again is few and recent: a stopped consumer's unacknowledged
# deliveries (its prefetch is 16) and what the enclave republishes until the broker confirms it
# (the latest releases). 64 covers both with room, and keeps a stream's entry near 12 KB, which
# is rewritten after every release.
RETAINED = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Admission(enum.Enum):
    """How a verified message fits the remembered chain (anything else raises)."""

    EXTENDS = "extends"        # the next release, and its head links to the remembered one
    GAP = "gap"                # releases were never received before it: its link cannot be checked
    LATE = "late"              # a position passed without being received (one of a gap), filled late
    CLOSES = "closes"          # the budget_exhausted notice, at the remembered head
    REDELIVERY = "redelivery"  # byte for byte a release (or the notice) already admitted
    ALREADY_READ = "already read"  # reread from the release stream at or below the offset admitted, long passed


@dataclass(frozen=True, slots=True)
class ChainKey:
    """Which chain a memory is about. The platform key is the pinned one (``[trust]``): a
    consumer attests only enclaves under it, so another platform is another deployment."""

    platform_key: str  # hex of the pinned Ed25519 platform public key
    vhost: str
    prefix: str
    stream: str


class Gap(NamedTuple):
    """Releases ``first`` to ``last`` of a stream never received. Windows are numbered apart
    from positions and withheld windows leave holes in them, so what can be said of the
    missing windows is only that they lie between the neighbours received."""

    first: int
    last: int
    after_window: int | None  # the window of release first - 1, when it is remembered
    before_window: int | None  # the window of release last + 1; None when the notice came next

    def describe(self, stream: str) -> str:
        """E.g. ``releases 4-6 of stream 'x' not received: windows between 7 and 12``."""
        which = f"release {self.first}" if self.first == self.last else f"releases {self.first}-{self.last}"
        if self.after_window is not None and self.before_window is not None:
            windows = f"windows between {self.after_window} and {self.before_window}"
        elif self.before_window is not None:
            windows = f"windows before {self.before_window}"
        elif self.after_window is not None:
            windows = f"windows after {self.after_window}, before the budget ran out"
        else:
            windows = "windows before the budget ran out"
        return f"{which} of stream {stream!r} not received: {windows}"


@dataclass(frozen=True, slots=True)
class Seen:
    """One remembered release: its position, window, ledger head and payload digest."""

    n: int
    window: int
    head: bytes
    digest: bytes


def payload_digest(payload: bytes) -> bytes:
    """The digest a consumer remembers of a release: SHA-256 of its signed payload, as signed."""
    return hashlib.sha256(payload).digest()


def vhost_of(url: str) -> str:
    """The broker vhost an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _link(head: bytes, release: Release) -> bytes:
    """``head_n`` that ``release`` must carry when the head before it is ``head``."""
    return chain.next_head(head, chain.charge_bytes(release.stream, release.window, release.budget["releases"],
                                                    release.mechanism, release.epsilon, release.delta, release.rho))


class StreamChain:
    """One stream's remembered chain.

    :param releases: the highest position verified (0: nothing yet).
    :param head: ``head_releases`` (genesis when ``releases`` is 0).
    :param passed: every position at or below it was verified, or passed by and forgotten:
        a release there is refused unless it is a remembered one, byte for byte.
    :param seen: the remembered releases (at most :data:`RETAINED`, the latest positions).
    :param offset: the highest offset in the release stream of a message of this stream
        admitted, or ``None`` (none read from the stream).
    """

    def __init__(self, stream: str, *, releases: int = 0, head: bytes | None = None, exhausted: bool = False,
                 passed: int = 0, seen: Iterable[Seen] = (), offset: int | None = None) -> None:
        self.stream = stream
        self.releases = releases
        self.head = chain.genesis(stream) if head is None else head
        self.exhausted = exhausted
        self.passed = passed
        self.seen: dict[int, Seen] = {s.n: s for s in seen}
        self.offset = offset
        #: releases never received, noticed in this run; not kept
        self.gaps: list[Gap] = []

    # -- checking ------------------------------------------------------------------------
    def admit(self, message: Release | BudgetExhausted, digest: bytes, offset: int | None = None) -> Admission:
        """Check a verified message of this stream against the memory, and remember it.

        :param digest: :func:`payload_digest` of the message's signed payload.
        :param offset: its offset in the release stream, if it was read from there. At or below
            :attr:`offset` and at a position at or below :attr:`passed`, it was read before and
            has left memory: :attr:`Admission.ALREADY_READ`, nothing checked or changed.
        :raises ChainRestarted: another release 1 after releases were verified.
        :raises WindowRepeated: a remembered window with another body.
        :raises ChainForked: any other contradiction (another head at a verified position, a
            position long passed, a next release that does not link, windows that go back,
            a release after the budget_exhausted notice).
        """
        if message.stream != self.stream:
            raise ValueError(f"a message of stream {message.stream!r} is not about {self.stream!r}")
        if (offset is not None and self.offset is not None and offset <= self.offset
                and message.budget["releases"] <= self.passed):
            return Admission.ALREADY_READ
        admission = (self._admit_notice(message) if isinstance(message, BudgetExhausted)
                     else self._admit_release(message, digest))
        if offset is not None:  # a redelivery too, though only the next admission writes it
            self.offset = offset if self.offset is None else max(self.offset, offset)
        return admission

    def _admit_release(self, message: Release, digest: bytes) -> Admission:
        n, head, w = message.budget["releases"], bytes.fromhex(message.budget["ledger_head"]), message.window
        mine = Seen(n, w, head, digest)
        known = self.seen.get(n)
        if known == mine:
            return Admission.REDELIVERY
        where = f"release {n} of stream {self.stream!r} (window {w})"
        twin = next((s for s in self.seen.values() if s.window == w), None)
        if known is not None or n <= self.passed:
            if n == 1:
                raise ChainRestarted(f"{where} starts the ledger again from genesis after {self.releases} "
                                     "release(s) were verified")
            if twin is not None:
                raise WindowRepeated(f"{where} releases window {w} again with a different body "
                                     f"(verified before as release {twin.n})")
            what = (f"differs from the release {n} verified before (window {known.window})" if known is not None
                    else f"comes back to a position passed long ago (release {self.releases} was verified)")
            raise ChainForked(f"{where} {what}")
        if twin is not None:
            raise WindowRepeated(f"{where} releases window {w} again with a different body "
                                 f"(verified before as release {twin.n})")
        # An honest ledger is charged as windows close, so windows go up along the chain.
        before = max((s for s in self.seen.values() if s.n < n), key=lambda s: s.n, default=None)
        after = min((s for s in self.seen.values() if s.n > n), key=lambda s: s.n, default=None)
        if before is not None and before.window >= w:
            raise ChainForked(f"{where} comes after release {before.n} of window {before.window}: windows went back")
        if after is not None and after.window <= w:
            raise ChainForked(f"{where} comes before release {after.n} of window {after.window}: windows went back")
        if n > self.releases:
            if self.exhausted:
                raise ChainForked(f"{where} comes after the stream's budget_exhausted notice "
                                  f"(after release {self.releases})")
            if n == self.releases + 1:
                expected = _link(self.head, message)
                if head != expected:
                    raise ChainForked(f"{where} does not extend the ledger verified up to release {self.releases}: "
                                      f"its head is {head.hex()[:16]}..., the chain gives {expected.hex()[:16]}...")
                admission = Admission.EXTENDS
            else:
                if self.releases:  # joining a stream for the first time is not missing anything
                    self.gaps.append(Gap(self.releases + 1, n - 1, self._window_at(self.releases), w))
                admission = Admission.GAP
            self.releases, self.head = n, head
        else:
            # A position passed by (a gap, or before the first release received), filled now: it
            # must link to the release before it where that is known, and give the head known at it.
            prev = chain.genesis(self.stream) if n == 1 else (self.seen[n - 1].head if n - 1 in self.seen else None)
            if prev is not None and _link(prev, message) != head:
                raise ChainForked(f"{where} does not link to the release before it")
            if n == self.releases and head != self.head:
                raise ChainForked(f"{where} names another ledger head than the one verified at release {n}")
            admission = Admission.LATE
        self._remember(mine)
        return admission

    def _admit_notice(self, notice: BudgetExhausted) -> Admission:
        n, head = notice.budget["releases"], bytes.fromhex(notice.budget["ledger_head"])
        where = f"the budget_exhausted notice of stream {self.stream!r} (after release {n})"
        if n < self.releases or (n == self.releases and head != self.head):
            raise ChainForked(f"{where} contradicts the ledger verified up to release {self.releases}")
        if n == self.releases:
            if self.exhausted:
                return Admission.REDELIVERY
            admission = Admission.CLOSES
        else:
            if self.releases:
                self.gaps.append(Gap(self.releases + 1, n, self._window_at(self.releases), None))
            self.releases, self.head = n, head
            admission = Admission.GAP
        self.exhausted = True
        return admission

    def _window_at(self, n: int) -> int | None:
        known = self.seen.get(n)
        return known.window if known is not None else None

    def _remember(self, seen: Seen) -> None:
        self.seen[seen.n] = seen
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        while len(self.seen) > RETAINED:
            oldest = min(self.seen)
            del self.seen[oldest]
            self.passed = max(self.passed, oldest)

    # -- the persisted form (docs/protocol.md section 15.5) --------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "releases": self.releases,
            "head": self.head.hex(),
            "exhausted": self.exhausted,
            "passed": self.passed,
            "seen": [{"n": s.n, "window": s.window, "head": s.head.hex(), "digest": s.digest.hex()}
                     for s in sorted(self.seen.values(), key=lambda s: s.n)],
            "offset": self.offset,
        }

    @classmethod
    def from_json(cls, stream: str, doc: Mapping[str, Any], *, version: int = 2) -> StreamChain:
        """:param version: the file's: version 1 entries have no ``offset`` field.
        :raises ChainStateError: not a remembered chain (a field missing, of the wrong type,
        or inconsistent with the others)."""
        def bad(what: str) -> ChainStateError:
            return ChainStateError(f"the entry of stream {stream!r} {what}")

        fields = {"releases", "head", "exhausted", "passed", "seen"} | ({"offset"} if version >= 2 else set())
        if not isinstance(doc, Mapping) or set(doc) != fields:
            raise bad(f"does not have exactly the fields {', '.join(sorted(fields))}")
        offset = doc.get("offset")
        if offset is not None and not _count(offset):
            raise bad("has an offset that is neither null nor a count")
        releases, passed, exhausted = doc["releases"], doc["passed"], doc["exhausted"]
        if not _count(releases) or not _count(passed) or passed > releases:
            raise bad("has releases or passed that are not counts, or passed above releases")
        if not isinstance(exhausted, bool):
            raise bad("has an exhausted field that is not true or false")
        head = _hash(doc["head"])
        if head is None:
            raise bad("has a head that is not 64 hex digits")
        if releases == 0 and head != chain.genesis(stream):
            raise bad("has no release but a head that is not the stream's genesis")
        if not isinstance(doc["seen"], list):
            raise bad("has a seen field that is not a list")
        seen: list[Seen] = []
        for item in doc["seen"]:
            if not isinstance(item, Mapping) or set(item) != {"n", "window", "head", "digest"}:
                raise bad("has a seen item without exactly the fields n, window, head and digest")
            s = Seen(item["n"], item["window"], _hash(item["head"]), _hash(item["digest"]))
            if not (_count(s.n) and _count(s.window) and passed < s.n <= releases and s.head and s.digest):
                raise bad(f"has a seen item that is not a release between positions {passed + 1} and {releases}")
            seen.append(s)
        if len({s.n for s in seen}) != len(seen) or len({s.window for s in seen}) != len(seen):
            raise bad("remembers two releases at one position, or of one window")
        if releases in {s.n for s in seen} and next(s for s in seen if s.n == releases).head != head:
            raise bad("has a head that is not the one of its last release")
        restored = cls(stream, releases=releases, head=head, exhausted=exhausted, passed=passed, seen=seen,
                       offset=offset)
        restored._forget_oldest()  # a file written by a version that remembered more
        return restored


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _hash(v: Any) -> bytes | None:
    return bytes.fromhex(v) if isinstance(v, str) and _HEX64.fullmatch(v) else None
