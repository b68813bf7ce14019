"""Attestation verification: the only place a client decides to trust an enclave.

:func:`verify_attestation` runs the design page's checks in order and returns an
:class:`AttestedEnclave` only when every one passed:

1. the quote's signature verifies under the pinned platform key;
2. the quote's measurement is in the allow-list;
3. the quote's report data equals hash(keys ‖ policy ‖ nonce) recomputed from what
   was received, and the measurement binds the received code digest and policy;
4. the nonce is the one this client sent;
5. the quote is fresh.

Producers and consumers call this; neither copies it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass

from sealedsum.common import signing, wire
from sealedsum.common.errors import (
    AttestationError,
    ConfigError,
    InvalidMessage,
    KeySizeMismatch,
    NonceMismatch,
    ReportDataMismatch,
    StaleQuote,
    UnknownMeasurement,
    UntrustedPlatform,
)
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.policy_parse import policy_from_bytes

DEFAULT_MAX_QUOTE_AGE_SECONDS = 300.0
# A quote dated this far ahead of the client's clock is still accepted (clock skew).
FUTURE_SKEW_SECONDS = 30.0


def encode_platform_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_platform_key(text: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ConfigError("trust.platform_key is not base64") from err
    if len(raw) != signing.PUBLIC_KEY_SIZE:
        raise ConfigError("trust.platform_key must be a 32-byte Ed25519 key, as printed by `sealedsum platform init`")
    return raw


def decode_measurement(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"measurement {text!r} is not hex") from err
    if len(raw) != wire.DIGEST_SIZE:
        raise ConfigError("a measurement is 64 hex digits, as printed by `sealedsum measure`")
    return raw


@dataclass(frozen=True, slots=True)
class TrustAnchors:
    """What a client pins: the platform key and the measurements it accepts."""

    platform_key: bytes
    measurements: frozenset[bytes]
    max_quote_age_seconds: float = DEFAULT_MAX_QUOTE_AGE_SECONDS

    def __post_init__(self) -> None:
        if len(self.platform_key) != signing.PUBLIC_KEY_SIZE:
            raise ConfigError("the platform key must be 32 bytes")
        if not self.measurements:
            raise ConfigError("trust.measurements is empty: no enclave could ever be trusted",
                              hint="add the output of `sealedsum measure --config FILE`")
        if self.max_quote_age_seconds <= 0:
            raise ConfigError("trust.max_quote_age_seconds must be > 0")


@dataclass(frozen=True, slots=True)
class AttestedEnclave:
    """An enclave whose keys and policy passed every check."""

    keys: wire.KeyBundle
    policy: EnclavePolicy
    policy_bytes: bytes
    measurement: bytes
    code_digest: bytes
    issued_at_ms: int

    def to_json(self) -> dict:
        return {
            "measurement": self.measurement.hex(),
            "code_digest": self.code_digest.hex(),
            "quote_issued_at_ms": self.issued_at_ms,
            "platform": "emulated",
            "keys": {
                "epoch": self.keys.epoch,
                "x25519": base64.b64encode(self.keys.x25519).decode(),
                "ed25519": base64.b64encode(self.keys.ed25519).decode(),
                "paillier_n_bits": self.keys.paillier_n.bit_length(),
            },
            "policy": json.loads(self.policy_bytes),
        }


def verify_attestation(
    reply: bytes,
    nonce: bytes,
    trust: TrustAnchors,
    now_ms: int,
) -> AttestedEnclave:
    """Verify an attestation reply against ``trust`` and the ``nonce`` this client sent.

    :raises AttestationError: (a subclass naming the failed check) on any failure.
    """
    try:
        parsed = wire.AttestReply.from_bytes(reply)
        quote = wire.Quote.from_bytes(parsed.quote)
    except InvalidMessage as err:
        raise AttestationError(f"malformed attestation reply: {err}") from err

    # (1) The platform vouches for the quote.
    signing.verify(trust.platform_key, signing.QUOTE, quote.signed_part(), quote.signature,
                   error=UntrustedPlatform, what="quote")
    # (2) The code and policy it measured are ones we accept.
    if quote.measurement not in trust.measurements:
        raise UnknownMeasurement(
            f"measurement {quote.measurement.hex()} is not in trust.measurements",
            hint="if this enclave's code or policy changed on purpose, add its `sealedsum measure` output",
        )
    # (3) What we received is what the quote covers.
    expected = wire.report_data(parsed.keys, parsed.policy, parsed.nonce)
    if not hmac.compare_digest(expected, quote.report_data):
        raise ReportDataMismatch("keys, policy or nonce differ from what the quote covers")
    if not hmac.compare_digest(wire.measurement(parsed.code_digest, parsed.policy), quote.measurement):
        raise ReportDataMismatch("code digest and policy do not produce the quoted measurement")
    # (4) It answers our question, not a recorded one.
    if not hmac.compare_digest(parsed.nonce, nonce):
        raise NonceMismatch("the reply answers another nonce: a replayed or misrouted attestation")
    # (5) It is recent.
    # Quote times are whole milliseconds, so the age is printed exactly, in seconds with three
    # decimals, and the limit as configured: "0 s old (limit 0 s)" would say nothing.
    age_ms = now_ms - quote.issued_at_ms
    age = age_ms / 1000.0
    if age > trust.max_quote_age_seconds:
        raise StaleQuote(f"quote is {age_ms / 1000:.3f} s old (limit {trust.max_quote_age_seconds:.15g} s)",
                         hint="a replayed or delayed reply, or the platform clock is behind; attest again")
    if age < -FUTURE_SKEW_SECONDS:
        raise StaleQuote(f"quote is dated {-age_ms / 1000:.3f} s in the future (limit {FUTURE_SKEW_SECONDS:g} s)",
                         hint="check the clocks")

    try:
        keys = wire.KeyBundle.from_bytes(parsed.keys)
        policy = policy_from_bytes(parsed.policy)
    except InvalidMessage as err:
        raise AttestationError(f"attested keys or policy do not parse: {err}") from err
    if keys.paillier_n.bit_length() != policy.paillier_bits:
        # A smaller key than the attested policy promises (or a larger one) is refused: the
        # policy's paillier_bits is what the measurement vouches for, and packing depends on it.
        raise KeySizeMismatch(f"the Paillier key has {keys.paillier_n.bit_length()} bits; "
                              f"the attested policy says {policy.paillier_bits}")
    return AttestedEnclave(keys, policy, parsed.policy, quote.measurement, parsed.code_digest,
                           quote.issued_at_ms)
