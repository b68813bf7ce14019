"""Known-answer vectors (``tests/vectors/*.json``) decoded with the real code.

The vectors are produced by ``tests/vectors/generate.py`` from fixed keys and fixed
randomness, with hand-written encoders that follow ``docs/protocol.md``. Here every
file is decoded, verified and re-encoded with ``sealedsum.common.wire`` and friends, so a change
to the wire format, the hashing, the signatures or the check order fails a test. The
last tests keep ``docs/protocol.md`` in step with the constants in the code.
"""

from __future__ import annotations

import ast
import dataclasses
import base64
import functools
import itertools
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl import bindings
from nacl.public import PrivateKey, SealedBox
from phe import paillier

from sealedsum.common import attestation, errors, fixedpoint, privacy, signing, wire
from sealedsum.common.errors import (
    AttestationError,
    InvalidMessage,
    InvalidResultSignature,
    RejectReason,
    UntrustedPlatform,
)
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
from sealedsum.common.results import (
    BUDGET_KIND,
    EXHAUSTED_KIND,
    RESULT_KIND,
    ROTATED_KIND,
    BudgetExhausted,
    BudgetReport,
    KeyRotated,
    Release,
    verify_key_rotated,
    verify_result,
    verify_signed,
)

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"

VECTOR_FILES = sorted(VECTORS.glob("*.json"))
REQUIRED_KINDS = {
    "key_bundle", "policy", "code_digest", "measurement", "quote", "attest_request", "attest_reply",
    "envelope", "sealed_record", "signed_envelope", "result", "rejections", "budget_request", "budget_report",
    "budget_exhausted", "ledger", "sealed_state", "packed_envelope", "record_batch", "key_rotated",
    "budget_group", "release_interval", "notices", "nitro_reply",
}
# The order of the enclave's record checks (docs/protocol.md section 11.1).
CHECK_ORDER = [
    "too_large", "undecryptable", "malformed", "bad_signature", "revoked_producer", "unknown_producer",
    # out_of_range twice: the plaintexts against the stream after bad_ciphertext, and last, for
    # the records counted together, that their ciphertexts encrypt them (protocol section 11.5).
    "unknown_stream", "wrong_epoch", "wrong_dimension", "bad_ciphertext", "out_of_range", "duplicate",
    "budget_exhausted",
    "expired", "from_future", "late_window", "future_window", "contribution_limit", "out_of_range",
]


# The code digest the measurement and everything after it take as input (docs/protocol.md
# section 5): not code_digest.json's, which pins the current rule on other modules.
INPUT_CODE_DIGEST = bytes.fromhex("0bba7218b1f83f17f2e93051a8c3194605a3fde648af658273b9d0409a88e3b2")

def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# -- shared fixed material ------------------------------------------------------------

def keys_vector() -> dict:
    return load("keys.json")


def paillier_private() -> paillier.PaillierPrivateKey:
    k = keys_vector()
    p, q = int(k["paillier_p"], 16), int(k["paillier_q"], 16)
    return paillier.PaillierPrivateKey(paillier.PaillierPublicKey(p * q), p, q)


def enclave_keys():
    from sealedsum.sidecar.enclave.keyring import EnclaveKeys

    k = keys_vector()
    return EnclaveKeys(k["epoch"], PrivateKey(h(k["x25519_private"])),
                       Ed25519PrivateKey.from_private_bytes(h(k["ed25519_seed"])), paillier_private())


def vector_policy(identities: dict | None = None) -> tuple[EnclavePolicy, bytes]:
    """policy.json's policy; with ``identities``, that [identities] table added (and its own bytes)."""
    p = load("policy.json")
    if identities is not None:
        policy = enclave_policy(p["config_enclave"], p["config_streams"], identities)
        return policy, policy.to_bytes()
    return enclave_policy(p["config_enclave"], p["config_streams"]), h(p["canonical_hex"])


def trust_from(spec: dict) -> attestation.TrustAnchors:
    return attestation.TrustAnchors(
        attestation.decode_platform_key(spec["platform_key_base64"]),
        frozenset(attestation.decode_measurement(m) for m in spec["measurements"]),
        float(spec.get("max_quote_age_seconds", attestation.DEFAULT_MAX_QUOTE_AGE_SECONDS)),
    )


def attested_enclave() -> attestation.AttestedEnclave:
    v = load("attest_reply.json")
    return attestation.verify_attestation(h(v["reply_hex"]), h(v["nonce"]), trust_from(v["trust"]), v["now_ms"])


# -- one checker per kind -----------------------------------------------------------------

def check_key_bundle(v: dict, tmp_path, monkeypatch) -> None:
    raw = h(v["bundle_hex"])
    bundle = wire.KeyBundle.from_bytes(raw)
    n = int(v["paillier_n"], 16)
    assert bundle.epoch == v["epoch"]
    assert bundle.x25519 == h(v["x25519_public"])
    assert bundle.ed25519 == h(v["ed25519_public"])
    assert bundle.paillier_n == n
    assert n.bit_length() == v["paillier_n_bits"]
    assert bundle.ciphertext_width == v["ciphertext_width"] == math.ceil((n * n).bit_length() / 8)
    assert bundle.to_bytes() == raw
    # Layout: magic, u32 epoch, 32 + 32 key bytes, u16 length of n, n.
    assert raw[:4] == wire.KEYS_MAGIC and int.from_bytes(raw[4:8], "big") == v["epoch"]
    assert int.from_bytes(raw[72:74], "big") == len(raw) - 74 == (n.bit_length() + 7) // 8
    # The private material is what the public keys say.
    assert int(v["paillier_p"], 16) * int(v["paillier_q"], 16) == n
    assert bytes(PrivateKey(h(v["x25519_private"])).public_key) == bundle.x25519
    seed_key = Ed25519PrivateKey.from_private_bytes(h(v["ed25519_seed"]))
    assert seed_key.public_key().public_bytes_raw() == bundle.ed25519
    assert enclave_keys().bundle_bytes == raw
    # The decoder is strict.
    for bad in (raw[:-1], raw + b"\x00", b"SSK\x02" + raw[4:], raw[:-1] + bytes([raw[-1] ^ 1])):
        with pytest.raises(InvalidMessage):
            wire.KeyBundle.from_bytes(bad)


def check_policy(v: dict, tmp_path, monkeypatch) -> None:
    canonical = h(v["canonical_hex"])
    assert canonical == v["canonical"].encode("ascii")
    policy = enclave_policy(v["config_enclave"], v["config_streams"])
    assert policy.to_bytes() == canonical
    assert policy_from_bytes(canonical).to_bytes() == canonical
    assert hashlib.sha256(canonical).hexdigest() == v["sha256"]
    # Canonical form: sorted keys, no whitespace, ASCII only.
    assert json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":")).encode() == canonical
    assert b" " not in canonical and max(canonical) < 0x80
    assert set(v["noise_plans"]) == set(policy.streams)
    assert {s.kind for s in policy.streams.values()} == {"sum", "mean", "histogram", "vector"}
    for name, expected in v["noise_plans"].items():
        stream = policy.streams[name]
        plan = stream.noise_plan()
        k = expected["contributions"]
        assert stream.kind == expected["kind"] and stream.contributions == k
        if expected["coordinate_bounds_fixed"] is not None:
            # Box bounds, per coordinate: add/remove (time-closed windows) max(|round(lower·2^f)|,
            # |round(upper·2^f)|); replace-one (count-closed) round(upper·2^f) - round(lower·2^f).
            box = zip(*(b if isinstance(b, tuple) else (b,) * stream.dimension for b in (stream.lower, stream.upper)))
            scale = 1 << stream.fraction_bits
            bound = ((lambda lo, hi: round(hi * scale) - round(lo * scale)) if stream.count_closed
                     else (lambda lo, hi: privacy.fixed_bound(lo, hi, stream.fraction_bits)))
            assert expected["neighbouring"] == stream.neighbouring
            assert [bound(lo, hi) for lo, hi in box] == expected["coordinate_bounds_fixed"]
            assert expected["sensitivity_l1"] == k * sum(expected["coordinate_bounds_fixed"])
        assert stream.sensitivities() == (plan.sensitivity_l1, plan.sensitivity_l2)
        assert plan.sensitivity_l1 == expected["sensitivity_l1"]
        assert plan.sensitivity_l2 == pytest.approx(expected["sensitivity_l2"], rel=1e-12)
        if expected["rho"] is None:
            assert plan.rho is None and plan.mechanism == privacy.Mechanism.LAPLACE
        else:
            assert plan.rho == pytest.approx(expected["rho"], rel=1e-12)
            # ε = ρ + 2·sqrt(ρ·ln(1/δ)) holds for the ρ chosen.
            assert privacy.epsilon_from_rho_delta(plan.rho, stream.delta) == pytest.approx(stream.epsilon, rel=1e-12)
        assert plan.sum_scale == pytest.approx(expected["sum_scale"], rel=1e-12)
        assert privacy.noise_std(plan.mechanism, plan.sum_scale) == pytest.approx(expected["sum_std"], rel=1e-12)
        if expected["count_scale"] is None:
            # A histogram's count is the sum of its noised buckets: no count noise, no count budget.
            assert stream.kind == "histogram" and plan.count_scale is None and plan.count_share == 0.0
            assert expected["count_sensitivity"] is None
        else:
            assert plan.count_sensitivity == expected["count_sensitivity"] == k
            assert plan.count_scale == pytest.approx(expected["count_scale"], rel=1e-12)
            assert privacy.noise_std(plan.mechanism, plan.count_scale) == pytest.approx(expected["count_std"], rel=1e-12)
        assert privacy.max_releases(stream.mechanism, stream.epsilon, stream.delta, stream.budget_epsilon,
                                    stream.budget_delta) == expected["max_releases"]


def check_code_digest(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar import measurement as measure

    modules = {m["name"]: h(m["content_hex"]) for m in v["modules"]}
    assert sorted(modules) == v["measured_order"]
    assert measure.digest_of(modules, v["runtime_line"]) == h(v["code_digest"])
    assert hashlib.sha256(h(v["digest_input_hex"])).digest() == h(v["code_digest"])
    assert h(v["digest_input_hex"]).startswith(measure.CODE_LABEL)
    assert h(v["digest_input_hex"]).endswith(v["runtime_line"].encode("ascii"))


def check_runtime_line_format(v: dict) -> None:
    from sealedsum.sidecar import measurement as measure

    line = measure.runtime_line()
    keys = [part.split("=", 1)[0] for part in line.split(";")]
    assert keys == v["runtime_line_keys"]
    assert re.fullmatch(r"python=\d+\.\d+\.\d+", line.split(";")[0])


def check_measurement(v: dict, tmp_path, monkeypatch) -> None:
    code, policy, keys, nonce = h(v["code_digest"]), h(v["policy_hex"]), h(v["keys_hex"]), h(v["nonce"])
    assert hashlib.sha256(policy).digest() == h(v["policy_sha256"])
    assert h(v["measurement_input_hex"]) == wire.MEASUREMENT_LABEL + code + hashlib.sha256(policy).digest()
    assert wire.measurement(code, policy) == h(v["measurement"])
    assert hashlib.sha256(h(v["measurement_input_hex"])).digest() == h(v["measurement"])
    framed = len(keys).to_bytes(4, "big") + keys + len(policy).to_bytes(4, "big") + policy
    assert h(v["report_data_input_hex"]) == wire.REPORT_DATA_LABEL + framed + nonce
    assert wire.report_data(keys, policy, nonce) == h(v["report_data"])
    # Every input matters.
    assert wire.report_data(keys, policy, bytes(32)) != h(v["report_data"])
    assert wire.measurement(code, policy + b" ") != h(v["measurement"])
    # The inputs are the other vectors' outputs.
    assert keys == h(keys_vector()["bundle_hex"])
    assert policy == h(load("policy.json")["canonical_hex"])
    # The input code digest is section 5's earlier rule's, kept as is (any 32 bytes serve here).
    assert code == INPUT_CODE_DIGEST != h(load("code_digest.json")["code_digest"])


def check_quote(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform

    raw = h(v["quote_hex"])
    quote = wire.Quote.from_bytes(raw)
    assert len(raw) == wire.Quote.SIZE == 140
    assert quote.measurement == h(v["measurement"])
    assert quote.report_data == h(v["report_data"])
    assert quote.issued_at_ms == v["issued_at_ms"]
    assert quote.signature == h(v["signature"])
    assert quote.signed_part() == h(v["signed_part_hex"]) == raw[:76]
    assert quote.to_bytes() == raw
    assert signing.signing_input(signing.QUOTE, quote.signed_part()) == h(v["signing_input_hex"])
    assert h(v["signing_input_hex"]) == b"sealedsum/v1/quote\x00" + quote.signed_part()
    platform_key = h(v["platform_public_key"])
    assert attestation.decode_platform_key(v["platform_public_key_base64"]) == platform_key
    signing.verify(platform_key, signing.QUOTE, quote.signed_part(), quote.signature,
                   error=UntrustedPlatform, what="quote")
    with pytest.raises(UntrustedPlatform):
        signing.verify(platform_key, signing.RESULT, quote.signed_part(), quote.signature,
                       error=UntrustedPlatform, what="quote")  # another label does not verify
    with pytest.raises(UntrustedPlatform):
        bad = bytearray(quote.signed_part())
        bad[-1] ^= 1
        signing.verify(platform_key, signing.QUOTE, bytes(bad), quote.signature, error=UntrustedPlatform, what="quote")
    # The emulated platform makes exactly this quote (Ed25519 is deterministic).
    seed = Ed25519PrivateKey.from_private_bytes(h(v["platform_ed25519_seed"]))
    platform = EmulatedPlatform(seed, bytes(32), clock_ms=lambda: v["issued_at_ms"])
    assert platform.public_key() == platform_key
    assert platform.quote(quote.measurement, quote.report_data) == raw
    for bad in (raw[:-1], raw + b"\x00", b"SSQ\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.Quote.from_bytes(bad)


class _RpcChannel:
    """A channel that records the request the client publishes and answers it at once."""

    def __init__(self) -> None:
        self.published: list[dict] = []
        self.is_open = True
        self._on_reply = None

    def add_on_return_callback(self, callback) -> None:
        pass

    def basic_consume(self, queue, callback, auto_ack=False):
        from sealedsum.common import amqp
        assert queue == amqp.DIRECT_REPLY_TO and auto_ack
        self._on_reply = callback

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False):
        self.published.append({"exchange": exchange, "routing_key": routing_key, "body": body,
                               "properties": properties, "mandatory": mandatory})
        self._on_reply(self, None, type("P", (), {"correlation_id": properties.correlation_id})(), b"reply")

    def close(self) -> None:
        self.is_open = False


def check_rpc_publication(spec: dict, request: bytes, monkeypatch) -> None:
    """Section 8: where a request goes, as the vector states it and as the reference client
    publishes it; the default-exchange path reaches the same queue (the enclave answers both)."""
    from sealedsum.common import amqp, topology
    from sealedsum.common.config import BrokerSettings, Topology

    t = Topology("sealedsum")
    assert (spec["exchange"], spec["routing_key"]) == (t.attest_exchange, topology.ATTEST_ROUTING_KEY)
    assert spec["also_answered"] == {"exchange": "", "routing_key": t.attest_queue}
    assert (spec["reply_to"], spec["app_id"], spec["mandatory"]) == (amqp.DIRECT_REPLY_TO, amqp.APP_ID, True)
    declared = topology.declarations(t, "quorum", 1)
    assert topology.Binding(t.attest_queue, t.attest_exchange, spec["routing_key"]) in declared
    channel = _RpcChannel()
    connection = type("C", (), {"channel": lambda self: channel, "process_data_events": lambda self, **_: None})()
    monkeypatch.setattr(amqp, "connection_user", lambda _connection: "alice")
    assert amqp.call_enclave(connection, BrokerSettings(), request, spec["type"]) == b"reply"
    (sent,) = channel.published
    assert (sent["exchange"], sent["routing_key"], sent["body"], sent["mandatory"]) == \
        (spec["exchange"], spec["routing_key"], request, spec["mandatory"])
    props = sent["properties"]
    assert (props.reply_to, props.type, props.app_id, props.user_id, props.expiration) == \
        (spec["reply_to"], spec["type"], spec["app_id"], "alice", "10000")
    assert props.delivery_mode is None and len(props.correlation_id) == 32


def check_attest_request(v: dict, tmp_path, monkeypatch) -> None:
    raw = h(v["request_hex"])
    assert wire.AttestRequest.from_bytes(raw).nonce == h(v["nonce"])
    assert wire.AttestRequest(h(v["nonce"])).to_bytes() == raw
    assert len(raw) == 4 + wire.NONCE_SIZE
    for bad in (raw[:-1], raw + b"\x00", b"SSA\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.AttestRequest.from_bytes(bad)
    check_rpc_publication(v["amqp"], raw, monkeypatch)
    # The enclave core answers this request with exactly the reply vector.
    from sealedsum.sidecar.enclave.service import Enclave
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform

    q = load("quote.json")
    reply = load("attest_reply.json")
    policy, policy_bytes = vector_policy()
    platform = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(h(q["platform_ed25519_seed"])), bytes(32),
                                clock_ms=lambda: q["issued_at_ms"])
    measurement = h(q["measurement"])
    enclave = Enclave(enclave_keys(), policy, policy_bytes, h(reply["code_digest"]), measurement,
                      lambda rd: platform.quote(measurement, rd))
    assert enclave.attest(raw) == h(reply["reply_hex"])
    assert enclave.answer(raw, 0) == h(reply["reply_hex"])  # the RPC dispatches on the magic


def check_nitro_reply(v: dict, tmp_path, monkeypatch) -> None:
    """A Nitro reply: each verification case raises exactly its error (section 9), and the
    document's bytes are what section 7.2 says."""
    from sealedsum.common import config, nitro

    raw = h(v["reply_hex"])
    quote = wire.AttestReply.from_bytes(raw).quote
    assert quote == h(v["quote_hex"]) and wire.quote_format(quote) == wire.NITRO
    signed = nitro.decode(quote)
    assert signed.payload == h(v["payload_hex"]) and signed.sig_structure() == h(v["sig_structure_hex"])
    assert signed.document.user_data == h(v["user_data_hex"])
    assert signed.document.cabundle[1] == h(v["intermediate_der_hex"]) and signed.document.certificate == h(v["leaf_der_hex"])
    binding = wire.NitroBinding.from_bytes(signed.document.user_data)
    assert binding.measurement.hex() == v["expected"]["measurement"]

    def anchors(case: dict):
        spec = {k: val for k, val in dict(v["trust"], **case.get("trust", {})).items() if val is not None}
        if "platform_key_base64" in spec:
            spec["platform_key"] = spec.pop("platform_key_base64")
        return config.from_mapping({"trust": spec}, {}).trust

    seen = set()
    for case in v["verification_cases"]:
        args = (h(case["reply_hex"]), h(case.get("client_nonce", v["nonce"])), anchors(case),
                case.get("now_ms", v["now_ms"]))
        if case["expect"] is None:
            enclave = attestation.verify_attestation(*args)
            assert enclave.platform == "nitro" and enclave.issued_at_ms == v["expected"]["issued_at_ms"], case["name"]
            continue
        error = getattr(errors, case["expect"])
        with pytest.raises(AttestationError) as info:
            attestation.verify_attestation(*args)
        assert type(info.value) is error, (case["name"], type(info.value).__name__)
        seen.add(case["expect"])
    assert {"QuoteSignatureError", "CertificateChainError", "CertificateExpired", "MalformedQuote", "DebugEnclave",
            "UnknownMeasurement", "ReportDataMismatch", "NonceMismatch", "StaleQuote", "UntrustedPlatform"} <= seen
    valid = attestation.verify_attestation(raw, h(v["nonce"]), anchors({}), v["now_ms"])
    assert [p.hex() for p in valid.pcrs] == v["expected"]["pcrs"]


def check_attest_reply(v: dict, tmp_path, monkeypatch) -> None:
    raw = h(v["reply_hex"])
    parsed = wire.AttestReply.from_bytes(raw)
    assert parsed.nonce == h(v["nonce"])
    assert parsed.code_digest == h(v["code_digest"])
    assert parsed.keys == h(v["keys_hex"])
    assert parsed.policy == h(v["policy_hex"])
    assert parsed.quote == h(v["quote_hex"])
    assert parsed.to_bytes() == raw
    assert raw[:4] == wire.ATTEST_REPLY_MAGIC
    assert v["amqp"]["type"] == "reply"

    enclave = attestation.verify_attestation(raw, h(v["nonce"]), trust_from(v["trust"]), v["now_ms"])
    exp = v["expected"]
    assert enclave.measurement.hex() == exp["measurement"]
    assert enclave.code_digest.hex() == exp["code_digest"]
    assert enclave.issued_at_ms == exp["issued_at_ms"]
    assert enclave.keys.epoch == exp["key_epoch"]
    assert enclave.keys.paillier_n.bit_length() == exp["paillier_n_bits"]
    assert sorted(enclave.policy.streams) == exp["streams"]
    assert enclave.policy_bytes == parsed.policy

    names = [c["name"] for c in v["verification_cases"]]
    assert len(names) == len(set(names))
    expected_errors = {c["expect"] for c in v["verification_cases"]} - {None}
    assert {"UntrustedPlatform", "UnknownMeasurement", "ReportDataMismatch", "NonceMismatch",
            "StaleQuote", "AttestationError", "KeySizeMismatch"} <= expected_errors
    for case in v["verification_cases"]:
        trust_spec = dict(v["trust"], **case.get("trust", {}))
        args = (h(case["reply_hex"]), h(case.get("client_nonce", v["nonce"])), trust_from(trust_spec),
                case.get("now_ms", v["now_ms"]))
        if case["expect"] is None:
            assert attestation.verify_attestation(*args).measurement.hex() == exp["measurement"], case["name"]
            continue
        error = getattr(errors, case["expect"])
        assert issubclass(error, AttestationError)
        with pytest.raises(AttestationError) as info:
            attestation.verify_attestation(*args)
        assert type(info.value) is error, (case["name"], type(info.value).__name__)


def check_envelope(v: dict, tmp_path, monkeypatch) -> None:
    raw = h(v["envelope_hex"])
    env = wire.Envelope.from_bytes(raw)
    assert env.stream == v["stream"]
    assert env.record_id == h(v["record_id"])
    assert env.producer_id == h(v["producer_id"])
    assert env.key_epoch == v["key_epoch"]
    assert env.sent_at_ms == v["sent_at_ms"]
    assert env.window == v["window"]
    assert env.width == v["width"] == keys_vector()["ciphertext_width"]
    assert env.ciphertexts == tuple(int(c, 16) for c in v["ciphertexts"])
    assert env.to_bytes() == raw

    # The documented offsets.
    off, name = v["offsets"], v["stream"].encode("ascii")
    assert raw[off["magic"]:off["magic"] + 4] == wire.ENVELOPE_MAGIC
    assert raw[off["record_id"]:off["record_id"] + 16] == env.record_id
    assert raw[off["producer_id"]:off["producer_id"] + 16] == env.producer_id
    assert off["key_epoch"] == off["producer_id"] + wire.PRODUCER_ID_SIZE
    assert int.from_bytes(raw[off["key_epoch"]:off["key_epoch"] + 4], "big") == env.key_epoch
    assert int.from_bytes(raw[off["sent_at_ms"]:off["sent_at_ms"] + 8], "big") == env.sent_at_ms
    assert int.from_bytes(raw[off["window"]:off["window"] + 8], "big") == env.window
    assert raw[off["stream_len"]] == len(name) and raw[off["stream"]:off["stream"] + len(name)] == name
    assert int.from_bytes(raw[off["count"]:off["count"] + 2], "big") == len(env.ciphertexts)
    assert int.from_bytes(raw[off["width"]:off["width"] + 2], "big") == env.width
    pw = (env.width + 1) // 2  # a plaintext's bytes: those of n
    assert pw == (keys_vector()["paillier_n_bits"] + 7) // 8 == wire.plaintext_width(env.width)
    assert off["plaintexts"] == off["ciphertexts"] + len(env.ciphertexts) * env.width
    assert len(raw) == off["plaintexts"] + len(env.ciphertexts) * pw
    assert env.plaintexts == tuple(int(m, 16) for m in v["paillier_plaintexts"]) == tuple(
        int.from_bytes(raw[off["plaintexts"] + i * pw:off["plaintexts"] + (i + 1) * pw], "big")
        for i in range(len(env.ciphertexts)))

    # Clipping and encoding, as the producer does it for the stream's kind.
    policy, _ = vector_policy()
    stream = policy.streams[v["stream"]]
    assert stream.kind == v["stream_kind"] and stream.fraction_bits == v["fraction_bits"]
    assert stream.encode(v["values"]) == (v["encoded"], v["clipped_count"])
    assert len(env.ciphertexts) == stream.dimension
    if stream.kind == "histogram":
        buckets, _ = fixedpoint.one_hot(v["values"][0], stream.edges)
        assert buckets == v["encoded"] and sum(buckets) == 1
        index = buckets.index(1)
        assert stream.edges[index] <= v["clipped"][0] < stream.edges[index + 1] or index == len(buckets) - 1
    elif stream.l2_bound is not None:
        clipped, n_clipped = fixedpoint.clip_l2(v["values"], stream.l2_bound)
        assert clipped == v["clipped"] and n_clipped == v["clipped_count"]
        assert math.sqrt(math.fsum(c * c for c in clipped)) <= stream.l2_bound * (1 + 1e-12)
        assert fixedpoint.encode(clipped, v["fraction_bits"]) == v["encoded"]
    else:
        clipped, n_clipped = fixedpoint.clip(v["values"], stream.lower, stream.upper)
        assert clipped == v["clipped"]
        assert n_clipped == v["clipped_count"] == sum(a != b for a, b in zip(v["values"], v["clipped"]))
        assert fixedpoint.encode(clipped, v["fraction_bits"]) == v["encoded"]

    # Paillier: g = n + 1, negatives as n - |v|, c = (1 + n m) r^n mod n^2.
    private = paillier_private()
    n = private.public_key.n
    keys = enclave_keys()
    for value, m_hex, r_hex, c in zip(v["encoded"], v["paillier_plaintexts"], v["r"], env.ciphertexts):
        m, r = int(m_hex, 16), int(r_hex, 16)
        assert m == value % n and (value >= 0 or m == n - abs(value))
        assert 0 < c < n * n and math.gcd(c, n) == 1
        assert private.raw_decrypt(c) == m
        assert keys.decrypt_total(c) == value
        assert private.public_key.raw_encrypt(m, r_value=r) == c
        assert (1 + n * m) * pow(r, n, n * n) % (n * n) == c
    for bad in (raw[:-1], raw + b"\x00", b"SSE\x02" + raw[4:], b"SSE\x04" + raw[4:],
                raw[:off["plaintexts"]]):  # the layout of version 2: no plaintexts
        with pytest.raises(InvalidMessage):
            wire.Envelope.from_bytes(bad)


def check_packed_envelope(v: dict, tmp_path, monkeypatch) -> None:
    """A packed stream: policy bytes with the layout, packing, the envelope, the window total."""
    from sealedsum.sidecar.enclave.aggregate import Window
    from sealedsum.sidecar.enclave.keyring import Keyring
    from sealedsum.sidecar.enclave.release import decrypted_totals
    from sealedsum.sidecar.enclave.service import Enclave

    canonical = v["policy_canonical"].encode("ascii")
    policy = enclave_policy(v["config_enclave"], v["config_streams"])
    assert policy.to_bytes() == canonical and policy_from_bytes(canonical) == policy
    assert hashlib.sha256(canonical).hexdigest() == v["policy_sha256"]
    assert wire.measurement(h(v["code_digest"]), canonical) == h(v["measurement"])
    s = policy.streams[v["stream"]]
    lay = v["layout"]
    table = {k: lay[k] for k in ("slot_bits", "slots_per_ciphertext", "ciphertexts_per_record")}
    assert json.loads(canonical)["streams"][v["stream"]]["packing"] == table == s.packing.to_mapping()
    # The layout by its definition (section 10.2).
    ranges = s.coordinate_ranges(1)
    assert [lo for lo, _ in ranges] == lay["lows"] and set(ranges) == {tuple(lay["record_range"])}
    assert s.max_window_records == lay["max_window_records"]
    w, k, c = lay["slot_bits"], lay["slots_per_ciphertext"], lay["ciphertexts_per_record"]
    assert w == max((hi - lo) * lay["max_window_records"] for lo, hi in ranges).bit_length()
    assert k == min(s.dimension, (policy.paillier_bits - 3) // w) and c == math.ceil(s.dimension / k)
    assert c < s.dimension

    private = paillier_private()
    for rec in v["records"]:
        assert s.encode(rec["values"]) == (rec["encoded"], rec["clipped_count"])
        assert rec["slots"] == [x - lo for x, lo in zip(rec["encoded"], lay["lows"])]
        ms = [int(m, 16) for m in rec["paillier_plaintexts"]]
        assert s.plaintexts(rec["encoded"]) == ms and len(ms) == c
        for j, m in enumerate(ms):
            width_j = min(k, s.dimension - j * k)
            assert m == sum(rec["slots"][j * k + t] << (w * t) for t in range(width_j)) < 1 << (w * width_j)
        for m, r, ct in zip(ms, rec["r"], rec["ciphertexts"]):
            assert private.public_key.raw_encrypt(m, r_value=int(r, 16)) == int(ct, 16)
            assert private.raw_decrypt(int(ct, 16)) == m
        assert s.packing.unpack(ms) == rec["slots"]

    e = v["envelope"]
    raw = h(e["envelope_hex"])
    env = wire.Envelope.from_bytes(raw)
    assert env.to_bytes() == raw and env.stream == v["stream"] and env.producer_id == h(e["producer_id"])
    assert env.record_id == h(e["record_id"]) and env.window == e["window"] and env.width == e["width"]
    assert env.ciphertexts == tuple(int(ct, 16) for ct in v["records"][0]["ciphertexts"])
    assert int.from_bytes(raw[e["offsets"]["count"]:e["offsets"]["count"] + 2], "big") == c
    assert env.plaintexts == tuple(int(m, 16) for m in v["records"][0]["paillier_plaintexts"])
    assert len(raw) == e["offsets"]["ciphertexts"] + c * (e["width"] + wire.plaintext_width(e["width"]))

    # The window: folded by the enclave's own code, decrypted once per ciphertext, unpacked.
    t = v["window_total"]
    keys = enclave_keys()
    window = Window(v["stream"], 1)
    for rec in v["records"]:
        window.fold(keys.epoch, keys.paillier_public, tuple(int(ct, 16) for ct in rec["ciphertexts"]), 0)
    assert window.count == t["count"] and window.ciphertexts() == tuple(int(ct, 16) for ct in t["ciphertexts"])
    ms = [private.raw_decrypt(int(ct, 16)) for ct in t["ciphertexts"]]
    assert ms == [int(m, 16) for m in t["paillier_plaintexts"]]
    assert s.packing.unpack(ms) == t["slot_sums"] == [sum(col) for col in zip(*(r["slots"] for r in v["records"]))]
    assert t["totals"] == [x + t["count"] * lo for x, lo in zip(t["slot_sums"], lay["lows"])]
    assert t["totals"] == [sum(col) for col in zip(*(r["encoded"] for r in v["records"]))]
    assert decrypted_totals(window, s, Keyring.single(keys)) == t["totals"]

    # The enclave core takes the envelope with two ciphertexts, and refuses one value per ciphertext.
    core = Enclave(enclave_keys(), policy, canonical, h(v["code_digest"]), h(v["measurement"]), lambda rd: b"")
    box = SealedBox(PrivateKey(h(keys_vector()["x25519_private"])).public_key)
    assert core.on_record(box.encrypt(raw), e["sent_at_ms"]).rejection is None
    unpacked = wire.Envelope(env.stream, bytes(16), env.key_epoch, env.sent_at_ms, 0, env.width,
                             env.ciphertexts[:1] * s.dimension, env.producer_id, env.plaintexts[:1] * s.dimension)
    out = core.on_record(box.encrypt(unpacked.to_bytes()), e["sent_at_ms"])
    assert out.rejection is not None and out.rejection.reason is RejectReason.TOO_LARGE  # 40 > 2 ciphertexts
    for count, reason in ((c + 1, RejectReason.TOO_LARGE), (1, RejectReason.WRONG_DIMENSION)):
        other = wire.Envelope(env.stream, bytes(16), env.key_epoch, env.sent_at_ms, 0, env.width,
                              (env.ciphertexts[0],) * count, env.producer_id, (env.plaintexts[0],) * count)
        out = core.on_record(box.encrypt(other.to_bytes()), e["sent_at_ms"])
        assert out.rejection.reason is reason, count


def check_sealed_record(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.common import amqp
    from sealedsum.common.config import Topology
    from sealedsum.sidecar.enclave.keyring import Keyring
    from sealedsum.sidecar.enclave.records import max_record_bytes, open_record

    sealed, envelope_bytes = h(v["sealed_hex"]), h(v["envelope_hex"])
    sk, pk = h(v["recipient_private"]), h(v["recipient_public"])
    assert bytes(PrivateKey(sk).public_key) == pk == h(keys_vector()["x25519_public"])
    assert SealedBox(PrivateKey(sk)).decrypt(sealed) == envelope_bytes
    assert len(sealed) == len(envelope_bytes) + wire.SEALED_BOX_OVERHEAD
    # epk || crypto_box(m, BLAKE2b-192(epk || pk), pk, esk): rebuilt byte for byte.
    epk = bindings.crypto_scalarmult_base(h(v["ephemeral_private"]))
    assert epk == h(v["ephemeral_public"]) == sealed[:32]
    nonce = hashlib.blake2b(epk + pk, digest_size=24).digest()
    assert nonce == h(v["box_nonce"])
    assert epk + bindings.crypto_box(envelope_bytes, nonce, pk, h(v["ephemeral_private"])) == sealed
    # Another key cannot open it.
    with pytest.raises(Exception):
        SealedBox(PrivateKey(h(v["ephemeral_private"]))).decrypt(sealed)
    # The enclave's own validation accepts it and reads the same envelope.
    policy, _ = vector_policy()
    keys = enclave_keys()
    env = wire.Envelope.from_bytes(envelope_bytes)
    opened, stream, epoch_keys = open_record(sealed, Keyring.single(keys), policy,
                                             max_record_bytes(policy, keys))
    assert opened == env and stream.name == env.stream and epoch_keys is keys
    # Publishing: persistent, to PREFIX.records with key "record", nothing identifying.
    props = amqp.properties("record")
    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").records_exchange
    assert props.delivery_mode == spec["delivery_mode"] == 2
    assert props.content_type == spec["content_type"] and props.type == spec["type"]
    assert props.app_id == spec["app_id"]
    assert props.message_id is None and props.correlation_id is None and props.headers is None
    assert props.timestamp is None and props.user_id is None


def check_record_batch(v: dict, tmp_path, monkeypatch) -> None:
    import struct

    from sealedsum.common import amqp
    from sealedsum.sidecar.enclave.keyring import Keyring
    from sealedsum.sidecar.enclave.records import max_record_bytes, open_record

    batch, records = h(v["batch_hex"]), [h(r) for r in v["records_hex"]]
    assert v["max_records"] == wire.MAX_BATCH_RECORDS and v["max_bytes"] == wire.MAX_BATCH_BYTES
    assert records[0] == h(load("sealed_record.json")["sealed_hex"])
    # The layout, field by field, from the offsets.
    o = v["offsets"]
    assert batch[o["magic"]:o["count"]] == wire.RECORD_BATCH_MAGIC == b"SSB\x01"
    assert struct.unpack(">H", batch[o["count"]:o["first_length"]])[0] == len(records)
    assert struct.unpack(">I", batch[o["first_length"]:o["first_record"]])[0] == len(records[0])
    assert batch[o["first_record"]:o["second_length"]] == records[0]
    assert struct.unpack(">I", batch[o["second_length"]:o["second_record"]])[0] == len(records[1])
    assert batch[o["second_record"]:] == records[1]
    assert wire.RecordBatch.from_bytes(batch).records == tuple(records)
    assert wire.RecordBatch(tuple(records)).to_bytes() == batch
    for cut in (batch[:-1], batch + b"\x00", batch[:4] + b"\x00\x00" + batch[6:]):
        with pytest.raises(InvalidMessage):
            wire.RecordBatch.from_bytes(cut)
    # Each record opens on its own to its envelope.
    policy, _ = vector_policy()
    keys = enclave_keys()
    for record, env_hex in zip(records, v["envelopes_hex"]):
        env = wire.Envelope.from_bytes(h(env_hex))
        opened, stream, _ = open_record(record, Keyring.single(keys), policy,
                                        max_record_bytes(policy, keys))
        assert opened == env and stream.name == env.stream
    props, spec = amqp.properties(wire.RECORD_BATCH_TYPE), v["amqp"]
    assert props.type == spec["type"] == "records" and props.delivery_mode == spec["delivery_mode"]


def check_signed_envelope(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.producers.client import RecordSealer
    from sealedsum.sidecar.enclave.service import Enclave

    # The identity key and the producer id it stands for.
    identity = Ed25519PrivateKey.from_private_bytes(h(v["identity_ed25519_seed"]))
    public_key = identity.public_key().public_bytes_raw()
    assert public_key == h(v["identity_public_key"])
    assert base64.b64encode(public_key).decode("ascii") == v["identity_public_key_base64"]
    assert h(v["producer_id_input_hex"]) == b"sealedsum/v1/producer-id\x00" + public_key
    producer_id = hashlib.sha256(h(v["producer_id_input_hex"])).digest()[:wire.PRODUCER_ID_SIZE]
    assert producer_id == h(v["producer_id"]) == wire.producer_id_of(public_key)

    # The envelope inside: an ordinary SSE\x03 envelope carrying that producer id.
    env_bytes = h(v["envelope_hex"])
    env = wire.Envelope.from_bytes(env_bytes)
    assert env.to_bytes() == env_bytes
    assert (env.stream, env.record_id, env.producer_id) == (v["stream"], h(v["record_id"]), producer_id)
    assert (env.key_epoch, env.sent_at_ms, env.window) == (v["key_epoch"], v["sent_at_ms"], v["window"])
    policy, _ = vector_policy()
    assert policy.streams[v["stream"]].encode(v["values"])[0] == v["encoded"]
    private = paillier_private()
    assert [private.raw_decrypt(c) for c in env.ciphertexts] == v["encoded"]
    assert private.public_key.raw_encrypt(v["encoded"][0], r_value=int(v["r"], 16)) == env.ciphertexts[0]

    # The signature: Ed25519 over "sealedsum/v1/envelope" 0x00 || envelope, deterministic.
    signature = h(v["signature"])
    assert signing.signing_input(signing.ENVELOPE, env_bytes) == h(v["signing_input_hex"])
    assert h(v["signing_input_hex"]) == b"sealedsum/v1/envelope\x00" + env_bytes
    assert signing.sign(identity, signing.ENVELOPE, env_bytes) == signature
    signing.verify(public_key, signing.ENVELOPE, env_bytes, signature, error=InvalidMessage, what="envelope")
    for label in (signing.RESULT, signing.QUOTE):  # another label never verifies
        with pytest.raises(InvalidMessage):
            signing.verify(public_key, label, env_bytes, signature, error=InvalidMessage, what="envelope")

    # The wrapper: magic || public key || signature || envelope, at the documented offsets.
    raw, off = h(v["signed_envelope_hex"]), v["offsets"]
    assert raw[off["magic"]:off["public_key"]] == wire.SIGNED_ENVELOPE_MAGIC == b"SSI\x01"
    assert raw[off["public_key"]:off["signature"]] == public_key
    assert raw[off["signature"]:off["envelope"]] == signature
    assert raw[off["envelope"]:] == env_bytes and off["envelope"] == 4 + 32 + 64
    signed = wire.SignedEnvelope.from_bytes(raw)
    assert signed == wire.SignedEnvelope(public_key, signature, env_bytes) and signed.to_bytes() == raw
    for bad in (raw[:99], b"SSI\x02" + raw[4:], b"SSE\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.SignedEnvelope.from_bytes(bad)

    # The sealed box around the wrapper, rebuilt byte for byte (fixed ephemeral key).
    sealed = h(v["sealed_hex"])
    sk, pk = h(keys_vector()["x25519_private"]), h(v["recipient_public"])
    assert pk == h(keys_vector()["x25519_public"])
    assert SealedBox(PrivateKey(sk)).decrypt(sealed) == raw
    assert len(sealed) == wire.SEALED_BOX_OVERHEAD + 100 + len(env_bytes)
    epk = bindings.crypto_scalarmult_base(h(v["ephemeral_private"]))
    assert epk == h(v["ephemeral_public"]) == sealed[:32]
    nonce = hashlib.blake2b(epk + pk, digest_size=24).digest()
    assert nonce == h(v["box_nonce"])
    assert epk + bindings.crypto_box(raw, nonce, pk, h(v["ephemeral_private"])) == sealed

    # The enclave core: accepted where the key is enrolled, refused where it is not or is revoked.
    assert [c["expect"] for c in v["outcomes"]] == ["accepted", "unknown_producer", "revoked_producer"]
    for case in v["outcomes"]:
        p, p_bytes = vector_policy(case["identities"])
        core = Enclave(enclave_keys(), p, p_bytes, bytes(32), bytes(32), lambda rd: b"")
        outcome = core.on_record(sealed, v["sent_at_ms"] + 1000)
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == case["expect"], (case, got)
        assert core.streams[v["stream"]].current.count == (got == "accepted")

    # The reference producer with this key: the same producer id, and each record it seals is
    # this wrapper (its ciphertext is fresh: Paillier draws new randomness).
    sealer = RecordSealer(attested_enclave(), identity=identity, check_enrollment=False)
    assert sealer.producer_id == producer_id
    record = sealer.seal(v["stream"], v["values"], now_ms=v["sent_at_ms"], record_id=env.record_id)
    assert len(record.body) == len(sealed)
    mine = wire.SignedEnvelope.from_bytes(SealedBox(PrivateKey(sk)).decrypt(record.body))
    assert mine.public_key == public_key
    signing.verify(public_key, signing.ENVELOPE, mine.envelope, mine.signature, error=InvalidMessage, what="envelope")
    header = len(env_bytes) - (env.width + wire.plaintext_width(env.width)) * len(env.ciphertexts)
    assert mine.envelope[:header] == env_bytes[:header]
    assert mine.envelope[-len(env.plaintexts) * wire.plaintext_width(env.width):] == \
        env_bytes[-len(env.plaintexts) * wire.plaintext_width(env.width):]  # the same plaintext, stated
    assert private.raw_decrypt(wire.Envelope.from_bytes(mine.envelope).ciphertexts[0]) == v["encoded"][0]


def _check_signed(v: dict, payload_key: str) -> tuple[bytes, bytes]:
    """The SSS\x01 frame and signature of a signed-message vector; returns (raw, payload)."""
    raw = h(v["message_hex"])
    message = wire.SignedMessage.from_bytes(raw)
    payload = v["payload"].encode("ascii")
    assert message.payload == payload
    assert message.signature == h(v["signature"])
    assert message.to_bytes() == raw
    assert raw[:4] == wire.SIGNED_MAGIC
    assert int.from_bytes(raw[4:8], "big") == len(payload) and len(raw) == 8 + len(payload) + 64
    assert signing.signing_input(signing.RESULT, payload) == h(v["signing_input_hex"])
    assert h(v["signing_input_hex"]) == b"sealedsum/v1/result\x00" + payload
    ed_pub = h(v["enclave_ed25519_public"])
    assert ed_pub == h(keys_vector()["ed25519_public"])
    signing.verify(ed_pub, signing.RESULT, payload, message.signature, error=InvalidResultSignature, what="result")
    # Canonical JSON: sorted keys, compact, ASCII.
    assert json.loads(payload) == v[payload_key]
    assert json.dumps(v[payload_key], sort_keys=True, separators=(",", ":")).encode("ascii") == payload
    for bad in (raw[:-1], raw + b"\x00", b"SSS\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.SignedMessage.from_bytes(bad)
    return raw, payload


def _resign(mapping: dict) -> bytes:
    payload = json.dumps(mapping, sort_keys=True, separators=(",", ":")).encode("ascii")
    seed = Ed25519PrivateKey.from_private_bytes(h(keys_vector()["ed25519_seed"]))
    return wire.SignedMessage(payload, signing.sign(seed, signing.RESULT, payload)).to_bytes()


def _check_refusals(raw: bytes, mapping: dict, kinds: tuple[str, ...]) -> None:
    """What verify_signed refuses: altered bytes, another measurement, an unexpected kind."""
    enclave = attested_enclave()
    altered = bytearray(raw)
    altered[10] ^= 0x01  # a payload byte
    with pytest.raises(InvalidResultSignature):
        verify_signed(bytes(altered), enclave, kinds)
    with pytest.raises(InvalidResultSignature):
        verify_signed(_resign(dict(mapping, measurement="00" * 32)), enclave, kinds)
    # Another key epoch is not refused: rotation changes the encryption keys, not the signing key.
    later = dict(mapping, key_epoch=mapping["key_epoch"] + 1)
    if "previous_epoch" in mapping:  # a key_rotated notice names two consecutive epochs
        later["previous_epoch"] += 1
    assert verify_signed(_resign(later), enclave, kinds)
    with pytest.raises(InvalidResultSignature):
        verify_signed(raw[:-1], enclave, kinds)
    others = tuple(k for k in (RESULT_KIND, EXHAUSTED_KIND, BUDGET_KIND, ROTATED_KIND) if k not in kinds)
    with pytest.raises(InvalidMessage):
        verify_signed(raw, enclave, others)
    # A quote signature label never verifies a result and vice versa.
    message = wire.SignedMessage.from_bytes(raw)
    with pytest.raises(InvalidResultSignature):
        signing.verify(enclave.keys.ed25519, signing.QUOTE, message.payload, message.signature,
                       error=InvalidResultSignature, what="result")


def _check_budget_object(budget: dict, stream: str) -> None:
    """A budget object is one state of the stream's ledger (ledger.json)."""
    assert set(budget) == {"releases", "spent_epsilon", "spent_rho", "budget_epsilon", "budget_delta",
                           "remaining_releases", "ledger_head"}
    chain = next(c for c in load("ledger.json")["chains"] if c["stream"] == stream)
    charge = chain["charges"][budget["releases"] - 1]
    assert charge["budget"] == budget and charge["head"] == budget["ledger_head"]
    policy, _ = vector_policy()
    s = policy.streams[stream]
    assert (budget["budget_epsilon"], budget["budget_delta"]) == (s.budget_epsilon, s.budget_delta)
    eps, rho = privacy.spent(s.mechanism, s.epsilon, s.delta, budget["releases"], s.budget_delta)
    assert (budget["spent_epsilon"], budget["spent_rho"]) == (eps, rho)


def check_result(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.common import amqp
    from sealedsum.common.config import Topology

    raw, payload = _check_signed(v, "release")
    release = Release.from_payload(payload)
    assert release == Release(**v["release"])
    assert release.to_payload() == payload
    assert len(v["release"]) == 20 and v["release"]["kind"] == RESULT_KIND
    assert release.sum == [f / 2 ** release.fraction_bits for f in release.sum_fixed]
    policy, _ = vector_policy()
    stream = policy.streams[release.stream]
    plan = stream.noise_plan()
    assert release.aggregate == stream.kind and release.dimension == stream.dimension
    assert release.fraction_bits == stream.fraction_bits
    assert release.sum_noise_scale == plan.sum_scale and release.count_noise_scale == plan.count_scale
    assert release.rho == plan.rho and release.epsilon == stream.epsilon and release.delta == stream.delta
    if release.aggregate == "histogram":
        assert release.count == sum(release.sum_fixed) and release.mean is None
        assert release.count_noise_scale is None and release.fraction_bits == 0
        assert release.to_json()["buckets"] == release.sum
    elif release.count > 0:
        assert release.mean == [s / release.count for s in release.sum]
    _check_budget_object(release.budget, release.stream)
    assert release.budget["releases"] >= 1
    # The charge of this release can be rebuilt from its own fields (the auditor's view).
    charge = json.dumps({"stream": release.stream, "window": release.window, "seq": release.budget["releases"],
                         "mechanism": release.mechanism, "epsilon": release.epsilon, "delta": release.delta,
                         "rho": release.rho}, sort_keys=True, separators=(",", ":"))
    chain = next(c for c in load("ledger.json")["chains"] if c["stream"] == release.stream)
    assert chain["charges"][release.budget["releases"] - 1]["charge"] == charge

    # A consumer holding the attested enclave accepts it...
    enclave = attested_enclave()
    assert release.measurement == enclave.measurement.hex()
    assert verify_result(raw, enclave) == release
    assert verify_signed(raw, enclave) == release
    # ...and refuses an altered payload, a foreign measurement, or a broken frame.
    altered = raw.replace(b'"count":%d' % release.count, b'"count":%d' % (release.count + 1))
    assert altered != raw
    with pytest.raises(InvalidResultSignature):
        verify_result(altered, enclave)
    _check_refusals(raw, v["release"], (RESULT_KIND,))

    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").results_exchange
    assert spec["routing_key"] == release.stream
    props = amqp.properties("result")
    assert props.delivery_mode == spec["delivery_mode"] and props.type == spec["type"]


def check_budget_exhausted(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.enclave.service import Enclave

    raw, payload = _check_signed(v, "notice")
    notice = BudgetExhausted.from_payload(payload)
    assert notice == BudgetExhausted(**v["notice"]) and notice.to_payload() == payload
    assert notice.kind == EXHAUSTED_KIND
    _check_budget_object(notice.budget, notice.stream)
    assert notice.budget["remaining_releases"] == 0
    enclave = attested_enclave()
    assert verify_signed(raw, enclave) == notice  # consumers take it with the releases
    with pytest.raises(InvalidMessage):
        verify_result(raw, enclave)  # but it is not a release
    _check_refusals(raw, v["notice"], (RESULT_KIND, EXHAUSTED_KIND))
    # The enclave core, fed the session, publishes the last release and then exactly this notice.
    policy, policy_bytes = vector_policy()
    core = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), enclave.measurement, lambda rd: b"")
    for step in v["session"]:
        outcome = core.on_record(h(step["body_hex"]), step["now_ms"])
        assert outcome.rejection is None
    release, published = outcome.publish
    assert published.body == raw and published.key == f"{notice.stream}/budget_exhausted"
    assert published.window is None and notice.at_ms == release.message.closed_at_ms
    assert release.message.budget == notice.budget  # the notice repeats the ledger of the last release
    assert core.exhausted == {notice.stream}
    assert core.on_record(h(v["session"][0]["body_hex"]), notice.at_ms).rejection.reason.value == "duplicate"
    assert v["amqp"]["routing_key"] == notice.stream and v["amqp"]["type"] == "result"


def check_key_rotated(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.common import amqp
    from sealedsum.common.config import Topology
    from sealedsum.sidecar.enclave.service import Enclave

    raw, payload = _check_signed(v, "notice")
    notice = KeyRotated.from_payload(payload)
    assert notice == KeyRotated(**v["notice"]) and notice.to_payload() == payload
    assert notice.kind == ROTATED_KIND and len(v["notice"]) == 6
    assert notice.key_epoch == notice.previous_epoch + 1 == keys_vector()["epoch"] + 1
    # A producer that attested epoch 1 verifies it with that attestation's Ed25519 key...
    enclave = attested_enclave()
    assert enclave.keys.epoch == notice.previous_epoch
    assert verify_key_rotated(raw, enclave) == notice
    with pytest.raises(InvalidMessage):
        verify_signed(raw, enclave)  # ...while a consumer of PREFIX.results does not take it
    _check_refusals(raw, v["notice"], (ROTATED_KIND,))
    for bad in (dict(previous_epoch=notice.key_epoch), dict(previous_retires_at_ms=notice.at_ms - 1)):
        with pytest.raises(InvalidMessage):
            verify_key_rotated(_resign(dict(v["notice"], **bad)), enclave)
    # The enclave core, rotating at at_ms under the default grace period, signs exactly this.
    policy, policy_bytes = vector_policy()
    assert notice.previous_retires_at_ms - notice.at_ms == policy.key_grace_seconds * 1000
    core = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), enclave.measurement, lambda rd: b"")
    (published,) = core.rotate(notice.at_ms).publish
    assert published.body == raw and published.key == f"key_rotated/{notice.key_epoch}" and published.announce
    assert core.keyring.retire_at == {notice.previous_epoch: notice.previous_retires_at_ms}
    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").announce_exchange and spec["routing_key"] == ""
    assert spec["mandatory"] is False
    props = amqp.properties(spec["type"])
    assert (props.delivery_mode, props.content_type, props.app_id) == \
        (spec["delivery_mode"], spec["content_type"], spec["app_id"])


def check_notices(v: dict, tmp_path, monkeypatch) -> None:
    """A rejection notice and a receipt (protocol section 11.6): the bytes, what a producer
    accepts of them and what it refuses, and the enclave core producing exactly them."""
    from sealedsum.common import amqp, topology
    from sealedsum.common.config import Topology
    from sealedsum.common.results import PRODUCER_KINDS, RecordRefused, RecordsCounted, verify_notice

    token = v["token"]
    assert topology.is_notice_token(token) and v["record_header"] == {topology.NOTIFY_HEADER: token}
    assert topology.notice_token(v["record_header"]) == token
    assert topology.notice_token({topology.NOTIFY_HEADER: token.upper()}) is None  # lowercase only
    assert topology.notice_token({topology.NOTIFY_HEADER: token.encode()}) == token  # as pika may hand it over
    enclave = attested_enclave()
    for name, cls, n_keys in (("rejected", RecordRefused, 10), ("counted", RecordsCounted, 7)):
        part = dict(v[name], enclave_ed25519_public=v["enclave_ed25519_public"])
        raw, payload = _check_signed(part, "notice")
        notice = cls.from_payload(payload)
        assert notice == cls(**v[name]["notice"]) and notice.to_payload() == payload and len(v[name]["notice"]) == n_keys
        assert verify_notice(raw, enclave, token) == notice
        _check_refusals(raw, v[name]["notice"], PRODUCER_KINDS)
        with pytest.raises(InvalidResultSignature):
            verify_notice(raw, enclave, "0" * 32)  # another producer's token: not for this one
        with pytest.raises(InvalidMessage):
            verify_signed(raw, enclave)  # consumers of PREFIX.results take no such thing
    refused = RecordRefused(**v["rejected"]["notice"])
    assert (refused.reason, refused.stream, refused.batch_index) == ("budget_exhausted", "wellbeing", 1)
    counted = RecordsCounted(**v["counted"]["notice"])
    assert counted.record_ids() == [("purchases", load("envelope_dim1.json")["record_id"])]
    for bad in (dict(count=2), dict(records={}), dict(records={"purchases": ["XY" * 16]}), dict(token="abc")):
        with pytest.raises(InvalidMessage):
            verify_notice(_resign(dict(v["counted"]["notice"], **bad)), enclave, bad.get("token", token))
    for bad in (dict(reason="sleepy"), dict(batch_index=-1), dict(record_id="00"), dict(stream="a b")):
        with pytest.raises(InvalidMessage):
            verify_notice(_resign(dict(v["rejected"]["notice"], **bad)), enclave, token)
    # Before the envelope opened, a refusal names no stream and no record.
    verify_notice(_resign(dict(v["rejected"]["notice"], stream=None, record_id=None, batch_index=None)),
                  enclave, token)
    # The enclave core, fed record_batch.json with wellbeing spent, gives exactly these.
    from sealedsum.sidecar.enclave.service import Enclave

    policy, policy_bytes = vector_policy()
    core = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), enclave.measurement, lambda rd: b"")
    core.exhausted.add("wellbeing")
    at = refused.at_ms
    parts = core.records_in(h(load("record_batch.json")["batch_hex"]), wire.RECORD_BATCH_TYPE)
    first, second = core.accept_batch([core.open(p) for p in parts], at)
    assert core.refusal_notice(token, second, 1, at).body == h(v["rejected"]["message_hex"])
    (receipt,) = core.receipts({token: [first.record]}, at)
    assert receipt.body == h(v["counted"]["message_hex"]) and receipt.token == token
    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").notices_exchange and spec["routing_key"] == token
    assert spec["mandatory"] is False
    props = amqp.properties(spec["type"])
    assert (props.delivery_mode, props.content_type, props.app_id) == \
        (spec["delivery_mode"], spec["content_type"], spec["app_id"])


def check_budget_request(v: dict, tmp_path, monkeypatch) -> None:
    raw = h(v["request_hex"])
    req = wire.BudgetRequest.from_bytes(raw)
    assert req.nonce == h(v["nonce"]) and req.stream == v["stream"]
    assert req.to_bytes() == raw
    name = v["stream"].encode("ascii")
    assert raw == wire.BUDGET_REQUEST_MAGIC + h(v["nonce"]) + bytes([len(name)]) + name
    assert len(raw) == 4 + wire.NONCE_SIZE + 1 + len(name)
    for bad in (raw[:-1], raw + b"\x00", b"SSG\x02" + raw[4:], raw[:36] + b"\x00",
                raw[:36] + b"\x03a.b"):
        with pytest.raises(InvalidMessage):
            wire.BudgetRequest.from_bytes(bad)
    assert v["amqp"]["type"] == "budget-request"
    check_rpc_publication(v["amqp"], raw, monkeypatch)


def check_budget_report(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.enclave.service import Enclave

    raw, payload = _check_signed(v, "report")
    report = BudgetReport.from_payload(payload)
    assert report == BudgetReport(**v["report"]) and report.to_payload() == payload
    assert report.kind == BUDGET_KIND
    _check_budget_object(report.budget, report.stream)
    request = load("budget_request.json")
    assert report.nonce == request["nonce"] and report.stream == request["stream"]
    enclave = attested_enclave()
    assert verify_signed(raw, enclave, (BUDGET_KIND,)) == report
    with pytest.raises(InvalidMessage):
        verify_signed(raw, enclave)  # a report is never taken for a result or a notice
    _check_refusals(raw, v["report"], (BUDGET_KIND,))
    # The enclave core, with the stream's ledger, answers the request vector with exactly these bytes.
    policy, policy_bytes = vector_policy()
    from sealedsum.sidecar.enclave.ledger import StreamLedger

    core = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), enclave.measurement, lambda rd: b"")
    core.ledgers[report.stream] = StreamLedger(policy.streams[report.stream], report.budget["releases"],
                                               h(report.budget["ledger_head"]))
    assert core.answer(h(request["request_hex"]), report.at_ms) == raw
    # A request for a stream the policy does not define is not answered.
    with pytest.raises(InvalidMessage):
        core.answer(wire.BudgetRequest(bytes(32), "nosuch").to_bytes(), report.at_ms)
    assert v["amqp"]["type"] == "reply"


def check_ledger(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.enclave import ledger

    label = h(v["label_hex"])
    assert label == ledger.LEDGER_LABEL == b"sealedsum/v1/ledger\x00"
    policy, _ = vector_policy()
    assert any(len(c["charges"]) >= 2 for c in v["chains"])
    assert ({policy.streams[c["stream"]].mechanism for c in v["chains"]}
            == {privacy.Mechanism.LAPLACE, privacy.Mechanism.GAUSSIAN})
    for chain in v["chains"]:
        stream = policy.streams[chain["stream"]]
        assert h(chain["genesis_input_hex"]) == label + chain["stream"].encode("ascii")
        genesis = hashlib.sha256(h(chain["genesis_input_hex"])).digest()
        assert genesis.hex() == chain["genesis"] and ledger.genesis(chain["stream"]) == genesis
        real = ledger.StreamLedger(stream)
        head = genesis
        for seq, charge in enumerate(chain["charges"], start=1):
            assert charge["seq"] == seq
            expected_charge = json.dumps(
                {"stream": stream.name, "window": charge["window"], "seq": seq, "mechanism": stream.mechanism,
                 "epsilon": stream.epsilon, "delta": stream.delta, "rho": stream.noise_plan().rho},
                sort_keys=True, separators=(",", ":")).encode("ascii")
            assert charge["charge"].encode("ascii") == expected_charge
            assert ledger.charge_bytes(stream, charge["window"], seq) == expected_charge
            assert h(charge["head_input_hex"]) == label + head + expected_charge
            head = hashlib.sha256(h(charge["head_input_hex"])).digest()
            assert head.hex() == charge["head"] == ledger.next_head(real.head, expected_charge).hex()
            real.charge(charge["window"])
            assert real.head == head and real.releases == seq
            assert real.summary() == charge["budget"]
            assert real.allows() == charge["allows_another"]
        assert chain["head"] == head.hex()
        assert ledger.StreamLedger.from_json(stream, real.to_json()).summary() == real.summary()
    # Laplace composes in exact decimal: 3 x 0.1 fits 0.3 although 0.1 + 0.1 + 0.1 > 0.3 in binary.
    visits = next(c for c in v["chains"] if c["stream"] == "visits")
    assert 0.1 + 0.1 + 0.1 > 0.3
    assert visits["charges"][-1]["budget"]["spent_epsilon"] == 0.3
    assert [c["allows_another"] for c in visits["charges"]] == [True, True, False]


def check_sealed_state(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.enclave import keyring, sealing
    from sealedsum.sidecar.enclave_process import store as state_mod
    from sealedsum.sidecar.enclave.service import Enclave
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform

    meas = h(v["measurement"])
    assert meas == h(load("measurement.json")["measurement"])
    platform = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(h(load("quote.json")["platform_ed25519_seed"])),
                                h(v["platform_root_secret"]), state_dir=tmp_path)
    key = platform.sealing_key(meas)
    assert key == h(v["sealing_key"])
    files = {name: h(x) for name, x in v["files"].items()}
    # The base: SSV\x01 || nonce || AES-256-GCM, aad = label || measurement.
    base = files["base_v1"]
    assert base[:4] == sealing.SEALED_MAGIC == b"SSV\x01" and base[4:16] == h(v["gcm_nonce"])
    assert h(v["base_aad_hex"]) == state_mod.STATE_AAD + meas == b"sealedsum/v1/sealed-state\x00" + meas
    plaintext = sealing.unseal(key, meas, base, state_mod.STATE_AAD)
    assert plaintext == h(v["base_plaintext_hex"])
    assert json.loads(plaintext) == {"version": 1, "state": v["base_state"]}
    with pytest.raises(errors.SealingError):
        sealing.unseal(key, bytes(32), base, state_mod.STATE_AAD)  # another measurement
    with pytest.raises(errors.SealingError):
        sealing.unseal(key, meas, base, keyring.SEALED_AAD)  # the keys' label
    # A journal chunk: u64 version || u32 length || sealed blob, aad = label || u64 version || measurement.
    chunk = files["chunk_v2"]
    version, length = int.from_bytes(chunk[:8], "big"), int.from_bytes(chunk[8:12], "big")
    assert version == 2 and len(chunk) == 12 + length
    assert h(v["chunk_v2_aad_hex"]) == state_mod.JOURNAL_AAD + (2).to_bytes(8, "big") + meas
    label = state_mod.JOURNAL_AAD + (2).to_bytes(8, "big")
    entry = sealing.unseal(key, meas, chunk[12:], label)
    assert entry == h(v["entry_plaintext_hex"]) and json.loads(entry) == v["journal_entry"]
    with pytest.raises(errors.SealingError):
        sealing.unseal(key, meas, chunk[12:], state_mod.JOURNAL_AAD + (3).to_bytes(8, "big"))  # another version
    # The enclave core restores the base and the journal entry.
    policy, policy_bytes = vector_policy()
    core = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), meas, lambda rd: b"",
                   [v["base_state"], v["journal_entry"]])
    assert core.streams["purchases"].current.count == 3

    # Rollback protection: the store against the platform's monotonic counter.
    class Counter:
        def __init__(self, value):
            self.value = value

        def read(self):
            return self.value

        def advance(self, value):
            self.value = max(self.value, value)
            return self.value

    outcomes = set()
    for i, case in enumerate(v["rollback_cases"]):
        directory = tmp_path / f"case{i}"
        directory.mkdir()
        if case["base"]:
            (directory / "state.sealed").write_bytes(files[case["base"]])
        journal = b"".join(files[c] for c in case["journal"])
        if case.get("torn"):
            journal = journal[:-1]
        if case["journal"]:
            (directory / "state.journal").write_bytes(journal)
        counter = Counter(case["counter"])
        store = state_mod.SealedStateStore(directory, key, meas, counter)
        if case["expect"] in ("RollbackDetected", "SealingError"):
            error = state_mod.RollbackDetected if case["expect"] == "RollbackDetected" else errors.SealingError
            with pytest.raises(error) as info:
                store.load()
            assert case["expect"] == "SealingError" or type(info.value) is state_mod.RollbackDetected
        else:
            loaded = store.load()
            assert (loaded is None) == (case["expect"] == "first_start"), case["name"]
            if loaded is not None:
                assert loaded == [v["base_state"], v["journal_entry"]][:case["checkpoints"]], case["name"]
                assert store.journal_bytes == case["journal_bytes_after"], case["name"]
        assert counter.value == case["counter_after"], case["name"]
        outcomes.add(case["expect"])
    assert outcomes == {"loaded", "first_start", "RollbackDetected", "SealingError"}
    # save() writes base version + 1 and advances the counter; append() adds version + 1 to the journal.
    directory = tmp_path / "saved"
    directory.mkdir()
    counter = Counter(0)
    store = state_mod.SealedStateStore(directory, key, meas, counter)
    store.save(v["base_state"])
    store.append(v["journal_entry"])
    assert counter.value == 2
    assert json.loads(sealing.unseal(key, meas, (directory / "state.sealed").read_bytes(), state_mod.STATE_AAD)) \
        == {"version": 1, "state": v["base_state"]}
    journal = (directory / "state.journal").read_bytes()
    assert journal[:8] == (2).to_bytes(8, "big") and len(journal) == 12 + int.from_bytes(journal[8:12], "big")
    assert state_mod.SealedStateStore(directory, key, meas, Counter(2)).load() \
        == [v["base_state"], v["journal_entry"]]
    # The emulated platform's counter file.
    assert platform.counter_read(meas) == 0 and platform.counter_advance(meas, 1) == 1
    assert platform.counter_advance(meas, 0) == 1  # never lowered
    assert (tmp_path / v["counter_file"]["name"]).read_text() == v["counter_file"]["after_advance_to_1"]
    assert v["directory"] == f"enclave/{meas.hex()[:32]}"


def check_rejections(v: dict, tmp_path, monkeypatch) -> None:
    from sealedsum.sidecar.enclave.records import max_record_bytes
    from sealedsum.sidecar.enclave.service import Enclave

    policy, policy_bytes = vector_policy()
    keys = enclave_keys()
    assert max_record_bytes(policy, keys) == v["size_limit"]
    attested = attested_enclave()
    enclave = Enclave(keys, policy, policy_bytes, bytes(32), attested.measurement, lambda rd: b"")
    reasons_seen = []
    # Only purchases' and visits' outcomes are pinned (the vector's description says why).
    unpinned = []

    def pinned(publications):
        unpinned.extend(p for p in publications if p.stream not in ("purchases", "visits"))
        return [p for p in publications if p.stream in ("purchases", "visits")]

    def withheld() -> int:
        sensor = enclave.ledgers["sensor"].releases - sum(p.window is not None for p in unpinned)
        return enclave.stats.windows_withheld - sensor

    for i, step in enumerate(v["steps"]):
        if "tick_ms" in step:
            assert pinned(enclave.on_tick(step["tick_ms"]).publish) == []
            assert withheld() == step["windows_withheld"], (i, step.get("note"))
            continue
        outcome = enclave.on_record(h(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step.get("note"), got)
        assert_detail_documented(outcome.rejection)
        expected = step.get("publishes", [])
        publications = pinned(outcome.publish)
        assert len(publications) == len(expected), (i, step.get("note"))
        for publication, exp in zip(publications, expected):
            message = verify_signed(publication.body, attested)  # signed by the attested key
            assert message == publication.message and publication.stream == exp["stream"] == message.stream
            assert message.kind == exp["kind"]
            assert message.budget["releases"] == exp["releases"]
            assert message.budget["ledger_head"] == exp["ledger_head"]
            if exp["kind"] == RESULT_KIND:
                assert message.window == exp["window"] and publication.key == f"{message.stream}/{message.window}"
                assert message.count == sum(message.sum_fixed)  # histogram: the buckets' total
            else:
                assert publication.key == f"{message.stream}/budget_exhausted"
        reasons_seen.append(got)
    reasons_seen += _check_identity_session(v["identity_session"])
    assert set(reasons_seen) == {r.value for r in RejectReason} | {"accepted"}
    final = v["final"]
    assert enclave.ledgers["sensor"].releases >= 1  # sensor's windows did close, unpinned
    assert withheld() == final["windows_withheld"]
    assert enclave.stats.windows_released - sum(p.window is not None for p in unpinned) == final["windows_released"]
    assert keys.decryptions == final["decryptions"]  # window totals only, never a single record
    assert sorted(enclave.exhausted) == final["exhausted"]
    assert enclave.ledgers["visits"].summary() == final["visits_budget"]
    # The signed budget report says the same.
    report = verify_signed(enclave.answer(wire.BudgetRequest(bytes(32), "visits").to_bytes(), 0), attested,
                           (BUDGET_KIND,))
    assert report.exhausted and report.budget == final["visits_budget"]


def _check_identity_session(v: dict) -> list[str]:
    """The second session: policy.json's policy plus an [identities] table, on a fresh core."""
    from sealedsum.sidecar.enclave.service import Enclave

    policy, policy_bytes = vector_policy(v["config_identities"])
    assert policy_bytes == v["policy_canonical"].encode("ascii")
    assert policy_from_bytes(policy_bytes) == policy
    assert hashlib.sha256(policy_bytes).hexdigest() == v["policy_sha256"]
    # The table is the only difference from policy.json, and it changes the measurement.
    document = json.loads(policy_bytes)
    assert json.loads(load("policy.json")["canonical"]) == {k: x for k, x in document.items() if k != "identities"}
    assert document["identities"] == {"required": True, "enrolled": dict(sorted(v["config_identities"]["enrolled"].items())),
                                      "revoked": v["config_identities"]["revoked"]}
    measurement = wire.measurement(INPUT_CODE_DIGEST, policy_bytes)
    assert measurement.hex() == v["measurement"] != load("measurement.json")["measurement"]
    status = {"alice": "enrolled", "carol": "enrolled", "bob": "revoked", "mallory": "unknown"}
    assert set(v["identity_seeds"]) == set(status)
    for name, seed in v["identity_seeds"].items():
        public_key = Ed25519PrivateKey.from_private_bytes(h(seed)).public_key().public_bytes_raw()
        assert public_key.hex() == v["public_keys"][name]
        assert wire.producer_id_of(public_key).hex() == v["producer_ids"][name]
        assert policy.identities.name_of(public_key) == (status[name], "" if name == "mallory" else name)
    assert policy.identities.required
    assert v["public_keys"]["alice"] == load("signed_envelope.json")["identity_public_key"]

    enclave = Enclave(enclave_keys(), policy, policy_bytes, bytes(32), measurement, lambda rd: b"")
    reasons = []
    for i, step in enumerate(v["steps"]):
        outcome = enclave.on_record(h(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step["note"], got)
        assert_detail_documented(outcome.rejection)
        assert outcome.publish == ()
        reasons.append(got)
    assert {"bad_signature", "revoked_producer", "unknown_producer", "accepted"} <= set(reasons)
    final = v["final"]
    assert enclave.stats.accepted == final["accepted"] == reasons.count("accepted")
    for stream, count in final["open_window_counts"].items():
        assert enclave.streams[stream].current.count == count, stream
    # Counted under the producer id of the signing key.
    contributors = {pid.hex(): k for pid, k in enclave.streams["visits"].current.contributors.items()}
    assert contributors == final["visits_contributors"] == {v["producer_ids"]["alice"]: 1}
    return reasons


def check_budget_group(v: dict, tmp_path, monkeypatch) -> None:
    """Budget groups (section 15.6): the policy bytes, each group's composition charge by charge
    against the real ledgers, and the signed budget report of a grouped stream."""
    from sealedsum.sidecar.enclave import ledger
    from sealedsum.sidecar.enclave.service import Enclave

    raw_policy = h(v["canonical_hex"])
    policy = policy_from_bytes(raw_policy)
    assert policy.to_bytes() == raw_policy == v["canonical"].encode("ascii")
    configured = enclave_policy(v["config_enclave"], v["config_streams"], None, v["config_budget_groups"])
    assert configured.to_bytes() == raw_policy
    assert wire.measurement(h(v["code_digest"]), raw_policy).hex() == v["measurement"]
    mechanisms = {name: {policy.streams[s].mechanism for s in g.streams} for name, g in policy.budget_groups.items()}
    assert sorted(len(m) for m in mechanisms.values()) == [1, 1, 2]  # Laplace only, Gaussian only, mixed
    assert any(privacy.Mechanism.GAUSSIAN in m and len(m) == 1 for m in mechanisms.values())
    solo = json.loads(v["canonical"])["streams"]["solo"]  # in no group: a budget of its own, as always
    assert policy.streams["solo"].budget_group is None and "budget_group" not in solo and "budget_epsilon" in solo
    real = ledger.ledgers(policy)
    for charge in v["charges"]:
        stream = policy.streams[charge["stream"]]
        assert real[stream.name].releases + 1 == charge["seq"]
        assert ledger.charge_bytes(stream, charge["window"], charge["seq"]).decode() == charge["charge"]
        real[stream.name].charge(charge["window"])
        budget = real[stream.name].summary()
        assert budget == charge["budget"] and budget["ledger_head"] == charge["head"]
        assert {s: real[s].allows() for s in charge["room_for_another"]} == charge["room_for_another"]
        group = policy.budget_groups[stream.budget_group]
        members = {s: (policy.streams[s].cost, real[s].releases) for s in group.streams}
        assert (budget["spent_epsilon"], budget["spent_rho"]) == privacy.group_spent(members, group.budget_delta)
    r = v["budget_report"]
    raw, payload = _check_signed(r, "report")
    report = BudgetReport.from_payload(payload)
    assert report == BudgetReport(**r["report"]) and report.budget == v["charges"][-1]["budget"]
    assert set(report.budget) == {"releases", "spent_epsilon", "spent_rho", "budget_epsilon", "budget_delta",
                                  "remaining_releases", "ledger_head", "budget_group", "group_releases"}
    # A grouped budget object must list its own stream with its own count, and both group keys.
    for bad in (dict(report.budget, group_releases={"amounts": 1}),
                dict(report.budget, group_releases={"amounts": 1, "baskets": 3}),
                {k: x for k, x in report.budget.items() if k != "budget_group"}):
        with pytest.raises(InvalidMessage):
            BudgetReport.from_payload(json.dumps(dict(r["report"], budget=bad), sort_keys=True,
                                                 separators=(",", ":")).encode("ascii"))
    core = Enclave(enclave_keys(), policy, raw_policy, h(v["code_digest"]), h(v["measurement"]), lambda rd: b"")
    for name, led in real.items():
        core.ledgers[name].releases, core.ledgers[name].head = led.releases, led.head
    assert core.answer(h(r["request_hex"]), report.at_ms) == raw


def check_release_interval(v: dict, tmp_path, monkeypatch) -> None:
    """A release interval (section 12): the policy bytes with min_release_interval_seconds, and
    the schedule of closes the real enclave core gives those records and ticks."""
    from sealedsum.sidecar.enclave.service import Enclave

    raw_policy = h(v["canonical_hex"])
    policy = policy_from_bytes(raw_policy)
    assert policy.to_bytes() == raw_policy == v["canonical"].encode("ascii")
    assert enclave_policy(v["config_enclave"], v["config_streams"]).to_bytes() == raw_policy
    assert wire.measurement(h(v["code_digest"]), raw_policy).hex() == v["measurement"]
    stream = policy.streams["taps"]
    interval = stream.min_release_interval_ms
    assert interval == round(json.loads(v["canonical"])["streams"]["taps"]["min_release_interval_seconds"] * 1000)
    core = Enclave(enclave_keys(), policy, raw_policy, h(v["code_digest"]), h(v["measurement"]), lambda rd: b"")
    last_close, closes = None, []
    for i, step in enumerate(v["steps"]):
        if step["action"] == "record":
            effects = core.on_record(h(step["body_hex"]), step["at_ms"])
            got = "accepted" if effects.rejection is None else effects.rejection.reason.value
            assert got == step["expect"], (i, got)
        else:
            effects = core.on_tick(step["at_ms"])
        assert [p.message.kind for p in effects.publish] == step["publishes"], i
        released = [p.message for p in effects.publish if isinstance(p.message, Release)]
        c = step["closes"]
        if c is None:
            assert released == [], i
            continue
        (r,) = released
        assert (r.window, r.count, r.closed_at_ms, r.budget["releases"]) == (
            c["window"], c["records"], c["closed_at_ms"], c["releases"]), i
        # The rule itself: full, and the interval passed since the previous close.
        assert c["records"] >= stream.window_records and c["closed_at_ms"] == step["at_ms"]
        assert last_close is None or c["closed_at_ms"] - last_close >= interval
        last_close = c["closed_at_ms"]
        closes.append(c)
    assert any(c["records"] > stream.window_records for c in closes)  # a waiting window kept counting
    assert [c["releases"] for c in closes] == list(range(1, len(closes) + 1))
    assert core.exhausted == {"taps"} and v["steps"][-1]["expect"] == "budget_exhausted"
    cp = core.checkpoint(True)
    assert cp.state["core"]["streams"]["taps"]["last_close_ms"] == v["last_close_ms"] == last_close


CHECKERS = {
    "key_bundle": check_key_bundle,
    "policy": check_policy,
    "code_digest": check_code_digest,
    "measurement": check_measurement,
    "quote": check_quote,
    "attest_request": check_attest_request,
    "attest_reply": check_attest_reply,
    "nitro_reply": check_nitro_reply,
    "envelope": check_envelope,
    "sealed_record": check_sealed_record,
    "signed_envelope": check_signed_envelope,
    "result": check_result,
    "rejections": check_rejections,
    "budget_request": check_budget_request,
    "budget_report": check_budget_report,
    "budget_exhausted": check_budget_exhausted,
    "key_rotated": check_key_rotated,
    "notices": check_notices,
    "ledger": check_ledger,
    "sealed_state": check_sealed_state,
    "packed_envelope": check_packed_envelope,
    "record_batch": check_record_batch,
    "budget_group": check_budget_group,
    "release_interval": check_release_interval,
}


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector(path: Path, tmp_path, monkeypatch) -> None:
    vector = json.loads(path.read_text())
    assert vector.get("kind") in CHECKERS, f"{path.name}: unknown kind {vector.get('kind')!r}"
    CHECKERS[vector["kind"]](vector, tmp_path, monkeypatch)


def test_every_kind_has_a_vector() -> None:
    kinds = {json.loads(p.read_text())["kind"] for p in VECTOR_FILES}
    assert kinds == REQUIRED_KINDS == set(CHECKERS)


def test_envelopes_cover_kinds_producers_and_clipping() -> None:
    envelopes = [json.loads(p.read_text()) for p in VECTOR_FILES]
    envelopes = [e for e in envelopes if e["kind"] == "envelope"]
    assert {len(e["ciphertexts"]) for e in envelopes} >= {1, 3}
    assert {e["stream_kind"] for e in envelopes} == {"sum", "mean", "histogram", "vector"}
    assert any(v < 0 for e in envelopes for v in e["encoded"])
    assert any(e["window"] == 0 for e in envelopes) and any(e["window"] > 0 for e in envelopes)
    assert any(e["clipped_count"] for e in envelopes if e["stream_kind"] != "vector")
    assert any(e["clipped_count"] for e in envelopes if e["stream_kind"] == "vector")  # L2 scaling
    assert any(e["producer_id"] == "00" * 16 for e in envelopes)
    assert any(e["producer_id"] != "00" * 16 for e in envelopes)


def test_rejections_pin_the_check_order() -> None:
    """Every reason occurs, and each step whose note says 'A is checked before B' of two
    reasons gets A, with A before B in CHECK_ORDER."""
    v = load("rejections.json")
    steps = v["steps"] + v["identity_session"]["steps"]
    reasons = [s["expect"] for s in steps if "expect" in s]
    assert set(CHECK_ORDER) == {r.value for r in RejectReason} == set(reasons) - {"accepted"}
    pinned = set()
    for s in steps:
        for first, then in re.findall(r"([a-z_]+) is checked before ([a-z_]+)", s["note"]):
            if first in CHECK_ORDER and then in CHECK_ORDER:
                assert s["expect"] == first and CHECK_ORDER.index(first) < CHECK_ORDER.index(then), s["note"]
                pinned.add((first, then))
    # Each identity reason is pinned against its neighbours in the order.
    assert {("malformed", "bad_signature"), ("bad_signature", "revoked_producer"), ("bad_signature", "unknown_producer"),
            ("revoked_producer", "unknown_stream"), ("unknown_producer", "wrong_epoch"),
            ("unknown_producer", "duplicate")} <= pinned
    publishes = [p["kind"] for s in v["steps"] for p in s.get("publishes", [])]
    assert publishes.count(EXHAUSTED_KIND) == 1 and publishes[-1] == EXHAUSTED_KIND
    # After the notice, only duplicates of counted records escape budget_exhausted on that stream.
    after = v["steps"][[i for i, s in enumerate(v["steps"]) if EXHAUSTED_KIND in
                        [p["kind"] for p in s.get("publishes", [])]][0] + 1:]
    assert {s["expect"] for s in after if s.get("stream") == "visits"} == {"budget_exhausted", "duplicate"}
    assert any(s["expect"] == "accepted" for s in after if s.get("stream") != "visits")  # other streams go on


def test_runtime_line_format() -> None:
    check_runtime_line_format(load("code_digest.json"))


def test_vectors_are_reproducible(tmp_path) -> None:
    """generate.py rebuilds exactly the committed files (fixed keys, fixed randomness)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vector_generator", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert {f"{name}.json" for name in built} == {p.name for p in VECTOR_FILES}
    for name, doc in built.items():
        committed = load(f"{name}.json")
        committed.pop("generator")
        assert committed == json.loads(json.dumps(doc)), name


# -- docs/protocol.md must not drift from the code ------------------------------------------

def _doc() -> str:
    return PROTOCOL_DOC.read_text(encoding="utf-8")


def _magics() -> dict[str, bytes]:
    from sealedsum.sidecar.enclave import sealing

    found = {name: value for name, value in vars(wire).items() if name.endswith("_MAGIC")}
    found["sealing.SEALED_MAGIC"] = sealing.SEALED_MAGIC
    return found


def test_doc_mentions_every_reject_reason() -> None:
    doc = _doc()
    missing = [r.value for r in RejectReason if f"`{r.value}`" not in doc]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_doc_mentions_every_magic() -> None:
    doc = _doc()
    magics = _magics()
    assert len(magics) >= 8
    for name, magic in magics.items():
        text = magic[:3].decode("ascii") + "\\x%02x" % magic[3]
        hex_spaced = " ".join(f"{b:02x}" for b in magic)
        assert text in doc, f"{name} ({text}) is not in docs/protocol.md"
        assert hex_spaced in doc, f"{name} as hex ({hex_spaced}) is not in docs/protocol.md"


def test_doc_mentions_every_label_and_header() -> None:
    from sealedsum.sidecar.enclave import keyring, ledger
    from sealedsum.sidecar.enclave_process import store as state
    from sealedsum.sidecar import measurement as measure
    from sealedsum.sidecar.platform import emulated

    doc = _doc()
    labels = [wire.REPORT_DATA_LABEL, wire.MEASUREMENT_LABEL, measure.CODE_LABEL, emulated.SEALING_INFO,
              keyring.SEALED_AAD, state.STATE_AAD, ledger.LEDGER_LABEL, signing.QUOTE.encode(),
              signing.RESULT.encode(), signing.ENVELOPE.encode(), b"sealedsum/v1/producer-id\x00"]
    assert wire.producer_id_of(bytes(32)) == hashlib.sha256(b"sealedsum/v1/producer-id\x00" + bytes(32)).digest()[:16]
    for label in labels:
        assert label.rstrip(b"\x00").decode("ascii") in doc, label
    runtime_source = (ROOT / "sidecar" / "enclave_process" / "runtime.py").read_text()
    headers = set(re.findall(r'"(x-sealedsum-[a-z-]+)"', runtime_source))
    assert headers == {"x-sealedsum-reason", "x-sealedsum-detail", "x-sealedsum-rejected-at", "x-sealedsum-batch-index",
                       "x-sealedsum-original-bytes", "x-sealedsum-stream"}
    from sealedsum.common.topology import NOTIFY_HEADER

    for header in headers | {NOTIFY_HEADER}:
        assert header in doc, header
    for dist in measure.RUNTIME_DISTRIBUTIONS:
        assert dist.lower() in doc, dist
    assert emulated.COUNTER_FILE in doc


@functools.cache
def _detail_templates() -> dict[str, tuple[re.Pattern, ...]]:
    """Section 11.4's table of x-sealedsum-detail strings: every backticked string of a reason's
    row, with each ``<field>`` standing for any text."""
    section = _doc().split("### 11.4", 1)[1].split("\n### ", 1)[0]
    table = section.split("The detail strings the reference enclave writes:", 1)[1]
    rows = re.findall(r"^\| `([a-z_]+)` \| (.*) \|$", table, re.MULTILINE)
    assert [reason for reason, _ in rows] == sorted({r.value for r in RejectReason}, key=CHECK_ORDER.index)
    return {reason: tuple(re.compile("".join(".+" if part.startswith("<") else re.escape(part)
                                             for part in re.split(r"(<[A-Za-z_]+>)", text)))
                          for text in re.findall(r"`([^`]+)`", cell) if text != reason)
            for reason, cell in rows}


def assert_detail_documented(rejection) -> None:
    """A rejection's detail is one section 11.4 lists for its reason (``unknown_stream``: the
    stream name, which the row states in words)."""
    if rejection is None:
        return
    templates = _detail_templates()[rejection.reason.value]
    if rejection.reason is RejectReason.UNKNOWN_STREAM:
        assert not templates and wire.STREAM_NAME.fullmatch(rejection.detail), rejection.detail
        return
    assert any(t.fullmatch(rejection.detail) for t in templates), (rejection.reason.value, rejection.detail)


def _rendered(node: ast.expr) -> list[str] | None:
    """The strings an f-string expression can give, each field shown as ``7`` (``'7'`` with
    ``!r``; a wire constant as its value; a decoder's ``self._what`` as each thing a record
    decoder reads); None when it is not a string built in place."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                field = ast.unparse(value.value)
                if field == "self._what":
                    parts.append(["envelope", "signed envelope", "record batch"])
                elif field.isupper() and hasattr(wire, field):  # a wire constant: its value
                    parts.append([str(getattr(wire, field))])
                else:
                    parts.append(["'7'" if value.conversion == ord("r") else "7"])
            else:
                parts.append(_rendered(value))
        return ["".join(combo) for combo in itertools.product(*parts)]
    if isinstance(node, ast.IfExp):
        body, orelse = _rendered(node.body), _rendered(node.orelse)
        return None if body is None or orelse is None else body + orelse
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _rendered(node.left), _rendered(node.right)
        return None if left is None or right is None else [a + b for a in left for b in right]
    return None


def _written_details() -> tuple[list[tuple[str, str]], list[str]]:
    """(reason, detail) for every RecordRejected the enclave code builds with a detail written in
    place (``_reject`` is validity.py's out_of_range), and every InvalidMessage text of the wire
    decoders (the malformed details)."""
    written = []
    for path in sorted((ROOT / "sidecar").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "RecordRejected" and isinstance(node.args[0], ast.Attribute) \
                    and ast.unparse(node.args[0].value) == "RejectReason":
                reason, detail = RejectReason[node.args[0].attr].value, node.args[1]
            elif name == "_reject" and path.name == "validity.py":
                reason, detail = RejectReason.OUT_OF_RANGE.value, node.args[0]
            else:
                continue
            written += [(reason, text) for text in _rendered(detail) or ()]
    decoder = [text for node in ast.walk(ast.parse((ROOT / "common" / "wire.py").read_text(encoding="utf-8")))
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InvalidMessage" and node.args
               for text in _rendered(node.args[0]) or ()]
    return written, decoder


def test_doc_lists_exactly_the_detail_strings_the_enclave_writes() -> None:
    """Section 11.4: every detail the enclave code writes is listed for its reason, and every
    listed one is written (the decoders' messages for malformed and a batch's too_large)."""
    templates = _detail_templates()
    written, decoder = _written_details()
    assert len(written) > 30
    for reason, text in written:
        assert any(t.fullmatch(text) for t in templates[reason]), (reason, text)
    for reason, patterns in templates.items():
        sources = [text for r, text in written if r == reason]
        if reason in ("malformed", "too_large"):
            sources += decoder
        for pattern in patterns:
            assert any(pattern.fullmatch(text) for text in sources), (reason, pattern.pattern)


def _section(number: str) -> str:
    """Section ``number`` of docs/protocol.md up to the next section or subsection, whitespace
    collapsed (so a number's phrase may wrap)."""
    text = _doc().split(f"\n## {number}. " if "." not in number else f"\n### {number} ", 1)[1]
    return re.sub(r"\s+", " ", re.split(r"\n##+ ", text, maxsplit=1)[0])


def test_doc_numbers_are_the_codes_constants() -> None:
    """Every operational number sections 2, 8, 11.4, 13.1 and 17 state, from the constant the
    code uses: a change to one of them fails here until the text follows."""
    from sealedsum.common import topology as t
    from sealedsum.common.config import BrokerSettings
    from sealedsum.sidecar.enclave_process import checkpoint as c, runtime as r

    broker = BrokerSettings()
    mib = 1 << 20
    expected = {
        "2": [f"`broker.max_queued_records` ({broker.max_queued_records:,} by default)".replace(",", " "),
              f"`x-delivery-limit` = {t.DELIVERY_LIMIT}",
              f"prefetch {r.PREFETCH_MAX} deliveries, fewer when one record can exceed "
              f"{r.PREFETCH_BYTES // r.PREFETCH_MAX >> 10} KiB: at most {r.PREFETCH_BYTES // mib} MiB in flight, "
              f"never below {r.PREFETCH_MIN}",
              f"`x-max-length` = {t.REJECTED_QUEUE_MAX_LENGTH}, `x-max-length-bytes` = {t.REJECTED_QUEUE_MAX_BYTES} "
              f"({t.REJECTED_QUEUE_MAX_BYTES // mib} MiB)",
              f"`x-message-ttl` = {t.ATTEST_REQUEST_TTL_MS}; `x-max-length` = {t.ATTEST_QUEUE_MAX_LENGTH}, "
              f"`x-max-length-bytes` = {t.ATTEST_QUEUE_MAX_BYTES} ({t.ATTEST_QUEUE_MAX_BYTES // mib} MiB)",
              f"manual acks and prefetch {r.RPC_PREFETCH} (section 8)",
              f"tries again every {r.LOCK_RETRY_S:g} s"],
        "8": [f"(default `{int(broker.attest_timeout_seconds * 1000)}`)",
              f"`broker.attest_timeout_seconds` (default {broker.attest_timeout_seconds:g} s)",
              f"a body larger than {r.RPC_MAX_REQUEST_BYTES} bytes",
              f"Requests not consumed within {t.ATTEST_REQUEST_TTL_MS // 1000} s expire",
              f"the queue's {t.ATTEST_REQUEST_TTL_MS // 1000} s TTL",
              f"looks at up to {r.RPC_PER_PASS} per pass",
              f"at most {r.RPC_ACCOUNT_RATE_PER_S:g} a second per `user_id` (bursts of {r.RPC_ACCOUNT_BURST};",
              f"at most {r.RPC_RATE_PER_S:g} a second in all (bursts of {r.RPC_BURST})",
              f"the enclave reopens it after {r.RPC_REOPEN_S:g} s"],
        "11.4": [f"only its first {r.DEAD_LETTER_PREFIX_BYTES} bytes"],
        "13.1": [f"publishes it again every {r.HELD_RETRY_S:g} s until a queue takes it"],
        "17": [f"`ACK_BATCH_MAX` = {r.ACK_BATCH_MAX} being half the largest prefetch of {r.PREFETCH_MAX}",
               f"batches go out at least every {r.FLUSH_EVERY_S:g} s",
               f"after {c.STORAGE_RETRY_FIRST_S:g} s doubling to {c.STORAGE_RETRY_MAX_S:g} s",
               f"every {c.BASE_EVERY_S:g} s and when the journal passes {c.JOURNAL_MAX_BYTES // mib} MiB"],
    }
    for number, phrases in expected.items():
        text = _section(number)
        for phrase in phrases:
            assert phrase in text, (number, phrase)
    # The rules those numbers come from, as the text states them.
    assert r.ACK_BATCH_MAX == r.PREFETCH_MAX // 2
    for prefetch in (r.PREFETCH_MIN, 100, r.PREFETCH_MAX):
        assert r.ack_batch_for(prefetch) == min(r.ACK_BATCH_MAX, prefetch // 2)
    assert r.prefetch_for(1) == r.PREFETCH_MAX and r.prefetch_for(r.PREFETCH_BYTES // r.PREFETCH_MAX) == r.PREFETCH_MAX
    assert r.prefetch_for(r.PREFETCH_BYTES // r.PREFETCH_MAX + 1) < r.PREFETCH_MAX
    assert r.prefetch_for(r.PREFETCH_BYTES) == r.PREFETCH_MIN


def test_doc_check_table_is_in_check_order() -> None:
    """The rows of the table in section 11.1 name the reasons in CHECK_ORDER."""
    section = _doc().split("### 11.1", 1)[1].split("###", 1)[0]
    rows = re.findall(r"^\| (\d+) \|.*\| `([a-z_]+)` \|$", section, re.MULTILINE)
    assert [int(n) for n, _ in rows] == list(range(1, len(CHECK_ORDER) + 1))
    assert [reason for _, reason in rows] == CHECK_ORDER


def test_doc_names_every_policy_key_and_payload_field() -> None:
    from sealedsum.common.policy import StreamPolicy
    from sealedsum.common.results import BUDGET_FIELDS

    doc = _doc()
    for key in StreamPolicy.KEYS:
        assert f"`streams.NAME.{key}`" in doc or f"`{key}`" in doc, key
    for cls in (Release, BudgetExhausted, BudgetReport, KeyRotated):
        for name in (f.name for f in dataclasses.fields(cls)):
            assert f"| `{name}` |" in doc, (cls.__name__, name)
    for name in BUDGET_FIELDS:
        assert f"| `{name}` |" in doc, name


def test_doc_worked_examples_match_the_vectors() -> None:
    doc = re.sub(r"\s+", "", _doc())
    q = load("quote.json")
    for field in ("measurement", "report_data", "signature", "platform_public_key"):
        assert q[field] in doc, field
    e = load("envelope_dim1.json")
    raw = h(e["envelope_hex"])
    assert raw[:e["offsets"]["ciphertexts"]].hex() in doc
    e3 = load("envelope_dim3.json")
    assert h(e3["envelope_hex"])[:e3["offsets"]["ciphertexts"]].hex() in doc  # a non-zero producer_id
    assert load("policy.json")["canonical"] in doc
    for chain in load("ledger.json")["chains"]:
        if chain["stream"] == "wellbeing":
            assert chain["genesis"] in doc
            for charge in chain["charges"]:
                assert charge["head"] in doc and re.sub(r"\s+", "", charge["charge"]) in doc
    assert load("budget_request.json")["request_hex"] in doc
    s = load("signed_envelope.json")
    for field in ("identity_ed25519_seed", "identity_public_key", "identity_public_key_base64", "producer_id",
                  "signature"):
        assert s[field] in doc, field
    wrapper = h(s["signed_envelope_hex"])
    assert wrapper[:100 + 70].hex() in doc  # magic, key, signature and the envelope's header
    assert s["sealed_hex"][:64] in doc and s["sealed_hex"][64:96] in doc  # ephemeral key, tag
    identities = json.loads(load("rejections.json")["identity_session"]["policy_canonical"])["identities"]
    assert json.dumps({"identities": identities}, sort_keys=True, separators=(",", ":"))[1:-1] in doc
    assert load("budget_exhausted.json")["payload"] in doc
    grouped = load("budget_group.json")["charges"][-1]["budget"]  # section 15.6's example
    assert json.dumps(grouped, sort_keys=True, separators=(",", ":")) in doc
    assert load("key_rotated.json")["payload"] in doc
    for part in ("rejected", "counted"):
        assert re.sub(r"\s+", "", load("notices.json")[part]["payload"]) in doc, part
    assert load("result_histogram.json")["payload"] in doc
    packed = load("envelope_packed.json")
    for text in (packed["policy_canonical"], packed["policy_sha256"], packed["measurement"],
                 packed["envelope"]["envelope_hex"][:2 * packed["envelope"]["offsets"]["ciphertexts"]],
                 packed["records"][0]["paillier_plaintexts"][0][-30:]):
        assert text in doc, text
