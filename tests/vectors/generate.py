"""Generate the known-answer vectors in ``tests/vectors/*.json``.

Run from the repository root::

    .venv/bin/python tests/vectors/generate.py

Everything is fixed: Ed25519 seeds and X25519 keys come from RFC 8032 / RFC 7748 test
vectors, the Paillier primes are hard-coded below, Paillier randomness ``r`` and
record ids are fixed, and the sealed boxes are built with a fixed *ephemeral* X25519
key (libsodium's ``crypto_box_seal`` draws it at random; any ephemeral key gives a
valid box, so a fixed one makes the vectors reproducible). Running this script twice
gives identical files.

The messages are encoded here *by hand*, from ``docs/protocol.md``, with ``struct``,
``hashlib``, plain integer arithmetic and the raw primitives (Ed25519, X25519,
``crypto_box``), not with ``common.wire``. Every encoding is then cross-checked
against the real code before anything is written, so the script fails loudly if the
code and the document disagree. ``tests/unit/test_vectors.py`` decodes the files with
the real code.

These keys are public and tiny (1024-bit Paillier): test vectors only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from nacl import bindings  # noqa: E402
from nacl.public import PrivateKey, SealedBox  # noqa: E402

# ---------------------------------------------------------------------------------
# Fixed material
# ---------------------------------------------------------------------------------

# RFC 8032 section 7.1, TEST 1 and TEST 2 secret keys (Ed25519 seeds).
PLATFORM_ED25519_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
ENCLAVE_ED25519_SEED = bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
# RFC 7748 section 6.1: Alice's private key is the enclave's record key; Bob's is the
# ephemeral key used for every sealed box below.
ENCLAVE_X25519_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
EPHEMERAL_X25519_PRIVATE = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
# 512-bit primes: next_prime((SHA-512(label) | 3 << 510) mod 2**512) for the labels
# b"sealedsum test vector paillier p" / "... q"; n = p*q is exactly 1024 bits.
PAILLIER_P = int(
    "e8779d4fdd2f5d7c2e41b089e4b871fabd00f672a50f3603ea55db6902f94f7a"
    "076c1141bba27d2600481d914068676604717cde1cbe4444b440b6d84d7d8f9b", 16)
PAILLIER_Q = int(
    "e209b9e5a61875d855357d99f241a9558072f72f1b2894d7d402bbc7cbc0ed73"
    "abe6358da58b59e4f69dc74b91c1e8819bfb3c22c828974f3ff8f5145cd0222f", 16)
KEY_EPOCH = 1

NONCE = bytes(range(32))
QUOTE_ISSUED_AT_MS = 1767225595000  # 2025-12-31T23:59:55Z
SENT_AT_MS = 1767225600000  # 2026-01-01T00:00:00Z
CLOSED_AT_MS = 1767225630000
RECORD_ID_1 = bytes.fromhex("00112233445566778899aabbccddeeff")
RECORD_ID_3 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")

PREFIX = "sealedsum"

# The configuration tables ([enclave] and [streams.*]) as a TOML loader returns them.
# Integers where floats are meant and omitted defaults show the normalisation.
CONFIG_ENCLAVE = {"paillier_bits": 1024, "insecure_test_keys": True, "max_record_age_seconds": 900}
CONFIG_STREAMS = {
    "wellbeing": {
        "dimension": 3, "lower": -10, "upper": 10, "window_records": 50, "min_batch": 5,
        "mechanism": "gaussian", "epsilon": 2, "delta": 1e-6, "fraction_bits": 12, "count_share": 0.25,
    },
    "purchases": {
        "lower": 0, "upper": 100.0, "window_records": 100, "window_seconds": 30, "min_batch": 10,
        "mechanism": "laplace", "epsilon": 1.0,
    },
}
# What the canonical policy document must be, written out by hand.
EXPECTED_POLICY_MAPPING = {
    "version": 1,
    "enclave": {
        "paillier_bits": 1024, "max_record_age_seconds": 900.0, "max_clock_skew_seconds": 60.0,
        "insecure_test_keys": True,
    },
    "streams": {
        "purchases": {
            "dimension": 1, "lower": 0.0, "upper": 100.0, "min_batch": 10, "mechanism": "laplace",
            "epsilon": 1.0, "fraction_bits": 16, "count_share": 0.5, "window_records": 100,
            "window_seconds": 30.0,
        },
        "wellbeing": {
            "dimension": 3, "lower": -10.0, "upper": 10.0, "min_batch": 5, "mechanism": "gaussian",
            "epsilon": 2.0, "delta": 1e-06, "fraction_bits": 12, "count_share": 0.25, "window_records": 50,
        },
    },
}

# A synthetic source tree for the code digest (the real digest changes with every edit).
CODE_FILES = {
    "common/__init__.py": b"",
    "common/ab.py": b"B = 2\n",
    "common/a_b.py": b"A_B = 1\n",
    "common/notes.txt": b"not a .py file: not measured\n",
    "sidecar/__init__.py": b'"""sidecar"""\n',
    "sidecar/platform_x.py": b"X = 'x'\n",
    "sidecar/platform/__init__.py": b"",
    "sidecar/platform/measure.py": "LABEL = 'caf\u00e9'\n".encode("utf-8"),
}
RUNTIME_LINE_KEYS = ["python", "cryptography", "gmpy2", "numpy", "opendp", "phe", "pika", "pynacl"]
RUNTIME_LINE = ("python=3.11.9;cryptography=50.0.2;gmpy2=2.3.2;numpy=2.4.6;opendp=0.16.0;"
                "phe=1.5.0;pika=1.4.4;pynacl=1.6.2")


# ---------------------------------------------------------------------------------
# Hand-written encoders (the protocol document, in code)
# ---------------------------------------------------------------------------------

def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def framed(b: bytes) -> bytes:
    return u32(len(b)) + b


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def ed25519_public(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()


def ed25519_sign(seed: bytes, label: bytes, message: bytes) -> tuple[bytes, bytes]:
    signing_input = label + b"\x00" + message
    return signing_input, Ed25519PrivateKey.from_private_bytes(seed).sign(signing_input)


def byte_len(v: int) -> int:
    return (v.bit_length() + 7) // 8


def paillier_encrypt(n: int, m: int, r: int) -> int:
    n2 = n * n
    return (1 + n * m) * pow(r, n, n2) % n2


def paillier_decrypt(p: int, q: int, c: int) -> int:
    n = p * q
    lam = (p - 1) * (q - 1)
    L = (pow(c, lam, n * n) - 1) // n
    return L * pow(lam, -1, n) % n


def fixed_point(values, lower, upper, fraction_bits):
    clipped = [min(max(float(v), float(lower)), float(upper)) for v in values]
    return clipped, [round(v * (1 << fraction_bits)) for v in clipped]


def fixed_r(label: str, n: int) -> int:
    return int.from_bytes(hashlib.sha512(label.encode()).digest(), "big") % n


def envelope(stream: str, record_id: bytes, epoch: int, sent_at_ms: int, window: int, width: int,
             cts: list[int], magic: bytes = b"SSE\x01") -> bytes:
    name = stream.encode("ascii")
    return (magic + record_id + u32(epoch) + u64(sent_at_ms) + u64(window) + bytes([len(name)]) + name
            + u16(len(cts)) + u16(width) + b"".join(c.to_bytes(width, "big") for c in cts))


def seal(recipient_pk: bytes, message: bytes, ephemeral_sk: bytes = EPHEMERAL_X25519_PRIVATE):
    """crypto_box_seal with a chosen ephemeral key: epk || crypto_box(m, nonce, pk, esk)."""
    epk = bindings.crypto_scalarmult_base(ephemeral_sk)
    nonce = hashlib.blake2b(epk + recipient_pk, digest_size=24).digest()
    return epk, nonce, epk + bindings.crypto_box(message, nonce, recipient_pk, ephemeral_sk)


def hexs(b: bytes) -> str:
    return b.hex()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


# ---------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------

def build() -> dict[str, dict]:
    from phe import paillier

    from common import attestation, privacy, results, signing, wire
    from common.policy import EnclavePolicy
    from sidecar.platform import measure

    out: dict[str, dict] = {}

    # -- keys -------------------------------------------------------------------------
    n = PAILLIER_P * PAILLIER_Q
    assert n.bit_length() == 1024
    x_pub = bindings.crypto_scalarmult_base(ENCLAVE_X25519_PRIVATE)
    ed_pub = ed25519_public(ENCLAVE_ED25519_SEED)
    bundle = b"SSK\x01" + u32(KEY_EPOCH) + x_pub + ed_pub + u16(byte_len(n)) + n.to_bytes(byte_len(n), "big")
    width = byte_len(n * n)
    assert wire.KeyBundle(KEY_EPOCH, x_pub, ed_pub, n).to_bytes() == bundle
    assert wire.KeyBundle.from_bytes(bundle).ciphertext_width == width
    out["keys"] = {
        "kind": "key_bundle",
        "description": "The enclave's public key bundle (SSK\\x01) and the fixed private material "
                       "behind it. Every other vector uses these keys.",
        "epoch": KEY_EPOCH,
        "x25519_private": hexs(ENCLAVE_X25519_PRIVATE),
        "x25519_public": hexs(x_pub),
        "ed25519_seed": hexs(ENCLAVE_ED25519_SEED),
        "ed25519_public": hexs(ed_pub),
        "paillier_p": hex(PAILLIER_P),
        "paillier_q": hex(PAILLIER_Q),
        "paillier_n": hex(n),
        "paillier_n_bits": n.bit_length(),
        "ciphertext_width": width,
        "bundle_hex": hexs(bundle),
    }

    # -- policy -----------------------------------------------------------------------
    policy_bytes = canonical_json(EXPECTED_POLICY_MAPPING)
    policy = EnclavePolicy.from_mapping(CONFIG_ENCLAVE, CONFIG_STREAMS)
    assert policy.to_bytes() == policy_bytes, (policy.to_bytes(), policy_bytes)
    plans = {}
    for name, s in sorted(policy.streams.items()):
        bound = max(abs(round(s.lower * (1 << s.fraction_bits))), abs(round(s.upper * (1 << s.fraction_bits))))
        l1 = bound * s.dimension
        l2 = (bound * bound * s.dimension) ** 0.5
        if s.mechanism == "laplace":
            rho = None
            sum_scale = l1 / (s.epsilon * (1 - s.count_share))
            count_scale = 1 / (s.epsilon * s.count_share)
        else:
            lg = math.log(1 / s.delta)
            rho = (math.sqrt(lg + s.epsilon) - math.sqrt(lg)) ** 2
            sum_scale = l2 / math.sqrt(2 * rho * (1 - s.count_share))
            count_scale = 1 / math.sqrt(2 * rho * s.count_share)
        real = s.noise_plan()
        assert real.sensitivity_l1 == l1 and abs(real.sensitivity_l2 - l2) <= 1e-9 * l2
        assert abs(real.sum_scale - sum_scale) <= 1e-9 * sum_scale
        assert abs(real.count_scale - count_scale) <= 1e-9 * count_scale
        plans[name] = {
            "value_bound_fixed": bound,
            "sensitivity_l1": l1,
            "sensitivity_l2": real.sensitivity_l2,
            "rho": real.rho,
            "sum_scale": real.sum_scale,
            "count_scale": real.count_scale,
            "sum_std": privacy.noise_std(s.mechanism, real.sum_scale),
            "count_std": privacy.noise_std(s.mechanism, real.count_scale),
        }
    out["policy"] = {
        "kind": "policy",
        "description": "EnclavePolicy.from_mapping(enclave, streams).to_bytes(): canonical JSON (sorted keys, "
                       "compact separators, ASCII), with defaults filled in and numbers normalised; plus the "
                       "noise calibration each stream implies (scales in fixed-point units for the sum).",
        "config_enclave": CONFIG_ENCLAVE,
        "config_streams": CONFIG_STREAMS,
        "canonical": policy_bytes.decode("ascii"),
        "canonical_hex": hexs(policy_bytes),
        "sha256": hexs(sha256(policy_bytes)),
        "noise_plans": plans,
    }

    # -- code digest ------------------------------------------------------------------
    h = hashlib.sha256(b"sealedsum/v1/code\x00")
    measured = sorted(p for p in CODE_FILES if p.endswith(".py"))
    digest_input = b"sealedsum/v1/code\x00"
    for path in measured:
        name, content = path.encode("utf-8"), CODE_FILES[path]
        rec = u32(len(name)) + name + u64(len(content)) + content
        h.update(rec)
        digest_input += rec
    assert ["python"] + [d.lower() for d in measure.RUNTIME_DISTRIBUTIONS] == RUNTIME_LINE_KEYS
    h.update(RUNTIME_LINE.encode("ascii"))
    digest_input += RUNTIME_LINE.encode("ascii")
    code_digest = h.digest()
    assert sha256(digest_input) == code_digest
    out["code_digest"] = {
        "kind": "code_digest",
        "description": "sidecar.platform.measure.code_digest() over a synthetic tree with the packages "
                       "'common' and 'sidecar' (paths relative to the packages' parent, sorted as strings; "
                       "only *.py files), and a fixed runtime line.",
        "files": [{"path": p, "content_hex": hexs(c)} for p, c in CODE_FILES.items()],
        "measured_order": measured,
        "runtime_line": RUNTIME_LINE,
        "runtime_line_keys": RUNTIME_LINE_KEYS,
        "digest_input_hex": hexs(digest_input),
        "code_digest": hexs(code_digest),
    }

    # -- measurement and report data --------------------------------------------------
    meas_input = b"sealedsum/v1/measurement\x00" + code_digest + sha256(policy_bytes)
    meas = sha256(meas_input)
    rd_input = b"sealedsum/v1/report-data\x00" + framed(bundle) + framed(policy_bytes) + NONCE
    rd = sha256(rd_input)
    assert wire.measurement(code_digest, policy_bytes) == meas
    assert wire.report_data(bundle, policy_bytes, NONCE) == rd
    out["measurement"] = {
        "kind": "measurement",
        "description": "measurement = SHA-256(label || code_digest || SHA-256(policy)); report_data = "
                       "SHA-256(label || u32 len || keys || u32 len || policy || nonce). keys = keys.json "
                       "bundle_hex, policy = policy.json canonical_hex.",
        "code_digest": hexs(code_digest),
        "policy_hex": hexs(policy_bytes),
        "policy_sha256": hexs(sha256(policy_bytes)),
        "measurement_input_hex": hexs(meas_input),
        "measurement": hexs(meas),
        "keys_hex": hexs(bundle),
        "nonce": hexs(NONCE),
        "report_data_input_hex": hexs(rd_input),
        "report_data": hexs(rd),
    }

    # -- quote ------------------------------------------------------------------------
    platform_pub = ed25519_public(PLATFORM_ED25519_SEED)
    signed_part = b"SSQ\x01" + meas + rd + u64(QUOTE_ISSUED_AT_MS)
    q_input, q_sig = ed25519_sign(PLATFORM_ED25519_SEED, b"sealedsum/v1/quote", signed_part)
    quote = signed_part + q_sig
    assert len(quote) == wire.Quote.SIZE == 140
    assert wire.Quote(meas, rd, QUOTE_ISSUED_AT_MS, q_sig).to_bytes() == quote
    assert signing.signing_input(signing.QUOTE, signed_part) == q_input

    from sidecar.platform.emulated import EmulatedPlatform
    emulated = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(PLATFORM_ED25519_SEED), bytes(32),
                                clock_ms=lambda: QUOTE_ISSUED_AT_MS)
    assert emulated.quote(meas, rd) == quote
    out["quote"] = {
        "kind": "quote",
        "description": "SSQ\\x01 quote: magic || measurement || report_data || u64 issued_at_ms || Ed25519 "
                       "signature by the platform over 'sealedsum/v1/quote' || 0x00 || the first 76 bytes.",
        "platform_ed25519_seed": hexs(PLATFORM_ED25519_SEED),
        "platform_public_key": hexs(platform_pub),
        "platform_public_key_base64": b64(platform_pub),
        "measurement": hexs(meas),
        "report_data": hexs(rd),
        "issued_at_ms": QUOTE_ISSUED_AT_MS,
        "signed_part_hex": hexs(signed_part),
        "signing_input_hex": hexs(q_input),
        "signature": hexs(q_sig),
        "quote_hex": hexs(quote),
    }

    # -- attestation request and reply ------------------------------------------------
    request = b"SSA\x01" + NONCE
    assert wire.AttestRequest(NONCE).to_bytes() == request
    out["attest_request"] = {
        "kind": "attest_request",
        "description": "SSA\\x01 || 32-byte nonce, published to the default exchange with routing key "
                       "PREFIX.attest and the AMQP properties below (correlation_id is random per request).",
        "nonce": hexs(NONCE),
        "request_hex": hexs(request),
        "amqp": {
            "exchange": "",
            "routing_key": f"{PREFIX}.attest",
            "reply_to": "amq.rabbitmq.reply-to",
            "type": "attest-request",
            "app_id": "sealedsum",
        },
    }

    def reply_bytes(nonce=NONCE, code=code_digest, keys=bundle, pol=policy_bytes, q=quote) -> bytes:
        return b"SSD\x01" + nonce + code + framed(keys) + framed(pol) + framed(q)

    reply = reply_bytes()
    assert wire.AttestReply(NONCE, code_digest, bundle, policy_bytes, quote).to_bytes() == reply
    now = SENT_AT_MS
    trust = {"platform_key_base64": b64(platform_pub), "measurements": [hexs(meas)],
             "max_quote_age_seconds": 300.0}
    other_pub = ed25519_public(ENCLAVE_ED25519_SEED)  # any key that is not the platform's
    tampered_policy = policy_bytes.replace(b'"epsilon":1.0', b'"epsilon":9.0')
    assert tampered_policy != policy_bytes
    other_code = sha256(b"other code")
    # Each case: the reply, the nonce the client sent, its trust anchors, its clock, and
    # the error class (common.errors) verify_attestation must raise; null = accepted.
    cases = [
        {"name": "valid", "reply_hex": hexs(reply), "expect": None},
        {"name": "platform key not the pinned one (checked first, before the allow-list)",
         "reply_hex": hexs(reply), "trust": {"platform_key_base64": b64(other_pub), "measurements": [hexs(sha256(b"x"))]},
         "expect": "UntrustedPlatform"},
        {"name": "quote signature altered", "reply_hex": hexs(reply_bytes(q=quote[:-1] + bytes([quote[-1] ^ 1]))),
         "expect": "UntrustedPlatform"},
        {"name": "measurement not in the allow-list", "reply_hex": hexs(reply),
         "trust": {"measurements": [hexs(sha256(b"some other measurement"))]}, "expect": "UnknownMeasurement"},
        {"name": "policy altered after quoting", "reply_hex": hexs(reply_bytes(pol=tampered_policy)),
         "expect": "ReportDataMismatch"},
        {"name": "code digest does not produce the quoted measurement", "reply_hex": hexs(reply_bytes(code=other_code)),
         "expect": "ReportDataMismatch"},
        {"name": "reply answers another nonce", "reply_hex": hexs(reply), "client_nonce": hexs(bytes(32)),
         "expect": "NonceMismatch"},
        {"name": "quote 301 s old", "reply_hex": hexs(reply), "now_ms": QUOTE_ISSUED_AT_MS + 301_000,
         "expect": "StaleQuote"},
        {"name": "quote exactly 300 s old is accepted", "reply_hex": hexs(reply), "now_ms": QUOTE_ISSUED_AT_MS + 300_000,
         "expect": None},
        {"name": "quote dated 31 s in the future", "reply_hex": hexs(reply), "now_ms": QUOTE_ISSUED_AT_MS - 31_000,
         "expect": "StaleQuote"},
        {"name": "truncated reply", "reply_hex": hexs(reply[:-1]), "expect": "AttestationError"},
        {"name": "trailing byte", "reply_hex": hexs(reply + b"\x00"), "expect": "AttestationError"},
    ]
    trust_anchors = attestation.TrustAnchors(platform_pub, frozenset({meas}), 300.0)
    assert attestation.verify_attestation(reply, NONCE, trust_anchors, now).measurement == meas
    out["attest_reply"] = {
        "kind": "attest_reply",
        "description": "SSD\\x01 || nonce || code_digest || u32 len || key bundle || u32 len || policy || "
                       "u32 len || quote; then the client's checks, in order, on altered copies.",
        "nonce": hexs(NONCE),
        "code_digest": hexs(code_digest),
        "keys_hex": hexs(bundle),
        "policy_hex": hexs(policy_bytes),
        "quote_hex": hexs(quote),
        "reply_hex": hexs(reply),
        "amqp": {"exchange": "", "routing_key": "<the request's reply_to>",
                 "correlation_id": "<the request's correlation_id>", "type": "attest-reply", "app_id": "sealedsum"},
        "trust": trust,
        "now_ms": now,
        "expected": {
            "measurement": hexs(meas), "code_digest": hexs(code_digest), "issued_at_ms": QUOTE_ISSUED_AT_MS,
            "key_epoch": KEY_EPOCH, "paillier_n_bits": 1024, "streams": sorted(CONFIG_STREAMS),
        },
        "verification_cases": cases,
    }

    # -- envelopes --------------------------------------------------------------------
    def make_envelope(key, stream, values, record_id, window, r_labels):
        s = policy.streams[stream]
        clipped, encoded = fixed_point(values, s.lower, s.upper, s.fraction_bits)
        ms = [v % n for v in encoded]  # negatives as n - |v|
        rs = [fixed_r(label, n) for label in r_labels]
        cts = [paillier_encrypt(n, m, r) for m, r in zip(ms, rs)]
        for m, r, c in zip(ms, rs, cts):
            assert paillier.PaillierPublicKey(n).raw_encrypt(m, r_value=r) == c
            assert paillier_decrypt(PAILLIER_P, PAILLIER_Q, c) == m
        env = envelope(stream, record_id, KEY_EPOCH, SENT_AT_MS, window, width, cts)
        assert wire.Envelope(stream, record_id, KEY_EPOCH, SENT_AT_MS, window, width, tuple(cts)).to_bytes() == env
        name_len = len(stream)
        out[key] = {
            "kind": "envelope",
            "description": "SSE\\x01 record envelope (the plaintext inside the sealed box). Ciphertexts are "
                           "Paillier with g = n+1 under keys.json, c = (1 + n*m) * r^n mod n^2, "
                           "big-endian, ciphertext_width bytes each.",
            "stream": stream,
            "record_id": hexs(record_id),
            "key_epoch": KEY_EPOCH,
            "sent_at_ms": SENT_AT_MS,
            "window": window,
            "width": width,
            "values": values,
            "lower": s.lower,
            "upper": s.upper,
            "fraction_bits": s.fraction_bits,
            "clipped": clipped,
            "encoded": encoded,
            "paillier_plaintexts": [hex(m) for m in ms],
            "r": [hex(r) for r in rs],
            "ciphertexts": [c.to_bytes(width, "big").hex() for c in cts],
            "offsets": {
                "magic": 0, "record_id": 4, "key_epoch": 20, "sent_at_ms": 24, "window": 32,
                "stream_len": 40, "stream": 41, "count": 41 + name_len, "width": 43 + name_len,
                "ciphertexts": 45 + name_len,
            },
            "envelope_hex": hexs(env),
        }
        return env

    env1 = make_envelope("envelope_dim1", "purchases", [42.3], RECORD_ID_1, 0, ["r/purchases/0"])
    make_envelope("envelope_dim3", "wellbeing", [3.5, -2.25, 12.0], RECORD_ID_3, 1,
                  ["r/wellbeing/0", "r/wellbeing/1", "r/wellbeing/2"])

    # -- sealed record ----------------------------------------------------------------
    epk, box_nonce, sealed = seal(x_pub, env1)
    assert SealedBox(PrivateKey(ENCLAVE_X25519_PRIVATE)).decrypt(sealed) == env1
    assert len(sealed) == len(env1) + 48
    out["sealed_record"] = {
        "kind": "sealed_record",
        "description": "crypto_box_seal(envelope_dim1, enclave X25519 public key). The box was made with a "
                       "fixed ephemeral key so it is reproducible: sealed = epk || crypto_box(envelope, "
                       "nonce = BLAKE2b-192(epk || pk), pk, esk). Any other ephemeral key is as valid.",
        "recipient_private": hexs(ENCLAVE_X25519_PRIVATE),
        "recipient_public": hexs(x_pub),
        "ephemeral_private": hexs(EPHEMERAL_X25519_PRIVATE),
        "ephemeral_public": hexs(epk),
        "box_nonce": hexs(box_nonce),
        "envelope_hex": hexs(env1),
        "sealed_hex": hexs(sealed),
        "amqp": {"exchange": f"{PREFIX}.records", "routing_key": "record", "delivery_mode": 2,
                 "content_type": "application/octet-stream", "type": "record", "app_id": "sealedsum"},
    }

    # -- results ----------------------------------------------------------------------
    def make_result(key, stream, window, count, sum_fixed):
        s = policy.streams[stream]
        plan = plans[stream]
        sums = [v / (1 << s.fraction_bits) for v in sum_fixed]
        mapping = {
            "closed_at_ms": CLOSED_AT_MS,
            "count": count,
            "count_noise_scale": plan["count_scale"],
            "delta": s.delta,
            "dimension": s.dimension,
            "epsilon": s.epsilon,
            "fraction_bits": s.fraction_bits,
            "key_epoch": KEY_EPOCH,
            "kind": "result",
            "mean": [v / count for v in sums] if count > 0 else None,
            "measurement": hexs(meas),
            "mechanism": s.mechanism,
            "rho": plan["rho"],
            "stream": stream,
            "sum": sums,
            "sum_fixed": sum_fixed,
            "sum_noise_scale": plan["sum_scale"],
            "window": window,
        }
        payload = canonical_json(mapping)
        sig_input, sig = ed25519_sign(ENCLAVE_ED25519_SEED, b"sealedsum/v1/result", payload)
        message = b"SSS\x01" + u32(len(payload)) + payload + sig
        fields = {k: v for k, v in mapping.items()}
        assert results.Release(**fields).to_payload() == payload
        assert wire.SignedMessage(payload, sig).to_bytes() == message
        out[key] = {
            "kind": "result",
            "description": "SSS\\x01 || u32 len || JSON payload || Ed25519 signature by the enclave key over "
                           "'sealedsum/v1/result' || 0x00 || payload. Published to PREFIX.results with "
                           "routing key = stream. The noised numbers are made up (noise is random).",
            "enclave_ed25519_public": hexs(ed_pub),
            "release": mapping,
            "payload": payload.decode("ascii"),
            "signing_input_hex": hexs(sig_input),
            "signature": hexs(sig),
            "message_hex": hexs(message),
            "amqp": {"exchange": f"{PREFIX}.results", "routing_key": stream, "delivery_mode": 2,
                     "content_type": "application/octet-stream", "type": "result", "app_id": "sealedsum"},
        }

    make_result("result_laplace", "purchases", 1, 103, [319_815_037])
    make_result("result_gaussian", "wellbeing", 4, 48, [276_419, -15_873, 409_600 - 123])

    # -- rejections: a scripted session against the enclave core -------------------------
    out["rejections"] = build_rejections(policy, policy_bytes, bundle, x_pub, n, width, code_digest, meas)
    return out


def build_rejections(policy, policy_bytes, bundle, x_pub, n, width, code_digest, meas) -> dict:
    """Records and ticks fed in order to sidecar.enclave.service.Enclave, with the outcome
    each must have. Pins the reasons and the order of the checks."""
    purchases = policy.streams["purchases"]
    size_limit = 48 + (4 + 16 + 4 + 8 + 8 + 1 + 64 + 2 + 2) + max(s.dimension for s in policy.streams.values()) * width
    assert size_limit == 925

    def ct(label: str, m: int = 1_000_000) -> int:
        return paillier_encrypt(n, m, fixed_r(label, n))

    def rid(i: int) -> bytes:
        return hashlib.sha256(f"record {i}".encode()).digest()[:16]

    def env(i, *, stream="purchases", epoch=KEY_EPOCH, sent=SENT_AT_MS, window=0, w=width, cts=None,
            magic=b"SSE\x01", trailer=b""):
        if cts is None:
            cts = [ct(f"rej/{i}")]
        return envelope(stream, rid(i), epoch, sent, window, w, cts, magic) + trailer

    def sealed(e: bytes, pk: bytes = x_pub) -> str:
        return seal(pk, e)[2].hex()

    other_pk = bindings.crypto_scalarmult_base(hashlib.sha256(b"another enclave").digest())
    good = sealed(env(1))
    flipped = bytearray(bytes.fromhex(good))
    flipped[60] ^= 0x01
    t0 = SENT_AT_MS + 1000
    steps = [
        {"note": "larger than 48 + 109 + widest dimension * width = 925 bytes: refused before opening",
         "body_hex": "00" * (size_limit + 1), "now_ms": t0, "expect": "too_large"},
        {"note": "exactly the size limit, but not a sealed box", "body_hex": "00" * size_limit,
         "now_ms": t0, "expect": "undecryptable"},
        {"note": "one bit flipped in a valid sealed box", "body_hex": bytes(flipped).hex(), "now_ms": t0,
         "expect": "undecryptable"},
        {"note": "sealed to another X25519 key", "body_hex": sealed(env(2), other_pk), "now_ms": t0,
         "expect": "undecryptable"},
        {"note": "envelope with version byte 2", "body_hex": sealed(env(3, magic=b"SSE\x02")), "now_ms": t0,
         "expect": "malformed"},
        {"note": "envelope with a trailing byte", "body_hex": sealed(env(4, trailer=b"\x00")), "now_ms": t0,
         "expect": "malformed"},
        {"note": "stream name with a character outside A-Z a-z 0-9 _ -", "body_hex": sealed(env(5, stream="pur.chases")),
         "now_ms": t0, "expect": "malformed"},
        {"note": "stream not in the policy", "body_hex": sealed(env(6, stream="nosuch")), "now_ms": t0,
         "expect": "unknown_stream"},
        {"note": "key epoch 2; also two values: the epoch is checked before the dimension",
         "body_hex": sealed(env(7, epoch=2, cts=[ct("rej/7a"), ct("rej/7b")])), "now_ms": t0,
         "expect": "wrong_epoch"},
        {"note": "two values for a one-value stream; also a wrong width: dimension before width",
         "body_hex": sealed(env(8, w=width + 1, cts=[ct("rej/8a"), ct("rej/8b")])), "now_ms": t0,
         "expect": "wrong_dimension"},
        {"note": "ciphertext width 255 instead of 256", "body_hex": sealed(env(9, w=width - 1, cts=[5])),
         "now_ms": t0, "expect": "bad_ciphertext"},
        {"note": "ciphertext 0", "body_hex": sealed(env(10, cts=[0])), "now_ms": t0, "expect": "bad_ciphertext"},
        {"note": "ciphertext >= n^2", "body_hex": sealed(env(11, cts=[n * n])), "now_ms": t0,
         "expect": "bad_ciphertext"},
        {"note": "ciphertext sharing a factor with n (not a unit mod n^2)", "body_hex": sealed(env(12, cts=[PAILLIER_P])),
         "now_ms": t0, "expect": "bad_ciphertext"},
        {"note": "bad ciphertext and expired: ciphertexts are checked before age",
         "body_hex": sealed(env(13, cts=[0])), "now_ms": SENT_AT_MS + 10_000_000, "expect": "bad_ciphertext"},
        {"note": "sent 900.001 s ago (max_record_age_seconds = 900)", "body_hex": sealed(env(14)),
         "now_ms": SENT_AT_MS + 900_001, "expect": "expired"},
        {"note": "sent 60.001 s in the future (max_clock_skew_seconds = 60)", "body_hex": sealed(env(15)),
         "now_ms": SENT_AT_MS - 60_001, "expect": "from_future"},
        {"note": "valid, window 0 = the open window (window 1); opens it at t0", "body_hex": good,
         "now_ms": t0, "expect": "accepted"},
        {"note": "the same record again", "body_hex": good, "now_ms": t0 + 1, "expect": "duplicate"},
        {"note": "same record id, resealed (another box): still a duplicate",
         "body_hex": seal(x_pub, env(1), hashlib.sha256(b"another ephemeral").digest())[2].hex(),
         "now_ms": t0 + 2, "expect": "duplicate"},
        {"note": "exactly 900 s old: accepted (the limit is inclusive)", "body_hex": sealed(env(16)),
         "now_ms": SENT_AT_MS + 900_000, "expect": "accepted"},
        {"note": "exactly 60 s in the future: accepted (the limit is inclusive)", "body_hex": sealed(env(17)),
         "now_ms": SENT_AT_MS - 60_000, "expect": "accepted"},
        {"note": "explicit window 2 while window 1 is open", "body_hex": sealed(env(18, window=2)),
         "now_ms": t0 + 3, "expect": "future_window"},
        {"note": "explicit window 1 (the open one)", "body_hex": sealed(env(19, window=1)), "now_ms": t0 + 4,
         "expect": "accepted"},
        {"note": "29.999 s after the window's first record: still open", "tick_ms": t0 + 29_999,
         "windows_withheld": 0},
        {"note": "window_seconds = 30 after its first record at t0: window 1 closes (4 records < "
                 "min_batch 10: withheld, nothing published)", "tick_ms": t0 + 30_000, "windows_withheld": 1},
        {"note": "window 1 is closed now", "body_hex": sealed(env(20, window=1)), "now_ms": t0 + 30_001,
         "expect": "late_window"},
        {"note": "a record counted in window 1, replayed with window 0: duplicate (ids are remembered "
                 "across windows for the replay horizon)", "body_hex": good, "now_ms": t0 + 30_002,
         "expect": "duplicate"},
        {"note": "explicit window 2 is open now", "body_hex": sealed(env(21, window=2)), "now_ms": t0 + 30_003,
         "expect": "accepted"},
    ]
    assert purchases.window_seconds == 30
    # Cross-check with the real enclave core.
    run_rejections(steps, policy, policy_bytes, code_digest, meas)
    return {
        "kind": "rejections",
        "description": "A session fed, in order, to the enclave core (sidecar.enclave.service.Enclave) built "
                       "with keys.json and policy.json: each record step gives the x-sealedsum-reason the "
                       "record must be dead-lettered with (or 'accepted'); tick steps close windows whose "
                       "time is up. Records are for stream 'purchases' unless noted; now_ms is the enclave's "
                       "clock.",
        "size_limit": size_limit,
        "steps": steps,
        "final_stats": {"windows_withheld": 1, "windows_released": 0},
    }


def enclave_keys():
    from phe import paillier

    from sidecar.enclave.keyring import EnclaveKeys

    public = paillier.PaillierPublicKey(PAILLIER_P * PAILLIER_Q)
    return EnclaveKeys(KEY_EPOCH, PrivateKey(ENCLAVE_X25519_PRIVATE),
                       Ed25519PrivateKey.from_private_bytes(ENCLAVE_ED25519_SEED),
                       paillier.PaillierPrivateKey(public, PAILLIER_P, PAILLIER_Q))


def run_rejections(steps, policy, policy_bytes, code_digest, meas):
    from sidecar.enclave.service import Enclave

    enclave = Enclave(enclave_keys(), policy, policy_bytes, code_digest, meas, lambda rd: b"")
    for i, step in enumerate(steps):
        if "tick_ms" in step:
            assert enclave.on_tick(step["tick_ms"]) == ()
            assert enclave.stats.windows_withheld == step["windows_withheld"], (i, step.get("note"))
            continue
        outcome = enclave.on_record(bytes.fromhex(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step.get("note"), got)
    assert enclave.stats.windows_withheld == 1 and enclave.stats.windows_released == 0


def main() -> int:
    vectors = build()
    for old in HERE.glob("*.json"):
        if old.stem not in vectors:
            old.unlink()
    for name, doc in vectors.items():
        doc = {"kind": doc.pop("kind"), **doc, "generator": "tests/vectors/generate.py"}
        text = json.dumps(doc, indent=2, ensure_ascii=True) + "\n"
        (HERE / f"{name}.json").write_text(text)
    print(f"wrote {len(vectors)} vector files to {HERE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
