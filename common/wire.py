"""The wire format: every message that crosses the broker, byte by byte.

``docs/protocol.md`` specifies the same layouts in prose and ``tests/vectors/``
pins them. All integers are unsigned big-endian. Each message starts with a
four-byte magic whose last byte is the format version.

Decoders are strict: a wrong magic, a short or long buffer, or a value out of range
raises :class:`~sealedsum.common.errors.InvalidMessage` and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass

from sealedsum.common import signing
from sealedsum.common.errors import InvalidMessage

ENVELOPE_MAGIC = b"SSE\x03"  # 2: producer_id after record_id; 3: each ciphertext's plaintext
KEYS_MAGIC = b"SSK\x01"
QUOTE_MAGIC = b"SSQ\x01"
ATTEST_REQUEST_MAGIC = b"SSA\x01"
ATTEST_REPLY_MAGIC = b"SSD\x01"
BUDGET_REQUEST_MAGIC = b"SSG\x01"
SIGNED_ENVELOPE_MAGIC = b"SSI\x01"
SIGNED_MAGIC = b"SSS\x01"
RECORD_BATCH_MAGIC = b"SSB\x01"
# The binding of a Nitro attestation document's user_data (protocol section 7.2).
NITRO_BINDING_MAGIC = b"SSN\x01"

NONCE_SIZE = 32
RECORD_ID_SIZE = 16
PRODUCER_ID_SIZE = 16
DIGEST_SIZE = 32
X25519_KEY_SIZE = 32
SEALED_BOX_OVERHEAD = 48

MAX_STREAM_NAME = 64
MAX_VALUES = 65535
MAX_PAILLIER_MODULUS_BYTES = 1024  # 8192-bit n
MAX_POLICY_BYTES = 1 << 20
MAX_SIGNED_PAYLOAD = 1 << 24
# The quote field of an attestation reply: AWS's largest attestation document payload
# (16 384 bytes) and the COSE_Sign1 around it. An emulated quote is 140 bytes.
MAX_QUOTE_BYTES = 16384 + 256

# A record batch (several sealed records in one broker message) holds at most this many
# records and is at most this long; a record too large for a batch travels alone.
MAX_BATCH_RECORDS = 1024
MAX_BATCH_BYTES = 256 << 10
# The AMQP ``type`` property tells the two apart: a sealed box starts with random bytes,
# so no magic could.
RECORD_TYPE = "record"
RECORD_BATCH_TYPE = "records"

STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ENVELOPE_HEAD = struct.Struct(">4s16s16sIQQB")

REPORT_DATA_LABEL = b"sealedsum/v1/report-data\x00"
MEASUREMENT_LABEL = b"sealedsum/v1/measurement\x00"


class _Reader:
    """Consumes a buffer front to back; any shortfall is an ``InvalidMessage``."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise InvalidMessage(f"{self._what}: truncated")
        out = self._data[self._pos : self._pos + n].tobytes()
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def magic(self, expected: bytes) -> None:
        if self.take(len(expected)) != expected:
            raise InvalidMessage(f"{self._what}: wrong magic or version")

    def end(self) -> None:
        if self._pos != len(self._data):
            raise InvalidMessage(f"{self._what}: {len(self._data) - self._pos} trailing bytes")


def plaintext_width(ciphertext_width: int) -> int:
    """Bytes of one plaintext in an envelope: the byte length of n, half that of n² rounded up."""
    return (ciphertext_width + 1) // 2


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {key!r} in a JSON object")
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: a number beyond the doubles
        raise ValueError(f"JSON number {text} is beyond the range of a double")
    return value


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes) -> object:
    """Parse JSON the way the protocol reads every JSON text (docs/protocol.md section 1): a
    duplicate key in an object, ``NaN``, ``Infinity``, ``-Infinity`` and a number that
    overflows a double are errors (``ValueError``, which callers turn into their own error);
    integers are read exactly, whatever their size."""
    return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_float=_finite_float,
                      parse_constant=_no_constant)


def check_stream_name(name: str) -> str:
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        raise InvalidMessage("stream name must be 1-64 characters of A-Z a-z 0-9 _ -")
    return name


def shard_key(body: bytes) -> str:
    """The ``message_id`` of a record message: the first 16 bytes of the SHA-256 of its body, in
    hex. A sharded deployment's records exchange hashes it onto a shard queue; the same message
    published again (a retry) lands on the same shard. It tells the broker nothing the body does
    not (docs/protocol.md section 10.6)."""
    return hashlib.sha256(body).digest()[:16].hex()


@dataclass(frozen=True, slots=True)
class Envelope:
    """One record, as the producer builds it and the enclave reads it inside the sealed box.

    ``window`` 0 means "the stream's currently open window". ``ciphertexts`` are
    Paillier ciphertexts (integers in [1, n²)), one per value (or per packed plaintext),
    each ``width`` bytes. ``plaintexts`` are what they encrypt, one per ciphertext, in
    [0, n), each :func:`plaintext_width` bytes: the enclave checks them against the
    stream's bounds, and that the ciphertexts it adds up encrypt exactly them, before a
    record touches any total. ``producer_id`` names the contributor for per-producer
    contribution bounds (all zeros: anonymous). It is asserted by the producer, not
    authenticated.
    """

    stream: str
    record_id: bytes
    key_epoch: int
    sent_at_ms: int
    window: int
    width: int
    ciphertexts: tuple[int, ...]
    producer_id: bytes = bytes(PRODUCER_ID_SIZE)
    plaintexts: tuple[int, ...] = ()

    def to_bytes(self) -> bytes:
        check_stream_name(self.stream)
        if len(self.record_id) != RECORD_ID_SIZE or len(self.producer_id) != PRODUCER_ID_SIZE:
            raise ValueError("record_id and producer_id must be 16 bytes each")
        if not 1 <= len(self.ciphertexts) <= MAX_VALUES:
            raise ValueError("an envelope holds 1..65535 ciphertexts")
        if not 0 < self.width <= 2 * MAX_PAILLIER_MODULUS_BYTES:
            raise ValueError("ciphertext width out of range")
        if not (0 <= self.key_epoch < 1 << 32 and 0 <= self.sent_at_ms < 1 << 64 and 0 <= self.window < 1 << 64):
            raise ValueError("epoch, time or window does not fit its field")
        if any(not 0 <= c < 1 << (8 * self.width) for c in self.ciphertexts):
            raise ValueError("a ciphertext does not fit the width")
        pw = plaintext_width(self.width)
        if len(self.plaintexts) != len(self.ciphertexts) or any(not 0 <= m < 1 << (8 * pw) for m in self.plaintexts):
            raise ValueError(f"one plaintext per ciphertext, each fitting {pw} bytes")
        name = self.stream.encode("ascii")
        head = (
            ENVELOPE_MAGIC
            + self.record_id
            + self.producer_id
            + struct.pack(">IQQB", self.key_epoch, self.sent_at_ms, self.window, len(name))
            + name
            + struct.pack(">HH", len(self.ciphertexts), self.width)
        )
        return (head + b"".join(c.to_bytes(self.width, "big") for c in self.ciphertexts)
                + b"".join(m.to_bytes(pw, "big") for m in self.plaintexts))

    @classmethod
    def from_bytes(cls, data: bytes) -> "Envelope":
        # One struct call for the fixed head: this runs once per record in the enclave.
        if len(data) < _ENVELOPE_HEAD.size:
            raise InvalidMessage("envelope: truncated")
        magic, record_id, producer_id, key_epoch, sent_at_ms, window, name_len = _ENVELOPE_HEAD.unpack_from(data)
        if magic != ENVELOPE_MAGIC:
            raise InvalidMessage("envelope: wrong magic or version")
        pos = _ENVELOPE_HEAD.size
        if len(data) < pos + name_len + 4:
            raise InvalidMessage("envelope: truncated")
        try:
            stream = check_stream_name(data[pos:pos + name_len].decode("ascii"))
        except UnicodeDecodeError as err:
            raise InvalidMessage("envelope: stream name is not ASCII") from err
        pos += name_len
        count, width = struct.unpack_from(">HH", data, pos)
        pos += 4
        if count == 0 or width == 0 or width > 2 * MAX_PAILLIER_MODULUS_BYTES:
            raise InvalidMessage("envelope: bad ciphertext count or width")
        pw = plaintext_width(width)
        end = pos + count * (width + pw)
        if len(data) != end:
            raise InvalidMessage("envelope: truncated" if len(data) < end else
                                 f"envelope: {len(data) - end} trailing bytes")
        cts = tuple(int.from_bytes(data[pos + i * width:pos + (i + 1) * width], "big") for i in range(count))
        pos += count * width
        ms = tuple(int.from_bytes(data[pos + i * pw:pos + (i + 1) * pw], "big") for i in range(count))
        return cls(stream, bytes(record_id), key_epoch, sent_at_ms, window, width, cts, bytes(producer_id), ms)


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Several sealed records in one broker message, each sealed on its own.

    The enclave counts or dead-letters every record by itself; the batch only saves
    the broker a message per record. It is not sealed as a whole: the broker sees how
    many records it carries and their lengths, as it would seeing them one by one.
    """

    records: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.records) <= MAX_BATCH_RECORDS:
            raise ValueError(f"a record batch holds 1..{MAX_BATCH_RECORDS} records")
        out = RECORD_BATCH_MAGIC + struct.pack(">H", len(self.records)) + b"".join(
            struct.pack(">I", len(r)) + r for r in self.records)
        if len(out) > MAX_BATCH_BYTES:
            raise ValueError(f"a record batch is at most {MAX_BATCH_BYTES} bytes")
        return out

    @staticmethod
    def size(record_lengths) -> int:
        """Bytes of a batch holding records of these lengths."""
        return len(RECORD_BATCH_MAGIC) + 2 + sum(4 + n for n in record_lengths)

    @classmethod
    def from_bytes(cls, data: bytes) -> "RecordBatch":
        if len(data) > MAX_BATCH_BYTES:
            raise InvalidMessage(f"record batch: {len(data)} bytes > {MAX_BATCH_BYTES}")
        r = _Reader(data, "record batch")
        r.magic(RECORD_BATCH_MAGIC)
        count = r.u16()
        if not 1 <= count <= MAX_BATCH_RECORDS:
            raise InvalidMessage(f"record batch: {count} records, limit 1..{MAX_BATCH_RECORDS}")
        records = tuple(r.take(r.u32()) for _ in range(count))
        r.end()
        return cls(records)


def producer_id_of(public_key: bytes) -> bytes:
    """The producer id an identity key stands for: the first 16 bytes of its SHA-256."""
    return hashlib.sha256(b"sealedsum/v1/producer-id\x00" + public_key).digest()[:PRODUCER_ID_SIZE]


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """An envelope signed by the producer's Ed25519 identity key, inside the sealed box.

    The signature covers ``sealedsum/v1/envelope || 0x00 || envelope bytes``; the
    envelope's ``producer_id`` must be :func:`producer_id_of` the key. A sealed box
    alone proves nothing about its sender; this does, to the enclave only (the broker
    sees neither the key nor the signature).
    """

    public_key: bytes
    signature: bytes
    envelope: bytes

    def to_bytes(self) -> bytes:
        if len(self.public_key) != signing.PUBLIC_KEY_SIZE or len(self.signature) != signing.SIGNATURE_SIZE:
            raise ValueError("identity key is 32 bytes and signature 64")
        return SIGNED_ENVELOPE_MAGIC + self.public_key + self.signature + self.envelope

    @classmethod
    def from_bytes(cls, data: bytes) -> "SignedEnvelope":
        r = _Reader(data, "signed envelope")
        r.magic(SIGNED_ENVELOPE_MAGIC)
        pk, sig = r.take(signing.PUBLIC_KEY_SIZE), r.take(signing.SIGNATURE_SIZE)
        return cls(pk, sig, bytes(data[4 + 32 + 64:]))


@dataclass(frozen=True, slots=True)
class KeyBundle:
    """The enclave's public keys for one key epoch."""

    epoch: int
    x25519: bytes
    ed25519: bytes
    paillier_n: int

    def to_bytes(self) -> bytes:
        n_len = (self.paillier_n.bit_length() + 7) // 8
        if len(self.x25519) != X25519_KEY_SIZE or len(self.ed25519) != signing.PUBLIC_KEY_SIZE:
            raise ValueError("public keys are 32 bytes each")
        if not 64 <= n_len <= MAX_PAILLIER_MODULUS_BYTES or not 0 <= self.epoch < 1 << 32:
            raise ValueError("Paillier modulus size or epoch out of range")
        return (
            KEYS_MAGIC
            + struct.pack(">I", self.epoch)
            + self.x25519
            + self.ed25519
            + struct.pack(">H", n_len)
            + self.paillier_n.to_bytes(n_len, "big")
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeyBundle":
        r = _Reader(data, "key bundle")
        r.magic(KEYS_MAGIC)
        epoch = r.u32()
        x, ed = r.take(X25519_KEY_SIZE), r.take(signing.PUBLIC_KEY_SIZE)
        n_len = r.u16()
        if not 64 <= n_len <= MAX_PAILLIER_MODULUS_BYTES:
            raise InvalidMessage("key bundle: Paillier modulus size out of range")
        n = int.from_bytes(r.take(n_len), "big")
        r.end()
        if n.bit_length() != n_len * 8 or n % 2 == 0:
            raise InvalidMessage("key bundle: Paillier modulus is not a full-length odd integer")
        return cls(epoch, x, ed, n)

    @property
    def ciphertext_width(self) -> int:
        """Bytes of one Paillier ciphertext (an integer below n²)."""
        return ((self.paillier_n**2).bit_length() + 7) // 8


@dataclass(frozen=True, slots=True)
class Quote:
    """The platform's signed statement: this measurement produced this report data at this time."""

    measurement: bytes
    report_data: bytes
    issued_at_ms: int
    signature: bytes

    SIZE = 4 + 32 + 32 + 8 + 64

    def signed_part(self) -> bytes:
        return QUOTE_MAGIC + self.measurement + self.report_data + struct.pack(">Q", self.issued_at_ms)

    def to_bytes(self) -> bytes:
        return self.signed_part() + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> "Quote":
        r = _Reader(data, "quote")
        r.magic(QUOTE_MAGIC)
        q = cls(r.take(DIGEST_SIZE), r.take(DIGEST_SIZE), r.u64(), r.take(signing.SIGNATURE_SIZE))
        r.end()
        return q


EMULATED = "emulated"
NITRO = "nitro"


def quote_format(quote: bytes) -> str:
    """Which platform's quote the reply's quote field holds, told by its first bytes:
    the ``SSQ\x01`` magic (emulated), or a COSE_Sign1, the CBOR array of four (``84``),
    untagged or under tag 18 (``d2 84``) (a Nitro attestation document)."""
    if quote[:4] == QUOTE_MAGIC:
        return EMULATED
    if quote[:1] == b"\x84" or quote[:2] == b"\xd2\x84":
        return NITRO
    raise InvalidMessage("quote: neither an emulated quote (SSQ\\x01) nor a Nitro COSE_Sign1")


@dataclass(frozen=True, slots=True)
class NitroBinding:
    """What a sealedsum enclave puts in its Nitro document's ``user_data``: the measurement
    and report data an emulated quote carries (sections 6 and 7.2)."""

    measurement: bytes
    report_data: bytes

    SIZE = 4 + DIGEST_SIZE + DIGEST_SIZE

    def to_bytes(self) -> bytes:
        if len(self.measurement) != DIGEST_SIZE or len(self.report_data) != DIGEST_SIZE:
            raise ValueError("measurement and report data are 32 bytes each")
        return NITRO_BINDING_MAGIC + self.measurement + self.report_data

    @classmethod
    def from_bytes(cls, data: bytes) -> "NitroBinding":
        r = _Reader(data, "Nitro user_data")
        r.magic(NITRO_BINDING_MAGIC)
        b = cls(r.take(DIGEST_SIZE), r.take(DIGEST_SIZE))
        r.end()
        return b


@dataclass(frozen=True, slots=True)
class AttestRequest:
    nonce: bytes

    def to_bytes(self) -> bytes:
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        return ATTEST_REQUEST_MAGIC + self.nonce

    @classmethod
    def from_bytes(cls, data: bytes) -> "AttestRequest":
        r = _Reader(data, "attestation request")
        r.magic(ATTEST_REQUEST_MAGIC)
        nonce = r.take(NONCE_SIZE)
        r.end()
        return cls(nonce)


@dataclass(frozen=True, slots=True)
class BudgetRequest:
    """Ask the enclave for a stream's ledger; it answers with a signed ``budget`` report."""

    nonce: bytes
    stream: str

    def to_bytes(self) -> bytes:
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 32 bytes")
        name = check_stream_name(self.stream).encode("ascii")
        return BUDGET_REQUEST_MAGIC + self.nonce + bytes([len(name)]) + name

    @classmethod
    def from_bytes(cls, data: bytes) -> "BudgetRequest":
        r = _Reader(data, "budget request")
        r.magic(BUDGET_REQUEST_MAGIC)
        nonce = r.take(NONCE_SIZE)
        try:
            stream = check_stream_name(r.take(r.u8()).decode("ascii"))
        except UnicodeDecodeError as err:
            raise InvalidMessage("budget request: stream name is not ASCII") from err
        r.end()
        return cls(nonce, stream)


@dataclass(frozen=True, slots=True)
class AttestReply:
    """What the enclave answers to an attestation request. Unverified until
    :func:`sealedsum.common.attestation.verify_attestation` says otherwise."""

    nonce: bytes
    code_digest: bytes
    keys: bytes
    policy: bytes
    quote: bytes

    def to_bytes(self) -> bytes:
        out = [ATTEST_REPLY_MAGIC, self.nonce, self.code_digest]
        for part in (self.keys, self.policy, self.quote):
            out.append(struct.pack(">I", len(part)))
            out.append(part)
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> "AttestReply":
        r = _Reader(data, "attestation reply")
        r.magic(ATTEST_REPLY_MAGIC)
        nonce, code = r.take(NONCE_SIZE), r.take(DIGEST_SIZE)
        parts = []
        for limit in (4 + 4 + 64 + 2 + MAX_PAILLIER_MODULUS_BYTES, MAX_POLICY_BYTES, MAX_QUOTE_BYTES):
            n = r.u32()
            if n > limit:
                raise InvalidMessage("attestation reply: field too long")
            parts.append(r.take(n))
        r.end()
        return cls(nonce, code, *parts)


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A signed JSON payload from the enclave (results and notices)."""

    payload: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        return SIGNED_MAGIC + struct.pack(">I", len(self.payload)) + self.payload + self.signature

    @classmethod
    def from_bytes(cls, data: bytes) -> "SignedMessage":
        r = _Reader(data, "signed message")
        r.magic(SIGNED_MAGIC)
        n = r.u32()
        if n > MAX_SIGNED_PAYLOAD:
            raise InvalidMessage("signed message: payload too long")
        payload, sig = r.take(n), r.take(signing.SIGNATURE_SIZE)
        r.end()
        return cls(payload, sig)


def _framed(part: bytes) -> bytes:
    return struct.pack(">I", len(part)) + part


def report_data(keys: bytes, policy: bytes, nonce: bytes) -> bytes:
    """What the quote's report data must be for these keys, policy and nonce."""
    return hashlib.sha256(REPORT_DATA_LABEL + _framed(keys) + _framed(policy) + nonce).digest()


def measurement(code_digest: bytes, policy: bytes) -> bytes:
    """The measurement: code digest and policy, bound together."""
    return hashlib.sha256(MEASUREMENT_LABEL + code_digest + hashlib.sha256(policy).digest()).digest()
