"""Fixtures of the fuzz tests (the policy, and the machinery, are in ``tests/fuzzing.py``):
the wall-clock guard around every test here, ``fw`` (a fresh ``FuzzWorld``) and ``corpus``
(valid messages of every kind); and ``test_fuzz_total`` moved to the end of the session, so
that it sees what every fuzz test before it ran."""

from __future__ import annotations

import json
import os

import pytest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sealedsum.common import wire
from sealedsum.common.results import BUDGET_KIND, EXHAUSTED_KIND, RESULT_KIND
from sealedsum.producers.client import RecordSealer

from tests.fuzzing import (
    PARSERS,
    STREAMS,
    VALUES,
    FuzzWorld,
    Seed,
    decode_strictly,
    vector,
    wall_clock,
)

TOTAL_TEST = "test_fuzz_total"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """``test_fuzz_total`` last, whatever order the files were given or collected in."""
    items.sort(key=lambda item: item.name == TOTAL_TEST)  # stable: the others keep their order


@pytest.fixture(autouse=True)
def wall_clock_guard(request):
    """Every test here runs under ``tests.fuzzing.wall_clock`` (CASE_LIMIT_S, TEST_LIMIT_S)."""
    with wall_clock(request):
        yield


@pytest.fixture
def fw(small_keys) -> FuzzWorld:
    return FuzzWorld(small_keys)


@pytest.fixture(scope="session")
def corpus(small_keys) -> dict[str, list[Seed]]:
    """Valid messages of every kind: from the test vectors and from a live enclave core (built
    once, shared by the fuzz modules; under ``"_world"``, the ``FuzzWorld`` that made them)."""
    w = FuzzWorld(small_keys)
    e = w.enclave
    nonce = os.urandom(32)
    reply = e.attest(wire.AttestRequest(nonce).to_bytes())
    parsed = wire.AttestReply.from_bytes(reply)
    releases = []
    for name, values in VALUES.items():
        sealer = RecordSealer(w.attested)
        for i in range(8):
            sealer = RecordSealer(w.attested) if i % 2 == 0 else sealer
            out = e.on_record(sealer.seal(name, values[i % len(values)], now_ms=w.clock).body, w.clock)
            assert out.rejection is None
            releases += out.publish
        w.clock += 60_000  # time-closed windows ("h") close when the clock passes their end
        releases += e.on_tick(w.clock).publish
    assert {p.stream for p in releases} == set(STREAMS)
    report = e.answer(wire.BudgetRequest(nonce, "m").to_bytes(), w.clock)
    signed = [bytes.fromhex(vector(v)["message_hex"]) for v in
              ("result_laplace", "result_gaussian", "result_histogram", "budget_exhausted", "budget_report")]
    signed += [p.body for p in releases] + [report]
    envelopes = [bytes.fromhex(vector(v)["envelope_hex"]) for v in
                 ("envelope_dim1", "envelope_dim3", "envelope_histogram", "envelope_vector")]
    envelopes += [w.envelope(name) for name in STREAMS]
    signed_envelopes = [w.signed_envelope(name) for name in STREAMS]
    identity = RecordSealer(w.attested, identity=Ed25519PrivateKey.generate(), check_enrollment=False)
    signed_envelopes.append(w.keys.open_sealed_box(identity.seal("v", VALUES["v"][0], now_ms=w.clock).body))
    raw = {
        "envelope": envelopes,
        "key_bundle": [bytes.fromhex(vector("keys")["bundle_hex"]), parsed.keys],
        "quote": [bytes.fromhex(vector("quote")["quote_hex"]), parsed.quote],
        "attest_request": [bytes.fromhex(vector("attest_request")["request_hex"]), wire.AttestRequest(nonce).to_bytes()],
        "attest_reply": [bytes.fromhex(vector("attest_reply")["reply_hex"]), reply],
        "budget_request": [bytes.fromhex(vector("budget_request")["request_hex"])]
                          + [wire.BudgetRequest(nonce, s).to_bytes() for s in ("s", "a" * 64, "A-_9")],
        "signed_message": signed,
        "signed_envelope": signed_envelopes,
    }
    out = {name: [Seed(name, d, PARSERS[name][2](d)) for d in datas] for name, datas in raw.items()}
    for name, datas in raw.items():
        for d in datas:
            assert decode_strictly(name, d) is not None, name
    out["policy"] = [Seed("policy", bytes.fromhex(vector("policy")["canonical_hex"])), Seed("policy", e.policy_bytes)]
    payloads = {"release": [], "budget_exhausted": [], "budget_report": []}
    kinds = {RESULT_KIND: "release", EXHAUSTED_KIND: "budget_exhausted", BUDGET_KIND: "budget_report"}
    for body in signed:
        payload = wire.SignedMessage.from_bytes(body).payload
        payloads[kinds[json.loads(payload)["kind"]]].append(Seed("payload", payload))
    out.update(payloads)
    out["_world"] = w
    return out
