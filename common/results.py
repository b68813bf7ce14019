"""What the enclave signs and publishes: releases, budget notices, budget reports,
key-rotation notices, and the notices that tell a producer what became of its records.

On the wire each is a :class:`sealedsum.common.wire.SignedMessage` whose payload is ASCII JSON
(sorted keys, compact) with a ``kind`` field, signed under the label
``sealedsum/v1/result`` with the enclave's attested Ed25519 key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from sealedsum.common import signing, wire
from sealedsum.common.attestation import AttestedEnclave
from sealedsum.common.errors import InvalidMessage, InvalidResultSignature, RejectReason
from sealedsum.common.policy import StreamKind
from sealedsum.common.privacy import Mechanism

RESULT_KIND = "result"
EXHAUSTED_KIND = "budget_exhausted"
BUDGET_KIND = "budget"
ROTATED_KIND = "key_rotated"
REJECTED_KIND = "rejected"
COUNTED_KIND = "counted"
# What a producer hears on its notice queue (docs/protocol.md sections 13.7 and 13.8).
PRODUCER_KINDS = (ROTATED_KIND, REJECTED_KIND, COUNTED_KIND)

BUDGET_FIELDS = {"releases", "spent_epsilon", "spent_rho", "budget_epsilon", "budget_delta",
                 "remaining_releases", "ledger_head"}
# Present, both, only for a stream in a budget group (docs/protocol.md section 13.3), so an
# ungrouped stream's budget object is what it always was.
GROUP_BUDGET_FIELDS = {"budget_group", "group_releases"}


def _num(v: Any) -> bool:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        return False


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _group_ok(b: dict) -> bool:
    g = b["group_releases"]
    return bool(isinstance(b["budget_group"], str) and wire.STREAM_NAME.fullmatch(b["budget_group"])
                and isinstance(g, dict) and g
                and all(isinstance(s, str) and wire.STREAM_NAME.fullmatch(s) and _int(n) and n >= 0
                        for s, n in g.items()))


def _budget_ok(b: Any) -> bool:
    return (isinstance(b, dict) and (set(b) == BUDGET_FIELDS or (set(b) == BUDGET_FIELDS | GROUP_BUDGET_FIELDS
                                                                 and _group_ok(b)))
            and _int(b["releases"]) and _int(b["remaining_releases"])
            and _num(b["spent_epsilon"]) and (b["spent_rho"] is None or _num(b["spent_rho"]))
            and _num(b["budget_epsilon"]) and _num(b["budget_delta"])
            and isinstance(b["ledger_head"], str) and len(b["ledger_head"]) == 64
            and all(c in "0123456789abcdef" for c in b["ledger_head"]))


def _own_releases_ok(stream: str, b: dict) -> bool:
    """A grouped stream's budget object lists the stream itself, with its own release count."""
    return "group_releases" not in b or b["group_releases"].get(stream) == b["releases"]


def _ledger_notice_ok(m) -> bool:
    """The fields a budget notice and a budget report share: a stream, its ledger, when, by whom."""
    return bool(isinstance(m.stream, str) and wire.STREAM_NAME.fullmatch(m.stream) and _budget_ok(m.budget)
                and _own_releases_ok(m.stream, m.budget)
                and _int(m.key_epoch) and _int(m.at_ms) and isinstance(m.measurement, str))


def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _load(payload: bytes, cls, kind: str):
    try:
        raw = wire.strict_json(payload.decode("ascii"))
    except (ValueError, RecursionError) as err:  # also integers of over 4300 digits, too deep nesting
        raise InvalidMessage(f"{kind}: payload is not ASCII JSON") from err
    if not isinstance(raw, dict) or raw.get("kind") != kind:
        raise InvalidMessage(f"not a {kind} payload")
    if set(raw) != {f.name for f in fields(cls)}:
        raise InvalidMessage(f"{kind}: unexpected or missing fields")
    obj = cls(**raw)
    if not obj._valid():
        raise InvalidMessage(f"{kind}: a field has the wrong type or length")
    return obj


class _Payload:
    """A signed message's payload: canonical ASCII JSON of its fields, ``kind`` first among
    equals; parsing checks the kind, the exact set of fields and each field's type."""

    __slots__ = ()
    KIND: ClassVar[str]

    def to_payload(self) -> bytes:
        return _canonical(asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes):
        return _load(payload, cls, cls.KIND)


@dataclass(frozen=True, slots=True)
class Release(_Payload):
    """One noised window. ``sum`` and ``mean`` hold one entry per coordinate; for a
    histogram, ``sum`` holds the noised bucket counts and ``count`` is their total.
    ``budget`` is the stream's ledger after this release."""

    stream: str
    window: int
    aggregate: str
    count: int
    sum: list[float]
    sum_fixed: list[int]
    mean: list[float] | None
    dimension: int
    fraction_bits: int
    mechanism: str
    epsilon: float
    delta: float
    rho: float | None
    sum_noise_scale: float
    count_noise_scale: float | None
    key_epoch: int
    measurement: str
    closed_at_ms: int
    budget: dict
    kind: str = RESULT_KIND
    KIND: ClassVar[str] = RESULT_KIND

    def _valid(self) -> bool:
        d = self.dimension
        # tuple(...): before Python 3.12, ``in`` on an Enum class raises TypeError for a plain string.
        return bool(
            isinstance(self.stream, str) and wire.STREAM_NAME.fullmatch(self.stream)
            and all(_int(v) for v in (self.window, self.count, d, self.fraction_bits, self.key_epoch, self.closed_at_ms))
            and self.aggregate in tuple(StreamKind) and self.mechanism in tuple(Mechanism)
            and isinstance(self.sum, list) and len(self.sum) == d and all(_num(v) for v in self.sum)
            and isinstance(self.sum_fixed, list) and len(self.sum_fixed) == d and all(_int(v) for v in self.sum_fixed)
            and (self.mean is None or (isinstance(self.mean, list) and len(self.mean) == d and all(_num(v) for v in self.mean)))
            and all(_num(v) for v in (self.epsilon, self.delta, self.sum_noise_scale))
            and (self.rho is None or _num(self.rho)) and (self.count_noise_scale is None or _num(self.count_noise_scale))
            and isinstance(self.measurement, str) and _budget_ok(self.budget)
            and _own_releases_ok(self.stream, self.budget)
        )

    def to_json(self) -> dict[str, Any]:
        """The consumer-facing view: scalars for one-dimensional sums and means."""
        scalar = self.dimension == 1 and self.aggregate != StreamKind.HISTOGRAM
        out = {
            "stream": self.stream,
            "window": self.window,
            "aggregate": self.aggregate,
            "count": self.count,
            "sum": self.sum[0] if scalar else self.sum,
            "mean": (self.mean[0] if scalar else self.mean) if self.mean is not None else None,
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sum_noise_scale": self.sum_noise_scale * 2.0 ** -self.fraction_bits,
            "count_noise_scale": self.count_noise_scale,
            "closed_at_ms": self.closed_at_ms,
            "key_epoch": self.key_epoch,
            "budget_spent_epsilon": self.budget["spent_epsilon"],
            "budget_remaining_releases": self.budget["remaining_releases"],
        }
        if self.aggregate == StreamKind.HISTOGRAM:
            out["buckets"] = out.pop("sum")
        if self.rho is not None:
            out["rho"] = self.rho
        return out


@dataclass(frozen=True, slots=True)
class BudgetExhausted(_Payload):
    """Published once per stream, instead of the release that would exceed its budget.
    After it the enclave accepts nothing more for the stream."""

    stream: str
    budget: dict
    key_epoch: int
    measurement: str
    at_ms: int
    kind: str = EXHAUSTED_KIND
    KIND: ClassVar[str] = EXHAUSTED_KIND

    def _valid(self) -> bool:
        return _ledger_notice_ok(self)

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "notice": EXHAUSTED_KIND, "at_ms": self.at_ms, **self.budget}


@dataclass(frozen=True, slots=True)
class BudgetReport(_Payload):
    """The enclave's answer to ``sealedsum budget``: a stream's ledger, for a client's nonce."""

    stream: str
    nonce: str
    exhausted: bool
    budget: dict
    key_epoch: int
    measurement: str
    at_ms: int
    kind: str = BUDGET_KIND
    KIND: ClassVar[str] = BUDGET_KIND

    def _valid(self) -> bool:
        return isinstance(self.nonce, str) and isinstance(self.exhausted, bool) and _ledger_notice_ok(self)

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "exhausted": self.exhausted, "at_ms": self.at_ms,
                "measurement": self.measurement, **self.budget}


@dataclass(frozen=True, slots=True)
class KeyRotated(_Payload):
    """Published on ``PREFIX.announce`` when the enclave rotates its encryption keys:
    ``key_epoch`` is the new current epoch, ``previous_epoch`` drains until
    ``previous_retires_at_ms`` and is refused after. Producers that hear it attest again."""

    key_epoch: int
    previous_epoch: int
    previous_retires_at_ms: int
    measurement: str
    at_ms: int
    kind: str = ROTATED_KIND
    KIND: ClassVar[str] = ROTATED_KIND

    def _valid(self) -> bool:
        return bool(all(_int(v) for v in (self.key_epoch, self.previous_epoch, self.previous_retires_at_ms,
                                          self.at_ms))
                    and 1 <= self.previous_epoch and self.key_epoch == self.previous_epoch + 1
                    and 0 <= self.at_ms <= self.previous_retires_at_ms
                    and isinstance(self.measurement, str))

    def to_json(self) -> dict[str, Any]:
        return {"notice": ROTATED_KIND, "key_epoch": self.key_epoch, "previous_epoch": self.previous_epoch,
                "previous_retires_at_ms": self.previous_retires_at_ms, "at_ms": self.at_ms}


def _hex(v: Any, digits: int) -> bool:
    return isinstance(v, str) and len(v) == digits and all(c in "0123456789abcdef" for c in v)


@dataclass(frozen=True, slots=True)
class RecordRefused(_Payload):
    """Sent to one producer's notice token when the enclave dead-letters a record that carried
    it: what the dead letter says, and which record it was when the envelope opened
    (``stream`` and ``record_id`` are ``None`` before that; ``batch_index`` is ``None`` for a
    record that came alone)."""

    token: str
    stream: str | None
    record_id: str | None
    batch_index: int | None
    reason: str
    detail: str
    key_epoch: int
    measurement: str
    at_ms: int
    kind: str = REJECTED_KIND
    KIND: ClassVar[str] = REJECTED_KIND

    def _valid(self) -> bool:
        return bool(_hex(self.token, 32)
                    and (self.stream is None or (isinstance(self.stream, str) and wire.STREAM_NAME.fullmatch(self.stream)))
                    and (self.record_id is None or _hex(self.record_id, 32))
                    and (self.stream is None) == (self.record_id is None)
                    and (self.batch_index is None or (_int(self.batch_index) and self.batch_index >= 0))
                    and isinstance(self.reason, str) and self.reason in {r.value for r in RejectReason}
                    and isinstance(self.detail, str)
                    and _int(self.key_epoch) and _int(self.at_ms) and isinstance(self.measurement, str))

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "record_id": self.record_id, "batch_index": self.batch_index,
                "reason": self.reason, "detail": self.detail, "at_ms": self.at_ms}


@dataclass(frozen=True, slots=True)
class RecordsCounted(_Payload):
    """Sent to one producer's notice token after a checkpoint that holds records carrying it:
    their ids, by stream, in the order they were counted; ``count`` is their number."""

    token: str
    count: int
    records: dict
    key_epoch: int
    measurement: str
    at_ms: int
    kind: str = COUNTED_KIND
    KIND: ClassVar[str] = COUNTED_KIND

    def _valid(self) -> bool:
        r = self.records
        return bool(_hex(self.token, 32) and _int(self.count) and self.count >= 1 and isinstance(r, dict) and r
                    and all(isinstance(s, str) and wire.STREAM_NAME.fullmatch(s) and isinstance(ids, list) and ids
                            and all(_hex(i, 32) for i in ids) for s, ids in r.items())
                    and sum(len(ids) for ids in r.values()) == self.count
                    and _int(self.key_epoch) and _int(self.at_ms) and isinstance(self.measurement, str))

    def record_ids(self) -> list[tuple[str, str]]:
        """(stream, record id hex) of every record counted."""
        return [(s, i) for s, ids in self.records.items() for i in ids]


PAYLOADS = {RESULT_KIND: Release, EXHAUSTED_KIND: BudgetExhausted, BUDGET_KIND: BudgetReport,
            ROTATED_KIND: KeyRotated, REJECTED_KIND: RecordRefused, COUNTED_KIND: RecordsCounted}


def verify_signed(body: bytes, enclave: AttestedEnclave, kinds: tuple[str, ...] = (RESULT_KIND, EXHAUSTED_KIND)):
    """Check a signed message's signature under the attested key, then parse it.

    :returns: a :class:`Release`, :class:`BudgetExhausted`, :class:`BudgetReport` or
        :class:`KeyRotated`, whichever of ``kinds`` the payload is.
    :raises InvalidResultSignature: forged, altered, or signed by another enclave.
    :raises InvalidMessage: signed but not a well-formed message of an expected kind.
    """
    try:
        message = wire.SignedMessage.from_bytes(body)
    except InvalidMessage as err:
        raise InvalidResultSignature(f"result is not a signed message: {err}") from err
    signing.verify(enclave.keys.ed25519, signing.RESULT, message.payload, message.signature,
                   error=InvalidResultSignature, what="result")
    try:
        kind = wire.strict_json(message.payload).get("kind")
    except (ValueError, RecursionError, AttributeError) as err:
        raise InvalidMessage("signed payload is not a JSON object") from err
    if kind not in kinds:
        raise InvalidMessage(f"unexpected message kind {kind!r}")
    parsed = PAYLOADS[kind].from_payload(message.payload)
    if parsed.measurement != enclave.measurement.hex():
        raise InvalidResultSignature("result names another measurement than the attested enclave")
    # key_epoch is informational: rotation changes the encryption keys, not the signing key,
    # so a result signed by the attested key is the enclave's whatever epoch it names.
    return parsed


def verify_result(body: bytes, enclave: AttestedEnclave) -> Release:
    """Like :func:`verify_signed`, for a release only."""
    return verify_signed(body, enclave, (RESULT_KIND,))


def verify_key_rotated(body: bytes, enclave: AttestedEnclave) -> KeyRotated:
    """Like :func:`verify_signed`, for a key-rotation notice only (what producers hear)."""
    return verify_signed(body, enclave, (ROTATED_KIND,))


def verify_notice(body: bytes, enclave: AttestedEnclave, token: str) -> KeyRotated | RecordRefused | RecordsCounted:
    """Like :func:`verify_signed`, for what a producer hears on its notice queue; a notice
    about records must name this producer's ``token``.

    :raises InvalidResultSignature: forged, altered, signed by another enclave, or for another token.
    :raises InvalidMessage: signed but not a well-formed notice.
    """
    notice = verify_signed(body, enclave, PRODUCER_KINDS)
    if not isinstance(notice, KeyRotated) and notice.token != token:
        raise InvalidResultSignature("the notice is for another producer's token")
    return notice
