"""Domain-separated Ed25519 signatures.

Every signature covers ``label || 0x00 || message``. Labels are fixed ASCII strings
without NUL, so a signature made for one kind of message never verifies as another
(the DSSE pre-authentication idea, simplified because our labels are fixed).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealedsum.common.errors import SealedsumError

QUOTE = "sealedsum/v1/quote"
RESULT = "sealedsum/v1/result"
ENVELOPE = "sealedsum/v1/envelope"

SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32


def signing_input(label: str, message: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers."""
    raw = label.encode("ascii")
    if b"\x00" in raw:
        raise ValueError("labels must not contain NUL")
    return raw + b"\x00" + message


def sign(key: Ed25519PrivateKey, label: str, message: bytes) -> bytes:
    return key.sign(signing_input(label, message))


def verify(
    public_key: bytes,
    label: str,
    message: bytes,
    signature: bytes,
    *,
    error: type[SealedsumError],
    what: str,
) -> None:
    """Return ``None`` if ``signature`` is valid; raise ``error`` otherwise."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise error(f"{what}: malformed key or signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, signing_input(label, message))
    except (InvalidSignature, ValueError) as err:
        raise error(f"{what}: signature does not verify") from err
