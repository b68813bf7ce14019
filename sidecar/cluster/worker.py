"""A replica's work on its records: open and check each one (everything that needs only keys
and policy: docs/protocol.md section 11.1, checks 1 to 11 and 19), then fold what passed into
an :class:`~.frames.Increment` for the release holder, which makes the checks that need the
state and counts the increment into its windows (``Enclave.merge``).

Pure: the runtime (``sealedsum.sidecar.cluster.runtime``) feeds it deliveries and carries
the increment to the holder.
"""

from __future__ import annotations

import gmpy2

from sealedsum.common.errors import RecordRejected, RejectReason
from sealedsum.sidecar.enclave.frames import Group, Increment, Member
from sealedsum.sidecar.enclave import validity
from sealedsum.sidecar.enclave.service import OpenedRecord


def checked(opened: list[OpenedRecord | RecordRejected]) -> list[OpenedRecord | RecordRejected]:
    """``opened`` with check 19 made: records whose ciphertexts do not encrypt the plaintexts
    they state are refused ``out_of_range`` (by the same split as a single enclave's, per
    stream and key epoch), and a record id seen earlier in the batch ``duplicate`` (the
    holder would refuse it anyway; the split needs ids unique within what it checks)."""
    out = list(opened)
    seen: set[tuple[str, bytes]] = set()
    groups: dict[tuple[str, int], list[int]] = {}
    for i, item in enumerate(out):
        if isinstance(item, RecordRejected):
            continue
        key = (item.stream.name, item.envelope.record_id)
        if key in seen:
            out[i] = _rejected(RejectReason.DUPLICATE, f"record id {item.envelope.record_id.hex()} seen already", item)
            continue
        seen.add(key)
        groups.setdefault((item.stream.name, item.keys.epoch), []).append(i)
    for indices in groups.values():
        keys = out[indices[0]].keys  # type: ignore[union-attr]
        members = [validity.Member(out[i].envelope.ciphertexts, out[i].envelope.plaintexts,  # type: ignore[union-attr]
                                   out[i].envelope.record_id) for i in indices]  # type: ignore[union-attr]
        for k in validity.mismatched(members, keys.paillier_public.n, keys.nsquare, keys.decrypt_product):
            out[indices[k]] = _rejected(RejectReason.OUT_OF_RANGE, "its ciphertexts do not encrypt the plaintexts it states",
                                        out[indices[k]])  # type: ignore[arg-type]
    return out


def _rejected(reason: RejectReason, detail: str, record: OpenedRecord) -> RecordRejected:
    rejection = RecordRejected(reason, detail)
    rejection.record = (record.stream.name, record.envelope.record_id)
    return rejection


def increment(worker: bytes, seq: int, records: list[OpenedRecord], read_ms: int, through_ms: int,
              resend: bool = False) -> tuple[Increment, list[int]]:
    """Fold ``records`` (checked) per stream and key epoch.

    :returns: the increment, and for each of its members (in ``Increment.members`` order) the
        index in ``records`` it stands for."""
    order: dict[tuple[str, int], list[int]] = {}
    for i, record in enumerate(records):
        order.setdefault((record.stream.name, record.keys.epoch), []).append(i)
    groups, index = [], []
    for (stream, epoch), indices in order.items():
        keys = records[indices[0]].keys
        nsquare = keys.nsquare
        width = len(records[indices[0]].envelope.ciphertexts)
        delta = [gmpy2.mpz(1)] * width
        for i in indices:
            delta = [gmpy2.f_mod(t * c, nsquare) for t, c in zip(delta, records[i].envelope.ciphertexts)]
        members = tuple(Member(records[i].envelope.record_id, records[i].envelope.producer_id,
                               records[i].envelope.sent_at_ms, records[i].envelope.window) for i in indices)
        groups.append(Group(stream, epoch, tuple(int(c) for c in delta), members))
        index.extend(indices)
    return Increment(worker, seq, resend, read_ms, through_ms, tuple(groups)), index
