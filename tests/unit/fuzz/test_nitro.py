"""Fuzzing the Nitro verifier (``common/nitro.py``; the policy: ``tests/fuzzing.py``): 20,000
hostile attestation documents, each refused with a typed error (a strict subclass of
``AttestationError``), none crashing or hanging the verifier (the wall-clock guard bounds
every case).

Two generators: byte-level mutations of the real AWS documents and of a test-chain document
(flips, truncations, insertions, splices, edits of the CBOR heads); and structure-aware ones,
re-signed with the test-only chain so that they pass the signature and reach every rule
behind it: fields re-typed, oversized, deleted or added, PCR maps too large or keyed wrong,
deep nesting, CBOR heads declaring huge lengths, tags, indefinite lengths, duplicate keys,
other protected headers, and bad CBOR."""

from __future__ import annotations

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from sealedsum.common import nitro
from sealedsum.common.errors import (
    AttestationError,
    CertificateChainError,
    DebugEnclave,
    MalformedQuote,
    QuoteSignatureError,
    UnknownMeasurement,
)

from tests.conftest import now_ms
from tests.fuzzing import Seed, count, fuzz, fuzz_test, mutated
from tests.nitro_chain import PCRS, REAL_NONCE, VALID_DOCUMENTS, TestChain, aws_root, real_document

BYTE_CASES = 10_000
STRUCTURED_CASES = 10_000
AGE = 300.0


def cose_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    """The CBOR heads of a COSE_Sign1 (array, protected, payload and signature heads) and the
    payload's first bytes: the integer and length fields of this layout."""
    signed = nitro.decode(data)
    payload_at = data.index(signed.payload)
    return ((0, 1), (1, 1), (2, 4), (6, 1), (7, payload_at - 7), (payload_at, 16),
            (len(data) - 98, 2), (len(data) - 96, 96))


def refused_or_genuine(data: bytes, trust: nitro.NitroTrust, nonce: bytes, at: int, genuine):
    try:
        result = nitro.verify_document(data, trust, nonce, at, AGE)
    except AttestationError as err:
        assert type(err) is not AttestationError, err  # each refusal names its check
        return
    assert result == genuine, "a changed document verified"


@fuzz_test(BYTE_CASES)
def test_mutated_documents_are_refused():
    """10,000 cases: the real documents (AWS chain, debug allowed, as of their own time) and a
    production document of the test chain, mutated at the byte level."""
    chain = TestChain.generate(now_ms())
    at = now_ms()
    own = chain.sign(chain.document(at, nonce=REAL_NONCE))
    targets = []
    for name in VALID_DOCUMENTS:
        data = real_document(name)
        targets.append((data, nitro.NitroTrust(aws_root(), frozenset(), allow_debug=True),
                        nitro.decode(data).document.timestamp_ms))
    targets.append((own, chain.trust(), at))
    seeds = [Seed(f"nitro-{i}", data, cose_fields(data)) for i, (data, _, _) in enumerate(targets)]
    pool = tuple(t[0] for t in targets)
    genuine = [nitro.verify_document(data, trust, REAL_NONCE, t, AGE) for data, trust, t in targets]

    @fuzz(BYTE_CASES)
    @given(st.integers(0, len(seeds) - 1).flatmap(lambda i: st.tuples(st.just(i), mutated(seeds[i], pool))))
    def run(case):
        count("nitro-bytes")
        i, data = case
        _, trust, t = targets[i]
        refused_or_genuine(data, trust, REAL_NONCE, t, genuine[i])

    run()


WRONG_TYPES = st.sampled_from([0, -1, 1 << 64, -(1 << 64), 1.5, float("nan"), True, None, "", "x" * 600,
                               b"", [], {}, [b"\x00"], {"a": 1}, cbor2.CBORTag(24, b"\x00")])
INVALID_BYTES = {  # sizes each field must not have
    "certificate": st.sampled_from([0, 1025, 4000]), "public_key": st.sampled_from([0, 1025, 2000]),
    "user_data": st.sampled_from([513, 1024, 1025]), "nonce": st.sampled_from([513, 1024]),
}
FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "public_key", "user_data", "nonce")
EXPECTED_TYPES = {"module_id": str, "digest": str, "timestamp": int, "pcrs": dict, "certificate": bytes,
                  "cabundle": list, "public_key": bytes, "user_data": bytes, "nonce": bytes}


def _raw_head(major: int, length: int) -> bytes:
    return bytes([major << 5 | 27]) + length.to_bytes(8, "big")


@st.composite
def broken_document(draw, chain: TestChain, at: int):
    """(COSE bytes, why it is invalid): a document breaking at least one rule, signed."""
    doc = chain.document(at, nonce=REAL_NONCE, user_data=b"u" * 68, public_key=b"k" * 97)
    kind = draw(st.sampled_from(["retype", "oversize", "delete", "add", "pcrs", "nest", "cabundle", "raw",
                                 "protected", "cose"]))
    protected = nitro.PROTECTED_ES384
    if kind == "retype":
        name = draw(st.sampled_from(FIELDS))
        value = draw(WRONG_TYPES.filter(lambda v, n=name: type(v) is not EXPECTED_TYPES[n]))
        doc[name] = value
    elif kind == "oversize":
        name = draw(st.sampled_from(sorted(INVALID_BYTES)))
        doc[name] = b"\x30" * draw(INVALID_BYTES[name])
    elif kind == "delete":
        del doc[draw(st.sampled_from(nitro.MANDATORY))]
    elif kind == "add":
        doc[draw(st.sampled_from(["Nonce", "user-data", "pcr0", "", "timestamp "]))] = draw(WRONG_TYPES)
    elif kind == "pcrs":
        doc["pcrs"] = draw(st.sampled_from([
            {}, {i: PCRS[0] for i in range(33)}, {**doc["pcrs"], 32: bytes(48)}, {**doc["pcrs"], -1: bytes(48)},
            {**doc["pcrs"], 5: bytes(47)}, {**doc["pcrs"], 0: bytes(32)}, {**doc["pcrs"], "0": bytes(48)},
            {**doc["pcrs"], 3: "00" * 48}, {1: PCRS[1], 2: PCRS[2]}, {i: bytes(48) for i in range(16)},
            {**doc["pcrs"], 0: bytes(47) + b"\x01"}, {**doc["pcrs"], 7: bytes(65)}]))
    elif kind == "nest":
        name = draw(st.sampled_from(FIELDS))
        value = doc.get(name, b"")
        for _ in range(draw(st.integers(2, 600))):
            value = [value]
        doc[name] = value
    elif kind == "cabundle":
        doc["cabundle"] = draw(st.sampled_from([
            [], doc["cabundle"][1:], doc["cabundle"][::-1], doc["cabundle"] + [doc["certificate"]],
            [doc["cabundle"][0], b"\x30\x00"], [doc["cabundle"][0]] * 3, [b"\x30" * 1025]]))
    elif kind == "protected":
        protected = draw(st.sampled_from([b"", b"\xa0", cbor2.dumps({1: -7}), cbor2.dumps({1: -35, 4: b"k"}),
                                          b"\xa1\x01\x39\x00\x22", b"\xa1\x01\x38\x22\x00", cbor2.dumps([1, -35])]))
    cose = chain.sign(doc, protected=protected)
    if kind == "raw":  # CBOR the encoder would never write, inside a signed payload
        head = draw(st.sampled_from([_raw_head(2, (1 << 63) + 5), _raw_head(3, 1 << 40), _raw_head(4, 1 << 62),
                                     _raw_head(5, 1 << 62), b"\x5f\x41\x00\xff", b"\x9f\xff", b"\xc1\x00",
                                     b"\xd8\x1c\x80", b"\xd9\xd9\xf7\x00", b"\xf7", b"\xff", b"\x1c"]))
        payload = cbor2.dumps(doc)
        where = draw(st.sampled_from(["front", "value", "dup"]))
        if where == "front":
            payload = head + payload
        elif where == "value":
            payload = payload[:-len(cbor2.dumps(doc["nonce"]))] + head
        else:  # the map declares one more entry, a second "nonce"
            payload = bytes([payload[0] + 1]) + payload[1:] + cbor2.dumps("nonce") + cbor2.dumps(REAL_NONCE)
        cose = chain.sign_payload(payload)
    elif kind == "cose":
        cose = draw(st.sampled_from([
            cose[:draw(st.integers(0, len(cose) - 1))], b"\x83" + cose[1:], b"\x85" + cose[1:] + b"\x00",
            b"\xd2\xd2" + cose, b"\xd3" + cose, cose + b"\x00", b"\x9f" + cose[1:] + b"\xff",
            cbor2.dumps([nitro.PROTECTED_ES384, {}, cbor2.dumps(doc), b"\x00" * 95]),
            cbor2.dumps([nitro.PROTECTED_ES384, {1: -35}, cbor2.dumps(doc), b"\x00" * 96]),
            cbor2.dumps([nitro.PROTECTED_ES384, {}, cbor2.dumps([doc]), b"\x00" * 96]),
            cbor2.dumps([nitro.PROTECTED_ES384, {}, b"\x00" * (nitro.MAX_PAYLOAD + 1), b"\x00" * 96]),
            draw(st.binary(max_size=64))]))
    return cose, kind


# The errors each kind of breakage may be refused with (exactly these types: a CertificateExpired
# or NonceMismatch would mean the case was refused for something the generator did not break).
REFUSALS = {
    "retype": {MalformedQuote}, "oversize": {MalformedQuote}, "delete": {MalformedQuote}, "add": {MalformedQuote},
    "nest": {MalformedQuote}, "raw": {MalformedQuote}, "protected": {MalformedQuote},
    "pcrs": {MalformedQuote, DebugEnclave, UnknownMeasurement},  # all zero; PCR0 changed
    "cabundle": {MalformedQuote, CertificateChainError},
    "cose": {MalformedQuote, QuoteSignatureError},  # a well-formed COSE_Sign1 with a zero signature
}


@fuzz_test(STRUCTURED_CASES)
def test_structurally_broken_documents_are_refused():
    """10,000 cases: documents that break a rule of AWS's format, signed by the test chain,
    each refused with a typed error, never accepted, and for what the case broke: the same
    document unbroken verifies (else every case would be refused and the test prove nothing)."""
    at = now_ms()
    chain = TestChain.generate(at)
    trust = chain.trust()
    unbroken = chain.sign(chain.document(at, nonce=REAL_NONCE, user_data=b"u" * 68, public_key=b"k" * 97))
    assert nitro.verify_document(unbroken, trust, REAL_NONCE, at, AGE).nonce == REAL_NONCE

    @fuzz(STRUCTURED_CASES)
    @given(broken_document(chain, at))
    def run(case):
        count("nitro-structured")
        data, kind = case
        try:
            nitro.verify_document(data, trust, REAL_NONCE, at, AGE)
        except AttestationError as err:
            assert type(err) in REFUSALS[kind], (kind, type(err).__name__, err)
            return
        raise AssertionError(f"a broken document ({kind}) verified")

    run()
