"""Fuzzing ``verify_attestation`` (the policy: ``tests/fuzzing.py``): a real attestation
reply, mutated byte by byte and field by field, raises only ``AttestationError`` (subclasses),
and verifies only when untouched."""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from sealedsum.common import wire
from sealedsum.common.attestation import verify_attestation
from sealedsum.common.errors import AttestationError

from tests.conftest import make_policy, make_world
from tests.fuzzing import (
    QUOTE_FIELDS,
    STREAMS,
    Seed,
    attest_reply_fields,
    count,
    fuzz,
    fuzz_test,
    json_text,
    key_bundle_fields,
    mutated,
)

ATTESTATION_CASES = 1500


@fuzz_test(ATTESTATION_CASES)
def test_verify_attestation_on_mutated_replies(small_keys, other_keys):
    """1,500 cases: a real reply, mutated byte by byte or field by field (other nonce, digest,
    keys, policy or quote, quotes signed by another platform): only ``AttestationError``s, and
    success only for the untouched reply."""
    w = make_world(small_keys, make_policy(STREAMS))
    other = make_world(other_keys)
    nonce = os.urandom(32)
    genuine = w.enclave.attest(wire.AttestRequest(nonce).to_bytes())
    parsed = wire.AttestReply.from_bytes(genuine)
    at = wire.Quote.from_bytes(parsed.quote).issued_at_ms + 1_000
    baseline = verify_attestation(genuine, nonce, w.trust, at)
    foreign = other.enclave.attest(wire.AttestRequest(nonce).to_bytes())
    replay = w.enclave.attest(wire.AttestRequest(os.urandom(32)).to_bytes())
    pool = (genuine, foreign, replay, parsed.keys, parsed.policy, parsed.quote)
    seed = Seed("attest_reply", genuine, attest_reply_fields(genuine))
    policy_doc = json.loads(parsed.policy)
    keys_seed = Seed("key_bundle", parsed.keys, key_bundle_fields(parsed.keys))
    quote_seed = Seed("quote", parsed.quote, QUOTE_FIELDS)
    other_quote = wire.AttestReply.from_bytes(foreign).quote

    @st.composite
    def structured(draw):
        fields = {"nonce": parsed.nonce, "code_digest": parsed.code_digest, "keys": parsed.keys,
                  "policy": parsed.policy, "quote": parsed.quote}
        for part in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True)):
            if part == "nonce":
                fields[part] = draw(st.sampled_from([bytes(32), parsed.code_digest]) | st.binary(min_size=32, max_size=32))
            elif part == "code_digest":
                fields[part] = draw(st.binary(min_size=32, max_size=32) | st.just(parsed.nonce))
            elif part == "keys":
                fields[part] = draw(mutated(keys_seed, pool) | st.just(other_keys.bundle_bytes))
            elif part == "policy":
                fields[part] = draw(json_text(policy_doc) | st.just(other.enclave.policy_bytes))
            else:
                fields[part] = draw(mutated(quote_seed, pool) | st.just(other_quote)
                                    | st.just(other.platform.quote(w.measurement, parsed.quote[36:68])))
        return wire.AttestReply(**fields).to_bytes()

    @fuzz(ATTESTATION_CASES)
    @given(mutated(seed, pool) | structured())
    def run(reply):
        count("verify-attestation")
        try:
            result = verify_attestation(reply, nonce, w.trust, at)
        except AttestationError:
            assert reply != genuine
            return
        assert reply == genuine and result == baseline

    run()
    assert verify_attestation(genuine, nonce, w.trust, at) == baseline
