"""Generate the known-answer vectors in ``tests/vectors/*.json``.

Run from the repository root::

    .venv/bin/python tests/vectors/generate.py

Everything is fixed: Ed25519 seeds (platform, enclave, producer identities) and X25519
keys come from RFC 8032 / RFC 7748 test vectors or are SHA-256 of a label, the Paillier
primes are hard-coded below, Paillier randomness ``r``, record and producer ids, nonces
and timestamps are fixed, and the sealed boxes are built with fixed *ephemeral* X25519
keys (libsodium's ``crypto_box_seal`` draws one at random; any ephemeral key gives a
valid box, so a fixed one makes the vectors reproducible). The
sealed-state blob uses a fixed AES-GCM nonce for the same reason. Running this script
twice gives identical files.

The messages are encoded here *by hand*, from ``docs/protocol.md``, with ``struct``,
``hashlib``, ``fractions``, plain integer arithmetic and the raw primitives (Ed25519,
X25519, ``crypto_box``, AES-GCM, HKDF), not with ``sealedsum.common.wire``. Every encoding is
then cross-checked against the real code before anything is written, so the script
fails loudly if the code and the document disagree. ``tests/unit/test_vectors.py``
decodes the files with the real code.

These keys are public and tiny (1024-bit Paillier): test vectors only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import sys
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl import bindings
from nacl.public import PrivateKey, SealedBox

if TYPE_CHECKING:
    from sealedsum.common.policy import EnclavePolicy

# sealedsum is imported inside the functions below, once the repository root is on the path.
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
# The signed_envelope vector's box gets an ephemeral key of its own (SHA-256 of a label), so
# that its worked example does not share a keystream with sealed_record's.
SIGNED_EPHEMERAL_X25519_PRIVATE = hashlib.sha256(b"sealedsum test vector ephemeral key 2").digest()
# The record_batch vector's second record, sealed with a third ephemeral key.
BATCH_EPHEMERAL_X25519_PRIVATE = hashlib.sha256(b"sealedsum test vector ephemeral key 3").digest()
# 512-bit primes: next_prime((SHA-512(label) | 3 << 510) mod 2**512) for the labels
# b"sealedsum test vector paillier p" / "... q"; n = p*q is exactly 1024 bits.
PAILLIER_P = int(
    "e8779d4fdd2f5d7c2e41b089e4b871fabd00f672a50f3603ea55db6902f94f7a"
    "076c1141bba27d2600481d914068676604717cde1cbe4444b440b6d84d7d8f9b", 16)
PAILLIER_Q = int(
    "e209b9e5a61875d855357d99f241a9558072f72f1b2894d7d402bbc7cbc0ed73"
    "abe6358da58b59e4f69dc74b91c1e8819bfb3c22c828974f3ff8f5145cd0222f", 16)
KEY_EPOCH = 1
# The emulated platform's root secret (sealing keys derive from it): SHA-256 of a label.
PLATFORM_ROOT_SECRET = hashlib.sha256(b"sealedsum test vector platform root secret").digest()

NONCE = bytes(range(32))
BUDGET_NONCE = bytes(range(0x20, 0x40))
STATE_GCM_NONCE = bytes.fromhex("000102030405060708090a0b")
QUOTE_ISSUED_AT_MS = 1767225595000  # 2025-12-31T23:59:55Z
SENT_AT_MS = 1767225600000  # 2026-01-01T00:00:00Z
CLOSED_AT_MS = 1767225630000
BUDGET_AT_MS = 1767225700000
ROTATED_AT_MS = 1767225660000  # 2026-01-01T00:01:00Z
NOTICE_AT_MS = 1767225601000  # the record batch is counted and refused a second after it was sent
NOTICE_TOKEN = bytes(range(0x40, 0x50)).hex()
DEFAULT_KEY_GRACE_MS = 900_000  # enclave.key_grace_seconds when the policy does not set it
RECORD_ID_1 = bytes.fromhex("00112233445566778899aabbccddeeff")
RECORD_ID_3 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
RECORD_ID_H = bytes.fromhex("48495354000000000000000000000001")
RECORD_ID_V = bytes.fromhex("56454354000000000000000000000002")
ANONYMOUS = bytes(16)
PRODUCER_A = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
PRODUCER_B = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babbbcbdbebf")
RECORD_ID_S = bytes.fromhex("5349474e000000000000000000000003")
RECORD_ID_P = bytes.fromhex("5041434b000000000000000000000004")  # "PACK"
# Producer identity keys (Ed25519 seeds). alice is RFC 8032 section 7.1 TEST 3 (the
# signed_envelope vector's producer), bob TEST 1024, mallory TEST SHA(abc); carol's seed
# is SHA-256 of a label. In the identity session alice and carol are enrolled, bob is
# revoked and mallory is not in the policy at all.
IDENTITY_SEEDS = {
    "alice": bytes.fromhex("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7"),
    "bob": bytes.fromhex("f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5"),
    "carol": hashlib.sha256(b"sealedsum test vector producer carol").digest(),
    "mallory": bytes.fromhex("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42"),
}
# The public keys RFC 8032 gives for its three (a check on the seeds above).
RFC8032_PUBLIC = {
    "alice": "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    "bob": "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
    "mallory": "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
}

PREFIX = "sealedsum"

# The configuration tables ([enclave] and [streams.*]) as a TOML loader returns them.
# Integers where floats are meant and omitted defaults show the normalisation. One
# stream of each kind; "visits" has a budget of three releases and a contribution bound.
CONFIG_ENCLAVE = {"paillier_bits": 1024, "insecure_test_keys": True, "max_record_age_seconds": 900}
CONFIG_STREAMS = {
    "wellbeing": {
        "kind": "mean", "dimension": 3, "lower": -10, "upper": 10, "window_records": 50, "min_batch": 5,
        "mechanism": "gaussian", "epsilon": 2, "delta": 1e-6, "budget_epsilon": 8, "budget_delta": 1e-5,
        "fraction_bits": 12, "count_share": 0.25,
    },
    "purchases": {
        "lower": 0, "upper": 100.0, "window_records": 100, "window_seconds": 30, "min_batch": 10,
        "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 10,
    },
    "visits": {
        "kind": "histogram", "edges": [0, 1, 5, 10], "window_records": 2, "min_batch": 2,
        "mechanism": "laplace", "epsilon": 0.1, "budget_epsilon": 0.3, "max_records_per_producer": 1,
    },
    "model": {
        "kind": "vector", "dimension": 3, "l2_bound": 2, "fraction_bits": 8, "window_records": 20, "min_batch": 5,
        "mechanism": "gaussian", "epsilon": 1, "delta": 1e-6, "budget_epsilon": 5, "budget_delta": 1e-5,
        "max_records_per_producer": 2,
    },
    "sensor": {
        "kind": "vector", "dimension": 2, "lower": [-1, 0], "upper": [1, 50], "window_seconds": 60,
        "min_batch": 3, "mechanism": "laplace", "epsilon": 0.5, "budget_epsilon": 5, "count_share": 0.2,
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
        "model": {
            "kind": "vector", "dimension": 3, "l2_bound": 2.0, "fraction_bits": 8, "count_share": 0.5,
            "min_batch": 5, "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-06, "budget_epsilon": 5.0,
            "budget_delta": 1e-05, "window_records": 20, "max_records_per_producer": 2,
        },
        "purchases": {
            "kind": "sum", "dimension": 1, "lower": 0.0, "upper": 100.0, "min_batch": 10, "mechanism": "laplace",
            "epsilon": 1.0, "budget_epsilon": 10.0, "fraction_bits": 16, "count_share": 0.5,
            "window_records": 100, "window_seconds": 30.0,
        },
        "sensor": {
            "kind": "vector", "dimension": 2, "lower": [-1.0, 0.0], "upper": [1.0, 50.0], "fraction_bits": 16,
            "count_share": 0.2, "min_batch": 3, "mechanism": "laplace", "epsilon": 0.5, "budget_epsilon": 5.0,
            "window_seconds": 60.0,
        },
        "visits": {
            "kind": "histogram", "dimension": 3, "edges": [0.0, 1.0, 5.0, 10.0], "min_batch": 2,
            "mechanism": "laplace", "epsilon": 0.1, "budget_epsilon": 0.3, "window_records": 2,
            "max_records_per_producer": 1,
        },
        "wellbeing": {
            "kind": "mean", "dimension": 3, "lower": -10.0, "upper": 10.0, "min_batch": 5, "mechanism": "gaussian",
            "epsilon": 2.0, "delta": 1e-06, "budget_epsilon": 8.0, "budget_delta": 1e-05, "fraction_bits": 12,
            "count_share": 0.25, "window_records": 50,
        },
    },
}

# A packed stream (section 10.2), in a policy of its own so that policy.json keeps its bytes:
# 40 coordinates, L2 bound 1 at f = 16, windows closed by time only (so up to 1 000 000
# records): slots of 37 bits, 27 to a 1024-bit plaintext, two ciphertexts per record.
PACKED_CONFIG_STREAMS = {
    "updates": {
        "kind": "vector", "dimension": 40, "l2_bound": 1, "fraction_bits": 16, "window_seconds": 60,
        "min_batch": 2, "mechanism": "gaussian", "epsilon": 1, "delta": 1e-6, "budget_epsilon": 10,
        "budget_delta": 1e-5, "packing": True,
    },
}
EXPECTED_PACKED_STREAM = {
    "kind": "vector", "dimension": 40, "l2_bound": 1.0, "fraction_bits": 16, "count_share": 0.5, "min_batch": 2,
    "mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-06, "budget_epsilon": 10.0, "budget_delta": 1e-05,
    "window_seconds": 60.0, "packing": {"slot_bits": 37, "slots_per_ciphertext": 27, "ciphertexts_per_record": 2},
}
# Budget groups (section 15.6), in a policy of their own so that policy.json keeps its bytes:
# "app" composes two Laplace streams (exact decimal: 0.1 + 0.2 + 0.2 fills 0.5), "vitals" two
# Gaussian ones (zCDP), "purchases" a Laplace and a Gaussian one (the Laplace release as
# eps^2/2-zCDP); "solo" is in no group and keeps a budget of its own.
GROUP_CONFIG_GROUPS = {
    "app": {"budget_epsilon": 0.5},
    "vitals": {"budget_epsilon": 4, "budget_delta": 1e-5},
    "purchases": {"budget_epsilon": 8, "budget_delta": 1e-6},
}
GROUP_CONFIG_STREAMS = {
    "taps": {"lower": 0, "upper": 1, "window_records": 10, "min_batch": 1, "mechanism": "laplace",
             "epsilon": 0.1, "budget_group": "app"},
    "swipes": {"kind": "histogram", "edges": [0, 1, 2], "window_records": 10, "min_batch": 1,
               "mechanism": "laplace", "epsilon": 0.2, "budget_group": "app"},
    "pulse": {"kind": "mean", "lower": 40, "upper": 200, "window_records": 10, "min_batch": 1,
              "mechanism": "gaussian", "epsilon": 1, "delta": 1e-6, "budget_group": "vitals"},
    "steps": {"lower": 0, "upper": 50000, "fraction_bits": 0, "window_records": 10, "min_batch": 1,
              "mechanism": "gaussian", "epsilon": 0.5, "delta": 1e-6, "budget_group": "vitals"},
    "amounts": {"kind": "mean", "lower": 0, "upper": 200, "window_records": 10, "min_batch": 1,
                "mechanism": "laplace", "epsilon": 1, "budget_group": "purchases"},
    "baskets": {"kind": "histogram", "edges": [0, 10, 25, 50, 100, 200, 500], "window_records": 10,
                "min_batch": 1, "mechanism": "gaussian", "epsilon": 1, "delta": 1e-6, "budget_group": "purchases"},
    "solo": {"lower": 0, "upper": 1, "window_records": 10, "min_batch": 1, "mechanism": "laplace",
             "epsilon": 1, "budget_epsilon": 2},
}
EXPECTED_GROUP_POLICY_MAPPING = {
    "version": 1,
    "budget_groups": {
        "app": {"budget_epsilon": 0.5},
        "purchases": {"budget_epsilon": 8.0, "budget_delta": 1e-06},
        "vitals": {"budget_epsilon": 4.0, "budget_delta": 1e-05},
    },
    "enclave": EXPECTED_POLICY_MAPPING["enclave"],
    "streams": {
        "amounts": {"kind": "mean", "dimension": 1, "lower": 0.0, "upper": 200.0, "fraction_bits": 16,
                    "count_share": 0.5, "min_batch": 1, "window_records": 10, "mechanism": "laplace",
                    "epsilon": 1.0, "budget_group": "purchases"},
        "baskets": {"kind": "histogram", "dimension": 6, "edges": [0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0],
                    "min_batch": 1, "window_records": 10, "mechanism": "gaussian", "epsilon": 1.0,
                    "delta": 1e-06, "budget_group": "purchases"},
        "pulse": {"kind": "mean", "dimension": 1, "lower": 40.0, "upper": 200.0, "fraction_bits": 16,
                  "count_share": 0.5, "min_batch": 1, "window_records": 10, "mechanism": "gaussian",
                  "epsilon": 1.0, "delta": 1e-06, "budget_group": "vitals"},
        "solo": {"kind": "sum", "dimension": 1, "lower": 0.0, "upper": 1.0, "fraction_bits": 16, "count_share": 0.5,
                 "min_batch": 1, "window_records": 10, "mechanism": "laplace", "epsilon": 1.0,
                 "budget_epsilon": 2.0},
        "steps": {"kind": "sum", "dimension": 1, "lower": 0.0, "upper": 50000.0, "fraction_bits": 0,
                  "count_share": 0.5, "min_batch": 1, "window_records": 10, "mechanism": "gaussian",
                  "epsilon": 0.5, "delta": 1e-06, "budget_group": "vitals"},
        "swipes": {"kind": "histogram", "dimension": 2, "edges": [0.0, 1.0, 2.0], "min_batch": 1,
                   "window_records": 10, "mechanism": "laplace", "epsilon": 0.2, "budget_group": "app"},
        "taps": {"kind": "sum", "dimension": 1, "lower": 0.0, "upper": 1.0, "fraction_bits": 16, "count_share": 0.5,
                 "min_batch": 1, "window_records": 10, "mechanism": "laplace", "epsilon": 0.1,
                 "budget_group": "app"},
    },
}
# The releases charged, in order, as (stream, window).
# release_interval.json: one count-closed stream with min_release_interval_seconds (section 12).
# epsilon 1e9 so that the noise is 0 and each release's count is the window's true count; the
# budget allows 4 releases.
INTERVAL_CONFIG_STREAMS = {
    "taps": {"lower": 0, "upper": 1, "window_records": 3, "min_batch": 2, "mechanism": "laplace",
             "epsilon": 1e9, "budget_epsilon": 4e9, "min_release_interval_seconds": 2.5},
}
EXPECTED_INTERVAL_POLICY_MAPPING = {
    "version": 1,
    "enclave": EXPECTED_POLICY_MAPPING["enclave"],
    "streams": {"taps": {"budget_epsilon": 4e9, "count_share": 0.5, "dimension": 1, "epsilon": 1e9,
                         "fraction_bits": 16, "kind": "sum", "lower": 0.0, "mechanism": "laplace", "min_batch": 2,
                         "min_release_interval_seconds": 2.5, "upper": 1.0, "window_records": 3}},
}
# (ms after SENT_AT_MS, "record" or "tick"): the enclave's clock at each step.
INTERVAL_EVENTS = [(0, "record"), (10, "record"), (20, "record"),          # window 1: the first close waits for nothing
                   (100, "record"), (110, "record"), (120, "record"),      # window 2 full, 100 ms after the close
                   (1000, "record"), (2519, "tick"), (2520, "tick"),       # ... and closes at 20 + 2500, with 4
                   (2600, "record"), (2700, "record"), (6000, "tick"),     # window 3: 2 records, not full
                   (6100, "record"),                                       # full, interval long past: closes now
                   (6200, "record"), (6300, "record"), (6400, "record"),   # window 4 full, waits ...
                   (8599, "tick"), (8600, "tick"),                         # ... until 6100 + 2500: the 4th release
                   (8700, "record")]                                       # budget spent


def interval_schedule(events: list[tuple[int, str]], window_records: int, interval_ms: int, releases: int) -> list:
    """Section 12's rule, by hand: what each step closes (window, records, closed_at_ms) and
    the record's outcome."""
    index, count, last_close, charged, out = 1, 0, None, 0, []
    for at, what in events:
        now = SENT_AT_MS + at
        if charged == releases and what == "record":
            out.append({"outcome": "budget_exhausted", "closes": None})
            continue
        if what == "record":
            count += 1
        closes = None
        if count >= window_records and (last_close is None or now - last_close >= interval_ms):
            charged += 1
            closes = {"window": index, "records": count, "closed_at_ms": now, "releases": charged}
            index, count, last_close = index + 1, 0, now
        out.append({"outcome": "accepted" if what == "record" else None, "closes": closes})
    return out


def build_release_interval(m: "Shared") -> dict:
    """A count-closed stream with a release interval: its policy bytes, and a schedule of
    records and ticks with what each closes, run through the real enclave core."""
    from sealedsum.common import results, wire
    from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes

    policy_bytes = canonical_json(EXPECTED_INTERVAL_POLICY_MAPPING)
    policy = enclave_policy(CONFIG_ENCLAVE, INTERVAL_CONFIG_STREAMS)
    assert policy.to_bytes() == policy_bytes, policy.to_bytes()
    assert policy_from_bytes(policy_bytes).to_bytes() == policy_bytes
    meas = sha256(b"sealedsum/v1/measurement\x00" + m.code_digest + sha256(policy_bytes))
    assert wire.measurement(m.code_digest, policy_bytes) == meas
    s = policy.streams["taps"]
    assert s.min_release_interval_ms == 2500 and s.max_window_records == 1_000_000
    expected = interval_schedule(INTERVAL_EVENTS, 3, 2500, 4)
    core = enclave_core(policy, policy_bytes, m.code_digest, meas)
    steps = []
    for i, ((at, what), exp) in enumerate(zip(INTERVAL_EVENTS, expected)):
        now = SENT_AT_MS + at
        step = {"at_ms": now, "action": what}
        if what == "record":
            rid = hashlib.sha256(f"interval record {i}".encode()).digest()[:16]
            value = 1 << 16  # 1.0 in fixed point
            cts = [paillier_encrypt(m.n, value, fixed_r(f"interval/{i}", m.n))]
            body = seal(m.x_pub, envelope("taps", rid, KEY_EPOCH, now, 0, m.width, cts, ms=[value]))[2]
            effects = core.on_record(body, now)
            got = "accepted" if effects.rejection is None else effects.rejection.reason.value
            assert got == exp["outcome"], (i, got)
            step.update(body_hex=hexs(body), expect=got)
        else:
            effects = core.on_tick(now)
        kinds = [p.message.kind for p in effects.publish]
        released = [p.message for p in effects.publish if isinstance(p.message, results.Release)]
        closes = exp["closes"]
        if closes is None:
            assert released == [], (i, released)
        else:
            (r,) = released
            assert (r.window, r.count, r.closed_at_ms, r.budget["releases"]) == (
                closes["window"], closes["records"], closes["closed_at_ms"], closes["releases"]), (i, r)
            assert r.sum_fixed == [closes["records"] << 16]
        step.update(closes=closes, publishes=kinds)
        steps.append(step)
    last_close = checkpoint(core, base=True)["core"]["streams"]["taps"]["last_close_ms"]
    assert last_close == SENT_AT_MS + 8600 and core.exhausted == {"taps"}
    closes = [st["closes"] for st in steps if st["closes"]]
    assert [c["records"] for c in closes] == [3, 4, 3, 3]
    assert closes[-1]["closed_at_ms"] - closes[0]["closed_at_ms"] >= (4 - 1) * 2500
    return {
        "kind": "release_interval",
        "description": "A count-closed stream with min_release_interval_seconds = 2.5 (section 12): a window "
                       "closes once it holds window_records = 3 records and 2500 ms have passed on the enclave's "
                       "clock since the stream's previous close (the first close waits for nothing), right "
                       "after a record is folded in or at a tick; records keep being counted into a window "
                       "that waits. Each step is a record (sealed under keys.json's keys, value 1.0, sent at "
                       "at_ms) or a tick at at_ms; 'closes' is the window it closes (its index, how many "
                       "records it holds, closed_at_ms and the stream's releases after its charge) or null; "
                       "'publishes' the kinds of what the step publishes. epsilon = 1e9: the noise is 0, so "
                       "each release's count is the window's true count. The budget allows 4 releases, the "
                       "4th exhausts the stream; last_close_ms is the sealed state's field after the run.",
        "config_enclave": CONFIG_ENCLAVE,
        "config_streams": INTERVAL_CONFIG_STREAMS,
        "canonical": policy_bytes.decode("ascii"),
        "canonical_hex": hexs(policy_bytes),
        "code_digest": hexs(m.code_digest),
        "measurement": hexs(meas),
        "steps": steps,
        "last_close_ms": last_close,
    }


GROUP_CHARGES = [("taps", 1), ("swipes", 1), ("swipes", 2),
                 ("pulse", 1), ("steps", 1), ("pulse", 2),
                 ("amounts", 1), ("baskets", 1), ("baskets", 2)]

# Two records: the first within the bound, the second scaled down to it.
PACKED_VALUES = [
    [(i % 7 - 3) / 16 for i in range(40)],
    [((i * 5) % 11 - 5) / 4 for i in range(40)],
]

# A synthetic source tree for the code digest (the real digest changes with every edit).
# The code digest's input: the source of each measured module, by dotted name (section 5).
# Names that sort differently as paths and as dotted names, a package, and non-ASCII content.
CODE_FILES = {
    "sealedsum": b'__version__ = "0.0.0"\n',
    "sealedsum.common": b"",
    "sealedsum.common.a.b": b"B = 2\n",
    "sealedsum.common.a_b": b"A_B = 1\n",
    "sealedsum.sidecar": b'"""sidecar"""\n',
    "sealedsum.sidecar.enclave_process.__main__": "LABEL = 'caf\u00e9'\n".encode("utf-8"),
}
# The code digest the other vectors take as input: the synthetic one of the earlier rule
# (every .py file of common/ and sidecar/ by path), kept so that the measurement, quotes,
# sealing keys and everything signed under them stay as they were; any 32 bytes would do.
INPUT_CODE_DIGEST = bytes.fromhex("0bba7218b1f83f17f2e93051a8c3194605a3fde648af658273b9d0409a88e3b2")
RUNTIME_LINE_KEYS = ["python", "cryptography", "gmpy2", "numpy", "opendp", "phe", "pika", "pynacl"]
RUNTIME_LINE = ("python=3.11.9;cryptography=50.0.2;gmpy2=2.3.2;numpy=2.4.6;opendp=0.16.0;"
                "phe=1.5.0;pika=1.4.4;pynacl=1.6.2")

LEDGER_LABEL = b"sealedsum/v1/ledger\x00"
ENVELOPE_SIGNATURE_LABEL = b"sealedsum/v1/envelope"
PRODUCER_ID_LABEL = b"sealedsum/v1/producer-id\x00"
STATE_LABEL = b"sealedsum/v1/sealed-state\x00"
JOURNAL_LABEL = b"sealedsum/v1/sealed-journal\x00"
SEALING_INFO = b"sealedsum/v1/sealing-key\x00"
BUDGET_TOLERANCE = 1e-9
# (stream, windows released in order): the ledgers the result, notice and report vectors carry.
CHAINS = {"purchases": [1], "wellbeing": [2, 4], "visits": [1, 2, 3]}


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


def signed_message(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """SSS\\x01 || u32 len || payload || Ed25519 over 'sealedsum/v1/result' 0x00 payload."""
    sig_input, sig = ed25519_sign(ENCLAVE_ED25519_SEED, b"sealedsum/v1/result", payload)
    return sig_input, sig, b"SSS\x01" + u32(len(payload)) + payload + sig


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


def clip_box(values, box):
    return [min(max(float(v), float(lo)), float(hi)) for v, (lo, hi) in zip(values, box)]


def clip_l2(values, bound):
    norm = math.sqrt(math.fsum(float(v) * float(v) for v in values))
    if norm <= bound:
        return [float(v) for v in values]
    return [float(v) * (bound / norm) for v in values]


def one_hot(value, edges):
    v = min(max(float(value), edges[0]), edges[-1])
    buckets = len(edges) - 1
    index = next((i for i in range(buckets) if edges[i] <= v < edges[i + 1]), buckets - 1)
    return [v], [1 if i == index else 0 for i in range(buckets)]


def encode_values(s, values):
    """Clip and encode one record's values for stream policy ``s``, by the document."""
    if s.kind == "histogram":
        return one_hot(values[0], s.edges)
    if s.l2_bound is not None:
        clipped = clip_l2(values, s.l2_bound)
    else:
        lo = s.lower if isinstance(s.lower, tuple) else (s.lower,) * s.dimension
        hi = s.upper if isinstance(s.upper, tuple) else (s.upper,) * s.dimension
        clipped = clip_box(values, list(zip(lo, hi)))
    return clipped, [round(v * (1 << s.fraction_bits)) for v in clipped]


def fixed_r(label: str, n: int) -> int:
    return int.from_bytes(hashlib.sha512(label.encode()).digest(), "big") % n


def envelope(stream: str, record_id: bytes, epoch: int, sent_at_ms: int, window: int, width: int,
             cts: list[int], magic: bytes = b"SSE\x03", producer_id: bytes = ANONYMOUS, *,
             ms: list[int]) -> bytes:
    """SSE\\x03: the head, the ciphertexts, then the plaintext of each, ceil(width / 2) bytes."""
    name = stream.encode("ascii")
    pw = (width + 1) // 2
    return (magic + record_id + producer_id + u32(epoch) + u64(sent_at_ms) + u64(window) + bytes([len(name)])
            + name + u16(len(cts)) + u16(width) + b"".join(c.to_bytes(width, "big") for c in cts)
            + b"".join(m.to_bytes(pw, "big") for m in ms))


def seal(recipient_pk: bytes, message: bytes, ephemeral_sk: bytes = EPHEMERAL_X25519_PRIVATE):
    """crypto_box_seal with a chosen ephemeral key: epk || crypto_box(m, nonce, pk, esk)."""
    epk = bindings.crypto_scalarmult_base(ephemeral_sk)
    nonce = hashlib.blake2b(epk + recipient_pk, digest_size=24).digest()
    return epk, nonce, epk + bindings.crypto_box(message, nonce, recipient_pk, ephemeral_sk)


def producer_id_of(public_key: bytes) -> tuple[bytes, bytes]:
    """(hash input, producer id): SHA-256('sealedsum/v1/producer-id' 0x00 || key)[0:16]."""
    data = PRODUCER_ID_LABEL + public_key
    return data, sha256(data)[:16]


def signed_envelope(seed: bytes, env: bytes, public_key: bytes | None = None,
                    label: bytes = ENVELOPE_SIGNATURE_LABEL) -> bytes:
    """SSI\\x01 || public key || Ed25519 over 'sealedsum/v1/envelope' 0x00 || envelope, then the envelope.
    ``public_key`` (default: the seed's own) and ``label`` are for forgeries."""
    _, sig = ed25519_sign(seed, label, env)
    return b"SSI\x01" + (public_key if public_key is not None else ed25519_public(seed)) + sig + env


def hexs(b: bytes) -> str:
    return b.hex()


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


# -- privacy budget, by the document ------------------------------------------------------

def rho_of(epsilon: float, delta: float) -> float:
    lg = math.log(1 / delta)
    return (math.sqrt(lg + epsilon) - math.sqrt(lg)) ** 2


def eps_of_rho(rho: float, delta: float) -> float:
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def budget_fits(s, releases: int) -> bool:
    if s.mechanism == "laplace":
        return Fraction(repr(s.epsilon)) * releases <= Fraction(repr(s.budget_epsilon))
    return eps_of_rho(rho_of(s.epsilon, s.delta) * releases, s.budget_delta) <= s.budget_epsilon * (1 + BUDGET_TOLERANCE)


def total_releases(s) -> int:
    n = 0
    while budget_fits(s, n + 1):
        n += 1
    return n


def budget_summary(s, releases: int, head: bytes) -> dict:
    if s.mechanism == "laplace":
        spent_eps, spent_rho = float(Fraction(repr(s.epsilon)) * releases), None
    else:
        spent_rho = rho_of(s.epsilon, s.delta) * releases
        spent_eps = eps_of_rho(spent_rho, s.budget_delta) if releases else 0.0
    return {
        "budget_delta": s.budget_delta,
        "budget_epsilon": s.budget_epsilon,
        "ledger_head": hexs(head),
        "releases": releases,
        "remaining_releases": max(total_releases(s) - releases, 0),
        "spent_epsilon": spent_eps,
        "spent_rho": spent_rho,
    }


def group_members(policy, group: str) -> list[str]:
    return sorted(name for name, st in policy.streams.items() if st.budget_group == group)


def zcdp_rho_of(s) -> float:
    """One release as zCDP: a Gaussian's rho_1, a Laplace release's eps^2/2 (section 15.6)."""
    return s.epsilon * s.epsilon / 2 if s.mechanism == "laplace" else rho_of(s.epsilon, s.delta)


def group_spent_by_hand(policy, group: str, counts: dict) -> tuple[float, float | None, Fraction | None]:
    """(spent_epsilon, spent_rho, the exact decimal spend of a Laplace-only group or None)."""
    g = GROUP_CONFIG_GROUPS[group]
    members = [policy.streams[name] for name in group_members(policy, group)]
    if all(m.mechanism == "laplace" for m in members):
        exact = sum((Fraction(repr(m.epsilon)) * counts[m.name] for m in members), Fraction(0))
        return float(exact), None, exact
    rho = 0.0
    for m in members:  # sorted by name
        rho += counts[m.name] * zcdp_rho_of(m)
    delta = float(g["budget_delta"])
    return (eps_of_rho(rho, delta) if sum(counts[m.name] for m in members) else 0.0), rho, None


def group_fits(policy, group: str, counts: dict) -> bool:
    eps, _, exact = group_spent_by_hand(policy, group, counts)
    budget = float(GROUP_CONFIG_GROUPS[group]["budget_epsilon"])
    if exact is not None:
        return exact <= Fraction(repr(budget))
    return eps <= budget * (1 + BUDGET_TOLERANCE)


def group_budget_summary(policy, stream: str, counts: dict, head: bytes) -> dict:
    group = policy.streams[stream].budget_group
    g = GROUP_CONFIG_GROUPS[group]
    eps, rho, _ = group_spent_by_hand(policy, group, counts)
    k = 0
    while group_fits(policy, group, {**counts, stream: counts[stream] + k + 1}):
        k += 1
    return {
        "budget_delta": float(g.get("budget_delta", 0.0)),
        "budget_epsilon": float(g["budget_epsilon"]),
        "budget_group": group,
        "group_releases": {name: counts[name] for name in group_members(policy, group)},
        "ledger_head": hexs(head),
        "releases": counts[stream],
        "remaining_releases": k,
        "spent_epsilon": eps,
        "spent_rho": rho,
    }


def charge_json(s, window: int, seq: int) -> bytes:
    rho = None if s.mechanism == "laplace" else rho_of(s.epsilon, s.delta)
    return canonical_json({"delta": s.delta, "epsilon": s.epsilon, "mechanism": s.mechanism, "rho": rho,
                           "seq": seq, "stream": s.name, "window": window})


def ledger_chain(s, windows: list[int]) -> dict:
    genesis_input = LEDGER_LABEL + s.name.encode("ascii")
    head = sha256(genesis_input)
    chain = {"stream": s.name, "genesis_input_hex": hexs(genesis_input), "genesis": hexs(head), "charges": []}
    for seq, window in enumerate(windows, start=1):
        charge = charge_json(s, window, seq)
        head_input = LEDGER_LABEL + head + charge
        head = sha256(head_input)
        chain["charges"].append({"window": window, "seq": seq, "charge": charge.decode("ascii"),
                                 "head_input_hex": hexs(head_input), "head": hexs(head)})
    chain["head"] = hexs(head)
    return chain


# ---------------------------------------------------------------------------------
# Vectors
# ---------------------------------------------------------------------------------

class Shared(NamedTuple):
    """The fixed material most vectors are built from: the enclave's keys (keys.json), the policy
    (policy.json), the code digest the measurement takes, and what follows from them, down to the
    quote. Everything but the policy derives from the constants above.

    A NamedTuple, not a frozen dataclass: tests/unit/test_vectors.py loads this file without
    registering it in sys.modules, and dataclasses (Python 3.11) look the module up there to
    resolve string annotations."""

    policy: EnclavePolicy
    policy_bytes: bytes
    code_digest: bytes = INPUT_CODE_DIGEST

    @property
    def n(self) -> int:
        return PAILLIER_P * PAILLIER_Q

    @property
    def width(self) -> int:
        return byte_len(self.n * self.n)

    @property
    def x_pub(self) -> bytes:
        return bindings.crypto_scalarmult_base(ENCLAVE_X25519_PRIVATE)

    @property
    def ed_pub(self) -> bytes:
        return ed25519_public(ENCLAVE_ED25519_SEED)

    @property
    def bundle(self) -> bytes:
        n_len = byte_len(self.n)
        return b"SSK\x01" + u32(KEY_EPOCH) + self.x_pub + self.ed_pub + u16(n_len) + self.n.to_bytes(n_len, "big")

    @property
    def measurement_input(self) -> bytes:
        return b"sealedsum/v1/measurement\x00" + self.code_digest + sha256(self.policy_bytes)

    @property
    def meas(self) -> bytes:
        return sha256(self.measurement_input)

    @property
    def report_data_input(self) -> bytes:
        return b"sealedsum/v1/report-data\x00" + framed(self.bundle) + framed(self.policy_bytes) + NONCE

    @property
    def report_data(self) -> bytes:
        return sha256(self.report_data_input)

    @property
    def platform_pub(self) -> bytes:
        return ed25519_public(PLATFORM_ED25519_SEED)

    @property
    def quote_signed_part(self) -> bytes:
        return b"SSQ\x01" + self.meas + self.report_data + u64(QUOTE_ISSUED_AT_MS)

    @property
    def quote_signature(self) -> tuple[bytes, bytes]:
        """(signing input, signature) of the platform key over the signed part."""
        return ed25519_sign(PLATFORM_ED25519_SEED, b"sealedsum/v1/quote", self.quote_signed_part)

    @property
    def quote(self) -> bytes:
        return self.quote_signed_part + self.quote_signature[1]

    def reply_bytes(self, *, code: bytes | None = None, pol: bytes | None = None, q: bytes | None = None,
                    keys: bytes | None = None) -> bytes:
        """The SSD\\x01 attestation reply to NONCE; ``code``, ``pol``, ``q`` or ``keys`` replace the code
        digest, policy, quote or key bundle (the altered copies of the verification cases)."""
        return (b"SSD\x01" + NONCE + (self.code_digest if code is None else code)
                + framed(self.bundle if keys is None else keys)
                + framed(self.policy_bytes if pol is None else pol) + framed(self.quote if q is None else q))

    def requoted_reply(self, keys: bytes) -> bytes:
        """A reply with another key bundle that the platform quoted as it is: every check up to
        the key bundle's own passes."""
        report_data = sha256(b"sealedsum/v1/report-data\x00" + framed(keys) + framed(self.policy_bytes) + NONCE)
        signed = b"SSQ\x01" + self.meas + report_data + u64(QUOTE_ISSUED_AT_MS)
        return self.reply_bytes(keys=keys, q=signed + ed25519_sign(PLATFORM_ED25519_SEED, b"sealedsum/v1/quote",
                                                                   signed)[1])


def shared_material() -> Shared:
    """The policy of policy.json, written out by hand and checked against the real parser."""
    from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes

    policy_bytes = canonical_json(EXPECTED_POLICY_MAPPING)
    policy = enclave_policy(CONFIG_ENCLAVE, CONFIG_STREAMS)
    assert policy.to_bytes() == policy_bytes, (policy.to_bytes(), policy_bytes)
    assert policy_from_bytes(policy_bytes).to_bytes() == policy_bytes
    return Shared(policy, policy_bytes)


def build() -> dict[str, dict]:
    m = shared_material()
    plans = {name: noise_plan(s) for name, s in sorted(m.policy.streams.items())}
    out: dict[str, dict] = {
        "keys": build_keys(m),
        "policy": build_policy(m, plans),
        "code_digest": build_code_digest(),
        "measurement": build_measurement(m),
        "quote": build_quote(m),
        "attest_request": build_attest_request(),
        "attest_reply": build_attest_reply(m),
        "nitro_reply": build_nitro_reply(m),
        "envelope_dim1": build_envelope(m, "purchases", [42.3], RECORD_ID_1, 0, ["r/purchases/0"]),
        "envelope_dim3": build_envelope(m, "wellbeing", [3.5, -2.25, 12.0], RECORD_ID_3, 1,
                                        ["r/wellbeing/0", "r/wellbeing/1", "r/wellbeing/2"], PRODUCER_A),
        "envelope_histogram": build_envelope(m, "visits", [5.0], RECORD_ID_H, 0,
                                             ["r/visits/0", "r/visits/1", "r/visits/2"], PRODUCER_B),
        "envelope_vector": build_envelope(m, "model", [3.0, -4.0, 0.0], RECORD_ID_V, 0,
                                          ["r/model/0", "r/model/1", "r/model/2"], PRODUCER_A),
    }
    env1 = bytes.fromhex(out["envelope_dim1"]["envelope_hex"])
    env3 = bytes.fromhex(out["envelope_dim3"]["envelope_hex"])
    out["sealed_record"] = build_sealed_record(m, env1)
    out["record_batch"] = build_record_batch(m, env1, env3, bytes.fromhex(out["sealed_record"]["sealed_hex"]))
    out["signed_envelope"] = build_signed_envelope(m.policy, m.code_digest, m.x_pub, m.n, m.width)
    out["envelope_packed"] = build_packed_envelope(m.code_digest, m.n, m.width)
    chains = ledger_chains(m.policy)
    out["ledger"] = build_ledger(chains)
    out["result_laplace"] = build_result(m, plans, chains, "purchases", 1, [319_815_037], count=103)
    out["result_gaussian"] = build_result(m, plans, chains, "wellbeing", 4, [276_419, -15_873, 409_600 - 123],
                                          count=48)
    out["result_histogram"] = build_result(m, plans, chains, "visits", 3, [7, -1, 12])
    out["budget_exhausted"] = build_budget_exhausted(m, chains)
    out["key_rotated"] = build_key_rotated(m)
    out["notices"] = build_notices(m, bytes.fromhex(out["record_batch"]["batch_hex"]))
    out["budget_request"] = build_budget_request()
    out["budget_report"] = build_budget_report(m, chains, bytes.fromhex(out["budget_request"]["request_hex"]))
    out["budget_group"] = build_budget_group(m.code_digest)
    out["release_interval"] = build_release_interval(m)
    out["sealed_state"] = build_sealed_state(m.policy, m.policy_bytes, m.code_digest, m.meas, m.x_pub, m.n,
                                             m.width)
    # The rejections: a scripted session against the enclave core.
    out["rejections"] = build_rejections(m.policy, m.policy_bytes, m.bundle, m.x_pub, m.n, m.width,
                                         m.code_digest, m.meas, chains)
    return out


def build_keys(m: Shared) -> dict:
    """The enclave's public key bundle and the private material behind it."""
    from sealedsum.common import wire

    n = m.n
    assert n.bit_length() == 1024
    assert wire.KeyBundle(KEY_EPOCH, m.x_pub, m.ed_pub, n).to_bytes() == m.bundle
    assert wire.KeyBundle.from_bytes(m.bundle).ciphertext_width == m.width
    return {
        "kind": "key_bundle",
        "description": "The enclave's public key bundle (SSK\\x01) and the fixed private material "
                       "behind it. Every other vector uses these keys.",
        "epoch": KEY_EPOCH,
        "x25519_private": hexs(ENCLAVE_X25519_PRIVATE),
        "x25519_public": hexs(m.x_pub),
        "ed25519_seed": hexs(ENCLAVE_ED25519_SEED),
        "ed25519_public": hexs(m.ed_pub),
        "paillier_p": hex(PAILLIER_P),
        "paillier_q": hex(PAILLIER_Q),
        "paillier_n": hex(n),
        "paillier_n_bits": n.bit_length(),
        "ciphertext_width": m.width,
        "bundle_hex": hexs(m.bundle),
    }


def noise_plan(s) -> dict:
    """The noise calibration stream policy ``s`` implies, by the document, checked against the code."""
    from sealedsum.common import privacy

    k = s.max_records_per_producer or 1
    f = s.fraction_bits
    # Count-closed windows (window_records set): replace-one; time-closed: add/remove.
    replace = s.window_records is not None
    r = 2 if replace else 1
    if s.kind == "histogram":
        bounds, l1, l2 = None, r * k, k * (math.sqrt(2) if replace else 1.0)
    elif s.l2_bound is not None:
        scaled = s.l2_bound * (1 << f)
        bounds = None
        l1 = r * k * math.ceil(math.sqrt(s.dimension) * scaled + s.dimension / 2)
        l2 = r * k * (scaled + math.sqrt(s.dimension) / 2)
    else:
        lo = s.lower if isinstance(s.lower, tuple) else (s.lower,) * s.dimension
        hi = s.upper if isinstance(s.upper, tuple) else (s.upper,) * s.dimension
        if replace:  # a unit's values replaced: each coordinate moves by at most its span
            bounds = [round(b * (1 << f)) - round(a * (1 << f)) for a, b in zip(lo, hi)]
        else:
            bounds = [max(abs(round(a * (1 << f))), abs(round(b * (1 << f)))) for a, b in zip(lo, hi)]
        l1 = k * sum(bounds)
        l2 = k * math.sqrt(sum(b * b for b in bounds))
    c = 0.0 if s.kind == "histogram" else s.count_share
    count_k = None if s.kind == "histogram" else k
    if s.mechanism == "laplace":
        rho = None
        sum_scale = l1 / (s.epsilon * (1 - c))
        count_scale = count_k / (s.epsilon * c) if count_k else None
    else:
        rho = rho_of(s.epsilon, s.delta)
        sum_scale = l2 / math.sqrt(2 * rho * (1 - c))
        count_scale = count_k / math.sqrt(2 * rho * c) if count_k else None
    real = s.noise_plan()
    assert s.sensitivities()[0] == real.sensitivity_l1 == l1, (s.name, real.sensitivity_l1, l1)
    assert abs(real.sensitivity_l2 - l2) <= 1e-12 * l2
    assert abs(real.sum_scale - sum_scale) <= 1e-12 * sum_scale
    assert (real.count_scale is None) == (count_scale is None)
    if count_scale is not None:
        assert abs(real.count_scale - count_scale) <= 1e-12 * count_scale
    assert real.rho == rho
    assert privacy.max_releases(s.mechanism, s.epsilon, s.delta, s.budget_epsilon, s.budget_delta) \
        == total_releases(s), s.name
    return {
        "kind": s.kind,
        "neighbouring": "replace-one" if replace else "add/remove",
        "contributions": k,
        "coordinate_bounds_fixed": bounds,
        "sensitivity_l1": l1,
        "sensitivity_l2": real.sensitivity_l2,
        "count_sensitivity": count_k,
        "rho": real.rho,
        "sum_scale": real.sum_scale,
        "count_scale": real.count_scale,
        "sum_std": privacy.noise_std(s.mechanism, real.sum_scale),
        "count_std": None if real.count_scale is None else privacy.noise_std(s.mechanism, real.count_scale),
        "max_releases": total_releases(s),
    }


def build_policy(m: Shared, plans: dict) -> dict:
    """The canonical policy bytes and each stream's noise plan (``noise_plan``)."""
    return {
        "kind": "policy",
        "description": "EnclavePolicy.from_mapping(enclave, streams).to_bytes(): canonical JSON (sorted keys, "
                       "compact separators, ASCII), with defaults filled in and numbers normalised; plus the "
                       "noise calibration each stream implies (scales in fixed-point units for the sum, in "
                       "records for the count; count_scale null when the count is the sum of noised buckets) "
                       "and how many releases its budget allows.",
        "config_enclave": CONFIG_ENCLAVE,
        "config_streams": CONFIG_STREAMS,
        "canonical": m.policy_bytes.decode("ascii"),
        "canonical_hex": hexs(m.policy_bytes),
        "sha256": hexs(sha256(m.policy_bytes)),
        "noise_plans": plans,
    }


def build_code_digest() -> dict:
    """The code digest of the synthetic CODE_FILES (the other vectors take INPUT_CODE_DIGEST)."""
    from sealedsum.sidecar import measurement as measure

    h = hashlib.sha256(b"sealedsum/v1/code\x00")
    measured = sorted(CODE_FILES)
    digest_input = b"sealedsum/v1/code\x00"
    for module in measured:
        name, content = module.encode("ascii"), CODE_FILES[module]
        rec = u32(len(name)) + name + u64(len(content)) + content
        h.update(rec)
        digest_input += rec
    assert ["python"] + [d.lower() for d in measure.RUNTIME_DISTRIBUTIONS] == RUNTIME_LINE_KEYS
    h.update(RUNTIME_LINE.encode("ascii"))
    digest_input += RUNTIME_LINE.encode("ascii")
    assert sha256(digest_input) == h.digest()
    return {
        "kind": "code_digest",
        "description": "sidecar.measurement.digest_of(modules, runtime_line): the code digest of these "
                       "measured modules (dotted name -> source bytes, sorted by name as strings) and a fixed "
                       "runtime line. Which modules are measured (the enclave process's import closure) is "
                       "section 5's rule, checked by tests/unit/test_measurement.py.",
        "modules": [{"name": m, "content_hex": hexs(c)} for m, c in CODE_FILES.items()],
        "measured_order": measured,
        "runtime_line": RUNTIME_LINE,
        "runtime_line_keys": RUNTIME_LINE_KEYS,
        "digest_input_hex": hexs(digest_input),
        "code_digest": hexs(h.digest()),
    }


def build_measurement(m: Shared) -> dict:
    """The measurement and the report data, with their hash inputs."""
    from sealedsum.common import wire

    assert wire.measurement(m.code_digest, m.policy_bytes) == m.meas
    assert wire.report_data(m.bundle, m.policy_bytes, NONCE) == m.report_data
    return {
        "kind": "measurement",
        "description": "measurement = SHA-256(label || code_digest || SHA-256(policy)); report_data = "
                       "SHA-256(label || u32 len || keys || u32 len || policy || nonce). keys = keys.json "
                       "bundle_hex, policy = policy.json canonical_hex.",
        "code_digest": hexs(m.code_digest),
        "policy_hex": hexs(m.policy_bytes),
        "policy_sha256": hexs(sha256(m.policy_bytes)),
        "measurement_input_hex": hexs(m.measurement_input),
        "measurement": hexs(m.meas),
        "keys_hex": hexs(m.bundle),
        "nonce": hexs(NONCE),
        "report_data_input_hex": hexs(m.report_data_input),
        "report_data": hexs(m.report_data),
    }


def build_quote(m: Shared) -> dict:
    """The platform's SSQ\\x01 quote over the measurement and report data."""
    from sealedsum.common import signing, wire
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform

    signed_part = m.quote_signed_part
    q_input, q_sig = m.quote_signature
    quote = m.quote
    assert len(quote) == wire.Quote.SIZE == 140
    assert wire.Quote(m.meas, m.report_data, QUOTE_ISSUED_AT_MS, q_sig).to_bytes() == quote
    assert signing.signing_input(signing.QUOTE, signed_part) == q_input
    emulated = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(PLATFORM_ED25519_SEED), bytes(32),
                                clock_ms=lambda: QUOTE_ISSUED_AT_MS)
    assert emulated.quote(m.meas, m.report_data) == quote
    return {
        "kind": "quote",
        "description": "SSQ\\x01 quote: magic || measurement || report_data || u64 issued_at_ms || Ed25519 "
                       "signature by the platform over 'sealedsum/v1/quote' || 0x00 || the first 76 bytes.",
        "platform_ed25519_seed": hexs(PLATFORM_ED25519_SEED),
        "platform_public_key": hexs(m.platform_pub),
        "platform_public_key_base64": b64(m.platform_pub),
        "measurement": hexs(m.meas),
        "report_data": hexs(m.report_data),
        "issued_at_ms": QUOTE_ISSUED_AT_MS,
        "signed_part_hex": hexs(signed_part),
        "signing_input_hex": hexs(q_input),
        "signature": hexs(q_sig),
        "quote_hex": hexs(quote),
    }


# How enclave RPC requests are published (section 8), attestation and budget alike.
RPC_REQUEST_AMQP = {
    "exchange": f"{PREFIX}.attest",
    "routing_key": "request",
    "mandatory": True,
    "reply_to": "amq.rabbitmq.reply-to",
    "app_id": "sealedsum",
    "also_answered": {"exchange": "", "routing_key": f"{PREFIX}.attest"},
}


def build_attest_request() -> dict:
    from sealedsum.common import wire

    request = b"SSA\x01" + NONCE
    assert wire.AttestRequest(NONCE).to_bytes() == request
    return {
        "kind": "attest_request",
        "description": "SSA\\x01 || 32-byte nonce, published to the direct exchange PREFIX.attest with routing "
                       "key 'request', mandatory, with the AMQP properties below (correlation_id is random per "
                       "request; section 8). also_answered: the default exchange with routing key PREFIX.attest "
                       "reaches the same queue, and the enclave answers it alike; with no sidecar ever started "
                       "it gets a basic.return where the exchange gets a 404 channel close.",
        "nonce": hexs(NONCE),
        "request_hex": hexs(request),
        "amqp": RPC_REQUEST_AMQP | {"type": "attest-request"},
    }


def build_attest_reply(m: Shared) -> dict:
    """The SSD\\x01 reply, and the client's checks on altered copies of it."""
    from sealedsum.common import attestation, wire

    reply = m.reply_bytes()
    quote, meas, platform_pub = m.quote, m.meas, m.platform_pub
    assert wire.AttestReply(NONCE, m.code_digest, m.bundle, m.policy_bytes, quote).to_bytes() == reply
    now = SENT_AT_MS
    trust = {"platform_key_base64": b64(platform_pub), "measurements": [hexs(meas)],
             "max_quote_age_seconds": 300.0}
    other_pub = ed25519_public(ENCLAVE_ED25519_SEED)  # any key that is not the platform's
    tampered_policy = m.policy_bytes.replace(b'"epsilon":1.0', b'"epsilon":9.0')
    assert tampered_policy != m.policy_bytes
    other_code = sha256(b"other code")
    short_n = (m.n >> 8) | 1  # odd, exactly 1016 bits: a bundle that decodes, for a smaller key than attested
    short_bundle = m.bundle[:72] + u16(127) + short_n.to_bytes(127, "big")
    assert wire.KeyBundle.from_bytes(short_bundle).paillier_n.bit_length() == 1016
    # Each case: the reply, the nonce the client sent, its trust anchors, its clock, and
    # the error class (sealedsum.common.errors) verify_attestation must raise; null = accepted.
    cases = [
        {"name": "valid", "reply_hex": hexs(reply), "expect": None},
        {"name": "platform key not the pinned one (checked first, before the allow-list)",
         "reply_hex": hexs(reply), "trust": {"platform_key_base64": b64(other_pub), "measurements": [hexs(sha256(b"x"))]},
         "expect": "UntrustedPlatform"},
        {"name": "quote signature altered", "reply_hex": hexs(m.reply_bytes(q=quote[:-1] + bytes([quote[-1] ^ 1]))),
         "expect": "UntrustedPlatform"},
        {"name": "measurement not in the allow-list", "reply_hex": hexs(reply),
         "trust": {"measurements": [hexs(sha256(b"some other measurement"))]}, "expect": "UnknownMeasurement"},
        {"name": "policy altered after quoting", "reply_hex": hexs(m.reply_bytes(pol=tampered_policy)),
         "expect": "ReportDataMismatch"},
        {"name": "code digest does not produce the quoted measurement",
         "reply_hex": hexs(m.reply_bytes(code=other_code)), "expect": "ReportDataMismatch"},
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
        {"name": "quoted Paillier modulus of 1016 bits while the policy says paillier_bits = 1024",
         "reply_hex": hexs(m.requoted_reply(short_bundle)), "expect": "KeySizeMismatch"},
    ]
    trust_anchors = attestation.TrustAnchors(platform_pub, frozenset({meas}), 300.0)
    assert attestation.verify_attestation(reply, NONCE, trust_anchors, now).measurement == meas
    return {
        "kind": "attest_reply",
        "description": "SSD\\x01 || nonce || code_digest || u32 len || key bundle || u32 len || policy || "
                       "u32 len || quote; then the client's checks, in order, on altered copies.",
        "nonce": hexs(NONCE),
        "code_digest": hexs(m.code_digest),
        "keys_hex": hexs(m.bundle),
        "policy_hex": hexs(m.policy_bytes),
        "quote_hex": hexs(quote),
        "reply_hex": hexs(reply),
        "amqp": {"exchange": "", "routing_key": "<the request's reply_to>",
                 "correlation_id": "<the request's correlation_id>", "type": "reply", "app_id": "sealedsum"},
        "trust": trust,
        "now_ms": now,
        "expected": {
            "measurement": hexs(meas), "code_digest": hexs(m.code_digest), "issued_at_ms": QUOTE_ISSUED_AT_MS,
            "key_epoch": KEY_EPOCH, "paillier_n_bits": 1024, "streams": sorted(CONFIG_STREAMS),
        },
        "verification_cases": cases,
    }


def cbor(obj) -> bytes:
    """RFC 8949 encoding of the few types an attestation document uses, by hand: unsigned and
    negative integers, byte and text strings, arrays, maps (in the order given)."""
    def head(major: int, n: int) -> bytes:
        if n < 24:
            return bytes([major << 5 | n])
        for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
            if n < 1 << (8 * size):
                return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
        raise ValueError("too large")

    if isinstance(obj, int):
        return head(0, obj) if obj >= 0 else head(1, -1 - obj)
    if isinstance(obj, bytes):
        return head(2, len(obj)) + obj
    if isinstance(obj, str):
        return head(3, len(obj.encode())) + obj.encode()
    if isinstance(obj, list):
        return head(4, len(obj)) + b"".join(cbor(x) for x in obj)
    return head(5, len(obj)) + b"".join(cbor(k) + cbor(v) for k, v in obj.items())


# Private scalars of the test-only Nitro chain (root, intermediate, leaf), and its PCRs.
NITRO_SCALARS = tuple(int.from_bytes(hashlib.sha384(f"sealedsum/test-vector/nitro/{n}".encode()).digest(), "big")
                      for n in ("root", "intermediate", "leaf"))
NITRO_PCRS = (bytes([0xa1]) * 48, bytes([0xb2]) * 48, bytes([0xc3]) * 48)
NITRO_PROTECTED = bytes.fromhex("a1013822")


def build_nitro_reply(m: Shared) -> dict:
    """An SSD\\x01 reply carrying a Nitro attestation document (section 7.2) from a test-only
    P-384 chain, encoded by hand, and the client's checks on altered copies of it."""
    from cryptography.hazmat.primitives import hashes as h
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    from cryptography.hazmat.primitives.serialization import Encoding

    from sealedsum.common import attestation, config, wire
    from tests.nitro_chain import TestChain

    chain = TestChain.generate(QUOTE_ISSUED_AT_MS, NITRO_SCALARS)
    der = [c.public_bytes(Encoding.DER) for c in (chain.root, chain.intermediate, chain.leaf)]

    def document(report_data: bytes, pcrs=NITRO_PCRS) -> dict:
        return {"module_id": "i-0123456789abcdef0-enc0123456789abcdef", "digest": "SHA384",
                "timestamp": QUOTE_ISSUED_AT_MS, "pcrs": {i: (pcrs[i] if i < 3 else bytes(48)) for i in range(16)},
                "certificate": der[2], "cabundle": der[:2],
                "user_data": b"SSN\x01" + m.meas + report_data}

    def cose(doc: dict, protected: bytes = NITRO_PROTECTED) -> tuple[bytes, bytes, bytes]:
        payload = cbor(doc)
        to_sign = cbor(["Signature1", protected, b"", payload])
        r, s_ = decode_dss_signature(chain.leaf_key.sign(to_sign, ec.ECDSA(h.SHA384(), deterministic_signing=True)))
        signature = r.to_bytes(48, "big") + s_.to_bytes(48, "big")
        out = cbor([protected, {}, payload, signature])
        assert out == chain.sign(doc, protected=protected)  # the test chain's cbor2 encoding agrees
        return out, payload, to_sign

    quote, payload, to_sign = cose(document(m.report_data))
    assert to_sign[:18] == bytes.fromhex("846a5369676e61747572653144a101382240")  # as protocol 7.2 writes it
    reply = m.reply_bytes(q=quote)
    pem = chain.root.public_bytes(Encoding.PEM).decode()
    pcrs = [{"pcr0": hexs(NITRO_PCRS[0]), "pcr1": hexs(NITRO_PCRS[1]), "pcr2": hexs(NITRO_PCRS[2])}]
    trust = {"measurements": [hexs(m.meas)], "max_quote_age_seconds": 300.0,
             "nitro": {"root_certificate_pem": pem, "pcrs": pcrs, "allow_debug": False}}
    leaf_end_ms = int(chain.leaf.not_valid_after_utc.timestamp() * 1000)
    other_keys = wire.report_data(m.bundle[:8] + bytes(32) + m.bundle[40:], m.policy_bytes, NONCE)
    debug = cose(document(m.report_data, (bytes(48),) * 3))[0]
    cases = [
        {"name": "valid", "reply_hex": hexs(reply), "expect": None},
        {"name": "a client pinning only the emulated platform",
         "trust": {"platform_key_base64": b64(m.platform_pub), "nitro": None}, "reply_hex": hexs(reply),
         "expect": "UntrustedPlatform"},
        {"name": "signature altered", "reply_hex": hexs(m.reply_bytes(q=quote[:-1] + bytes([quote[-1] ^ 1]))),
         "expect": "QuoteSignatureError"},
        {"name": "another root pinned (the intermediate)",
         "trust": {"nitro": {"root_certificate_pem": chain.intermediate.public_bytes(Encoding.PEM).decode(),
                             "pcrs": pcrs}},
         "reply_hex": hexs(reply), "expect": "CertificateChainError"},
        {"name": "client clock past the signing certificate", "reply_hex": hexs(reply), "now_ms": leaf_end_ms + 1000,
         "trust": {"max_quote_age_seconds": 86400.0}, "expect": "CertificateExpired"},
        {"name": "protected header not exactly {1: -35}",
         "reply_hex": hexs(m.reply_bytes(q=cose(document(m.report_data), bytes.fromhex("a10126"))[0])),
         "expect": "MalformedQuote"},
        {"name": "debug-mode enclave (PCR0-2 zero)", "reply_hex": hexs(m.reply_bytes(q=debug)),
         "expect": "DebugEnclave"},
        {"name": "debug-mode enclave, allow_debug = true", "reply_hex": hexs(m.reply_bytes(q=debug)),
         "trust": {"nitro": {"root_certificate_pem": pem, "pcrs": [], "allow_debug": True}}, "expect": None},
        {"name": "PCRs not allow-listed", "reply_hex": hexs(reply),
         "trust": {"nitro": {"root_certificate_pem": pem, "pcrs": [dict(pcrs[0], pcr2=hexs(bytes(48)))]}},
         "expect": "UnknownMeasurement"},
        {"name": "user_data binds other keys", "reply_hex": hexs(m.reply_bytes(q=cose(document(other_keys))[0])),
         "expect": "ReportDataMismatch"},
        {"name": "reply answers another nonce", "reply_hex": hexs(reply), "client_nonce": hexs(bytes(32)),
         "expect": "NonceMismatch"},
        {"name": "document 301 s old", "reply_hex": hexs(reply), "now_ms": QUOTE_ISSUED_AT_MS + 301_000,
         "expect": "StaleQuote"},
    ]
    anchors = config.from_mapping({"trust": trust}, {}).trust
    assert attestation.verify_attestation(reply, NONCE, anchors, SENT_AT_MS).measurement == m.meas
    return {
        "kind": "nitro_reply",
        "description": "SSD\\x01 reply whose quote field is a Nitro attestation document (protocol section 7.2), "
                       "signed by a TEST-ONLY P-384 chain (root, intermediate, leaf; RFC 6979 signatures); trust "
                       "tables are [trust] as in a config file, a case's trust replacing the keys it names "
                       "(null: removed); then the client's checks on altered copies.",
        "root_certificate_pem": pem,
        "intermediate_der_hex": hexs(der[1]),
        "leaf_der_hex": hexs(der[2]),
        "user_data_hex": hexs(b"SSN\x01" + m.meas + m.report_data),
        "payload_hex": hexs(payload),
        "sig_structure_hex": hexs(to_sign),
        "quote_hex": hexs(quote),
        "reply_hex": hexs(reply),
        "nonce": hexs(NONCE),
        "trust": trust,
        "now_ms": SENT_AT_MS,
        "expected": {"measurement": hexs(m.meas), "issued_at_ms": QUOTE_ISSUED_AT_MS, "platform": "nitro",
                     "pcrs": [hexs(p) for p in NITRO_PCRS]},
        "verification_cases": cases,
    }


def build_envelope(m: Shared, stream, values, record_id, window, r_labels, producer_id=ANONYMOUS) -> dict:
    """An SSE\\x03 envelope of ``values`` for ``stream``, encrypted with the fixed r of ``r_labels``."""
    from phe import paillier
    from sealedsum.common import wire

    n, width = m.n, m.width
    s = m.policy.streams[stream]
    clipped, encoded = encode_values(s, values)
    assert s.encode(values)[0] == encoded
    assert len(r_labels) == len(encoded) == s.dimension
    ms = [v % n for v in encoded]  # negatives as n - |v|
    rs = [fixed_r(label, n) for label in r_labels]
    cts = [paillier_encrypt(n, pm, r) for pm, r in zip(ms, rs)]
    for pm, r, c in zip(ms, rs, cts):
        assert paillier.PaillierPublicKey(n).raw_encrypt(pm, r_value=r) == c
        assert paillier_decrypt(PAILLIER_P, PAILLIER_Q, c) == pm
    env = envelope(stream, record_id, KEY_EPOCH, SENT_AT_MS, window, width, cts, producer_id=producer_id, ms=ms)
    assert wire.Envelope(stream, record_id, KEY_EPOCH, SENT_AT_MS, window, width, tuple(cts),
                         producer_id, tuple(ms)).to_bytes() == env
    name_len = len(stream)
    return {
        "kind": "envelope",
        "description": "SSE\\x03 record envelope (the plaintext inside the sealed box). Values are clipped "
                       "and encoded by the stream's kind (box, L2 ball or one-hot histogram bucket); "
                       "ciphertexts are Paillier with g = n+1 under keys.json, c = (1 + n*m) * r^n mod n^2, "
                       "big-endian, ciphertext_width bytes each; then each ciphertext's plaintext m in [0, n) "
                       "(negative values as n - |v|), big-endian, ceil(ciphertext_width / 2) bytes each. "
                       "producer_id all zeros = anonymous.",
        "stream": stream,
        "stream_kind": s.kind,
        "record_id": hexs(record_id),
        "producer_id": hexs(producer_id),
        "key_epoch": KEY_EPOCH,
        "sent_at_ms": SENT_AT_MS,
        "window": window,
        "width": width,
        "values": values,
        "clipped": clipped,
        "clipped_count": s.encode(values)[1],
        "fraction_bits": s.fraction_bits,
        "encoded": encoded,
        "paillier_plaintexts": [hex(pm) for pm in ms],
        "r": [hex(r) for r in rs],
        "ciphertexts": [c.to_bytes(width, "big").hex() for c in cts],
        "offsets": {
            "magic": 0, "record_id": 4, "producer_id": 20, "key_epoch": 36, "sent_at_ms": 40, "window": 48,
            "stream_len": 56, "stream": 57, "count": 57 + name_len, "width": 59 + name_len,
            "ciphertexts": 61 + name_len, "plaintexts": 61 + name_len + len(cts) * width,
        },
        "envelope_hex": hexs(env),
    }


def build_sealed_record(m: Shared, env1: bytes) -> dict:
    """envelope_dim1's envelope ``env1`` in a sealed box, with the fixed ephemeral key."""
    epk, box_nonce, sealed = seal(m.x_pub, env1)
    assert SealedBox(PrivateKey(ENCLAVE_X25519_PRIVATE)).decrypt(sealed) == env1
    assert len(sealed) == len(env1) + 48
    return {
        "kind": "sealed_record",
        "description": "crypto_box_seal(envelope_dim1, enclave X25519 public key). The box was made with a "
                       "fixed ephemeral key so it is reproducible: sealed = epk || crypto_box(envelope, "
                       "nonce = BLAKE2b-192(epk || pk), pk, esk). Any other ephemeral key is as valid.",
        "recipient_private": hexs(ENCLAVE_X25519_PRIVATE),
        "recipient_public": hexs(m.x_pub),
        "ephemeral_private": hexs(EPHEMERAL_X25519_PRIVATE),
        "ephemeral_public": hexs(epk),
        "box_nonce": hexs(box_nonce),
        "envelope_hex": hexs(env1),
        "sealed_hex": hexs(sealed),
        "amqp": {"exchange": f"{PREFIX}.records", "routing_key": "record", "delivery_mode": 2,
                 "content_type": "application/octet-stream", "type": "record", "app_id": "sealedsum"},
    }


def build_record_batch(m: Shared, env1: bytes, env3: bytes, sealed: bytes) -> dict:
    """Two sealed records in one message: sealed_record's box ``sealed`` (of ``env1``) and ``env3``
    (envelope_dim3's) sealed with a third ephemeral key."""
    from sealedsum.common import wire

    _, _, sealed3 = seal(m.x_pub, env3, BATCH_EPHEMERAL_X25519_PRIVATE)
    batch = wire.RECORD_BATCH_MAGIC + struct.pack(">H", 2) + b"".join(
        struct.pack(">I", len(r)) + r for r in (sealed, sealed3))
    assert wire.RecordBatch((sealed, sealed3)).to_bytes() == batch
    return {
        "kind": "record_batch",
        "description": "SSB\\x01 record batch: several sealed records in one broker message, published with "
                       "AMQP type 'records'. u16 count, then per record u32 length || sealed box. The records "
                       "are sealed_record.json's box and a box of envelope_dim3 sealed with the ephemeral key "
                       "SHA-256('sealedsum test vector ephemeral key 3'). The enclave counts or dead-letters "
                       "each record on its own.",
        "max_records": wire.MAX_BATCH_RECORDS,
        "max_bytes": wire.MAX_BATCH_BYTES,
        "records_hex": [hexs(sealed), hexs(sealed3)],
        "envelopes_hex": [hexs(env1), hexs(env3)],
        "batch_hex": hexs(batch),
        "offsets": {"magic": 0, "count": 4, "first_length": 6, "first_record": 10,
                    "second_length": 10 + len(sealed), "second_record": 14 + len(sealed)},
        "amqp": {"exchange": f"{PREFIX}.records", "routing_key": "record", "delivery_mode": 2,
                 "content_type": "application/octet-stream", "type": "records", "app_id": "sealedsum"},
    }


def ledger_chains(policy) -> dict[str, dict]:
    """The privacy ledger of each stream of CHAINS, by stream, each charge with its budget object,
    checked against the real ledger."""
    from sealedsum.sidecar.enclave import ledger as ledger_mod

    chains = {}
    for stream, windows in CHAINS.items():
        s = policy.streams[stream]
        chain = ledger_chain(s, windows)
        real = ledger_mod.StreamLedger(s)
        assert real.head.hex() == chain["genesis"] == hexs(ledger_mod.genesis(stream))
        for charge in chain["charges"]:
            assert ledger_mod.charge_bytes(s, charge["window"], charge["seq"]) == charge["charge"].encode()
            real.charge(charge["window"])
            assert real.head.hex() == charge["head"] and real.releases == charge["seq"]
            charge["budget"] = budget_summary(s, charge["seq"], bytes.fromhex(charge["head"]))
            assert real.summary() == charge["budget"], (stream, real.summary(), charge["budget"])
            charge["allows_another"] = budget_fits(s, charge["seq"] + 1)
            assert real.allows() == charge["allows_another"]
        chains[stream] = chain
    assert [len(chains[s]["charges"]) for s in CHAINS] == [1, 2, 3]
    assert chains["visits"]["charges"][-1]["allows_another"] is False  # 0.1 * 4 > 0.3 (decimal)
    assert chains["visits"]["charges"][-1]["budget"]["spent_epsilon"] == 0.3  # not 0.30000000000000004
    return chains


def build_ledger(chains: dict[str, dict]) -> dict:
    return {
        "kind": "ledger",
        "description": "Per-stream privacy ledgers as hash chains: genesis = SHA-256('sealedsum/v1/ledger' 0x00 "
                       "|| stream); head_n = SHA-256('sealedsum/v1/ledger' 0x00 || head_(n-1) || charge_n), "
                       "charge_n = canonical JSON {delta, epsilon, mechanism, rho, seq, stream, window} of the "
                       "n-th release. 'budget' is the signed budget object after each charge; allows_another "
                       "says whether one more release fits the budget (false: the stream is exhausted).",
        "label_hex": hexs(LEDGER_LABEL),
        "chains": [chains[s] for s in CHAINS],
    }


def budget_of(chains: dict[str, dict], stream: str) -> dict:
    """The stream's budget object after its last charge in ``chains``."""
    return chains[stream]["charges"][-1]["budget"]


RESULT_AMQP = {"exchange": f"{PREFIX}.results", "delivery_mode": 2, "mandatory": True,
               "content_type": "application/octet-stream", "type": "result", "app_id": "sealedsum"}


def build_result(m: Shared, plans: dict, chains: dict[str, dict], stream, window, sum_fixed, count=None) -> dict:
    """A signed release of ``stream``'s ``window``, its last charge in ``chains``."""
    from sealedsum.common import results, wire

    s = m.policy.streams[stream]
    plan = plans[stream]
    sums = [v / (1 << s.fraction_bits) for v in sum_fixed]
    if s.kind == "histogram":
        assert count is None
        count = sum(sum_fixed)  # the buckets add up to the count
        mean = None
    else:
        mean = [v / count for v in sums] if count > 0 else None
    chain = chains[stream]
    assert chain["charges"][-1]["window"] == window
    mapping = {
        "aggregate": s.kind,
        "budget": budget_of(chains, stream),
        "closed_at_ms": CLOSED_AT_MS,
        "count": count,
        "count_noise_scale": plan["count_scale"],
        "delta": s.delta,
        "dimension": s.dimension,
        "epsilon": s.epsilon,
        "fraction_bits": s.fraction_bits,
        "key_epoch": KEY_EPOCH,
        "kind": "result",
        "mean": mean,
        "measurement": hexs(m.meas),
        "mechanism": s.mechanism,
        "rho": plan["rho"],
        "stream": stream,
        "sum": sums,
        "sum_fixed": sum_fixed,
        "sum_noise_scale": plan["sum_scale"],
        "window": window,
    }
    assert len(mapping) == 20
    payload = canonical_json(mapping)
    sig_input, sig, message = signed_message(payload)
    assert results.Release(**mapping).to_payload() == payload
    assert wire.SignedMessage(payload, sig).to_bytes() == message
    return {
        "kind": "result",
        "description": "SSS\\x01 || u32 len || JSON payload (kind 'result') || Ed25519 signature by the "
                       "enclave key over 'sealedsum/v1/result' || 0x00 || payload. Published to PREFIX.results "
                       "with routing key = stream. The noised numbers are made up (noise is random); the "
                       "budget object is the stream's ledger after this release (ledger.json).",
        "enclave_ed25519_public": hexs(m.ed_pub),
        "release": mapping,
        "payload": payload.decode("ascii"),
        "signing_input_hex": hexs(sig_input),
        "signature": hexs(sig),
        "message_hex": hexs(message),
        "amqp": dict(RESULT_AMQP, routing_key=stream),
    }


def build_budget_exhausted(m: Shared, chains: dict[str, dict]) -> dict:
    """The budget_exhausted notice after visits' third release, and a session that makes the core send it."""
    from sealedsum.common import results

    notice = {"at_ms": CLOSED_AT_MS, "budget": budget_of(chains, "visits"), "key_epoch": KEY_EPOCH,
              "kind": "budget_exhausted", "measurement": hexs(m.meas), "stream": "visits"}
    payload = canonical_json(notice)
    sig_input, sig, message = signed_message(payload)
    assert results.BudgetExhausted(**notice).to_payload() == payload
    assert notice["budget"]["remaining_releases"] == 0
    # The enclave core publishes exactly this after visits' third release: two records per
    # window from distinct producers, the last one at CLOSED_AT_MS.
    n = m.n
    core = enclave_core(m.policy, m.policy_bytes, m.code_digest, m.meas)
    session = []
    for i in range(6):
        ms = [1 if b == i % 3 else 0 for b in range(3)]
        cts = [paillier_encrypt(n, pm, fixed_r(f"notice/{i}/{b}", n)) for b, pm in enumerate(ms)]
        e = envelope("visits", sha256(b"notice record %d" % i)[:16], KEY_EPOCH, SENT_AT_MS, 0, m.width, cts,
                     producer_id=sha256(b"notice producer %d" % (i % 2))[:16], ms=ms)
        session.append({"body_hex": hexs(seal(m.x_pub, e)[2]),
                        "now_ms": CLOSED_AT_MS if i == 5 else SENT_AT_MS + 1000 + i})
        outcome = core.on_record(bytes.fromhex(session[-1]["body_hex"]), session[-1]["now_ms"])
        assert outcome.rejection is None
    assert [p.key for p in outcome.publish] == ["visits/3", "visits/budget_exhausted"]
    assert outcome.publish[1].body == message
    return {
        "kind": "budget_exhausted",
        "description": "The notice the enclave publishes once, on PREFIX.results with routing key = stream, "
                       "right after the release that leaves no room for another (here: visits' third "
                       "release, result_histogram.json; 0.1 + 0.1 + 0.1 = 0.3 fits budget_epsilon 0.3, a "
                       "fourth would not). Every later record of the stream is dead-lettered budget_exhausted.",
        "enclave_ed25519_public": hexs(m.ed_pub),
        "notice": notice,
        "payload": payload.decode("ascii"),
        "signing_input_hex": hexs(sig_input),
        "signature": hexs(sig),
        "message_hex": hexs(message),
        "amqp": dict(RESULT_AMQP, routing_key="visits"),
        "session": session,
        "session_description": "Six sealed visits records, two per window from two producers, fed to a fresh "
                               "enclave core: the last one closes window 3 and the core publishes the third "
                               "release and then exactly this notice.",
    }


def build_key_rotated(m: Shared) -> dict:
    """The key_rotated notice of a rotation from epoch 1 to epoch 2 at ROTATED_AT_MS."""
    from sealedsum.common import results

    rotated = {"at_ms": ROTATED_AT_MS, "key_epoch": KEY_EPOCH + 1, "kind": "key_rotated",
               "measurement": hexs(m.meas), "previous_epoch": KEY_EPOCH,
               "previous_retires_at_ms": ROTATED_AT_MS + DEFAULT_KEY_GRACE_MS}
    payload = canonical_json(rotated)
    sig_input, sig, message = signed_message(payload)
    assert results.KeyRotated(**rotated).to_payload() == payload
    # The enclave core signs exactly this when it rotates at ROTATED_AT_MS (the new epoch's
    # X25519 and Paillier keys are random, but the notice names none of them, and the
    # Ed25519 key, which signs it, is the one of keys.json: rotation keeps it).
    core = enclave_core(m.policy, m.policy_bytes, m.code_digest, m.meas)
    (announced,) = core.rotate(ROTATED_AT_MS).publish
    assert announced.body == message and announced.key == "key_rotated/2" and announced.stream == ""
    return {
        "kind": "key_rotated",
        "description": "The notice the enclave publishes on PREFIX.announce (fanout, routing key empty, "
                       "mandatory false) when it rotates from epoch 1 to epoch 2 at at_ms; epoch 1 drains "
                       "for the default key_grace_seconds (900) and is retired at previous_retires_at_ms. "
                       "Signed like every signed message, with the enclave's Ed25519 key, which rotation "
                       "keeps: a producer verifies it with the key it attested under epoch 1, and attests "
                       "again before its next record.",
        "enclave_ed25519_public": hexs(m.ed_pub),
        "notice": rotated,
        "payload": payload.decode("ascii"),
        "signing_input_hex": hexs(sig_input),
        "signature": hexs(sig),
        "message_hex": hexs(message),
        "amqp": {"exchange": f"{PREFIX}.announce", "routing_key": "", "delivery_mode": 2, "mandatory": False,
                 "content_type": "application/octet-stream", "type": "announce", "app_id": "sealedsum"},
    }


NOTICE_AMQP = {"exchange": f"{PREFIX}.notices", "routing_key": NOTICE_TOKEN, "delivery_mode": 2, "mandatory": False,
               "content_type": "application/octet-stream", "type": "notice", "app_id": "sealedsum"}


def build_notices(m: Shared, batch: bytes) -> dict:
    """What the producer of record_batch.json hears, with NOTICE_TOKEN in its notice header, when
    the enclave takes the batch at NOTICE_AT_MS: the first record (purchases) is counted, the
    second (wellbeing, whose budget is spent) refused budget_exhausted."""
    from sealedsum.common import results, wire

    refused = {"at_ms": NOTICE_AT_MS, "batch_index": 1, "detail": "stream 'wellbeing' has spent its privacy budget",
               "key_epoch": KEY_EPOCH, "kind": "rejected", "measurement": hexs(m.meas), "reason": "budget_exhausted",
               "record_id": hexs(RECORD_ID_3), "stream": "wellbeing", "token": NOTICE_TOKEN}
    counted = {"at_ms": NOTICE_AT_MS, "count": 1, "key_epoch": KEY_EPOCH, "kind": "counted",
               "measurement": hexs(m.meas), "records": {"purchases": [hexs(RECORD_ID_1)]}, "token": NOTICE_TOKEN}
    out = {}
    for name, fields, cls in (("rejected", refused, results.RecordRefused), ("counted", counted, results.RecordsCounted)):
        payload = canonical_json(fields)
        assert cls(**fields).to_payload() == payload
        sig_input, sig, message = signed_message(payload)
        out[name] = {"notice": fields, "payload": payload.decode("ascii"), "signing_input_hex": hexs(sig_input),
                     "signature": hexs(sig), "message_hex": hexs(message)}
    # The enclave core, fed the batch, gives exactly these: the runtime publishes the refusal with
    # the batch's dead letters and the receipt after the checkpoint that counts the first record.
    core = enclave_core(m.policy, m.policy_bytes, m.code_digest, m.meas)
    core.exhausted.add("wellbeing")  # as after its last release: all the refusal depends on
    parts = core.records_in(batch, wire.RECORD_BATCH_TYPE)
    first, second = core.accept_batch([core.open(p) for p in parts], NOTICE_AT_MS)
    assert first.rejection is None and first.record == ("purchases", RECORD_ID_1)
    assert second.rejection.reason.value == "budget_exhausted" and second.record == ("wellbeing", RECORD_ID_3)
    assert core.refusal_notice(NOTICE_TOKEN, second, 1, NOTICE_AT_MS).body.hex() == out["rejected"]["message_hex"]
    (receipt,) = core.receipts({NOTICE_TOKEN: [first.record]}, NOTICE_AT_MS)
    assert receipt.body.hex() == out["counted"]["message_hex"] and receipt.token == NOTICE_TOKEN
    return {
        "kind": "notices",
        "description": "The signed notices of docs/protocol.md section 11.6 for a producer whose record messages "
                       "carry the header x-sealedsum-notify = token: record_batch.json's batch, taken by the "
                       "enclave at at_ms, has its first record (purchases) counted and its second "
                       "(wellbeing, a stream that has spent its budget) dead-lettered budget_exhausted. Both notices "
                       "go to PREFIX.notices (direct) with routing key = token, mandatory false: the refusal "
                       "in the transaction of the batch's dead letters, the receipt after the checkpoint that "
                       "holds the counted record. Signed like every signed message (section 13.1).",
        "enclave_ed25519_public": hexs(m.ed_pub),
        "token": NOTICE_TOKEN,
        "record_header": {"x-sealedsum-notify": NOTICE_TOKEN},
        **out,
        "amqp": NOTICE_AMQP,
    }


def build_budget_request() -> dict:
    from sealedsum.common import wire

    budget_request = b"SSG\x01" + BUDGET_NONCE + bytes([len("wellbeing")]) + b"wellbeing"
    assert wire.BudgetRequest(BUDGET_NONCE, "wellbeing").to_bytes() == budget_request
    return {
        "kind": "budget_request",
        "description": "SSG\\x01 || 32-byte nonce || u8 stream-name length || stream name, published like an "
                       "attestation request (exchange PREFIX.attest, routing key 'request', direct reply-to). "
                       "The enclave answers with budget_report.json.",
        "nonce": hexs(BUDGET_NONCE),
        "stream": "wellbeing",
        "request_hex": hexs(budget_request),
        "amqp": RPC_REQUEST_AMQP | {"type": "budget-request"},
    }


def build_budget_report(m: Shared, chains: dict[str, dict], budget_request: bytes) -> dict:
    """The enclave's answer to ``budget_request`` (budget_request.json) after wellbeing's two releases."""
    from sealedsum.common import results
    from sealedsum.sidecar.enclave.ledger import StreamLedger

    report = {"at_ms": BUDGET_AT_MS, "budget": budget_of(chains, "wellbeing"), "exhausted": False,
              "key_epoch": KEY_EPOCH, "kind": "budget", "measurement": hexs(m.meas), "nonce": hexs(BUDGET_NONCE),
              "stream": "wellbeing"}
    payload = canonical_json(report)
    sig_input, sig, message = signed_message(payload)
    assert results.BudgetReport(**report).to_payload() == payload
    core = enclave_core(m.policy, m.policy_bytes, m.code_digest, m.meas)
    core.ledgers["wellbeing"] = StreamLedger(m.policy.streams["wellbeing"], 2,
                                             bytes.fromhex(chains["wellbeing"]["head"]))
    assert core.answer(budget_request, BUDGET_AT_MS) == message
    return {
        "kind": "budget_report",
        "description": "The enclave's reply to budget_request.json: a signed message (kind 'budget') with the "
                       "stream's ledger (two releases of wellbeing, ledger.json), the request's nonce in hex, "
                       "and whether the stream is exhausted. Sent to the request's reply_to with its "
                       "correlation_id, type 'reply'.",
        "enclave_ed25519_public": hexs(m.ed_pub),
        "report": report,
        "payload": payload.decode("ascii"),
        "signing_input_hex": hexs(sig_input),
        "signature": hexs(sig),
        "message_hex": hexs(message),
        "amqp": {"exchange": "", "routing_key": "<the request's reply_to>",
                 "correlation_id": "<the request's correlation_id>", "type": "reply", "app_id": "sealedsum"},
    }


def build_budget_group(code_digest: bytes) -> dict:
    """Budget groups (section 15.6): the policy with three groups, each group's charges with the
    budget object of the charged stream and which streams still have room, and the signed budget
    report of a stream in a mixed group, byte for byte as the enclave core answers it."""
    from sealedsum.common import results, wire
    from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
    from sealedsum.sidecar.enclave import ledger as ledger_mod

    policy_bytes = canonical_json(EXPECTED_GROUP_POLICY_MAPPING)
    policy = enclave_policy(CONFIG_ENCLAVE, GROUP_CONFIG_STREAMS, None, GROUP_CONFIG_GROUPS)
    assert policy.to_bytes() == policy_bytes, policy.to_bytes()
    assert policy_from_bytes(policy_bytes).to_bytes() == policy_bytes
    meas = sha256(b"sealedsum/v1/measurement\x00" + code_digest + sha256(policy_bytes))
    assert wire.measurement(code_digest, policy_bytes) == meas

    real = ledger_mod.ledgers(policy)
    counts = {name: 0 for name in policy.streams}
    heads = {name: sha256(LEDGER_LABEL + name.encode("ascii")) for name in policy.streams}
    charges = []
    for stream, window in GROUP_CHARGES:
        s = policy.streams[stream]
        counts[stream] += 1
        charge = charge_json(s, window, counts[stream])
        assert ledger_mod.charge_bytes(s, window, counts[stream]) == charge
        heads[stream] = sha256(LEDGER_LABEL + heads[stream] + charge)
        budget = group_budget_summary(policy, stream, counts, heads[stream])
        assert real[stream].allows()
        real[stream].charge(window)
        assert real[stream].summary() == budget, (stream, real[stream].summary(), budget)
        room = {name: group_fits(policy, s.budget_group, {**counts, name: counts[name] + 1})
                for name in group_members(policy, s.budget_group)}
        assert room == {name: real[name].allows() for name in room}
        charges.append({"stream": stream, "window": window, "seq": counts[stream], "charge": charge.decode("ascii"),
                        "head": hexs(heads[stream]), "budget": budget, "room_for_another": room})
    # What each group shows: app is full for both streams at exactly 0.5 (decimal), vitals has
    # room left, amounts ran out after its first release while the cheaper baskets go on.
    assert charges[2]["budget"]["spent_epsilon"] == 0.5 and charges[2]["room_for_another"] == {
        "swipes": False, "taps": False}
    assert all(charges[5]["room_for_another"].values())
    assert charges[8]["room_for_another"] == {"amounts": False, "baskets": True}
    assert real["solo"].summary()["remaining_releases"] == 2 and "budget_group" not in real["solo"].summary()

    # The signed budget report of baskets after its two releases.
    request = b"SSG\x01" + BUDGET_NONCE + bytes([len("baskets")]) + b"baskets"
    assert wire.BudgetRequest(BUDGET_NONCE, "baskets").to_bytes() == request
    report = {"at_ms": BUDGET_AT_MS, "budget": charges[8]["budget"], "exhausted": False, "key_epoch": KEY_EPOCH,
              "kind": "budget", "measurement": hexs(meas), "nonce": hexs(BUDGET_NONCE), "stream": "baskets"}
    payload = canonical_json(report)
    sig_input, sig, message = signed_message(payload)
    assert results.BudgetReport(**report).to_payload() == payload
    core = enclave_core(policy, policy_bytes, code_digest, meas)
    for name in policy.streams:  # the same ledgers as above, the group accounts kept
        core.ledgers[name].releases, core.ledgers[name].head = counts[name], heads[name]
    assert core.answer(request, BUDGET_AT_MS) == message
    return {
        "kind": "budget_group",
        "description": "Budget groups: streams that name budget_group share the budget of "
                       "[budget_groups.NAME]. Each stream keeps its own ledger chain (ledger.json's rules); "
                       "the group's spend composes all its streams' releases (Laplace only: exact decimal sum; "
                       "else zCDP with each Laplace release as eps^2/2, summed in sorted stream order). 'charges' "
                       "lists the releases in order with the charged stream's budget object and, per stream of "
                       "the group, whether one more release of it fits. 'budget_report' is the signed answer "
                       "to a budget request for baskets after the charges.",
        "config_enclave": CONFIG_ENCLAVE,
        "config_streams": GROUP_CONFIG_STREAMS,
        "config_budget_groups": GROUP_CONFIG_GROUPS,
        "canonical": policy_bytes.decode("ascii"),
        "canonical_hex": hexs(policy_bytes),
        "code_digest": hexs(code_digest),
        "measurement": hexs(meas),
        "charges": charges,
        "budget_report": {
            "enclave_ed25519_public": hexs(ed25519_public(ENCLAVE_ED25519_SEED)),
            "request_hex": hexs(request),
            "report": report,
            "payload": payload.decode("ascii"),
            "signing_input_hex": hexs(sig_input),
            "signature": hexs(sig),
            "message_hex": hexs(message),
        },
    }


def build_signed_envelope(policy, code_digest, x_pub, n, width) -> dict:
    """A record of alice's (RFC 8032 TEST 3 key): envelope, signature, SSI\\x01 wrapper, sealed box."""
    from sealedsum.common import signing, wire
    from sealedsum.common.policy_parse import enclave_policy

    seed = IDENTITY_SEEDS["alice"]
    public_key = ed25519_public(seed)
    assert public_key.hex() == RFC8032_PUBLIC["alice"]
    # RFC 8032 TEST 3 itself: the signature of the message af82.
    assert Ed25519PrivateKey.from_private_bytes(seed).sign(bytes.fromhex("af82")).hex() == (
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a")
    id_input, producer_id = producer_id_of(public_key)
    assert wire.producer_id_of(public_key) == producer_id

    s = policy.streams["purchases"]
    values = [17.25]
    _, encoded = encode_values(s, values)
    assert encoded == [1_130_496] and s.encode(values)[0] == encoded
    r = fixed_r("r/signed/0", n)
    cts = [paillier_encrypt(n, encoded[0], r)]
    env = envelope("purchases", RECORD_ID_S, KEY_EPOCH, SENT_AT_MS, 0, width, cts, producer_id=producer_id,
                   ms=encoded)
    assert wire.Envelope("purchases", RECORD_ID_S, KEY_EPOCH, SENT_AT_MS, 0, width, tuple(cts),
                         producer_id, tuple(encoded)).to_bytes() == env
    sig_input, sig = ed25519_sign(seed, ENVELOPE_SIGNATURE_LABEL, env)
    wrapped = b"SSI\x01" + public_key + sig + env
    assert wrapped == signed_envelope(seed, env) and len(wrapped) == 100 + len(env)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    assert signing.signing_input(signing.ENVELOPE, env) == sig_input
    assert signing.sign(key, signing.ENVELOPE, env) == sig
    assert wire.SignedEnvelope(public_key, sig, env).to_bytes() == wrapped
    assert wire.SignedEnvelope.from_bytes(wrapped) == wire.SignedEnvelope(public_key, sig, env)
    epk, box_nonce, sealed = seal(x_pub, wrapped, SIGNED_EPHEMERAL_X25519_PRIVATE)
    assert SealedBox(PrivateKey(ENCLAVE_X25519_PRIVATE)).decrypt(sealed) == wrapped
    assert len(sealed) == len(env) + 100 + 48

    # What the enclave core makes of it under three [identities] tables (None: no table).
    outcomes = [
        {"identities": {"enrolled": {"alice": b64(public_key)}}, "expect": "accepted"},
        {"identities": None, "expect": "unknown_producer"},
        {"identities": {"revoked": {"alice": b64(public_key)}}, "expect": "revoked_producer"},
    ]
    for case in outcomes:
        p = enclave_policy(CONFIG_ENCLAVE, CONFIG_STREAMS, case["identities"])
        core = enclave_core(p, p.to_bytes(), code_digest, sha256(p.to_bytes()))
        outcome = core.on_record(sealed, SENT_AT_MS + 1000)
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == case["expect"], (case, got)
        if got == "accepted":
            assert core.streams["purchases"].current.count == 1
    return {
        "kind": "signed_envelope",
        "description": "A record signed with a producer identity key (RFC 8032 TEST 3): the envelope (SSE\\x03, "
                       "producer_id = SHA-256('sealedsum/v1/producer-id' 0x00 || public key)[0:16]), the "
                       "Ed25519 signature over 'sealedsum/v1/envelope' 0x00 || envelope, the wrapper SSI\\x01 || "
                       "public key || signature || envelope, and crypto_box_seal(wrapper) made with a fixed "
                       "ephemeral key (SHA-256 of a label) as in sealed_record.json. outcomes: the reason the enclave core gives the sealed record "
                       "under the policy of policy.json with each [identities] table (null: none).",
        "identity_ed25519_seed": hexs(seed),
        "identity_public_key": hexs(public_key),
        "identity_public_key_base64": b64(public_key),
        "producer_id_input_hex": hexs(id_input),
        "producer_id": hexs(producer_id),
        "stream": "purchases",
        "record_id": hexs(RECORD_ID_S),
        "key_epoch": KEY_EPOCH,
        "sent_at_ms": SENT_AT_MS,
        "window": 0,
        "values": values,
        "encoded": encoded,
        "r": hex(r),
        "envelope_hex": hexs(env),
        "signing_input_hex": hexs(sig_input),
        "signature": hexs(sig),
        "offsets": {"magic": 0, "public_key": 4, "signature": 36, "envelope": 100},
        "signed_envelope_hex": hexs(wrapped),
        "recipient_public": hexs(x_pub),
        "ephemeral_private": hexs(SIGNED_EPHEMERAL_X25519_PRIVATE),
        "ephemeral_public": hexs(epk),
        "box_nonce": hexs(box_nonce),
        "sealed_hex": hexs(sealed),
        "outcomes": outcomes,
    }


def build_packed_envelope(code_digest, n, width) -> dict:
    """A packed stream: its policy bytes, the layout, two records packed and encrypted, the
    first one's envelope, and the window total of both as the enclave folds and unpacks it."""
    from phe import paillier
    from sealedsum.common import wire
    from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
    from sealedsum.sidecar.enclave.aggregate import Window
    from sealedsum.sidecar.enclave.keyring import Keyring
    from sealedsum.sidecar.enclave.release import decrypted_totals

    # The policy: the packing table is derived, and written into the canonical bytes.
    expected = {"version": 1, "enclave": EXPECTED_POLICY_MAPPING["enclave"],
                "streams": {"updates": EXPECTED_PACKED_STREAM}}
    policy_bytes = canonical_json(expected)
    policy = enclave_policy(CONFIG_ENCLAVE, PACKED_CONFIG_STREAMS)
    assert policy.to_bytes() == policy_bytes, policy.to_bytes()
    assert policy_from_bytes(policy_bytes).to_bytes() == policy_bytes
    meas = sha256(b"sealedsum/v1/measurement\x00" + code_digest + sha256(policy_bytes))
    assert wire.measurement(code_digest, policy_bytes) == meas
    s = policy.streams["updates"]

    # The layout, by section 10.2.
    d, f, bits = 40, 16, CONFIG_ENCLAVE["paillier_bits"]
    M = math.floor(1.0 * (1 << f) + 0.5)
    lo, hi = -M, M  # one record's range, every coordinate
    max_window = 1_000_000  # window_seconds only
    w = ((hi - lo) * max_window).bit_length()
    k = min(d, (bits - 3) // w)
    c = -(-d // k)
    layout = {"slot_bits": w, "slots_per_ciphertext": k, "ciphertexts_per_record": c}
    assert layout == EXPECTED_PACKED_STREAM["packing"] == s.packing.to_mapping()
    assert (hi - lo) * max_window < 1 << w and k * w <= bits - 3 and (1 << (k * w)) < n // 3

    records = []
    for index, values in enumerate(PACKED_VALUES):
        clipped, encoded = encode_values(s, values)
        assert s.encode(values)[0] == encoded
        slots = [v - lo for v in encoded]
        assert all(0 <= x <= hi - lo for x in slots)
        ms = [sum(slots[j * k + t] << (w * t) for t in range(min(k, d - j * k))) for j in range(c)]
        assert s.plaintexts(encoded) == ms
        rs = [fixed_r(f"r/updates/{index}/{j}", n) for j in range(c)]
        cts = [paillier_encrypt(n, m, r) for m, r in zip(ms, rs)]
        for m, r, ct in zip(ms, rs, cts):
            assert paillier.PaillierPublicKey(n).raw_encrypt(m, r_value=r) == ct
            assert paillier_decrypt(PAILLIER_P, PAILLIER_Q, ct) == m
        records.append({
            "values": values, "clipped": clipped, "clipped_count": s.encode(values)[1], "encoded": encoded,
            "slots": slots, "paillier_plaintexts": [hex(m) for m in ms], "r": [hex(r) for r in rs],
            "ciphertexts": [ct.to_bytes(width, "big").hex() for ct in cts],
        })
    assert records[0]["clipped_count"] == 0 and records[1]["clipped_count"] == 1

    # The first record's envelope: two ciphertexts for forty values.
    cts0 = [int(ct, 16) for ct in records[0]["ciphertexts"]]
    ms0 = [int(pm, 16) for pm in records[0]["paillier_plaintexts"]]
    env = envelope("updates", RECORD_ID_P, KEY_EPOCH, SENT_AT_MS, 0, width, cts0, producer_id=PRODUCER_A, ms=ms0)
    assert wire.Envelope("updates", RECORD_ID_P, KEY_EPOCH, SENT_AT_MS, 0, width, tuple(cts0),
                         PRODUCER_A, tuple(ms0)).to_bytes() == env

    # The window of both records: ciphertexts multiplied mod n^2, each total decrypted once,
    # the slots read back, count · lo added.
    cts1 = [int(ct, 16) for ct in records[1]["ciphertexts"]]
    totals_ct = [a * b % (n * n) for a, b in zip(cts0, cts1)]
    totals_m = [paillier_decrypt(PAILLIER_P, PAILLIER_Q, t) for t in totals_ct]
    assert totals_m == [int(a, 16) + int(b, 16) for a, b in
                        zip(records[0]["paillier_plaintexts"], records[1]["paillier_plaintexts"])]
    slot_sums = [(totals_m[i // k] >> (w * (i % k))) & ((1 << w) - 1) for i in range(d)]
    totals = [x + 2 * lo for x in slot_sums]
    assert totals == [a + b for a, b in zip(records[0]["encoded"], records[1]["encoded"])]
    keys = enclave_keys()
    window = Window("updates", 1)
    for cts in (cts0, cts1):
        window.fold(KEY_EPOCH, keys.paillier_public, tuple(cts), SENT_AT_MS)
    assert list(window.ciphertexts()) == totals_ct
    assert decrypted_totals(window, s, Keyring.single(keys)) == totals
    assert all(0 < int(t) < n * n for t in window.totals[KEY_EPOCH])  # folded ciphertexts, below n²

    name_len = len("updates")
    return {
        "kind": "packed_envelope",
        "description": "A packed stream (docs/protocol.md section 10.2): its configuration, canonical policy "
                       "bytes (with the derived packing table) and measurement (with the code digest of "
                       "code_digest.json); the layout; two records clipped, encoded, offset by lo = -M, packed "
                       "(coordinate i in slot i mod k of plaintext i div k, at bit slot_bits * (i mod k)) and "
                       "encrypted under keys.json with fixed r; the first record's envelope (producer id "
                       "non-zero, window 0); and the window total of both records: ciphertexts multiplied mod "
                       "n^2, decrypted once each, slots read back, count * lo added.",
        "config_enclave": CONFIG_ENCLAVE,
        "config_streams": PACKED_CONFIG_STREAMS,
        "policy_canonical": policy_bytes.decode("ascii"),
        "policy_sha256": hexs(sha256(policy_bytes)),
        "code_digest": hexs(code_digest),
        "measurement": hexs(meas),
        "stream": "updates",
        "layout": {**layout, "max_window_records": max_window, "record_range": [lo, hi], "lows": [lo] * d},
        "fraction_bits": f,
        "records": records,
        "envelope": {
            "record_id": hexs(RECORD_ID_P), "producer_id": hexs(PRODUCER_A), "key_epoch": KEY_EPOCH,
            "sent_at_ms": SENT_AT_MS, "window": 0, "width": width,
            "offsets": {"count": 57 + name_len, "width": 59 + name_len, "ciphertexts": 61 + name_len,
                        "plaintexts": 61 + name_len + len(cts0) * width},
            "envelope_hex": hexs(env),
        },
        "window_total": {
            "count": 2,
            "ciphertexts": [t.to_bytes(width, "big").hex() for t in totals_ct],
            "paillier_plaintexts": [hex(m) for m in totals_m],
            "slot_sums": slot_sums,
            "totals": totals,
        },
    }


def checkpoint(core, *, base: bool) -> dict:
    """The core's checkpoint (a base, or a journal entry), marked durable at once."""
    cp = core.checkpoint(base)
    core.checkpointed(cp)
    return cp.state


def enclave_core(policy, policy_bytes, code_digest, meas, state=None, now_ms=0):
    from sealedsum.sidecar.enclave.service import Enclave

    return Enclave(enclave_keys(), policy, policy_bytes, code_digest, meas, lambda rd: b"", state, now_ms)


def build_sealed_state(policy, policy_bytes, code_digest, meas, x_pub, n, width) -> dict:
    """The enclave's sealed state: a base and a journal, how they are sealed, and the rollback rule."""
    from sealedsum.sidecar.enclave_process import store as state_mod
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform

    sealing_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=SEALING_INFO + meas).derive(PLATFORM_ROOT_SECRET)
    platform = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(PLATFORM_ED25519_SEED), PLATFORM_ROOT_SECRET)
    assert platform.sealing_key(meas) == sealing_key
    assert state_mod.STATE_AAD == STATE_LABEL and state_mod.JOURNAL_AAD == JOURNAL_LABEL

    # The contents come from the enclave core itself (they are its own business, not a wire
    # format): two purchases records, a base; one more record, a journal entry.
    core = enclave_core(policy, policy_bytes, code_digest, meas)

    def record(i):
        e = envelope("purchases", sha256(b"state record %d" % i)[:16], KEY_EPOCH, SENT_AT_MS, 0, width,
                     [paillier_encrypt(n, 1000 * (i + 1), fixed_r(f"state/{i}", n))], ms=[1000 * (i + 1)])
        return seal(x_pub, e)[2]

    for i in range(2):
        assert core.on_record(record(i), SENT_AT_MS + 1000 + i).rejection is None
    base_state = checkpoint(core, base=True)
    assert core.on_record(record(2), SENT_AT_MS + 1002).rejection is None
    entry = checkpoint(core, base=False)
    restored = enclave_core(policy, policy_bytes, code_digest, meas, state=[base_state, entry])
    assert checkpoint(restored, base=True) == checkpoint(core, base=True)
    assert restored.streams["purchases"].current.count == 3
    assert restored.on_record(record(1), SENT_AT_MS + 2000).rejection.reason.value == "duplicate"

    def base_blob(version):
        plaintext = json.dumps({"version": version, "state": base_state}).encode()
        return plaintext, b"SSV\x01" + STATE_GCM_NONCE + AESGCM(sealing_key).encrypt(
            STATE_GCM_NONCE, plaintext, STATE_LABEL + meas)

    def chunk(version):
        plaintext = json.dumps(entry).encode()
        blob = b"SSV\x01" + STATE_GCM_NONCE + AESGCM(sealing_key).encrypt(
            STATE_GCM_NONCE, plaintext, JOURNAL_LABEL + u64(version) + meas)
        return plaintext, u64(version) + u32(len(blob)) + blob

    base_plain, base = base_blob(1)
    entry_plain, chunk2 = chunk(2)
    _, base_v2 = base_blob(2)
    _, chunk3 = chunk(3)
    files = {"base_v1": base, "base_v2": base_v2, "chunk_v2": chunk2, "chunk_v3": chunk3}
    # Each case: the files on disk (by name above, the journal as a concatenation of chunks,
    # "torn" = the last chunk without its final byte) and the platform counter before load.
    cases = [
        {"name": "base v1, journal [v2], counter 2", "base": "base_v1", "journal": ["chunk_v2"], "counter": 2,
         "expect": "loaded", "checkpoints": 2, "counter_after": 2, "journal_bytes_after": len(chunk2)},
        {"name": "counter one behind: the last checkpoint crashed before its counter step; load catches up",
         "base": "base_v1", "journal": ["chunk_v2"], "counter": 1, "expect": "loaded", "checkpoints": 2,
         "counter_after": 2, "journal_bytes_after": len(chunk2)},
        {"name": "counter ahead of the files: an older copy was put back", "base": "base_v1",
         "journal": ["chunk_v2"], "counter": 3, "expect": "RollbackDetected", "counter_after": 3},
        {"name": "files two versions ahead of the counter", "base": "base_v1", "journal": ["chunk_v2"],
         "counter": 0, "expect": "RollbackDetected", "counter_after": 0},
        {"name": "journal gone (rolled back to the base) although the counter says v2", "base": "base_v1",
         "journal": [], "counter": 2, "expect": "RollbackDetected", "counter_after": 2},
        {"name": "torn last chunk (crash mid-append, before its counter step): cut off", "base": "base_v1",
         "journal": ["chunk_v2"], "torn": True, "counter": 1, "expect": "loaded", "checkpoints": 1,
         "counter_after": 1, "journal_bytes_after": 0},
        {"name": "a journal chunk not newer than the base is left over from before the base: skipped",
         "base": "base_v2", "journal": ["chunk_v2"], "counter": 2, "expect": "loaded", "checkpoints": 1,
         "counter_after": 2, "journal_bytes_after": len(chunk2)},
        {"name": "the journal skips a version", "base": "base_v1", "journal": ["chunk_v3"], "counter": 1,
         "expect": "SealingError", "counter_after": 1},
        {"name": "base gone although the counter says one was written", "base": None, "journal": [],
         "counter": 1, "expect": "RollbackDetected", "counter_after": 1},
        {"name": "first start: no files, counter 0", "base": None, "journal": [], "counter": 0,
         "expect": "first_start", "counter_after": 0},
    ]
    for case in cases:
        run_state_case(case, files, sealing_key, meas, [base_state, entry])
    return {
        "kind": "sealed_state",
        "description": "STATE/enclave/<first 32 hex digits of the measurement>/: state.sealed (base) = SSV\\x01 || "
                       "12-byte nonce || AES-256-GCM(sealing_key, nonce, JSON {version, state}, aad = "
                       "'sealedsum/v1/sealed-state' 0x00 || measurement); state.journal = chunks u64 version || "
                       "u32 length || SSV\\x01 || nonce || AES-256-GCM(sealing_key, nonce, JSON entry, aad = "
                       "'sealedsum/v1/sealed-journal' 0x00 || u64 version || measurement). sealing_key = "
                       "HKDF-SHA256(platform root secret, no salt, info = 'sealedsum/v1/sealing-key' 0x00 || "
                       "measurement, 32). Versions are checked against the platform's monotonic counter "
                       "(rollback_cases). The reference code draws nonces at random; they are fixed here.",
        "platform_root_secret": hexs(PLATFORM_ROOT_SECRET),
        "measurement": hexs(meas),
        "sealing_key": hexs(sealing_key),
        "directory": f"enclave/{hexs(meas)[:32]}",
        "base_aad_hex": hexs(STATE_LABEL + meas),
        "chunk_v2_aad_hex": hexs(JOURNAL_LABEL + u64(2) + meas),
        "gcm_nonce": hexs(STATE_GCM_NONCE),
        "base_state": base_state,
        "journal_entry": entry,
        "base_plaintext_hex": hexs(base_plain),
        "entry_plaintext_hex": hexs(entry_plain),
        "files": {k: hexs(v) for k, v in files.items()},
        "counter_file": {"name": "platform.counters", "after_advance_to_1": json.dumps({hexs(meas): 1})},
        "rollback_cases": cases,
    }


def run_state_case(case, files, sealing_key, meas, checkpoints):
    import tempfile

    from sealedsum.common.errors import RollbackDetected, SealingError
    from sealedsum.sidecar.enclave_process.store import SealedStateStore

    class Counter:
        def __init__(self, value):
            self.value = value

        def read(self):
            return self.value

        def advance(self, value):
            self.value = max(self.value, value)
            return self.value

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if case["base"]:
            (directory / "state.sealed").write_bytes(files[case["base"]])
        journal = b"".join(files[c] for c in case["journal"])
        if case.get("torn"):
            journal = journal[:-1]
        if case["journal"]:
            (directory / "state.journal").write_bytes(journal)
        counter = Counter(case["counter"])
        store = SealedStateStore(directory, sealing_key, meas, counter)
        try:
            loaded = store.load()
            got = "first_start" if loaded is None else "loaded"
            if loaded is not None:
                assert loaded == checkpoints[:case["checkpoints"]], case["name"]
                assert store.journal_bytes == case["journal_bytes_after"], case["name"]
                if case["journal"]:
                    assert (directory / "state.journal").stat().st_size == case["journal_bytes_after"]
        except RollbackDetected:
            got = "RollbackDetected"
        except SealingError:
            got = "SealingError"
        assert got == case["expect"], (case["name"], got)
        assert counter.value == case["counter_after"], case["name"]


def build_rejections(policy, policy_bytes, bundle, x_pub, n, width, code_digest, meas, chains) -> dict:
    """Records and ticks fed in order to sealedsum.sidecar.enclave.service.Enclave, with the outcome
    each must have. Pins the reasons, the order of the checks, and what gets published."""
    purchases = policy.streams["purchases"]
    widest = max(s.dimension for s in policy.streams.values())
    size_limit = 48 + 100 + (4 + 16 + 16 + 4 + 8 + 8 + 1 + 64 + 2 + 2) + widest * (width + (width + 1) // 2)
    assert size_limit == 1425

    def ct(label: str, m: int = 1_000_000) -> int:
        return paillier_encrypt(n, m, fixed_r(label, n))

    def rid(i) -> bytes:
        return hashlib.sha256(f"record {i}".encode()).digest()[:16]

    def env(i, *, stream="purchases", epoch=KEY_EPOCH, sent=SENT_AT_MS, window=0, w=width, cts=None, ms=None,
            magic=b"SSE\x03", trailer=b"", producer=ANONYMOUS):
        """Record ``i``: by default one ciphertext of 1,000,000 stating it; with ``cts`` and no
        ``ms``, plaintexts 0 (for records refused before their plaintexts are looked at)."""
        if cts is None:
            cts, ms = [ct(f"rej/{i}")], [1_000_000]
        ms = [0] * len(cts) if ms is None else ms
        return envelope(stream, rid(i), epoch, sent, window, w, cts, magic, producer, ms=ms) + trailer

    def sealed(e: bytes, pk: bytes = x_pub) -> str:
        return seal(pk, e)[2].hex()

    def producer(name: str) -> bytes:
        return hashlib.sha256(f"producer {name}".encode()).digest()[:16]

    def visit(i, who, bucket, **kw):
        """A visits record: one-hot in ``bucket`` of three, from producer ``who``."""
        ms = [1 if b == bucket else 0 for b in range(3)]
        cts = [ct(f"rej/{i}/{b}", pm) for b, pm in enumerate(ms)]
        return env(i, stream="visits", cts=cts, ms=ms, producer=producer(who), **kw)

    other_pk = bindings.crypto_scalarmult_base(hashlib.sha256(b"another enclave").digest())
    good = sealed(env(1))
    flipped = bytearray(bytes.fromhex(good))
    flipped[60] ^= 0x01
    t0 = SENT_AT_MS + 1000
    steps = [
        {"note": "larger than 48 + 225 + widest dimension * (width + ceil(width / 2)) = 1425 bytes: refused "
                 "before opening",
         "body_hex": "00" * (size_limit + 1), "now_ms": t0, "expect": "too_large"},
        {"note": "exactly the size limit, but not a sealed box", "body_hex": "00" * size_limit,
         "now_ms": t0, "expect": "undecryptable"},
        {"note": "one bit flipped in a valid sealed box", "body_hex": bytes(flipped).hex(), "now_ms": t0,
         "expect": "undecryptable"},
        {"note": "sealed to another X25519 key", "body_hex": sealed(env(2), other_pk), "now_ms": t0,
         "expect": "undecryptable"},
        {"note": "envelope with version byte 2 (the layout before plaintexts)",
         "body_hex": sealed(env(3, magic=b"SSE\x02")), "now_ms": t0, "expect": "malformed"},
        {"note": "envelope with a trailing byte", "body_hex": sealed(env(4, trailer=b"\x00")), "now_ms": t0,
         "expect": "malformed"},
        {"note": "envelope in the old layout, without producer_id (16 bytes short)",
         "body_hex": sealed(env(1)[:20] + env(1)[36:]), "now_ms": t0, "expect": "malformed"},
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
        {"note": "plaintext 6,553,601 = 100 + 2^-16 in fixed point, stated as it is: above purchases' upper "
                 "bound 100 (6,553,600)", "body_hex": sealed(env(40, cts=[ct("rej/40", 6_553_601)], ms=[6_553_601])),
         "now_ms": t0, "expect": "out_of_range"},
        {"note": "plaintext n - 1, read as -1: below purchases' lower bound 0",
         "body_hex": sealed(env(41, cts=[ct("rej/41", n - 1)], ms=[n - 1])), "now_ms": t0, "expect": "out_of_range"},
        {"note": "plaintext floor(n / 2): where the signed reading of a total would wrap",
         "body_hex": sealed(env(42, cts=[ct("rej/42", n // 2)], ms=[n // 2])), "now_ms": t0, "expect": "out_of_range"},
        {"note": "out of range and expired: the plaintexts are checked before age",
         "body_hex": sealed(env(43, cts=[ct("rej/43", 6_553_601)], ms=[6_553_601])),
         "now_ms": SENT_AT_MS + 10_000_000, "expect": "out_of_range"},
        {"note": "states 1,000,000 (in range) but its ciphertext encrypts 6,553,601: refused by the check of "
                 "the counted records (their ciphertexts' product must decrypt to the sum of what they state)",
         "body_hex": sealed(env(44, cts=[ct("rej/44", 6_553_601)], ms=[1_000_000])), "now_ms": t0,
         "expect": "out_of_range"},
        {"note": "the same lie, expired: age is checked before ciphertexts are compared with plaintexts",
         "body_hex": sealed(env(45, cts=[ct("rej/45", 6_553_601)], ms=[1_000_000])),
         "now_ms": SENT_AT_MS + 10_000_000, "expect": "expired"},
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
                 "min_batch 10: withheld, nothing published, nothing charged)", "tick_ms": t0 + 30_000,
         "windows_withheld": 1},
        {"note": "window 1 is closed now", "body_hex": sealed(env(20, window=1)), "now_ms": t0 + 30_001,
         "expect": "late_window"},
        {"note": "a record counted in window 1, replayed with window 0: duplicate (ids are remembered "
                 "across windows for the replay horizon)", "body_hex": good, "now_ms": t0 + 30_002,
         "expect": "duplicate"},
        {"note": "explicit window 2 is open now", "body_hex": sealed(env(21, window=2)), "now_ms": t0 + 30_003,
         "expect": "accepted"},
    ]
    # Stream "visits": histogram, window_records = min_batch = 2, max_records_per_producer = 1,
    # epsilon 0.1 per release, budget_epsilon 0.3: three releases, then exhausted.
    t1 = t0 + 40_000
    v1 = sealed(visit(101, "p1", 0))
    v10 = sealed(visit(110, "p3", 2))
    visits_from = len(steps)
    steps += [
        {"note": "visits window 1: first record of producer p1", "body_hex": v1, "now_ms": t1,
         "expect": "accepted"},
        {"note": "two buckets set: not one-hot", "body_hex": sealed(env(
            118, stream="visits", cts=[ct("rej/118/0", 1), ct("rej/118/1", 1), ct("rej/118/2", 0)], ms=[1, 1, 0],
            producer=producer("p9"))), "now_ms": t1, "expect": "out_of_range"},
        {"note": "no bucket set: not one-hot", "body_hex": sealed(env(
            119, stream="visits", cts=[ct(f"rej/119/{b}", 0) for b in range(3)], ms=[0, 0, 0],
            producer=producer("p9"))), "now_ms": t1, "expect": "out_of_range"},
        {"note": "p1 again in the same window (max_records_per_producer = 1)",
         "body_hex": sealed(visit(102, "p1", 1)), "now_ms": t1 + 1, "expect": "contribution_limit"},
        {"note": "p1 again, explicit window 2: the window checks come before the contribution limit",
         "body_hex": sealed(visit(103, "p1", 1, window=2)), "now_ms": t1 + 2, "expect": "future_window"},
        {"note": "p1 again, expired: the age checks come before the contribution limit",
         "body_hex": sealed(visit(104, "p1", 1)), "now_ms": SENT_AT_MS + 900_001, "expect": "expired"},
        {"note": "p1's counted record again: duplicate, not contribution_limit", "body_hex": v1,
         "now_ms": t1 + 3, "expect": "duplicate"},
        {"note": "anonymous producer id (all zeros) where contributions are bounded per producer",
         "body_hex": sealed(visit(105, "p1", 1)[:20] + ANONYMOUS + visit(105, "p1", 1)[36:]),
         "now_ms": t1 + 4, "expect": "contribution_limit"},
        {"note": "producer p0 fills window 1: first release", "body_hex": sealed(visit(117, "p0", 1)),
         "now_ms": t1 + 4, "expect": "accepted",
         "publishes": [{"kind": "result", "window": 1}]},
        {"note": "visits window 2: p1 again (the bound is per window)", "body_hex": sealed(visit(106, "p1", 2)),
         "now_ms": t1 + 5, "expect": "accepted"},
        {"note": "p1, explicit window 1 (closed), also over its bound: late_window",
         "body_hex": sealed(visit(107, "p1", 2, window=1)), "now_ms": t1 + 6, "expect": "late_window"},
        {"note": "p2 fills window 2: second release", "body_hex": sealed(visit(108, "p2", 1)),
         "now_ms": t1 + 7, "expect": "accepted", "publishes": [{"kind": "result", "window": 2}]},
        {"note": "visits window 3", "body_hex": sealed(visit(109, "p1", 0)), "now_ms": t1 + 8,
         "expect": "accepted"},
        {"note": "third release: 3 x 0.1 = 0.3 fits budget_epsilon 0.3 exactly (decimal), a fourth would not: "
                 "the release and then the budget_exhausted notice are published",
         "body_hex": v10, "now_ms": t1 + 9, "expect": "accepted",
         "publishes": [{"kind": "result", "window": 3}, {"kind": "budget_exhausted"}]},
        {"note": "a new record for the exhausted stream", "body_hex": sealed(visit(111, "p4", 0)),
         "now_ms": t1 + 10, "expect": "budget_exhausted"},
        {"note": "a counted record again: duplicate is checked before budget_exhausted", "body_hex": v10,
         "now_ms": t1 + 11, "expect": "duplicate"},
        {"note": "expired and exhausted: budget_exhausted is checked before age",
         "body_hex": sealed(visit(112, "p5", 0)), "now_ms": SENT_AT_MS + 900_001, "expect": "budget_exhausted"},
        {"note": "from the future and exhausted", "body_hex": sealed(visit(113, "p5", 0)),
         "now_ms": SENT_AT_MS - 60_001, "expect": "budget_exhausted"},
        {"note": "explicit future window and exhausted: budget_exhausted is checked before the window",
         "body_hex": sealed(visit(114, "p5", 0, window=99)), "now_ms": t1 + 12, "expect": "budget_exhausted"},
        {"note": "over p1's contribution bound and exhausted", "body_hex": sealed(visit(115, "p1", 0)),
         "now_ms": t1 + 13, "expect": "budget_exhausted"},
        {"note": "the budget is per stream: purchases still accepts", "body_hex": sealed(env(116)),
         "now_ms": t1 + 14, "expect": "accepted"},
    ]
    for step in steps[visits_from:]:
        if "purchases" not in step["note"]:
            step["stream"] = "visits"
    visits_chain = chains["visits"]["charges"]
    for step in steps:
        for pub in step.get("publishes", ()):
            if pub["kind"] == "result":
                charge = visits_chain[pub["window"] - 1]
                pub.update(stream="visits", releases=charge["seq"], ledger_head=charge["head"])
            else:
                pub.update(stream="visits", releases=3, ledger_head=visits_chain[-1]["head"])
    assert purchases.window_seconds == 30
    final = {"windows_withheld": 1, "windows_released": 3, "decryptions": 9, "exhausted": ["visits"],
             "visits_budget": visits_chain[-1]["budget"]}
    # Cross-check with the real enclave core.
    run_rejections(steps, final, policy, policy_bytes, code_digest, meas)
    return {
        "kind": "rejections",
        "description": "A session fed, in order, to the enclave core (sidecar.enclave.service.Enclave) built "
                       "with keys.json and policy.json (measurement as in measurement.json): each record step "
                       "gives the x-sealedsum-reason the record must be dead-lettered with (or 'accepted'), "
                       "and what the step publishes on PREFIX.results (releases have random noise; only their "
                       "kind, window and ledger are pinned); tick steps close windows whose time is up. "
                       "Records are for stream 'purchases' (anonymous) unless noted; now_ms is the enclave's "
                       "clock. decryptions counts window totals decrypted (never a single record). Only "
                       "purchases' and visits' publications and withheld windows are pinned: 'sensor' is "
                       "time-closed (60 s), so each of its windows closes when the clock passes its end, empty, "
                       "charged, and is released or withheld by its noised count (random). "
                       "identity_session: a second session, on a fresh enclave core, under the same policy "
                       "with an [identities] table, for the identity checks.",
        "size_limit": size_limit,
        "steps": steps,
        "final": final,
        "identity_session": build_identity_session(x_pub, n, width, code_digest),
    }


def build_identity_session(x_pub, n, width, code_digest) -> dict:
    """Signed, forged, revoked, unknown and unsigned records under a policy that requires
    enrolled producers: the three identity reasons and where they sit in the order of checks."""
    from sealedsum.common import wire
    from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes

    keys = {name: ed25519_public(seed) for name, seed in IDENTITY_SEEDS.items()}
    for name, public in RFC8032_PUBLIC.items():
        assert keys[name].hex() == public, name
    ids = {name: producer_id_of(key)[1] for name, key in keys.items()}
    for name, key in keys.items():
        assert wire.producer_id_of(key) == ids[name]
    # As a TOML loader returns [identities] (carol before alice: the canonical form sorts).
    config = {"required": True, "enrolled": {"carol": b64(keys["carol"]), "alice": b64(keys["alice"])},
              "revoked": {"bob": b64(keys["bob"])}}
    expected = {"enrolled": {"alice": b64(keys["alice"]), "carol": b64(keys["carol"])}, "required": True,
                "revoked": {"bob": b64(keys["bob"])}}
    policy_bytes = canonical_json(dict(EXPECTED_POLICY_MAPPING, identities=expected))
    policy = enclave_policy(CONFIG_ENCLAVE, CONFIG_STREAMS, config)
    assert policy.to_bytes() == policy_bytes, (policy.to_bytes(), policy_bytes)
    assert policy_from_bytes(policy_bytes).to_bytes() == policy_bytes
    assert enclave_policy(CONFIG_ENCLAVE, CONFIG_STREAMS).to_bytes() == canonical_json(
        EXPECTED_POLICY_MAPPING)  # without the table, the bytes of policy.json
    meas = sha256(b"sealedsum/v1/measurement\x00" + code_digest + sha256(policy_bytes))
    assert wire.measurement(code_digest, policy_bytes) == meas

    def rid(i) -> bytes:
        return hashlib.sha256(f"identity record {i}".encode()).digest()[:16]

    def env(i, who=None, *, stream="purchases", epoch=KEY_EPOCH, producer=None, magic=b"SSE\x03", trailer=b"",
            cts=None, ms=None) -> bytes:
        """Record ``i`` with ``who``'s producer id (anonymous if None, or ``producer``)."""
        if cts is None:
            cts, ms = [paillier_encrypt(n, 1_000_000, fixed_r(f"id/{i}", n))], [1_000_000]
        pid = producer if producer is not None else ids[who] if who else ANONYMOUS
        return envelope(stream, rid(i), epoch, SENT_AT_MS, 0, width, cts, magic, pid, ms=ms) + trailer

    def signed(e: bytes, signer: str, key_of: str | None = None, label: bytes = ENVELOPE_SIGNATURE_LABEL) -> bytes:
        """``e`` signed by ``signer``; ``key_of`` puts another producer's public key in the wrapper."""
        return signed_envelope(IDENTITY_SEEDS[signer], e, keys[key_of or signer], label)

    def sealed(plaintext: bytes) -> str:
        return seal(x_pub, plaintext)[2].hex()

    def visit(i, who) -> bytes:
        ms = [1 if b == 0 else 0 for b in range(3)]
        cts = [paillier_encrypt(n, pm, fixed_r(f"id/{i}/{b}", n)) for b, pm in enumerate(ms)]
        return env(i, who, stream="visits", cts=cts, ms=ms)

    alice_1 = signed(env(20, "alice"), "alice")
    altered = bytearray(alice_1)
    altered[-1] ^= 0x01  # the last byte of the ciphertext, after signing
    t = SENT_AT_MS + 1000
    steps = [
        {"note": "alice's signed envelope cut to 99 bytes: shorter than magic, key and signature",
         "body_hex": sealed(alice_1[:99]), "expect": "malformed"},
        {"note": "a wrapper with nothing after the signature (100 bytes)", "body_hex": sealed(alice_1[:100]),
         "expect": "malformed"},
        {"note": "alice's valid signature over an envelope with a trailing byte: the envelope is decoded "
                 "before the signature is checked", "body_hex": sealed(signed(env(1, "alice", trailer=b"\x00"),
                                                                            "alice")), "expect": "malformed"},
        {"note": "a signed envelope inside a signed envelope: the signed bytes must be an SSE\\x03 envelope",
         "body_hex": sealed(signed(signed(env(2, "alice"), "alice"), "alice")), "expect": "malformed"},
        {"note": "magic SSI\\x02 (another wrapper version): neither a signed envelope nor an envelope",
         "body_hex": sealed(b"SSI\x02" + signed(env(3, "alice"), "alice")[4:]), "expect": "malformed"},
        {"note": "alice's key, mallory's signature, around an envelope of version 1: malformed is checked "
                 "before bad_signature", "body_hex": sealed(signed(env(4, "alice", magic=b"SSE\x01"), "mallory",
                                                                   "alice")), "expect": "malformed"},
        {"note": "signed by alice (enrolled) with alice's producer id: accepted",
         "body_hex": sealed(alice_1), "expect": "accepted"},
        {"note": "signed by carol (enrolled) with carol's producer id: accepted",
         "body_hex": sealed(signed(env(21, "carol"), "carol")), "expect": "accepted"},
        {"note": "alice's public key in the wrapper, the signature made by mallory",
         "body_hex": sealed(signed(env(5, "alice"), "mallory", "alice")), "expect": "bad_signature"},
        {"note": "alice's signature, then the envelope's last byte altered", "body_hex": sealed(bytes(altered)),
         "expect": "bad_signature"},
        {"note": "alice's valid signature over an envelope with carol's producer id",
         "body_hex": sealed(signed(env(6, producer=ids["carol"]), "alice")), "expect": "bad_signature"},
        {"note": "alice's valid signature over an envelope with the anonymous producer id (all zeros)",
         "body_hex": sealed(signed(env(7), "alice")), "expect": "bad_signature"},
        {"note": "alice's signature under the label sealedsum/v1/result instead of sealedsum/v1/envelope",
         "body_hex": sealed(signed(env(8, "alice"), "alice", label=b"sealedsum/v1/result")),
         "expect": "bad_signature"},
        {"note": "signed by bob (revoked) with bob's producer id", "body_hex": sealed(signed(env(9, "bob"), "bob")),
         "expect": "revoked_producer"},
        {"note": "signed by mallory (not in the policy) with mallory's producer id",
         "body_hex": sealed(signed(env(10, "mallory"), "mallory")), "expect": "unknown_producer"},
        {"note": "unsigned, anonymous producer id: identities.required is true",
         "body_hex": sealed(env(11)), "expect": "unknown_producer"},
        {"note": "unsigned, claiming alice's producer id", "body_hex": sealed(env(12, "alice")),
         "expect": "unknown_producer"},
        {"note": "alice's key, mallory's signature, for a stream not in the policy: bad_signature is checked "
                 "before unknown_stream", "body_hex": sealed(signed(env(13, "alice", stream="nosuch"), "mallory",
                                                                    "alice")), "expect": "bad_signature"},
        {"note": "bob's key, mallory's signature: bad_signature is checked before revoked_producer",
         "body_hex": sealed(signed(env(14, "bob"), "mallory", "bob")), "expect": "bad_signature"},
        {"note": "mallory's key, alice's signature: bad_signature is checked before unknown_producer",
         "body_hex": sealed(signed(env(15, "mallory"), "alice", "mallory")), "expect": "bad_signature"},
        {"note": "bob's valid signature, for a stream not in the policy: revoked_producer is checked before "
                 "unknown_stream", "body_hex": sealed(signed(env(16, "bob", stream="nosuch"), "bob")),
         "expect": "revoked_producer"},
        {"note": "mallory's valid signature, key epoch 2: unknown_producer is checked before wrong_epoch",
         "body_hex": sealed(signed(env(17, "mallory", epoch=2), "mallory")), "expect": "unknown_producer"},
        {"note": "unsigned, for a stream not in the policy: unknown_producer is checked before unknown_stream",
         "body_hex": sealed(env(18, stream="nosuch")), "expect": "unknown_producer"},
        {"note": "alice's valid signature, for a stream not in the policy: past the identity checks, the "
                 "others follow", "body_hex": sealed(signed(env(19, "alice", stream="nosuch"), "alice")),
         "expect": "unknown_stream"},
        {"note": "alice's accepted record again: it passes the identity checks, then is a duplicate",
         "body_hex": sealed(alice_1), "expect": "duplicate"},
        {"note": "the envelope of alice's accepted record, unsigned: unknown_producer is checked before duplicate",
         "body_hex": sealed(alice_1[100:]), "expect": "unknown_producer"},
        {"note": "visits: signed by alice, counted under alice's producer id",
         "body_hex": sealed(signed(visit(22, "alice"), "alice")), "expect": "accepted", "stream": "visits"},
        {"note": "visits: alice again in the same window (max_records_per_producer = 1 holds per signing key)",
         "body_hex": sealed(signed(visit(23, "alice"), "alice")), "expect": "contribution_limit",
         "stream": "visits"},
    ]
    steps = [{"note": step.pop("note"), "body_hex": step.pop("body_hex"), "now_ms": t + i, **step}
             for i, step in enumerate(steps)]
    final = {"accepted": 3, "open_window_counts": {"purchases": 2, "visits": 1},
             "visits_contributors": {hexs(ids["alice"]): 1}}
    run_identity_session(steps, final, policy, policy_bytes, code_digest, meas)
    return {
        "description": "Fed, in order, to a fresh enclave core built with keys.json and the policy of policy.json "
                       "plus the [identities] table config_identities (canonical bytes policy_canonical, "
                       "measurement with the code digest of code_digest.json). Producer identity keys are "
                       "Ed25519 seeds (alice: RFC 8032 TEST 3, as in signed_envelope.json; bob: TEST 1024; "
                       "mallory: TEST SHA(abc)); alice and carol are enrolled, bob revoked, mallory unknown. "
                       "Records are for stream 'purchases' unless noted, sent at sent_at_ms, window 0. "
                       "final: records accepted, each stream's open-window count, and the per-producer count "
                       "of visits' open window, keyed by producer id.",
        "config_identities": config,
        "identity_seeds": {name: hexs(seed) for name, seed in IDENTITY_SEEDS.items()},
        "public_keys": {name: hexs(key) for name, key in keys.items()},
        "producer_ids": {name: hexs(pid) for name, pid in ids.items()},
        "policy_canonical": policy_bytes.decode("ascii"),
        "policy_sha256": hexs(sha256(policy_bytes)),
        "measurement": hexs(meas),
        "sent_at_ms": SENT_AT_MS,
        "steps": steps,
        "final": final,
    }


def run_identity_session(steps, final, policy, policy_bytes, code_digest, meas):
    core = enclave_core(policy, policy_bytes, code_digest, meas)
    for i, step in enumerate(steps):
        outcome = core.on_record(bytes.fromhex(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step["note"], got, outcome.rejection)
        assert outcome.publish == ()
    assert core.stats.accepted == final["accepted"]
    for stream, count in final["open_window_counts"].items():
        assert core.streams[stream].current.count == count, stream
    assert {pid.hex(): k for pid, k in core.streams["visits"].current.contributors.items()} \
        == final["visits_contributors"]


def enclave_keys():
    from phe import paillier
    from sealedsum.sidecar.enclave.keyring import EnclaveKeys

    public = paillier.PaillierPublicKey(PAILLIER_P * PAILLIER_Q)
    return EnclaveKeys(KEY_EPOCH, PrivateKey(ENCLAVE_X25519_PRIVATE),
                       Ed25519PrivateKey.from_private_bytes(ENCLAVE_ED25519_SEED),
                       paillier.PaillierPrivateKey(public, PAILLIER_P, PAILLIER_Q))


# The session pins what these streams publish. "sensor" is time-closed (60 s): each of its
# windows closes when the session's clock passes its end, empty, charged, and is released or
# withheld by its noised count, so what it publishes is random and not pinned.
PINNED_STREAMS = ("purchases", "visits")


def run_rejections(steps, final, policy, policy_bytes, code_digest, meas):
    enclave = enclave_core(policy, policy_bytes, code_digest, meas)
    unpinned = []  # sensor's publications

    def pinned(publications):
        unpinned.extend(p for p in publications if p.stream not in PINNED_STREAMS)
        return [p for p in publications if p.stream in PINNED_STREAMS]

    def withheld() -> int:  # the pinned streams' withheld windows
        sensor = enclave.ledgers["sensor"].releases - sum(p.window is not None for p in unpinned)
        return enclave.stats.windows_withheld - sensor

    for i, step in enumerate(steps):
        if "tick_ms" in step:
            assert pinned(enclave.on_tick(step["tick_ms"]).publish) == []
            assert withheld() == step["windows_withheld"], (i, step.get("note"))
            continue
        outcome = enclave.on_record(bytes.fromhex(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step.get("note"), got)
        published = [{"kind": json.loads(p.message.to_payload())["kind"], "stream": p.stream,
                      "releases": p.message.budget["releases"], "ledger_head": p.message.budget["ledger_head"],
                      **({"window": p.window} if p.window is not None else {})} for p in pinned(outcome.publish)]
        assert published == step.get("publishes", []), (i, step.get("note"), published)
    assert enclave.ledgers["sensor"].releases >= 1  # its windows did close
    assert withheld() == final["windows_withheld"]
    assert enclave.stats.windows_released - sum(p.window is not None for p in unpinned) == final["windows_released"]
    assert enclave.keys.decryptions == final["decryptions"]
    assert sorted(enclave.exhausted) == final["exhausted"]
    assert enclave.ledgers["visits"].summary() == final["visits_budget"]


def main() -> int:
    import logging

    logging.getLogger("sealedsum").setLevel(logging.ERROR)  # the session's exhaustion warnings
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
