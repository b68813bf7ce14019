"""How a replica without keys gets the deployment's keys from one that has them, each side
having checked the other's quote first (mutual attestation).

1. The joiner draws a fresh nonce and a one-time X25519 key pair, has its platform quote
   ``SHA-256("sealedsum/v1/join" 0x00 || box_key || nonce)`` and sends a :class:`JoinRequest`
   (nonce, box key, its code digest and policy, the quote) to ``PREFIX.cluster.join``.
2. A replica that has the keys checks that quote: signed by a platform the policy lists
   (``cluster.platform_keys``), fresh, for a measurement it accepts (its own or one of
   ``cluster.peer_measurements``), which the joiner's code digest and policy produce, binding
   that box key and nonce. Only then does it answer (:class:`JoinReply`): an ordinary
   attestation reply to the joiner's nonce (its keys, its policy, its own quote) and the
   keyring sealed to the box key.
3. The joiner checks that attestation as any client would (against the same platforms and
   measurements), opens the keyring and accepts it only if its public keys are the attested
   ones.

Nobody else can open the keyring (the box key's private half never leaves the joiner), a
joiner that cannot attest gets nothing, and a joiner that received keys knows they belong to
attested code. Pure: the runtime carries the two messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

import nacl.exceptions
from nacl.public import PrivateKey, PublicKey, SealedBox

from sealedsum.common import wire
from sealedsum.common.attestation import TrustAnchors, verify_attestation, verify_quote
from sealedsum.common.cluster import Cluster
from sealedsum.common.errors import AttestationError, InvalidMessage, ReportDataMismatch, UntrustedPlatform
from sealedsum.common.wire import strict_json
from sealedsum.sidecar.enclave.keyring import Keyring

JOIN_LABEL = b"sealedsum/v1/join\x00"
REQUEST_TYPE = "join"
REPLY_TYPE = "join-reply"
MAX_QUOTE_AGE_SECONDS = 120.0


def report_data(box_key: bytes, nonce: bytes) -> bytes:
    return hashlib.sha256(JOIN_LABEL + box_key + nonce).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _json(body: bytes, fields: set[str]) -> dict:
    try:
        raw = strict_json(body.decode("ascii"))
        if not isinstance(raw, dict) or set(raw) != fields:
            raise ValueError(f"fields {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
        return {k: base64.b64decode(v, validate=True) for k, v in raw.items()}
    except (ValueError, TypeError) as err:
        raise InvalidMessage(f"not a join message: {err}") from err


@dataclass(frozen=True, slots=True)
class JoinRequest:
    nonce: bytes
    box_key: bytes
    code_digest: bytes
    policy: bytes
    quote: bytes

    FIELDS = {"nonce", "box_key", "code_digest", "policy", "quote"}

    def to_bytes(self) -> bytes:
        return json.dumps({k: _b64(getattr(self, k)) for k in sorted(self.FIELDS)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> "JoinRequest":
        raw = _json(body, cls.FIELDS)
        if len(raw["nonce"]) != wire.NONCE_SIZE or len(raw["box_key"]) != 32 or len(raw["code_digest"]) != 32:
            raise InvalidMessage("a join request with a field of the wrong size")
        return cls(**raw)


@dataclass(frozen=True, slots=True)
class JoinReply:
    attestation: bytes  # an attestation reply (docs/protocol.md section 8.2) to the joiner's nonce
    keys: bytes  # the keyring, sealed to the joiner's box key

    FIELDS = {"attestation", "keys"}

    def to_bytes(self) -> bytes:
        return json.dumps({k: _b64(getattr(self, k)) for k in sorted(self.FIELDS)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, body: bytes) -> "JoinReply":
        return cls(**_json(body, cls.FIELDS))


def accepted(cluster: Cluster, measurement: bytes) -> frozenset[bytes]:
    """The measurements a replica of ``measurement`` hands keys to and takes keys from."""
    return frozenset({measurement, *cluster.peer_measurements})


def _anchors(cluster: Cluster, measurement: bytes) -> list[TrustAnchors]:
    return [TrustAnchors(key, accepted(cluster, measurement), MAX_QUOTE_AGE_SECONDS) for key in cluster.platform_keys]


def _any_platform(cluster: Cluster, measurement: bytes, check):
    """``check(anchors)`` under each platform the policy lists, until one vouches."""
    last: AttestationError | None = None
    for anchors in _anchors(cluster, measurement):
        try:
            return check(anchors)
        except UntrustedPlatform as err:  # another listed platform may have signed it
            last = err
    raise last or UntrustedPlatform("cluster.platform_keys is empty")


def request(quote, code_digest: bytes, policy: bytes) -> tuple[JoinRequest, PrivateKey]:
    """A join request quoted by ``quote`` (the platform's, over report data), and the one-time
    key the answer will be sealed to."""
    box = PrivateKey.generate()
    nonce = os.urandom(wire.NONCE_SIZE)
    box_key = bytes(box.public_key)
    return JoinRequest(nonce, box_key, code_digest, policy, quote(report_data(box_key, nonce))), box


def check_request(req: JoinRequest, cluster: Cluster, measurement: bytes, now_ms: int) -> bytes:
    """What a replica with keys checks before it answers: the joiner's measurement.

    :raises AttestationError: the joiner cannot attest (which check failed is in the type)."""
    quoted, data, _ = _any_platform(cluster, measurement,
                                    lambda anchors: verify_quote(req.quote, req.nonce, anchors, now_ms))
    if not hmac.compare_digest(wire.measurement(req.code_digest, req.policy), quoted):
        raise ReportDataMismatch("the joiner's code digest and policy do not produce its quoted measurement")
    if not hmac.compare_digest(report_data(req.box_key, req.nonce), data):
        raise ReportDataMismatch("the joiner's quote does not bind its box key and nonce")
    return quoted


def answer(req: JoinRequest, keyring: Keyring, attest) -> JoinReply:
    """The answer to a checked request: ``attest(request bytes)`` is the enclave's attestation
    (``Enclave.attest``), to the joiner's nonce."""
    attestation = attest(wire.AttestRequest(req.nonce).to_bytes())
    return JoinReply(attestation, bytes(SealedBox(PublicKey(req.box_key)).encrypt(keyring.export())))


def accept(reply: JoinReply, req: JoinRequest, box: PrivateKey, cluster: Cluster, measurement: bytes,
           now_ms: int) -> Keyring:
    """The joiner's check of the answer; the keyring it carries.

    :raises AttestationError: the answering replica does not attest, or sent keys other than
        the ones it attested."""
    attested = _any_platform(cluster, measurement,
                             lambda anchors: verify_attestation(reply.attestation, req.nonce, anchors, now_ms))
    try:
        keyring = Keyring.imported(SealedBox(box).decrypt(reply.keys))
    except (nacl.exceptions.CryptoError, ValueError, KeyError, TypeError) as err:
        raise AttestationError(f"the keys sent do not open: {type(err).__name__}") from err
    if keyring.current.bundle_bytes != attested.keys.to_bytes():
        raise ReportDataMismatch("the keys sent are not the ones the answering replica attested")
    return keyring
