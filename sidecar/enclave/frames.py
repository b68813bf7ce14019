"""What replicas send one another over the broker: increments (ciphertext partial totals of a
batch of records, with what the release holder needs to check each record against its state),
the holder's replies, and heartbeats.

Every frame is canonical JSON inside a secret box (XSalsa20-Poly1305) under the deployment's
cluster key (:meth:`Keyring.cluster_key`), which only replicas holding the keyring know: the
broker and its operator see only lengths, cannot read a record id or producer id, and cannot
forge or alter a frame. A replayed frame is harmless by construction: an increment's records
are duplicates the second time, a reply names a sequence number its replica no longer waits
for, a heartbeat only says what an earlier one did.

Pure: no broker, no clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import nacl.exceptions
import nacl.secret

from sealedsum.common import wire
from sealedsum.common.errors import InvalidMessage, RecordRejected, RejectReason
from sealedsum.common.wire import strict_json

# The AMQP type of every frame (what kind it is, the broker cannot tell).
FRAME_TYPE = "cluster"
WORKER_ID_SIZE = 16


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class Member:
    """One record of an increment, as the holder checks it: duplicates, budget, age, window,
    contribution bound (``docs/protocol.md`` section 11.1, checks 12 to 18)."""

    record_id: bytes
    producer_id: bytes
    sent_at_ms: int
    window: int

    def to_json(self) -> list:
        return [self.record_id.hex(), self.producer_id.hex(), self.sent_at_ms, self.window]

    @classmethod
    def from_json(cls, raw) -> "Member":
        rid, pid, sent, window = raw
        member = cls(bytes.fromhex(rid), bytes.fromhex(pid), int(sent), int(window))
        if len(member.record_id) != wire.RECORD_ID_SIZE or len(member.producer_id) != wire.PRODUCER_ID_SIZE:
            raise ValueError("record or producer id of the wrong size")
        return member


@dataclass(frozen=True, slots=True)
class Group:
    """The records of one stream and key epoch in an increment, and the Paillier sum of
    their ciphertexts (``delta``: one ciphertext per coordinate, the product mod n²)."""

    stream: str
    epoch: int
    delta: tuple[int, ...]
    members: tuple[Member, ...]

    def to_json(self) -> dict:
        return {"stream": self.stream, "epoch": self.epoch, "delta": [format(c, "x") for c in self.delta],
                "members": [m.to_json() for m in self.members]}

    @classmethod
    def from_json(cls, raw: dict) -> "Group":
        return cls(str(raw["stream"]), int(raw["epoch"]), tuple(int(c, 16) for c in raw["delta"]),
                   tuple(Member.from_json(m) for m in raw["members"]))


@dataclass(frozen=True, slots=True)
class Increment:
    """A batch of checked records of one replica, folded per stream and key epoch.

    :param worker: the sending replica's id (random per process start).
    :param seq: its sequence number (a replica sends its next increment only once this one is
        answered, so its frames reach the holder in the order it made them).
    :param resend: sent again after no answer came (the holder may have committed it: a
        ``duplicate`` refusal of its records then means counted).
    :param read_ms: when the replica received the increment's first record (its clock).
    :param through_ms: every record the replica received before this time is in this
        increment or an earlier one.
    """

    worker: bytes
    seq: int
    resend: bool
    read_ms: int
    through_ms: int
    groups: tuple[Group, ...]

    KIND = "increment"

    @property
    def members(self) -> list[tuple[Group, Member]]:
        """Every record in order: the indices replies refer to."""
        return [(g, m) for g in self.groups for m in g.members]

    def to_json(self) -> dict:
        return {"kind": self.KIND, "worker": self.worker.hex(), "seq": self.seq, "resend": self.resend,
                "read_ms": self.read_ms, "through_ms": self.through_ms, "groups": [g.to_json() for g in self.groups]}

    @classmethod
    def from_json(cls, raw: dict) -> "Increment":
        return cls(_worker(raw), int(raw["seq"]), bool(raw["resend"]), int(raw["read_ms"]), int(raw["through_ms"]),
                   tuple(Group.from_json(g) for g in raw["groups"]))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A replica with nothing in flight: every record it received before ``through_ms`` has
    been sent in an increment. ``reply_node`` names the broker node the replica is connected to,
    as direct reply-to names encode it (empty if unknown): clients on that node may attest to
    the holder, which answers only reply-to names of nodes it knows."""

    worker: bytes
    through_ms: int
    reply_node: bytes = b""

    KIND = "heartbeat"

    def to_json(self) -> dict:
        return {"kind": self.KIND, "worker": self.worker.hex(), "through_ms": self.through_ms,
                "reply_node": self.reply_node.hex()}

    @classmethod
    def from_json(cls, raw: dict) -> "Heartbeat":
        return cls(_worker(raw), int(raw["through_ms"]), bytes.fromhex(raw["reply_node"]))


@dataclass(frozen=True, slots=True)
class Reply:
    """The holder's answer to increment ``seq``: committed (no refusals: every record is counted
    and durable), or refused: the listed records are refused for good, with their reasons, and
    nothing of the increment was counted; the replica sends the others again."""

    worker: bytes
    seq: int
    refused: tuple[tuple[int, RecordRejected], ...] = ()
    # The holder got this increment again (the broker redelivered it, or the replica resent
    # it): a holder before it may have counted it, so a ``duplicate`` of it means counted.
    again: bool = False

    KIND = "reply"

    @property
    def committed(self) -> bool:
        return not self.refused

    def to_json(self) -> dict:
        return {"kind": self.KIND, "worker": self.worker.hex(), "seq": self.seq, "again": self.again,
                "refused": [[i, r.reason.value, r.detail] for i, r in self.refused]}

    @classmethod
    def from_json(cls, raw: dict) -> "Reply":
        return cls(_worker(raw), int(raw["seq"]),
                   tuple((int(i), RecordRejected(RejectReason(reason), str(detail))) for i, reason, detail in raw["refused"]),
                   bool(raw["again"]))


Frame = Increment | Heartbeat | Reply
KINDS = {cls.KIND: cls for cls in (Increment, Heartbeat, Reply)}


def _worker(raw: dict) -> bytes:
    worker = bytes.fromhex(raw["worker"])
    if len(worker) != WORKER_ID_SIZE:
        raise ValueError("worker id of the wrong size")
    return worker


def seal(key: bytes, frame: Frame) -> bytes:
    """The frame as it crosses the broker: a random nonce and the secret box of its JSON."""
    return bytes(nacl.secret.SecretBox(key).encrypt(_canonical(frame.to_json())))


def open_frame(key: bytes, body: bytes) -> Frame:
    """:raises InvalidMessage: not a frame sealed under ``key`` (tampered, another deployment's,
    junk), or one that does not parse."""
    try:
        raw = strict_json(nacl.secret.SecretBox(key).decrypt(body).decode("ascii"))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as err:
        raise InvalidMessage(f"not a frame of this deployment: {type(err).__name__}") from err
    try:
        return KINDS[raw["kind"]].from_json(raw)
    except (KeyError, ValueError, TypeError) as err:
        raise InvalidMessage(f"a frame that does not parse: {type(err).__name__}: {err}") from err
