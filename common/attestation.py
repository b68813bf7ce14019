"""Attestation verification: the only place a client decides to trust an enclave.

:func:`verify_attestation` runs the checks of docs/protocol.md section 9 in order and returns
an :class:`AttestedEnclave` only when every one passed. Only step 1 depends on the quote's
format (told by the quote field's first bytes, section 8.2):

1. the platform vouches for the quote: for an emulated quote, its signature under the pinned
   platform key; for a Nitro attestation document, AWS's checks (:mod:`sealedsum.common.nitro`:
   the chain from the pinned root, the COSE signature, PCR0-2 allow-listed, no debug mode
   unless allowed) and its ``user_data`` carrying the measurement and report data;
2. the quoted measurement is in the allow-list;
3. the quoted report data equals hash(keys ‖ policy ‖ nonce) recomputed from what was
   received, and the measurement binds the received code digest and policy;
4. the nonce is the one this client sent;
5. the quote is fresh.

Producers, consumers and the CLI call this; none copies it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass

from sealedsum.common import nitro, signing, wire
from sealedsum.common.errors import (
    AttestationError,
    ConfigError,
    InvalidMessage,
    KeySizeMismatch,
    MalformedQuote,
    NonceMismatch,
    ReportDataMismatch,
    UnknownMeasurement,
    UntrustedPlatform,
)
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.policy_parse import policy_from_bytes

DEFAULT_MAX_QUOTE_AGE_SECONDS = 300.0
FUTURE_SKEW_SECONDS = nitro.FUTURE_SKEW_SECONDS


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
    """What a client pins: the measurements it accepts, and for each quote format it
    accepts, its root: the emulated platform's key, the Nitro root certificate and PCRs.
    A format without its root is refused."""

    platform_key: bytes | None
    measurements: frozenset[bytes]
    max_quote_age_seconds: float = DEFAULT_MAX_QUOTE_AGE_SECONDS
    nitro: nitro.NitroTrust | None = None

    def __post_init__(self) -> None:
        if self.platform_key is None and self.nitro is None:
            raise ConfigError("[trust] accepts no quote format: set platform_key (emulated), [trust.nitro], or both")
        if self.platform_key is not None and len(self.platform_key) != signing.PUBLIC_KEY_SIZE:
            raise ConfigError("the platform key must be 32 bytes")
        if not self.measurements:
            raise ConfigError("trust.measurements is empty: no enclave could ever be trusted",
                              hint="add the output of `sealedsum measure --config FILE`")
        if self.max_quote_age_seconds <= 0:
            raise ConfigError("trust.max_quote_age_seconds must be > 0")

    def root_id(self) -> str:
        """Names the pinned root (a consumer's chain state is kept per root): the platform
        key's hex, or for a Nitro-only client ``nitro:`` and the SHA-256 of the root certificate."""
        if self.platform_key is not None:
            return self.platform_key.hex()
        return "nitro:" + self.nitro.root_fingerprint().hex()  # type: ignore[union-attr]  # one is set


@dataclass(frozen=True, slots=True)
class AttestedEnclave:
    """An enclave whose keys and policy passed every check."""

    keys: wire.KeyBundle
    policy: EnclavePolicy
    policy_bytes: bytes
    measurement: bytes
    code_digest: bytes
    issued_at_ms: int
    platform: str = wire.EMULATED
    # PCR0-2 of a Nitro enclave (empty for the emulated platform).
    pcrs: tuple[bytes, ...] = ()
    # A Nitro enclave in debug mode, accepted because trust.nitro.allow_debug said so.
    debug_mode: bool = False

    def to_json(self) -> dict:
        return {
            "measurement": self.measurement.hex(),
            "code_digest": self.code_digest.hex(),
            "quote_issued_at_ms": self.issued_at_ms,
            "platform": self.platform,
            **({"pcrs": {f"pcr{i}": p.hex() for i, p in enumerate(self.pcrs)}, "debug_mode": self.debug_mode}
               if self.pcrs else {}),
            "keys": {
                "epoch": self.keys.epoch,
                "x25519": base64.b64encode(self.keys.x25519).decode(),
                "ed25519": base64.b64encode(self.keys.ed25519).decode(),
                "paillier_n_bits": self.keys.paillier_n.bit_length(),
            },
            "policy": json.loads(self.policy_bytes),
        }


@dataclass(frozen=True, slots=True)
class _Vouched:
    """What the platform vouched for, whatever the quote's format."""

    measurement: bytes
    report_data: bytes
    issued_at_ms: int
    pcrs: tuple[bytes, ...] = ()
    debug_mode: bool = False


def _emulated(quote_bytes: bytes, trust: TrustAnchors) -> _Vouched:
    if trust.platform_key is None:
        raise UntrustedPlatform("an emulated quote, and [trust] pins no platform_key: this client accepts Nitro only",
                                hint="add trust.platform_key if this client is meant to trust the emulated platform")
    try:
        quote = wire.Quote.from_bytes(quote_bytes)
    except InvalidMessage as err:
        raise AttestationError(f"malformed attestation reply: {err}") from err
    signing.verify(trust.platform_key, signing.QUOTE, quote.signed_part(), quote.signature,
                   error=UntrustedPlatform, what="quote")
    return _Vouched(quote.measurement, quote.report_data, quote.issued_at_ms)


def _nitro(document: bytes, nonce: bytes, trust: TrustAnchors, now_ms: int) -> _Vouched:
    if trust.nitro is None:
        raise UntrustedPlatform("a Nitro attestation document, and [trust] has no [trust.nitro] table",
                                hint="add [trust.nitro] with the AWS root certificate and the enclave's PCRs (docs/nitro.md)")
    doc = nitro.verify_platform(document, trust.nitro, now_ms)
    if doc.user_data is None:
        raise MalformedQuote("the Nitro document carries no user_data: it binds no keys")
    try:
        binding = wire.NitroBinding.from_bytes(doc.user_data)
    except InvalidMessage as err:
        raise MalformedQuote(f"the Nitro document's user_data is not a sealedsum binding: {err}") from err
    # The client's nonce is bound through the report data; a nonce field, if the enclave set
    # one, must be the client's too.
    if doc.nonce is not None and not hmac.compare_digest(doc.nonce, nonce):
        raise NonceMismatch("the Nitro document answers another nonce: a replayed or misrouted attestation")
    return _Vouched(binding.measurement, binding.report_data, doc.timestamp_ms, doc.measured_pcrs, doc.debug)


def verify_quote(quote: bytes, nonce: bytes, trust: TrustAnchors, now_ms: int) -> tuple[bytes, bytes, int]:
    """Check a bare quote (either format) against ``trust``: its platform vouches for it, its
    measurement is one ``trust`` accepts, and it is fresh. What it binds (its report data) is
    for the caller to check: enclave replicas quote their own handshakes
    (``sealedsum.sidecar.cluster.join``).

    :returns: ``(measurement, report_data, issued_at_ms)``.
    :raises AttestationError: (a subclass naming the failed check) on any failure.
    """
    try:
        fmt = wire.quote_format(quote)
    except InvalidMessage as err:
        raise MalformedQuote(f"not a quote: {err}") from err
    vouched = _emulated(quote, trust) if fmt == wire.EMULATED else _nitro(quote, nonce, trust, now_ms)
    if vouched.measurement not in trust.measurements:
        raise UnknownMeasurement(f"measurement {vouched.measurement.hex()} is not one this deployment accepts",
                                 hint="list it under cluster.peer_measurements if it may join")
    nitro.check_fresh(vouched.issued_at_ms, now_ms, trust.max_quote_age_seconds)
    return vouched.measurement, vouched.report_data, vouched.issued_at_ms


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
        fmt = wire.quote_format(parsed.quote)
    except InvalidMessage as err:
        raise AttestationError(f"malformed attestation reply: {err}") from err

    # (1) The platform vouches for the quote.
    quote = _emulated(parsed.quote, trust) if fmt == wire.EMULATED else _nitro(parsed.quote, nonce, trust, now_ms)
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
    nitro.check_fresh(quote.issued_at_ms, now_ms, trust.max_quote_age_seconds)

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
                           quote.issued_at_ms, fmt, quote.pcrs, quote.debug_mode)
