"""Fuzzing the verification of signed results (the policy: ``tests/fuzzing.py``):
``verify_signed`` and ``ResultVerifier`` on mutated releases, notices and budget reports, and on
mutated payloads signed with the enclave's own key, raise only ``InvalidResultSignature`` /
``InvalidMessage``, and succeed only on genuine, well-formed messages of the attested enclave."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from sealedsum.common import signing, wire
from sealedsum.common.errors import InvalidMessage, InvalidResultSignature
from sealedsum.common.results import (
    BUDGET_KIND,
    EXHAUSTED_KIND,
    RESULT_KIND,
    BudgetReport,
    verify_signed,
)
from sealedsum.consumers.client import ResultVerifier

from tests.fuzzing import FuzzWorld, Seed, count, fuzz, fuzz_test, json_text, mutated

SIGNED_CASES = 1500
RESIGNED_CASES = 1000


@fuzz_test(SIGNED_CASES)
def test_verify_signed_on_mutated_releases(corpus, other_keys):
    """1,500 cases: real releases, notices and budget reports, mutated byte by byte, with
    edited payloads under the original signature, or signed by another key: only
    ``InvalidResultSignature`` / ``InvalidMessage``, success only for the genuine bytes."""
    w: FuzzWorld = corpus["_world"]
    mine = w.attested.measurement.hex()
    genuine = {s.data for s in corpus["signed_message"]
               if json.loads(wire.SignedMessage.from_bytes(s.data).payload)["measurement"] == mine}
    seeds = [s for s in corpus["signed_message"] if s.data in genuine]
    pool = tuple(s.data for s in corpus["signed_message"])
    verifier = ResultVerifier(w.attested)
    expected = {body: verify_signed(body, w.attested, (RESULT_KIND, EXHAUSTED_KIND, BUDGET_KIND)) for body in genuine}
    assert len(expected) >= 6

    @st.composite
    def structured(draw):
        seed = draw(st.sampled_from(seeds))
        message = wire.SignedMessage.from_bytes(seed.data)
        how = draw(st.sampled_from(["payload", "other-key", "signature"]))
        if how == "payload":
            return wire.SignedMessage(draw(json_text(json.loads(message.payload))), message.signature).to_bytes()
        if how == "other-key":
            payload = draw(json_text(json.loads(message.payload)) | st.just(message.payload))
            return wire.SignedMessage(payload, other_keys.sign(signing.RESULT, payload)).to_bytes()
        sig = draw(st.binary(min_size=64, max_size=64) | mutated(Seed("sig", message.signature)))
        return wire.SignedMessage(message.payload, sig[:64].ljust(64, b"\0")).to_bytes()

    @fuzz(SIGNED_CASES)
    @given(st.sampled_from(seeds).flatmap(lambda s: mutated(s, pool)) | structured())
    def run(body):
        count("verify-signed")
        try:
            parsed = verify_signed(body, w.attested, (RESULT_KIND, EXHAUSTED_KIND, BUDGET_KIND))
        except (InvalidResultSignature, InvalidMessage):
            assert body not in genuine
        else:
            assert expected.get(body) == parsed
        rejected = verifier.rejected
        try:
            parsed = verifier.verify(body)
        except (InvalidResultSignature, InvalidMessage):
            assert verifier.rejected == rejected + 1
            assert body not in genuine or isinstance(expected[body], BudgetReport)
        else:
            assert verifier.rejected == rejected and expected.get(body) == parsed
            assert not isinstance(parsed, BudgetReport)

    run()
    for body in genuine:
        assert verify_signed(body, w.attested, (RESULT_KIND, EXHAUSTED_KIND, BUDGET_KIND)) == expected[body]


@fuzz_test(RESIGNED_CASES)
def test_verify_signed_on_resigned_mutated_payloads(corpus):
    """1,000 cases: mutated payloads signed with the enclave's own key, so that the checks
    behind the signature run: only ``InvalidMessage`` / ``InvalidResultSignature``, and a
    success is a well-formed message of the attested enclave."""
    w: FuzzWorld = corpus["_world"]
    docs = [json.loads(wire.SignedMessage.from_bytes(s.data).payload) for s in corpus["signed_message"]]
    kinds = (RESULT_KIND, EXHAUSTED_KIND, BUDGET_KIND)

    @fuzz(RESIGNED_CASES)
    @given(st.sampled_from(docs).flatmap(json_text))
    def run(payload):
        count("verify-signed-resigned")
        body = wire.SignedMessage(payload, w.keys.sign(signing.RESULT, payload)).to_bytes()
        try:
            parsed = verify_signed(body, w.attested, kinds)
        except (InvalidResultSignature, InvalidMessage):
            return
        assert parsed.kind in kinds
        assert parsed.measurement == w.attested.measurement.hex()
        assert type(parsed).from_payload(parsed.to_payload()) == parsed

    run()
