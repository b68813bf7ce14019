"""What became of the records a producer published in one session, from the enclave's signed
notices to its notice token (docs/protocol.md section 11.6). Pure: no broker, no clock.

Each record is *counted* (a receipt names it, or the enclave refused it as a ``duplicate``:
an earlier copy of it was counted), *rejected* (a refusal names it, with the dead letter's
reason and detail) or, until one of those arrives, *unknown*. Notices are best effort: a
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
    """The records of one session (by record id) and what the notices said of them.

    ``track`` a record when it is handed to the broker, with anything that says whether the
    broker refused it (``failed``: a ticket's ``failed`` attribute); ``heard`` each verified
    notice. A notice about a record this session did not publish is counted in ``foreign``
    and otherwise ignored: another producer may have put this session's token on its own
    records, but it cannot make this one believe anything about its records.
    """

    def __init__(self, keep_rejections: int = 10_000) -> None:
        self._open: dict[str, object] = {}  # record id hex -> its ticket (None: confirmed already)
        self._streams: dict[str, str] = {}
        self.counted: set[str] = set()
        self.already: set[str] = set()
        self.rejected: dict[str, Rejection] = {}
        self.unattributed: list[Rejection] = []  # refusals of this session's messages that name no record
        self.foreign = 0
        self._keep = keep_rejections

    def track(self, record_id: bytes, stream: str, ticket=None) -> None:
        rid = record_id.hex()
        self._open[rid] = ticket
        self._streams[rid] = stream

    def heard(self, notice: RecordRefused | RecordsCounted) -> None:
        if isinstance(notice, RecordsCounted):
            for stream, rid in notice.record_ids():
                if self._streams.get(rid) != stream:
                    self.foreign += 1
                    continue
                self._open.pop(rid, None)
                self.rejected.pop(rid, None)  # counted wins: a refused copy was a second one
                self.counted.add(rid)
            return
        rejection = Rejection(notice.record_id, notice.stream, notice.reason, notice.detail, notice.batch_index,
                              notice.at_ms)
        rid = notice.record_id
        if rid is None:
            if len(self.unattributed) < self._keep:
                self.unattributed.append(rejection)
            return
        if self._streams.get(rid) != notice.stream:
            self.foreign += 1
            return
        if rid in self.counted:
            return
        self._open.pop(rid, None)
        if notice.reason == RejectReason.DUPLICATE.value:
            # Its id was counted before: an earlier copy of this record (republished after a lost
            # confirm, or sent by an earlier run resumed with the same record ids).
            self.counted.add(rid)
            self.already.add(rid)
            return
        self.rejected[rid] = rejection

    def outcomes(self, hearing: bool = True) -> Outcomes:
        waiting = sum(1 for ticket in self._open.values() if not getattr(ticket, "failed", False))
        unattributed = Counter(r.reason for r in self.unattributed)
        by_reason = Counter(r.reason for r in self.rejected.values()) + unattributed
        rejections = tuple(self.rejected.values())[:self._keep] + tuple(self.unattributed)
        return Outcomes(
            counted=len(self.counted), rejected=len(self.rejected) + len(self.unattributed),
            # A refusal that names no record is one of the records still waiting, but which one is unknown.
            unknown=max(0, waiting - len(self.unattributed)), already_counted=len(self.already),
            by_reason=dict(by_reason), rejections=rejections[:self._keep], hearing=hearing)
