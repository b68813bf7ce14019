"""What became of the records a producer published in one session, from the enclave's signed
notices to its notice token (docs/protocol.md section 11.6). Pure: no broker, no clock.

Each record is *counted* (a receipt names it, or the enclave refused it as a ``duplicate``:
an earlier copy of it was counted), *rejected* (a refusal names it, with the dead letter's
reason and detail) or, until one of those arrives, *unknown*; the first notice about a record
decides. Notices are best effort: a
record whose notice was lost (an enclave crash, a lost broker connection) stays unknown.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sealedsum.common.errors import RejectReason
from sealedsum.common.results import RecordRefused, RecordsCounted


@dataclass(frozen=True, slots=True)
class Rejection:
    """One record the enclave dead-lettered. ``record_id`` (hex) and ``stream`` are ``None``
    when its envelope did not open (``undecryptable``, ``malformed``, ``too_large``)."""

    record_id: str | None
    stream: str | None
    reason: str
    detail: str
    batch_index: int | None
    at_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "stream": self.stream, "reason": self.reason, "detail": self.detail,
                "batch_index": self.batch_index, "at_ms": self.at_ms}


@dataclass(frozen=True, slots=True)
class Outcomes:
    """A snapshot: ``counted + rejected + unknown`` is the number of records published in the
    session that the broker did not refuse. ``already_counted`` of the counted ones were
    refused as duplicates of a copy counted before (a republished record, or a rerun with
    ``--resume``). ``hearing`` says whether notices can arrive at all."""

    counted: int
    rejected: int
    unknown: int
    already_counted: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    rejections: tuple[Rejection, ...] = ()
    hearing: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"counted": self.counted, "already_counted": self.already_counted, "rejected": self.rejected,
                "rejected_by_reason": dict(sorted(self.by_reason.items())), "unknown": self.unknown}

    def reasons_text(self) -> str:
        """``budget_exhausted (5), future_window (2)``: most frequent first."""
        return ", ".join(f"{reason} ({n})" for reason, n in sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0])))


class OutcomeBook:
    """The records of one session still waiting for a word from the enclave (by record id),
    and what the notices said of the others.

    ``track`` a record when it is handed to the broker, with anything that says whether the
    broker refused it (``failed``: a ticket's ``failed`` attribute); ``heard`` each verified
    notice. The first notice about a record decides its outcome, and the record is then
    forgotten (memory follows the records waiting, not the session's length); later notices
    about it, and notices about records this session did not publish, are counted in
    ``ignored`` and change nothing: another producer may put this session's token on its own
    records, but it cannot make this one believe anything about its records.
    """

    def __init__(self, keep_rejections: int = 10_000) -> None:
        self._open: dict[str, tuple[str, object]] = {}  # record id hex -> (stream, ticket or None)
        self.counted = 0
        self.already = 0
        self.by_reason: Counter = Counter()
        self.rejections: list[Rejection] = []  # the first keep_rejections of them
        self.unattributed = 0  # refusals of this session's messages that name no record
        self.ignored = 0
        self._keep = keep_rejections

    def track(self, record_id: bytes, stream: str, ticket=None) -> None:
        self._open[record_id.hex()] = (stream, ticket)

    def _take(self, stream: str | None, rid: str | None) -> bool:
        """Whether ``rid`` of ``stream`` is a record of this session still waiting (it is not any more)."""
        waiting = self._open.get(rid) if rid is not None else None
        if waiting is None or waiting[0] != stream:
            self.ignored += 1
            return False
        del self._open[rid]
        return True

    def heard(self, notice: RecordRefused | RecordsCounted) -> None:
        if isinstance(notice, RecordsCounted):
            self.counted += sum(self._take(stream, rid) for stream, rid in notice.record_ids())
            return
        if notice.record_id is None:
            self.unattributed += 1
        elif not self._take(notice.stream, notice.record_id):
            return
        elif notice.reason == RejectReason.DUPLICATE.value:
            # Its id was counted before: an earlier copy of this record (republished after a lost
            # confirm, or sent by an earlier run resumed with the same record ids).
            self.counted += 1
            self.already += 1
            return
        self.by_reason[notice.reason] += 1
        if len(self.rejections) < self._keep:
            self.rejections.append(Rejection(notice.record_id, notice.stream, notice.reason, notice.detail,
                                             notice.batch_index, notice.at_ms))

    def outcomes(self, hearing: bool = True) -> Outcomes:
        waiting = sum(1 for _, ticket in self._open.values() if not getattr(ticket, "failed", False))
        return Outcomes(
            counted=self.counted, rejected=sum(self.by_reason.values()),
            # A refusal that names no record is one of the records still waiting, but which one is unknown.
            unknown=max(0, waiting - self.unattributed), already_counted=self.already,
            by_reason=dict(self.by_reason), rejections=tuple(self.rejections), hearing=hearing)
