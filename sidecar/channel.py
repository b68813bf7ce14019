"""The private channel between the platform and the enclave process: a pair of pipes
that nothing else in the system can read, carrying typed frames.

A frame is u32 length + JSON object with an ``op`` naming its type; every field is
checked on the way in, and anything else is a :class:`FrameError`. The enclave sends
requests (:class:`QuoteRequest`, :class:`CounterRead`, :class:`CounterAdvance`,
:class:`LedgerCounterRead`, :class:`LedgerCounterAdvance`) and one :class:`Ready`; the
platform sends one :class:`Launch` and a reply to each request (:class:`QuoteReply`,
:class:`CounterValue`). No frame names a measurement or a code digest: the platform answers
every request for the enclave it launched, so the enclave can reach no other counter, and
gets the keys of its own measurement and code only.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from sealedsum.common.errors import ChannelClosed, FrameError

MAX_FRAME = 1 << 22


class _Frame:
    """Fields of type ``bytes`` travel as hex, ``BrokerLink`` as an object; the rest as is,
    type-checked on the way in."""

    OP: ClassVar[str]

    def to_json(self) -> dict:
        return {f.name: _out(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, d: dict):
        expected = {f.name for f in fields(cls)}
        if set(d) != expected:
            raise FrameError(f"{cls.OP}: fields {sorted(d)} are not {sorted(expected)}")
        return cls(**{f.name: _in(f.type, d[f.name], f"{cls.OP}.{f.name}") for f in fields(cls)})


def _out(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, BrokerLink):
        return value.to_json()
    return value


def _in(kind: str, value: Any, where: str) -> Any:
    if kind == "bytes":
        try:
            return bytes.fromhex(value)
        except (TypeError, ValueError) as err:
            raise FrameError(f"{where} is not hex") from err
    if kind == "BrokerLink":
        if not isinstance(value, dict):
            raise FrameError(f"{where} is not an object")
        return BrokerLink.from_json(value)
    types = {"int": int, "str": str, "dict": dict}[kind]
    if isinstance(value, bool) or not isinstance(value, types):
        raise FrameError(f"{where} is not of type {kind}")
    return value


@dataclass(frozen=True, slots=True)
class BrokerLink(_Frame):
    """How the enclave reaches the broker (operational, not measured)."""

    OP: ClassVar[str] = "broker"
    url: str
    prefix: str
    queue_type: str
    max_queued_records: int
    start_timeout_ms: int  # how long the enclave waits for the broker at start (broker.reconnect_seconds)


@dataclass(frozen=True, slots=True)
class Launch(_Frame):
    """Platform to enclave, once, first: what the platform measured, the sealing key (this
    measurement's) and the ledger key (this code digest's, whatever the policy)."""

    OP: ClassVar[str] = "launch"
    sealing_key: bytes
    measurement: bytes
    code_digest: bytes
    policy: bytes
    state_dir: str
    broker: BrokerLink
    log_level: str
    ledger_key: bytes


@dataclass(frozen=True, slots=True)
class QuoteRequest(_Frame):
    OP: ClassVar[str] = "quote"
    report_data: bytes


@dataclass(frozen=True, slots=True)
class QuoteReply(_Frame):
    OP: ClassVar[str] = "quote_reply"
    quote: bytes


@dataclass(frozen=True, slots=True)
class CounterRead(_Frame):
    OP: ClassVar[str] = "counter_read"


@dataclass(frozen=True, slots=True)
class CounterAdvance(_Frame):
    """Raise the platform's monotonic counter to ``value`` (never lower it)."""

    OP: ClassVar[str] = "counter_advance"
    value: int


@dataclass(frozen=True, slots=True)
class LedgerCounterRead(_Frame):
    """Read the monotonic counter of the sealed ledger (the launched code digest's)."""

    OP: ClassVar[str] = "ledger_counter_read"


@dataclass(frozen=True, slots=True)
class LedgerCounterAdvance(_Frame):
    """Raise the sealed ledger's counter to ``value`` (never lower it)."""

    OP: ClassVar[str] = "ledger_counter_advance"
    value: int


@dataclass(frozen=True, slots=True)
class CounterValue(_Frame):
    OP: ClassVar[str] = "counter_value"
    value: int


@dataclass(frozen=True, slots=True)
class Ready(_Frame):
    """Enclave to platform, once it is set up: for the platform's log."""

    OP: ClassVar[str] = "ready"
    pid: int
    hardening: dict
    key_epoch: int


Frame = (Launch | QuoteRequest | QuoteReply | CounterRead | CounterAdvance | LedgerCounterRead | LedgerCounterAdvance
         | CounterValue | Ready)
FRAMES: dict[str, type] = {cls.OP: cls for cls in (Launch, QuoteRequest, QuoteReply, CounterRead, CounterAdvance,
                                                    LedgerCounterRead, LedgerCounterAdvance, CounterValue, Ready)}


def encode(frame: Frame) -> bytes:
    data = json.dumps({"op": frame.OP, **frame.to_json()}).encode()
    return struct.pack(">I", len(data)) + data


def decode(data: bytes) -> Frame:
    """:raises FrameError: not JSON, not an object, an unknown ``op``, or a field missing or wrong."""
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise FrameError("a frame is not JSON") from err
    if not isinstance(doc, dict) or doc.get("op") not in FRAMES:
        raise FrameError(f"unknown frame {doc.get('op') if isinstance(doc, dict) else type(doc).__name__!r}")
    return FRAMES[doc.pop("op")].from_json(doc)


class PipeChannel:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r, self._w = read_fd, write_fd

    def send(self, frame: Frame) -> None:
        view = memoryview(encode(frame))
        try:
            while view:
                view = view[os.write(self._w, view):]
        except BrokenPipeError as err:
            raise ChannelClosed("the other side closed the platform channel") from err

    def recv(self) -> Frame:
        """:raises ChannelClosed: the other side closed the channel.
        :raises FrameError: what came is not a frame of the protocol."""
        (size,) = struct.unpack(">I", self._read(4))
        if size > MAX_FRAME:
            raise FrameError("oversized frame on the platform channel")
        return decode(self._read(size))

    def request(self, frame: Frame, reply: type) -> Frame:
        """Send ``frame`` and return the reply, which must be of type ``reply``."""
        self.send(frame)
        answer = self.recv()
        if not isinstance(answer, reply):
            raise FrameError(f"expected {reply.OP}, got {answer.OP}")
        return answer

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(self._r, n - len(out))
            if not chunk:
                raise ChannelClosed("the other side closed the platform channel")
            out += chunk
        return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
