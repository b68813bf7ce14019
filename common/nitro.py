"""AWS Nitro Enclaves attestation documents: decoding and verification, free of I/O.

The checks follow AWS's published validation process (aws-nitro-enclaves-nsm-api,
``docs/attestation_process.md``, section 3) and docs/protocol.md section 7.2:

1. :func:`decode`: the COSE_Sign1 (untagged, or tag 18) and the attestation document it
   carries, every field's type and size (:class:`MalformedQuote`);
2. :func:`verify_chain`: the pinned root is ``cabundle[0]``, and the chain from it through the
   bundle to the signing certificate verifies at the given time (:class:`CertificateExpired`,
   :class:`CertificateChainError`);
3. :func:`verify_signature`: ES384 over the COSE Sig_structure (:class:`QuoteSignatureError`);
4. :func:`check_pcrs`: PCR0-2 are allow-listed, or all zero (debug mode) and allowed
   explicitly (:class:`UnknownMeasurement`, :class:`DebugEnclave`).

:func:`verify_document` runs them all, with the nonce and freshness checks, for a caller that
uses the document alone. ``common.attestation`` runs 1-4 and binds ``user_data`` to the reply.

pycose is not used: it decodes tagged messages only and leaves the header and payload checks
to the caller, so cbor2 decodes and ``cryptography`` verifies.
"""

from __future__ import annotations

import datetime
import hmac
import io
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification

from sealedsum.common.errors import (
    CertificateChainError,
    CertificateExpired,
    ConfigError,
    DebugEnclave,
    MalformedQuote,
    NonceMismatch,
    QuoteSignatureError,
    StaleQuote,
    UnknownMeasurement,
)

log = logging.getLogger("sealedsum.attestation")

COSE_SIGN1_TAG = b"\xd2"  # CBOR tag 18, one byte
# {1: -35}: algorithm ES384, and nothing else, in the only encoding CBOR allows for it.
PROTECTED_ES384 = b"\xa1\x01\x38\x22"
SIGNATURE_SIZE = 96  # r || s, 48 bytes each
PCR_SIZES = (32, 48, 64)
MAX_PCRS = 32
MAX_CERTIFICATE = 1024
MAX_USER_DATA = 512
MAX_NONCE = 512
MAX_PUBLIC_KEY = 1024
MAX_PAYLOAD = 16384
# The whole COSE_Sign1: the largest payload AWS allows plus room for the array around it.
MAX_DOCUMENT = MAX_PAYLOAD + 256
# Containers nest two deep in a document (its map, then pcrs or cabundle); the decoder stops
# well before anything deep enough to cost time or stack.
MAX_DEPTH = 4
MANDATORY = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL = ("public_key", "user_data", "nonce")
MEASURED_PCRS = (0, 1, 2)
PCR_SIZE = 48  # SHA-384, the only digest AWS's documents use
# A quote dated this far ahead of the client's clock is still accepted (clock skew).
FUTURE_SKEW_SECONDS = 30.0


class _NoTags(Mapping):
    """cbor2's ``semantic_decoders`` that refuses every tag: cbor2 would otherwise build
    datetimes, sets, regular expressions or shared references out of untrusted bytes, and no
    tag has a place inside an attestation document."""

    def __getitem__(self, tag: int):
        def refuse(_decoder: Any, *_rest: Any) -> None:
            raise ValueError(f"CBOR tag {tag} is not allowed here")
        return refuse

    def __contains__(self, _tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _NoTags()


def _cbor(data: bytes, what: str) -> Any:
    """One CBOR item that is all of ``data`` (``cbor2.loads`` would ignore trailing bytes)."""
    # Imported here: the enclave process imports this module (through common.config) but never
    # verifies a document, so cbor2 stays out of what it loads and its measured runtime line.
    import cbor2

    fp = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(fp, semantic_decoders=_NO_TAGS, max_depth=MAX_DEPTH, allow_indefinite=False,
                                 allow_duplicate_keys=False).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError) as err:
        raise MalformedQuote(f"{what} is not valid CBOR: {type(err).__name__}") from None
    if fp.tell() != len(data):
        raise MalformedQuote(f"{what}: {len(data) - fp.tell()} bytes after the CBOR item")
    return item


@dataclass(frozen=True, slots=True)
class NitroDocument:
    """An attestation document that passed the syntactic checks (not yet the signature)."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def debug(self) -> bool:
        """In debug mode the Nitro hypervisor reports PCR0-2 as zeros."""
        return all(self.pcrs[i] == bytes(len(self.pcrs[i])) for i in MEASURED_PCRS)

    @property
    def measured_pcrs(self) -> tuple[bytes, bytes, bytes]:
        return self.pcrs[0], self.pcrs[1], self.pcrs[2]


@dataclass(frozen=True, slots=True)
class SignedDocument:
    """The COSE_Sign1 around a document, as received: the signature covers these bytes."""

    protected: bytes
    payload: bytes
    signature: bytes
    document: NitroDocument

    def sig_structure(self) -> bytes:
        import cbor2

        return cbor2.dumps(["Signature1", self.protected, b"", self.payload])


def _bytes(value: Any, name: str, low: int, high: int) -> bytes:
    if not isinstance(value, bytes):
        raise MalformedQuote(f"attestation document: {name} is not a byte string")
    if not low <= len(value) <= high:
        raise MalformedQuote(f"attestation document: {name} is {len(value)} bytes, not {low}..{high}")
    return value


def _document(doc: Any) -> NitroDocument:
    if not isinstance(doc, dict):
        raise MalformedQuote("attestation document: the payload is not a map")
    unknown = [k for k in doc if k not in MANDATORY + OPTIONAL]
    if unknown:
        raise MalformedQuote(f"attestation document: unknown field {str(unknown[0])[:40]!r}")
    missing = [k for k in MANDATORY if k not in doc]
    if missing:
        raise MalformedQuote(f"attestation document: {missing[0]} is missing")
    # AWS 3.2.2.1: no field may be null, optional ones included.
    for k, v in doc.items():
        if v is None:
            raise MalformedQuote(f"attestation document: {k} is null")
    module_id, digest, timestamp, pcrs = doc["module_id"], doc["digest"], doc["timestamp"], doc["pcrs"]
    if not isinstance(module_id, str) or not module_id:
        raise MalformedQuote("attestation document: module_id is not a non-empty text string")
    if not isinstance(digest, str) or digest != "SHA384":
        raise MalformedQuote("attestation document: digest is not \"SHA384\"")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 < timestamp < 1 << 64:
        raise MalformedQuote("attestation document: timestamp is not a positive 64-bit integer")
    if not isinstance(pcrs, dict) or not 1 <= len(pcrs) <= MAX_PCRS:
        raise MalformedQuote(f"attestation document: pcrs is not a map of 1..{MAX_PCRS} entries")
    for index, value in pcrs.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_PCRS:
            raise MalformedQuote("attestation document: a PCR index is not an integer in 0..31")
        if not isinstance(value, bytes) or len(value) not in PCR_SIZES:
            raise MalformedQuote(f"attestation document: PCR{index} is not 32, 48 or 64 bytes")
    for i in MEASURED_PCRS:
        if i not in pcrs or len(pcrs[i]) != PCR_SIZE:
            raise MalformedQuote(f"attestation document: PCR{i} is missing or not a SHA-384 value")
    certificate = _bytes(doc["certificate"], "certificate", 1, MAX_CERTIFICATE)
    cabundle = doc["cabundle"]
    if not isinstance(cabundle, list) or not cabundle:
        raise MalformedQuote("attestation document: cabundle is not a non-empty array")
    bundle = tuple(_bytes(c, f"cabundle[{i}]", 1, MAX_CERTIFICATE) for i, c in enumerate(cabundle))
    optional = {
        "public_key": (1, MAX_PUBLIC_KEY),
        "user_data": (0, MAX_USER_DATA),
        "nonce": (0, MAX_NONCE),
    }
    extra = {k: _bytes(doc[k], k, *limits) if k in doc else None for k, limits in optional.items()}
    return NitroDocument(module_id, digest, timestamp, MappingProxyType(dict(pcrs)), certificate, bundle, **extra)


def decode(data: bytes) -> SignedDocument:
    """The COSE_Sign1 in ``data`` and the attestation document it carries.

    :raises MalformedQuote: on any departure from AWS's format.
    """
    if len(data) > MAX_DOCUMENT:
        raise MalformedQuote(f"Nitro attestation document: {len(data)} bytes > {MAX_DOCUMENT}")
    body = data[1:] if data[:1] == COSE_SIGN1_TAG else data
    cose = _cbor(body, "COSE_Sign1")
    if not isinstance(cose, list) or len(cose) != 4:
        raise MalformedQuote("COSE_Sign1: not an array of four")
    protected, unprotected, payload, signature = cose
    if not isinstance(protected, bytes) or protected != PROTECTED_ES384:
        raise MalformedQuote("COSE_Sign1: the protected header is not exactly {1: -35} (ES384)")
    if not isinstance(unprotected, dict) or unprotected:
        raise MalformedQuote("COSE_Sign1: the unprotected header is not an empty map")
    if not isinstance(payload, bytes) or not 1 <= len(payload) <= MAX_PAYLOAD:
        raise MalformedQuote(f"COSE_Sign1: the payload is not a byte string of 1..{MAX_PAYLOAD} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise MalformedQuote(f"COSE_Sign1: the signature is not {SIGNATURE_SIZE} bytes (ES384 r || s)")
    return SignedDocument(protected, payload, signature, _document(_cbor(payload, "attestation document")))


def _certificate(der: bytes, name: str) -> x509.Certificate:
    # cryptography still parses a few RFC 5280 violations (a serial number that is not
    # positive), with a deprecation warning: refused here rather than warned about. A version
    # other than v1-v3 raises InvalidVersion, which is no ValueError.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning):
            raise MalformedQuote(f"attestation document: {name} is not a valid DER certificate") from None


def _leaf_basic_constraints(_policy: Any, _cert: x509.Certificate, value: x509.BasicConstraints | None) -> None:
    if value is not None and value.ca:
        raise ValueError("the signing certificate is a CA")


def _leaf_key_usage(_policy: Any, _cert: x509.Certificate, value: x509.KeyUsage) -> None:
    if not value.digital_signature:
        raise ValueError("the signing certificate's key usage lacks digitalSignature")
    # RFC 5280 4.2.1.3, AWS 3.2.3.3: keyCertSign only in a CA. Basic constraints are optional
    # in a leaf, so without this a leaf asserting keyCertSign but no cA would pass as no CA.
    if value.key_cert_sign:
        raise ValueError("the signing certificate's key usage has keyCertSign: it is a CA's key")


# AWS 3.2.3.2-3.2.3.3: CAs (root included) are CAs with keyCertSign, within their path length;
# the signing certificate is no CA (neither cA nor keyCertSign) and has digitalSignature. The Web
# PKI defaults cover the CAs; the leaf gets AWS's rules only (a Nitro leaf has no SAN, AKI or
# extended key usage).
_EE_POLICY = (verification.ExtensionPolicy.permit_all()
              .may_be_present(x509.BasicConstraints, verification.Criticality.AGNOSTIC, _leaf_basic_constraints)
              .require_present(x509.KeyUsage, verification.Criticality.AGNOSTIC, _leaf_key_usage))
_CA_POLICY = verification.ExtensionPolicy.webpki_defaults_ca()


def _as_datetime(ms: int) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    except (OverflowError, ValueError, OSError):
        raise ConfigError(f"time {ms} ms is out of range") from None


def verify_chain(signed: SignedDocument, root: x509.Certificate, at_ms: int) -> x509.Certificate:
    """Check the chain from the pinned ``root`` to the document's certificate at ``at_ms``;
    return the signing certificate. The bundle's own root is never trusted: it must be the
    pinned one, byte for byte.

    :raises CertificateExpired: a certificate (the pinned root too) is not valid at ``at_ms``.
    :raises CertificateChainError: any other failure of the chain.
    """
    doc = signed.document
    pinned = root.public_bytes(Encoding.DER)
    if not hmac.compare_digest(doc.cabundle[0], pinned):
        raise CertificateChainError("cabundle[0] is not the pinned root certificate (trust.nitro)")
    leaf = _certificate(doc.certificate, "certificate")
    intermediates = [_certificate(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle[1:], 1)]
    at = _as_datetime(at_ms)
    for name, cert in [("the pinned root", root),
                       *((f"cabundle[{i}]", c) for i, c in enumerate(intermediates, 1)),
                       ("the signing certificate", leaf)]:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise CertificateExpired(f"{name} is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                                     f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {at:%Y-%m-%dT%H:%M:%SZ}")
    # The bundle's order is AWS's (root first): each certificate is checked against the one
    # before it first, in one pass, so that path building below only ever sees a chain already
    # anchored at the pinned root (an unsigned document could otherwise hand it many
    # cross-signed certificates to search through).
    path = [root, *intermediates, leaf]
    for i in range(1, len(path)):
        try:
            path[i].verify_directly_issued_by(path[i - 1])
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            what = "the signing certificate" if i == len(path) - 1 else f"cabundle[{i}]"
            raise CertificateChainError(f"{what} is not issued by the certificate before it in the chain from "
                                        "the pinned root") from None
    verifier = (verification.PolicyBuilder().store(verification.Store([root])).time(at)
                .max_chain_depth(len(intermediates) + 1)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY).build_client_verifier())
    try:
        chain = verifier.verify(leaf, intermediates).chain
    except verification.VerificationError as err:
        raise CertificateChainError(f"the certificate chain does not verify from the pinned root: {err}") from None
    # Built through the whole bundle, in order: no certificate of it left out or reordered.
    if [c.public_bytes(Encoding.DER) for c in chain] != [doc.certificate, *reversed(doc.cabundle)]:
        raise CertificateChainError("the chain does not run through the whole cabundle, in order")
    return leaf


def verify_signature(signed: SignedDocument, leaf: x509.Certificate) -> None:
    """:raises QuoteSignatureError: the COSE signature is not the leaf's ES384 signature."""
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise QuoteSignatureError("the signing certificate's key is not a P-384 key")
    half = SIGNATURE_SIZE // 2
    der = encode_dss_signature(int.from_bytes(signed.signature[:half], "big"),
                               int.from_bytes(signed.signature[half:], "big"))
    try:
        key.verify(der, signed.sig_structure(), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise QuoteSignatureError("the COSE signature does not verify under the document's certificate") from None


@dataclass(frozen=True, slots=True)
class NitroTrust:
    """What a client pins for Nitro: the root certificate and the PCR0-2 triples it accepts."""

    root: x509.Certificate
    pcrs: frozenset[tuple[bytes, bytes, bytes]]
    allow_debug: bool = False

    def root_fingerprint(self) -> bytes:
        return self.root.fingerprint(hashes.SHA256())

    def __post_init__(self) -> None:
        if any(len(p) != PCR_SIZE for triple in self.pcrs for p in triple):
            raise ConfigError("a Nitro PCR is 96 hex digits (48 bytes, SHA-384)")
        if not self.pcrs and not self.allow_debug:
            raise ConfigError("trust.nitro.pcrs is empty: no Nitro enclave could ever be trusted",
                              hint="add the PCR0, PCR1 and PCR2 that `nitro-cli build-enclave` prints (docs/nitro.md)")


def check_pcrs(doc: NitroDocument, trust: NitroTrust) -> None:
    """:raises DebugEnclave: a debug-mode enclave, not allowed.
    :raises UnknownMeasurement: PCR0-2 are not an allow-listed triple."""
    if doc.debug:
        if not trust.allow_debug:
            raise DebugEnclave("the enclave runs in debug mode (PCR0-2 are zero): its parent can read its memory")
        # Logged at every attestation so that a test setting cannot pass unnoticed in production.
        log.warning("accepting a DEBUG-MODE Nitro enclave (trust.nitro.allow_debug = true): it protects nothing "
                    "from the parent instance", extra={"fields": {"module_id": doc.module_id}})
        return
    if doc.measured_pcrs not in trust.pcrs:
        raise UnknownMeasurement(
            f"PCR0 {doc.pcrs[0].hex()[:16]}…, PCR1 {doc.pcrs[1].hex()[:16]}…, PCR2 {doc.pcrs[2].hex()[:16]}… "
            "are not in trust.nitro.pcrs",
            hint="if this enclave image changed on purpose, pin the PCRs `nitro-cli describe-eif` prints")


def verify_platform(data: bytes, trust: NitroTrust, now_ms: int) -> NitroDocument:
    """Steps 1-4 of the module docstring: the document is AWS's, for allow-listed code."""
    signed = decode(data)
    verify_signature(signed, verify_chain(signed, trust.root, now_ms))
    check_pcrs(signed.document, trust)
    return signed.document


def check_fresh(timestamp_ms: int, now_ms: int, max_age_seconds: float) -> None:
    """:raises StaleQuote: older than ``max_age_seconds``, or dated more than 30 s ahead."""
    # Quote times are whole milliseconds, so the age is printed exactly, in seconds with three
    # decimals, and the limit as configured: "0 s old (limit 0 s)" would say nothing.
    age_ms = now_ms - timestamp_ms
    age = age_ms / 1000.0
    if age > max_age_seconds:
        raise StaleQuote(f"quote is {age_ms / 1000:.3f} s old (limit {max_age_seconds:.15g} s)",
                         hint="a replayed or delayed reply, or the platform clock is behind; attest again")
    if age < -FUTURE_SKEW_SECONDS:
        raise StaleQuote(f"quote is dated {-age_ms / 1000:.3f} s in the future (limit {FUTURE_SKEW_SECONDS:g} s)",
                         hint="check the clocks")


def verify_document(data: bytes, trust: NitroTrust, nonce: bytes, now_ms: int,
                    max_age_seconds: float) -> NitroDocument:
    """A Nitro document on its own: AWS's checks, then the document's nonce is ``nonce``
    and it is fresh at ``now_ms`` (which is also the time the certificates must be valid at).

    :raises AttestationError: the subclass naming the failed check.
    """
    doc = verify_platform(data, trust, now_ms)
    if doc.nonce is None or not hmac.compare_digest(doc.nonce, nonce):
        raise NonceMismatch("the document answers another nonce: a replayed or misrouted attestation")
    check_fresh(doc.timestamp_ms, now_ms, max_age_seconds)
    return doc


def load_root(pem: bytes) -> x509.Certificate:
    """The root certificate from PEM text (``trust.nitro.root_certificate``)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, x509.InvalidVersion):
        raise ConfigError("trust.nitro root certificate is not a PEM certificate") from None
    if len(certs) != 1:
        raise ConfigError("trust.nitro root certificate: give exactly one certificate")
    return certs[0]


def decode_pcr(text: object, name: str) -> bytes:
    try:
        raw = bytes.fromhex(text)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise ConfigError(f"{name} is not hex") from None
    if len(raw) != PCR_SIZE:
        raise ConfigError(f"{name} must be 96 hex digits (48 bytes, SHA-384)")
    return raw

