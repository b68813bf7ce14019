"""Known-answer vectors (``tests/vectors/*.json``) decoded with the real code.

The vectors are produced by ``tests/vectors/generate.py`` from fixed keys and fixed
randomness, with hand-written encoders that follow ``docs/protocol.md``. Here every
file is decoded, verified and re-encoded with ``common.wire`` and friends, so a change
to the wire format, the hashing, the signatures or the check order fails a test. The
last tests keep ``docs/protocol.md`` in step with the constants in the code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import types
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl import bindings
from nacl.public import PrivateKey, SealedBox
from phe import paillier

from common import attestation, errors, fixedpoint, privacy, signing, wire
from common.errors import (
    AttestationError,
    InvalidMessage,
    InvalidResultSignature,
    RejectReason,
    UntrustedPlatform,
)
from common.policy import EnclavePolicy
from common.results import Release, verify_result

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"

VECTOR_FILES = sorted(VECTORS.glob("*.json"))
REQUIRED_KINDS = {
    "key_bundle", "policy", "code_digest", "measurement", "quote", "attest_request", "attest_reply",
    "envelope", "sealed_record", "result", "rejections",
}


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
    from sidecar.enclave.keyring import EnclaveKeys

    k = keys_vector()
    return EnclaveKeys(k["epoch"], PrivateKey(h(k["x25519_private"])),
                       Ed25519PrivateKey.from_private_bytes(h(k["ed25519_seed"])), paillier_private())


def vector_policy() -> tuple[EnclavePolicy, bytes]:
    p = load("policy.json")
    return EnclavePolicy.from_mapping(p["config_enclave"], p["config_streams"]), h(p["canonical_hex"])


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
    policy = EnclavePolicy.from_mapping(v["config_enclave"], v["config_streams"])
    assert policy.to_bytes() == canonical
    assert EnclavePolicy.from_bytes(canonical).to_bytes() == canonical
    assert hashlib.sha256(canonical).hexdigest() == v["sha256"]
    # Canonical form: sorted keys, no whitespace, ASCII only.
    assert json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":")).encode() == canonical
    assert b" " not in canonical and max(canonical) < 0x80
    assert set(v["noise_plans"]) == set(policy.streams)
    for name, expected in v["noise_plans"].items():
        stream = policy.streams[name]
        plan = stream.noise_plan()
        assert stream.value_bound == expected["value_bound_fixed"]
        assert plan.sensitivity_l1 == expected["sensitivity_l1"]
        assert plan.sensitivity_l2 == pytest.approx(expected["sensitivity_l2"], rel=1e-12)
        if expected["rho"] is None:
            assert plan.rho is None and plan.mechanism == privacy.LAPLACE
        else:
            assert plan.rho == pytest.approx(expected["rho"], rel=1e-12)
            # ε = ρ + 2·sqrt(ρ·ln(1/δ)) holds for the ρ chosen.
            assert privacy.epsilon_from_rho_delta(plan.rho, stream.delta) == pytest.approx(stream.epsilon, rel=1e-12)
        assert plan.sum_scale == pytest.approx(expected["sum_scale"], rel=1e-12)
        assert plan.count_scale == pytest.approx(expected["count_scale"], rel=1e-12)
        assert privacy.noise_std(plan.mechanism, plan.sum_scale) == pytest.approx(expected["sum_std"], rel=1e-12)
        assert privacy.noise_std(plan.mechanism, plan.count_scale) == pytest.approx(expected["count_std"], rel=1e-12)


def check_code_digest(v: dict, tmp_path, monkeypatch) -> None:
    from sidecar.platform import measure

    for f in v["files"]:
        path = tmp_path / f["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(h(f["content_hex"]))
    packages = tuple(types.SimpleNamespace(__file__=str(tmp_path / name / "__init__.py"))
                     for name in ("common", "sidecar"))
    monkeypatch.setattr(measure, "MEASURED_PACKAGES", packages)
    monkeypatch.setattr(measure, "runtime_line", lambda: v["runtime_line"])
    assert [rel for rel, _ in measure.measured_files()] == v["measured_order"]
    assert measure.code_digest() == h(v["code_digest"])
    assert hashlib.sha256(h(v["digest_input_hex"])).digest() == h(v["code_digest"])
    assert h(v["digest_input_hex"]).startswith(measure.CODE_LABEL)
    assert h(v["digest_input_hex"]).endswith(v["runtime_line"].encode("ascii"))


def check_runtime_line_format(v: dict) -> None:
    from sidecar.platform import measure

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
    assert code == h(load("code_digest.json")["code_digest"])


def check_quote(v: dict, tmp_path, monkeypatch) -> None:
    from sidecar.platform.emulated import EmulatedPlatform

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


def check_attest_request(v: dict, tmp_path, monkeypatch) -> None:
    from common import amqp
    from common.config import Topology

    raw = h(v["request_hex"])
    assert wire.AttestRequest.from_bytes(raw).nonce == h(v["nonce"])
    assert wire.AttestRequest(h(v["nonce"])).to_bytes() == raw
    assert len(raw) == 4 + wire.NONCE_SIZE
    for bad in (raw[:-1], raw + b"\x00", b"SSA\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.AttestRequest.from_bytes(bad)
    props = v["amqp"]
    assert props["reply_to"] == amqp.DIRECT_REPLY_TO
    assert props["routing_key"] == Topology("sealedsum").attest_queue
    assert props["app_id"] == amqp.APP_ID
    # The enclave core answers this request with exactly the reply vector.
    from sidecar.enclave.service import Enclave
    from sidecar.platform.emulated import EmulatedPlatform

    q = load("quote.json")
    reply = load("attest_reply.json")
    policy, policy_bytes = vector_policy()
    platform = EmulatedPlatform(Ed25519PrivateKey.from_private_bytes(h(q["platform_ed25519_seed"])), bytes(32),
                                clock_ms=lambda: q["issued_at_ms"])
    measurement = h(q["measurement"])
    enclave = Enclave(enclave_keys(), policy, policy_bytes, h(reply["code_digest"]), measurement,
                      lambda rd: platform.quote(measurement, rd))
    assert enclave.attest(raw) == h(reply["reply_hex"])


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
    assert v["amqp"]["type"] == "attest-reply"

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
            "StaleQuote", "AttestationError"} <= expected_errors
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
    assert int.from_bytes(raw[off["key_epoch"]:off["key_epoch"] + 4], "big") == env.key_epoch
    assert int.from_bytes(raw[off["sent_at_ms"]:off["sent_at_ms"] + 8], "big") == env.sent_at_ms
    assert int.from_bytes(raw[off["window"]:off["window"] + 8], "big") == env.window
    assert raw[off["stream_len"]] == len(name) and raw[off["stream"]:off["stream"] + len(name)] == name
    assert int.from_bytes(raw[off["count"]:off["count"] + 2], "big") == len(env.ciphertexts)
    assert int.from_bytes(raw[off["width"]:off["width"] + 2], "big") == env.width
    assert len(raw) == off["ciphertexts"] + len(env.ciphertexts) * env.width

    # Clipping and fixed point, as the producer does it.
    clipped, n_clipped = fixedpoint.clip(v["values"], v["lower"], v["upper"])
    assert clipped == v["clipped"]
    assert n_clipped == sum(a != b for a, b in zip(v["values"], v["clipped"]))
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
    for bad in (raw[:-1], raw + b"\x00", b"SSE\x02" + raw[4:]):
        with pytest.raises(InvalidMessage):
            wire.Envelope.from_bytes(bad)


def check_sealed_record(v: dict, tmp_path, monkeypatch) -> None:
    from common import amqp
    from common.config import Topology
    from sidecar.enclave.records import max_record_bytes, open_record

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
    opened, stream = open_record(sealed, keys, policy, env.sent_at_ms + 1000, max_record_bytes(policy, keys))
    assert opened == env and stream.name == env.stream
    # Publishing: persistent, to PREFIX.records with key "record", nothing identifying.
    props = amqp.properties("record")
    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").records_exchange
    assert props.delivery_mode == spec["delivery_mode"] == 2
    assert props.content_type == spec["content_type"] and props.type == spec["type"]
    assert props.app_id == spec["app_id"]
    assert props.message_id is None and props.correlation_id is None and props.headers is None
    assert props.timestamp is None and props.user_id is None


def check_result(v: dict, tmp_path, monkeypatch) -> None:
    from common import amqp
    from common.config import Topology

    raw = h(v["message_hex"])
    message = wire.SignedMessage.from_bytes(raw)
    payload = v["payload"].encode("ascii")
    assert message.payload == payload
    assert message.signature == h(v["signature"])
    assert message.to_bytes() == raw
    assert int.from_bytes(raw[4:8], "big") == len(payload) and len(raw) == 8 + len(payload) + 64
    assert signing.signing_input(signing.RESULT, payload) == h(v["signing_input_hex"])
    assert h(v["signing_input_hex"]) == b"sealedsum/v1/result\x00" + payload
    ed_pub = h(v["enclave_ed25519_public"])
    assert ed_pub == h(keys_vector()["ed25519_public"])
    signing.verify(ed_pub, signing.RESULT, payload, message.signature, error=InvalidResultSignature, what="result")

    release = Release.from_payload(payload)
    assert release == Release(**v["release"])
    assert release.to_payload() == payload
    assert json.loads(payload) == v["release"]
    assert release.sum == [f / 2 ** release.fraction_bits for f in release.sum_fixed]
    if release.count > 0:
        assert release.mean == [s / release.count for s in release.sum]
    policy, _ = vector_policy()
    plan = policy.streams[release.stream].noise_plan()
    assert release.sum_noise_scale == plan.sum_scale and release.count_noise_scale == plan.count_scale
    assert release.rho == plan.rho

    # A consumer holding the attested enclave accepts it...
    enclave = attested_enclave()
    assert release.measurement == enclave.measurement.hex()
    assert verify_result(raw, enclave) == release
    # ...and refuses an altered payload, a foreign measurement, or a broken frame.
    altered = raw.replace(b'"count":%d' % release.count, b'"count":%d' % (release.count + 1))
    assert altered != raw
    with pytest.raises(InvalidResultSignature):
        verify_result(altered, enclave)
    other = Release(**dict(v["release"], measurement="00" * 32)).to_payload()
    seed = Ed25519PrivateKey.from_private_bytes(h(keys_vector()["ed25519_seed"]))
    resigned = wire.SignedMessage(other, signing.sign(seed, signing.RESULT, other)).to_bytes()
    with pytest.raises(InvalidResultSignature):
        verify_result(resigned, enclave)
    with pytest.raises(InvalidResultSignature):
        verify_result(raw[:-1], enclave)

    spec = v["amqp"]
    assert spec["exchange"] == Topology("sealedsum").results_exchange
    assert spec["routing_key"] == release.stream
    props = amqp.properties("result")
    assert props.delivery_mode == spec["delivery_mode"] and props.type == spec["type"]


def check_rejections(v: dict, tmp_path, monkeypatch) -> None:
    from sidecar.enclave.records import max_record_bytes
    from sidecar.enclave.service import Enclave

    policy, policy_bytes = vector_policy()
    keys = enclave_keys()
    assert max_record_bytes(policy, keys) == v["size_limit"]
    enclave = Enclave(keys, policy, policy_bytes, bytes(32), bytes(32), lambda rd: b"")
    reasons_seen = set()
    for i, step in enumerate(v["steps"]):
        if "tick_ms" in step:
            assert enclave.on_tick(step["tick_ms"]) == ()
            assert enclave.stats.windows_withheld == step["windows_withheld"], (i, step.get("note"))
            continue
        outcome = enclave.on_record(h(step["body_hex"]), step["now_ms"])
        got = "accepted" if outcome.rejection is None else outcome.rejection.reason.value
        assert got == step["expect"], (i, step.get("note"), got)
        assert outcome.releases == ()
        reasons_seen.add(got)
    assert reasons_seen == {r.value for r in RejectReason} | {"accepted"}
    assert enclave.stats.windows_withheld == v["final_stats"]["windows_withheld"]
    assert enclave.stats.windows_released == v["final_stats"]["windows_released"]
    assert keys.decryptions == 0  # no single record is ever decrypted


CHECKERS = {
    "key_bundle": check_key_bundle,
    "policy": check_policy,
    "code_digest": check_code_digest,
    "measurement": check_measurement,
    "quote": check_quote,
    "attest_request": check_attest_request,
    "attest_reply": check_attest_reply,
    "envelope": check_envelope,
    "sealed_record": check_sealed_record,
    "result": check_result,
    "rejections": check_rejections,
}


@pytest.mark.parametrize("path", VECTOR_FILES, ids=[p.stem for p in VECTOR_FILES])
def test_vector(path: Path, tmp_path, monkeypatch) -> None:
    vector = json.loads(path.read_text())
    assert vector.get("kind") in CHECKERS, f"{path.name}: unknown kind {vector.get('kind')!r}"
    CHECKERS[vector["kind"]](vector, tmp_path, monkeypatch)


def test_every_kind_has_a_vector() -> None:
    kinds = {json.loads(p.read_text())["kind"] for p in VECTOR_FILES}
    assert kinds == REQUIRED_KINDS == set(CHECKERS)


def test_envelopes_cover_dimensions_and_a_negative_value() -> None:
    envelopes = [json.loads(p.read_text()) for p in VECTOR_FILES]
    envelopes = [e for e in envelopes if e["kind"] == "envelope"]
    assert {len(e["ciphertexts"]) for e in envelopes} >= {1, 3}
    assert any(v < 0 for e in envelopes for v in e["encoded"])
    assert any(e["window"] == 0 for e in envelopes) and any(e["window"] > 0 for e in envelopes)
    assert any(e["values"] != e["clipped"] for e in envelopes)


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
    from sidecar.enclave import keyring

    found = {name: value for name, value in vars(wire).items() if name.endswith("_MAGIC")}
    found["keyring.SEALED_MAGIC"] = keyring.SEALED_MAGIC
    return found


def test_doc_mentions_every_reject_reason() -> None:
    doc = _doc()
    missing = [r.value for r in RejectReason if f"`{r.value}`" not in doc]
    assert not missing, f"docs/protocol.md does not mention {missing}"


def test_doc_mentions_every_magic() -> None:
    doc = _doc()
    magics = _magics()
    assert len(magics) >= 7
    for name, magic in magics.items():
        text = magic[:3].decode("ascii") + "\\x%02x" % magic[3]
        hex_spaced = " ".join(f"{b:02x}" for b in magic)
        assert text in doc, f"{name} ({text}) is not in docs/protocol.md"
        assert hex_spaced in doc, f"{name} as hex ({hex_spaced}) is not in docs/protocol.md"


def test_doc_mentions_every_label_and_header() -> None:
    from sidecar.platform import emulated, measure
    from sidecar.enclave import keyring

    doc = _doc()
    labels = [wire.REPORT_DATA_LABEL, wire.MEASUREMENT_LABEL, measure.CODE_LABEL, emulated.SEALING_INFO,
              keyring.SEALED_AAD, signing.QUOTE.encode(), signing.RESULT.encode()]
    for label in labels:
        assert label.rstrip(b"\x00").decode("ascii") in doc, label
    runtime_source = (ROOT / "sidecar" / "runtime.py").read_text()
    headers = set(re.findall(r'"(x-sealedsum-[a-z-]+)"', runtime_source))
    assert headers == {"x-sealedsum-reason", "x-sealedsum-detail", "x-sealedsum-rejected-at"}
    for header in headers:
        assert header in doc, header
    for dist in measure.RUNTIME_DISTRIBUTIONS:
        assert dist.lower() in doc, dist


def test_doc_worked_examples_match_the_vectors() -> None:
    doc = re.sub(r"\s+", "", _doc())
    q = load("quote.json")
    for field in ("measurement", "report_data", "signature", "platform_public_key"):
        assert q[field] in doc, field
    e = load("envelope_dim1.json")
    raw = h(e["envelope_hex"])
    assert raw[:e["offsets"]["ciphertexts"]].hex() in doc
    assert load("policy.json")["canonical"] in doc
