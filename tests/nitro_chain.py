"""TEST ONLY: a Nitro-like PKI of our own (root, intermediate, leaf; P-384, generated with
``cryptography``) that signs attestation documents the way the Nitro Secure Module does.

Nothing here is a root of trust: the keys are generated per test session and a verifier
accepts their documents only when a test pins this root in place of AWS's. It lets tests
build documents AWS never issued (a chosen ``user_data``, non-debug PCRs) and the real
documents in ``tests/data/nitro/`` cover the AWS chain itself.
"""

from __future__ import annotations

import base64
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from sealedsum.common import nitro, wire

DATA = Path(__file__).resolve().parent / "data" / "nitro"
AWS_ROOT = DATA / "aws-nitro-root-g1.pem"
VALID_DOCUMENTS = ("valid-2024-09-09", "valid-2024-09-17")
BAD_SIGNATURE = "bad-signature"
# The nonce both real valid documents answer (tests/data/nitro/README.md).
REAL_NONCE = bytes(19) + b"\x01"
# PCR0-2 of an imaginary production image (what `nitro-cli build-enclave` would print).
PCRS = (bytes.fromhex("a1" * 48), bytes.fromhex("b2" * 48), bytes.fromhex("c3" * 48))


def real_document(name: str) -> bytes:
    return base64.b64decode((DATA / f"{name}.b64").read_text())


def aws_root() -> x509.Certificate:
    return nitro.load_root(AWS_ROOT.read_bytes())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sealedsum TEST ONLY")])


def _certificate(subject: str, key, issuer: x509.Certificate | None, issuer_key, start: datetime.datetime,
                 days: float, *, ca: bool, path_length: int | None = None, serial: int | None = None,
                 deterministic: bool = False) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer.subject if issuer else _name(subject))
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA384(), ecdsa_deterministic=deterministic)


@dataclass
class TestChain:
    """Root -> intermediate -> leaf, valid from ``start`` for a day (the leaf: three hours)."""

    __test__ = False  # not a pytest test class

    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate
    # Fixed keys and RFC 6979 signatures: the same bytes on every run (the test vectors).
    deterministic: bool = False

    @classmethod
    def generate(cls, start_ms: int, scalars: tuple[int, int, int] | None = None) -> "TestChain":
        """Fresh keys, or with ``scalars`` (private keys of root, intermediate, leaf) a chain
        that is the same on every run: fixed serial numbers, deterministic signatures."""
        start = datetime.datetime.fromtimestamp(start_ms / 1000, datetime.timezone.utc) - datetime.timedelta(hours=1)
        fixed = scalars is not None
        keys = ([ec.derive_private_key(d, ec.SECP384R1()) for d in scalars] if fixed
                else [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)])
        serials = (1, 2, 3) if fixed else (None, None, None)
        root = _certificate("TEST ONLY root", keys[0], None, keys[0], start, 2, ca=True, serial=serials[0],
                            deterministic=fixed)
        inter = _certificate("TEST ONLY intermediate", keys[1], root, keys[0], start, 1, ca=True, path_length=0,
                             serial=serials[1], deterministic=fixed)
        leaf = _certificate("TEST ONLY enclave", keys[2], inter, keys[1], start, 0.125, ca=False, serial=serials[2],
                            deterministic=fixed)
        return cls(keys[0], root, keys[1], inter, keys[2], leaf, fixed)

    def trust(self, *, allow_debug: bool = False, pcrs=frozenset({PCRS})) -> nitro.NitroTrust:
        return nitro.NitroTrust(self.root, pcrs, allow_debug)

    def document(self, timestamp_ms: int, **fields) -> dict:
        """An attestation document's fields (``fields`` replace or add; ``None`` removes)."""
        doc = {
            "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
            "digest": "SHA384",
            "timestamp": timestamp_ms,
            "pcrs": {i: (PCRS[i] if i < 3 else bytes(48)) for i in range(16)},
            "certificate": self.leaf.public_bytes(Encoding.DER),
            "cabundle": [self.root.public_bytes(Encoding.DER), self.intermediate.public_bytes(Encoding.DER)],
            "public_key": None,
            "user_data": None,
            "nonce": None,
        }
        doc.update(fields)
        return {k: v for k, v in doc.items() if v is not None}

    def sign(self, doc: dict, *, protected: bytes = nitro.PROTECTED_ES384) -> bytes:
        """The COSE_Sign1 (untagged, as the NSM returns it) over ``doc``, signed by the leaf."""
        return self.sign_payload(cbor2.dumps(doc), protected=protected)

    def sign_payload(self, payload: bytes, *, protected: bytes = nitro.PROTECTED_ES384) -> bytes:
        """The same over ``payload`` exactly as given (bytes no CBOR encoder would write, too)."""
        to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
        r, s = decode_dss_signature(self.leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384(),
                                                                         deterministic_signing=self.deterministic)))
        return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])

    def quoter(self, measurement: bytes, clock_ms, **fields):
        """An ``Enclave`` quote function (report data -> quote) that answers with Nitro
        documents binding ``measurement`` and the report data, as sealedsum's enclave does."""
        def quote(report_data: bytes) -> bytes:
            binding = wire.NitroBinding(measurement, report_data).to_bytes()
            return self.sign(self.document(clock_ms(), user_data=binding, **fields))
        return quote


@pytest.fixture(scope="module")
def chain() -> TestChain:
    """A fresh test-only chain, valid from an hour ago (a fixture: import it into a test module)."""
    return TestChain.generate(int(time.time() * 1000))


def random_nonce() -> bytes:
    return os.urandom(wire.NONCE_SIZE)
