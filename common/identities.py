"""Producer identities (``[identities]`` in the config): the Ed25519 keys a producer may sign
records with. They are part of the measured policy, so enrolling or revoking a key changes
the measurement.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Mapping

import nacl.bindings

from sealedsum.common.errors import ConfigError
from sealedsum.common.tables import take
from sealedsum.common.wire import producer_id_of


def _identity_keys(raw: Any, where: str) -> dict[str, bytes]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must map names to base64 Ed25519 public keys")
    out = {}
    for name, text in raw.items():
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError) as err:
            raise ConfigError(f"{where}.{name} is not base64") from err
        if len(key) != 32:
            raise ConfigError(f"{where}.{name} must be a 32-byte Ed25519 public key",
                              hint="as printed by `sealedsum producer keygen`")
        # Small-order or non-canonical points verify forged signatures under some libraries.
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(key):
            raise ConfigError(f"{where}.{name} is not a valid Ed25519 public key (small order or not canonical)")
        out[str(name)] = key
    return out


@dataclass(frozen=True, slots=True)
class Identities:
    """Producer identity keys: enrolled ones may sign records, revoked ones are refused
    by name. With ``required`` every record must be signed by an enrolled key."""

    required: bool = False
    enrolled: dict[str, bytes] = field(default_factory=dict)
    revoked: dict[str, bytes] = field(default_factory=dict)

    KEYS = {"required", "enrolled", "revoked"}

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Identities":
        d = take(raw, cls.KEYS, "identities")
        required = d.get("required", False)
        if not isinstance(required, bool):
            raise ConfigError("identities.required must be true or false")
        enrolled = _identity_keys(d.get("enrolled", {}), "identities.enrolled")
        revoked = _identity_keys(d.get("revoked", {}), "identities.revoked")
        both = set(enrolled.values()) & set(revoked.values())
        if both:
            raise ConfigError("a key is both enrolled and revoked", hint="remove it from identities.enrolled")
        if required and not enrolled:
            raise ConfigError("identities.required is set but no key is enrolled")
        return cls(required, enrolled, revoked)

    def to_mapping(self) -> dict[str, Any]:
        enc = lambda keys: {n: base64.b64encode(k).decode() for n, k in sorted(keys.items())}  # noqa: E731
        return {"required": self.required, "enrolled": enc(self.enrolled), "revoked": enc(self.revoked)}

    def __bool__(self) -> bool:
        return self.required or bool(self.enrolled) or bool(self.revoked)

    @property
    def producer_ids(self) -> frozenset[bytes]:
        """The producer ids enrolled keys stand for."""
        return frozenset(producer_id_of(k) for k in self.enrolled.values())

    def name_of(self, key: bytes) -> tuple[str, str]:
        """``("enrolled" | "revoked" | "unknown", name)`` for an identity key."""
        for status, keys in (("enrolled", self.enrolled), ("revoked", self.revoked)):
            for name, k in keys.items():
                if k == key:
                    return status, name
        return "unknown", ""
