"""Fuzzing the decoders (the policy: ``tests/fuzzing.py``): every ``wire.*.from_bytes``,
``policy_from_bytes`` and ``*.from_payload`` on arbitrary bytes (half behind the right magic)
and on mutated valid messages, policies and signed payloads either returns a message or raises
``InvalidMessage``; a binary message that decodes re-encodes to exactly its bytes, and a JSON
one to a form that decodes to the same message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import (
    PARSERS,
    PAYLOADS,
    count,
    decode_payload,
    decode_policy,
    decode_strictly,
    fuzz,
    fuzz_test,
    json_text,
    mutated,
)

ARBITRARY_PER_PARSER = 300
MUTATIONS_PER_PARSER = 500


@fuzz_test(ARBITRARY_PER_PARSER)
@pytest.mark.parametrize("name", list(PARSERS) + ["policy"] + list(PAYLOADS))
def test_parsers_on_arbitrary_bytes(name):
    """300 cases per decoder (12 decoders): random bytes, half of them behind the right magic."""
    magic = PARSERS[name][1] if name in PARSERS else b"{\"" if name == "policy" else b"{\"kind\":\""

    @fuzz(ARBITRARY_PER_PARSER)
    @given(st.booleans(), st.binary(max_size=600))
    def run(prefixed, data):
        count(f"parser-arbitrary-{name}")
        data = magic + data if prefixed else data
        if name in PARSERS:
            decode_strictly(name, data)
        elif name == "policy":
            decode_policy(data)
        else:
            decode_payload(PAYLOADS[name], data)

    run()


@fuzz_test(MUTATIONS_PER_PARSER)
@pytest.mark.parametrize("name", list(PARSERS))
def test_binary_parsers_on_mutated_messages(corpus, name):
    """500 cases per binary decoder (8 decoders): valid messages after mutations."""
    seeds = corpus[name]
    pool = tuple(s.data for s in seeds) + tuple(s.data for s in corpus["signed_message"][:2])

    @fuzz(MUTATIONS_PER_PARSER)
    @given(st.sampled_from(seeds).flatmap(lambda s: mutated(s, pool)))
    def run(data):
        count(f"parser-mutated-{name}")
        decode_strictly(name, data)

    run()
    for seed in seeds:  # and the originals still decode
        assert decode_strictly(name, seed.data) is not None


POLICY_MUTATIONS = 1200
PAYLOAD_MUTATIONS = 500


@fuzz_test(POLICY_MUTATIONS)
def test_policy_parser_on_mutated_policies(corpus):
    """1,200 cases: policy documents with edited, deleted, added and renamed keys, values of
    every type, huge numbers, deep nesting and byte-level damage."""
    docs = [json.loads(s.data) for s in corpus["policy"]]

    @fuzz(POLICY_MUTATIONS)
    @given(st.sampled_from(docs).flatmap(json_text))
    def run(data):
        count("parser-policy-json")
        decode_policy(data)

    run()


@fuzz_test(PAYLOAD_MUTATIONS)
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_payload_parsers_on_mutated_payloads(corpus, name):
    """500 cases per signed-payload decoder (3 decoders)."""
    docs = [json.loads(s.data) for s in corpus[name]]

    @fuzz(PAYLOAD_MUTATIONS)
    @given(st.sampled_from(docs).flatmap(json_text))
    def run(data):
        count(f"parser-payload-{name}")
        decode_payload(PAYLOADS[name], data)

    run()
