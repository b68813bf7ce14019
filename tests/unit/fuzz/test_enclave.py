"""Fuzzing the enclave core (the policy: ``tests/fuzzing.py``): ``Enclave.on_record`` on
arbitrary bodies, mutated sealed boxes, mutated envelopes re-sealed to the enclave's key and
valid records with edge values in every field never raises, counts every accepted record
exactly once and rejects the others with the reason the documented order of checks gives
(``FuzzWorld.expected``); afterwards the enclave still accepts valid records and every release
it signed verifies. ``Enclave.answer`` on hostile requests raises only ``InvalidMessage``."""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st
from sealedsum.common import wire
from sealedsum.common.attestation import verify_attestation
from sealedsum.common.errors import InvalidMessage, RejectReason
from sealedsum.common.results import BUDGET_KIND, verify_signed
from sealedsum.sidecar.enclave.aggregate import ANONYMOUS

from tests.conftest import now_ms
from tests.fuzzing import (
    ATTEST_REQUEST_FIELDS,
    STREAMS,
    FuzzWorld,
    Seed,
    apply_program,
    budget_request_fields,
    count,
    envelope_fields,
    fuzz,
    fuzz_test,
    mutated,
    programs,
    raw_envelope,
    signed_envelope_fields,
)

ARBITRARY_RECORDS = 1200
FLIPPED_BOXES = 1200
RESEALED_ENVELOPES = 3000
FIELD_EDITS = 3000
RPC_CASES = 1000


@fuzz_test(ARBITRARY_RECORDS)
def test_on_record_arbitrary_bytes(fw):
    """1,200 cases: random bodies of every size up to four times the size limit."""
    limit = fw.enclave.size_limit
    bodies = (st.binary(max_size=limit + 64)
              | st.builds(lambda n, b: bytes([b]) * n, st.integers(limit - 2, 4 * limit), st.integers(0, 255))
              | st.builds(lambda head, n: head + bytes(n), st.binary(max_size=64), st.integers(0, limit + 8)))

    @fuzz(ARBITRARY_RECORDS)
    @given(bodies, st.integers(0, 2_000))
    def run(body, advance):
        count("on-record-arbitrary")
        fw.tick(advance)
        fw.deliver(body, fw.expected(len(body), fw.plaintext_of(body), fw.clock))

    run()
    fw.still_works()


@fuzz_test(FLIPPED_BOXES)
def test_on_record_mutated_sealed_boxes(fw):
    """1,200 cases: valid sealed records (every stream), mutated: they are undecryptable or
    too large, unless the mutation gave back a valid body."""
    names = sorted(STREAMS)
    pool_plaintexts = [fw.envelope(name) for name in names]
    pool = tuple(fw.seal(p) for p in pool_plaintexts)
    known: dict[bytes, bytes] = dict(zip(pool, pool_plaintexts))

    @fuzz(FLIPPED_BOXES)
    @given(st.sampled_from(names), st.integers(0, 5), programs(), st.integers(0, 2_000))
    def run(stream, choice, program, advance):
        count("on-record-flipped-box")
        fw.tick(advance)
        plaintext = fw.envelope(stream, choice)
        original = fw.seal(plaintext)
        known[original] = plaintext
        body = apply_program(Seed("box", original, ((0, 32), (32, 16), (48, 4), (len(original) - 16, 16))),
                             program, pool)
        plaintext = known.get(body)
        expected = fw.expected(len(body), plaintext, fw.clock)
        if plaintext is None:
            assert expected in (RejectReason.TOO_LARGE, RejectReason.UNDECRYPTABLE)
        fw.deliver(body, expected)

    run()
    fw.still_works()


@fuzz_test(RESEALED_ENVELOPES)
def test_on_record_resealed_mutated_envelopes(fw):
    """3,000 cases: valid envelopes (and arbitrary plaintexts, and envelopes signed by a key
    the policy does not enroll) mutated at byte and field level, then sealed to the enclave,
    so that the mutations reach the validation: the reason is the one the documented order of
    checks gives."""
    names = sorted(STREAMS)
    pool = tuple(fw.envelope(name) for name in names)
    limit = fw.enclave.size_limit
    envelopes = st.tuples(st.sampled_from(names), st.integers(0, 5), programs(2, in_place=True))
    signed = st.tuples(st.just("signed"), st.sampled_from(names), st.integers(0, 5), programs(2, in_place=True))
    inputs = st.one_of(*[envelopes] * 4, signed, st.tuples(st.just("arbitrary"), st.binary(max_size=limit)))

    @fuzz(RESEALED_ENVELOPES)
    @given(inputs, st.integers(0, 2_000))
    def run(what, advance):
        count("on-record-resealed")
        fw.tick(advance)
        if what[0] == "arbitrary":
            plaintext = what[1]
        elif what[0] == "signed":  # signed by a key the policy does not enroll
            _, stream, choice, program = what
            original = fw.signed_envelope(stream, choice)
            plaintext = apply_program(Seed("signed", original, signed_envelope_fields(original)), program, pool)
        else:
            stream, choice, program = what
            original = fw.envelope(stream, choice)
            # (the magic is left out of the field edits: the parser tests cover it)
            plaintext = apply_program(Seed("envelope", original, envelope_fields(original)[1:]), program, pool)
        body = fw.seal(plaintext)
        fw.deliver(body, fw.expected(len(body), plaintext, fw.clock))

    run()
    # Past the parser: mutated records were counted, and rejected for many reasons. (Since
    # envelopes state their plaintexts, an edit of a ciphertext or a plaintext is refused
    # out_of_range where it used to be counted, so fewer mutated records count.)
    assert fw.enclave.stats.accepted >= 50 and len(fw.enclave.stats.rejected) >= 10, fw.enclave.stats
    assert fw.enclave.stats.rejected["out_of_range"] >= 100, fw.enclave.stats
    fw.still_works()


BAD_NAMES = [b"", b"S", b"nope", b"s ", b" s", b"s\n", b"s\x00", b"s.t", b"s*", b"#", b"x" * 64, b"y" * 65,
             "é".encode(), b"\xff", b"-", b"_", b"s" * 255, b"v" * 2]
SENT_AT = ["now", "-age", "-age-1", "-age+1", "+skew", "+skew+1", "+skew-1", 0, 1, 2**63, 2**64 - 1]
WINDOWS = ["current", "current-1", "current+1", "current+2", 0, 1, 2, 2**63, 2**64 - 1]
PRODUCERS = ["anonymous", "pool0", "pool1", "pool2", "fresh"]
RECORD_IDS = ["replay", "zeros", "ones", "fresh"]
WIDTHS = [0, 1, 2, "W-1", "W+1", "2W", 2048, 2049, 65535]
COUNTS = [0, 1, 2, 3, 4, 5, 65535, "dim-1", "dim+1"]
CIPHERTEXTS = ["0", "1", "n", "n-1", "n+1", "n2", "n2-1", "n2+1", "p", "q", "2p", "p2", "q3", "top",
               "enc(-1)", "enc(n/2)", "enc(2^62)"]
PLAINTEXTS = ["0", "1", "n", "n-1", "n+1", "n/2", "n/2+1", "2^62", "top"]

FIELD_STRATEGIES = {
    "stream": st.sampled_from(BAD_NAMES) | st.binary(max_size=70),
    "record_id": st.sampled_from(RECORD_IDS) | st.binary(min_size=16, max_size=16),
    "producer_id": st.sampled_from(PRODUCERS) | st.binary(min_size=16, max_size=16),
    "epoch": st.sampled_from([0, 2, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    "sent_at": st.sampled_from(SENT_AT) | st.integers(-2_000_000, 2_000_000).map(lambda d: ("rel", d))
               | st.integers(0, 2**64 - 1),
    "window": st.sampled_from(WINDOWS) | st.integers(0, 6) | st.integers(0, 2**64 - 1),
    "count": st.sampled_from(COUNTS),
    "header_count": st.sampled_from([0, 1, 2, 3, 4, 65535]),
    "width": st.sampled_from(WIDTHS),
    "ciphertexts": st.lists(st.tuples(st.integers(0, 3), st.sampled_from(CIPHERTEXTS) | st.integers(min_value=0)),
                            min_size=1, max_size=3),
    "plaintexts": st.lists(st.tuples(st.integers(0, 3), st.sampled_from(PLAINTEXTS) | st.integers(-10**7, 10**7)),
                           min_size=1, max_size=3),
}
# Zero to four fields edited at once (mostly few, so that many records pass and are counted).
field_edits = st.lists(st.sampled_from(sorted(FIELD_STRATEGIES)), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELD_STRATEGIES[k] for k in keys}))


def apply_edits(fw: FuzzWorld, stream: str, choice: int, edits: dict) -> bytes:
    """A valid envelope for ``stream`` with ``edits`` (symbolic values resolved against the
    enclave's current state)."""
    e = fw.enclave
    policy = e.policy.streams[stream]
    age_ms, skew_ms = int(e.policy.max_record_age_seconds * 1000), int(e.policy.max_clock_skew_seconds * 1000)
    pick = choice % len(fw.pool[stream])
    f = {"name": stream.encode(), "rid": fw.fresh_id(), "pid": fw.producers[choice % 3], "epoch": 1,
         "sent": fw.clock, "window": 0, "width": fw.width, "cts": list(fw.pool[stream][pick]),
         "ms": list(fw.plain[stream][pick])}
    if "stream" in edits:
        f["name"] = edits["stream"][:255]
    rid = edits.get("record_id")
    if rid == "replay":
        if fw.accepted_ids:
            f["rid"] = fw.accepted_ids[choice % len(fw.accepted_ids)][1]
    elif rid == "zeros":
        f["rid"] = bytes(16)
    elif rid == "ones":
        f["rid"] = b"\xff" * 16
    elif isinstance(rid, bytes):
        f["rid"] = rid
    pid = edits.get("producer_id")
    if isinstance(pid, bytes):
        f["pid"] = pid
    elif pid == "anonymous":
        f["pid"] = ANONYMOUS
    elif pid == "fresh":
        f["pid"] = fw.fresh_id()
    elif pid is not None:
        f["pid"] = fw.producers[int(pid[-1])]
    if "epoch" in edits:
        f["epoch"] = edits["epoch"]
    sent = edits.get("sent_at", "now")
    offsets = {"now": 0, "-age": -age_ms, "-age-1": -age_ms - 1, "-age+1": -age_ms + 1, "+skew": skew_ms,
               "+skew+1": skew_ms + 1, "+skew-1": skew_ms - 1}
    if isinstance(sent, str):
        f["sent"] = fw.clock + offsets[sent]
    elif isinstance(sent, tuple):
        f["sent"] = max(fw.clock + sent[1], 0)
    else:
        f["sent"] = sent
    window = edits.get("window", 0)
    index = e.streams[stream].current.index
    f["window"] = {"current": index, "current-1": index - 1, "current+1": index + 1,
                   "current+2": index + 2}.get(window, window) if isinstance(window, str) else window
    for i, value in edits.get("ciphertexts", ()):
        value = fw.special[value] if isinstance(value, str) else value
        f["cts"][i % len(f["cts"])] = value
    special = {"0": 0, "1": 1, "n": fw.n, "n-1": fw.n - 1, "n+1": fw.n + 1, "n/2": fw.n // 2,
               "n/2+1": fw.n // 2 + 1, "2^62": 1 << 62, "top": (1 << (8 * wire.plaintext_width(fw.width))) - 1}
    for i, value in edits.get("plaintexts", ()):  # the ciphertext stays: a lie, or out of range
        f["ms"][i % len(f["ms"])] = special[value] if isinstance(value, str) else value % fw.n
    width = edits.get("width", fw.width)
    f["width"] = {"W-1": fw.width - 1, "W+1": fw.width + 1, "2W": 2 * fw.width}.get(width, width) \
        if isinstance(width, str) else width
    n = edits.get("count")
    if n is not None:
        n = {"dim-1": policy.dimension - 1, "dim+1": policy.dimension + 1}.get(n, n) if isinstance(n, str) else n
        if n * max(f["width"], 1) <= 16 * fw.width:
            f["cts"] = (f["cts"] * (n // len(f["cts"]) + 1))[:n]
        else:  # a header that claims more than is there
            f["cts"], f["count"] = f["cts"][:1], n
    if "header_count" in edits:
        f["count"] = edits["header_count"]
    return raw_envelope(**f)


@fuzz_test(FIELD_EDITS)
def test_on_record_valid_records_with_edge_field_values(fw):
    """3,000 cases: valid records of every stream with zero to all fields set to edge values
    (stream names, record and producer ids, epochs, times, windows, counts, widths, and
    ciphertexts such as 0, 1, n, n², multiples of p, encryptions of huge values): each is
    accepted and counted once, or rejected for the reason the order of checks gives."""
    names = sorted(STREAMS)

    @fuzz(FIELD_EDITS)
    @given(st.sampled_from(names), st.integers(0, 5), field_edits, st.integers(0, 2_000))
    def run(stream, choice, edits, advance):
        count("on-record-field-edits")
        fw.tick(advance)
        plaintext = apply_edits(fw, stream, choice, edits)
        body = fw.seal(plaintext)
        fw.deliver(body, fw.expected(len(body), plaintext, fw.clock))

    run()
    # The fuzzing reached every outcome: accepted, and every reason of an unsigned envelope
    # sealed properly (so neither ``undecryptable`` nor, being small, ``too_large``).
    reasons = set(fw.enclave.stats.rejected)
    assert fw.enclave.stats.accepted > 100
    assert reasons >= {"malformed", "unknown_stream", "wrong_epoch", "wrong_dimension", "bad_ciphertext",
                       "duplicate", "expired", "from_future", "late_window", "future_window", "budget_exhausted",
                       "contribution_limit", "out_of_range"}, reasons
    fw.still_works()


@fuzz_test(RPC_CASES)
def test_answer_on_hostile_requests(fw):
    """1,000 cases: arbitrary bytes and mutated attestation and budget requests: the enclave
    answers valid requests (and the answers verify) and raises ``InvalidMessage`` otherwise."""
    e = fw.enclave
    nonce = bytes(range(32))
    seeds = [Seed("attest", wire.AttestRequest(nonce).to_bytes(), ATTEST_REQUEST_FIELDS)]
    for name in ("s", "v", "h", "m", "nope", "a" * 64):
        data = wire.BudgetRequest(nonce, name).to_bytes()
        seeds.append(Seed("budget", data, budget_request_fields(data)))
    pool = tuple(s.data for s in seeds)
    requests = (st.sampled_from(seeds).flatmap(lambda s: mutated(s, pool))
                | st.binary(max_size=200)
                | st.builds(lambda m, b: m + b, st.sampled_from([wire.ATTEST_REQUEST_MAGIC, wire.BUDGET_REQUEST_MAGIC]),
                            st.binary(max_size=120)))
    answered = collections.Counter()

    @fuzz(RPC_CASES)
    @given(requests)
    def run(request):
        count("enclave-answer")
        attestations = e.stats.attestations
        try:
            reply = e.answer(request, fw.clock)
        except InvalidMessage:
            assert e.stats.attestations == attestations
            return
        if request[:4] == wire.BUDGET_REQUEST_MAGIC:
            req = wire.BudgetRequest.from_bytes(request)
            report = verify_signed(reply, fw.attested, (BUDGET_KIND,))
            assert (report.stream, report.nonce) == (req.stream, req.nonce.hex())
            assert req.stream in STREAMS
            answered["budget"] += 1
        else:
            req = wire.AttestRequest.from_bytes(request)
            verify_attestation(reply, req.nonce, fw.world.trust, now_ms())
            assert e.stats.attestations == attestations + 1
            answered["attest"] += 1

    run()
    assert answered["budget"] and answered["attest"]
