"""Sealing: AES-256-GCM under the measurement-bound sealing key, with a label and the
measurement as associated data, so only the same code and policy can open a blob."""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealedsum.common.errors import SealingError

SEALED_MAGIC = b"SSV\x01"


def seal(sealing_key: bytes, measurement: bytes, plaintext: bytes, label: bytes) -> bytes:
    nonce = secrets.token_bytes(12)
    return SEALED_MAGIC + nonce + AESGCM(sealing_key).encrypt(nonce, plaintext, label + measurement)


def unseal(sealing_key: bytes, measurement: bytes, blob: bytes, label: bytes) -> bytes:
    """:raises SealingError: other code or policy, other platform, or tampering."""
    if len(blob) < 4 + 12 + 16 or blob[:4] != SEALED_MAGIC:
        raise SealingError("sealed blob has the wrong format")
    try:
        return AESGCM(sealing_key).decrypt(blob[4:16], blob[16:], label + measurement)
    except InvalidTag as err:
        raise SealingError("sealed blob does not open: other code or policy, other platform, or tampering") from err
