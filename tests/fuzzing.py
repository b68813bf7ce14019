"""Hostile input (issue 4): tens of thousands of mutated envelopes, quotes, replies,
policies and results, thrown at the parsers and at the enclave core.

The contract under test:

- every decoder (``wire.*.from_bytes``, ``EnclavePolicy.from_bytes``, ``*.from_payload``)
  either returns a message or raises ``InvalidMessage``, nothing else; a binary message that
  decodes re-encodes to exactly the bytes it came from (the wire format is canonical), and a
  JSON one re-encodes to a form that decodes to the same message;
- ``verify_attestation`` raises only ``AttestationError`` (subclasses) and succeeds only on
  the untouched reply; ``verify_signed`` / ``ResultVerifier`` raise only
  ``InvalidResultSignature`` / ``InvalidMessage`` and succeed only on genuine bytes;
- ``Enclave.on_record`` never raises: every record is accepted and counted exactly once, or
  rejected with the reason the documented order of checks (docs/protocol.md, section 11.1)
  gives, never as an "internal error"; afterwards the enclave still accepts valid records and
  every release it signed verifies; ``Enclave.answer`` raises only ``InvalidMessage``.

Inputs are random bytes, structure-aware mutations of valid messages (bit flips, byte
edits, truncations, insertions, deletions, duplications, splices and edits of the integer
and length fields of each layout), JSON-level mutations (values of every type, deleted,
added and renamed keys, huge integers, NaN, deep nesting, non-ASCII) and, for records,
valid envelopes with edge values in every field, re-sealed to the enclave's key so that the
mutations reach the validation behind the sealed box.

Runs are derandomized (the same cases every run, no example database). Each fuzz test declares
how many cases it runs (``@fuzz_test(N)``, per parametrization) and fails unless Hypothesis ran
exactly that many; ``test_fuzz_total`` checks that the declared cases of every fuzz module
together add up to at least 20,000 (whatever ``-k`` or the command line selected: it imports
them all) and, when every fuzz test ran in the session, that exactly those cases ran. A wall-clock
guard fails a test whose next case has not started within ``CASE_LIMIT_S`` (a hang, or a
pathologically slow input), and ends the process, with every thread's traceback, if a test is
still running after ``TEST_LIMIT_S`` (a hang in C code that never returns to Python).

This module is the machinery the fuzz tests share: the ``fuzz_test`` / ``fuzz`` decorators, the
case counters and the guard's state, the mutation programs, where the fields of each layout
are, the strict decoders, the JSON mutations and ``FuzzWorld`` (an enclave core with an oracle
for ``on_record``). The tests are in ``tests/unit/fuzz/``, one module per target:
``test_parsers.py``, ``test_attestation.py``, ``test_signed.py`` (signed results),
``test_enclave.py`` (the enclave core) and ``test_total.py`` (the total above); the fixtures
(the wall-clock guard, ``fw``, ``corpus``) are in its ``conftest.py``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import faulthandler
import functools
import importlib
import json
import math
import os
import re
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from nacl.public import PublicKey, SealedBox
from phe import PaillierPublicKey
from sealedsum.common import signing, wire
from sealedsum.common.errors import (
    InvalidMessage,
    RecordRejected,
    RejectReason,
)
from sealedsum.common.policy_parse import policy_from_bytes
from sealedsum.common.results import (
    BudgetExhausted,
    BudgetReport,
    Release,
    verify_signed,
)
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave.aggregate import ANONYMOUS

from tests.conftest import World, make_policy, make_world, now_ms, stream_table

VECTORS = Path(__file__).resolve().parent / "vectors"
# The fuzz test modules: tests/unit/fuzz/test_*.py.
FUZZ_PACKAGE = "tests.unit.fuzz"
FUZZ_DIR = Path(__file__).resolve().parent / "unit" / "fuzz"
# A plaintext with the signed-envelope magic (producer identities) is never accepted here, as
# no identity key is enrolled: it is malformed, or its signature or key is refused.
IDENTITY_REASONS = frozenset({RejectReason.MALFORMED, RejectReason.BAD_SIGNATURE, RejectReason.UNKNOWN_PRODUCER,
                              RejectReason.REVOKED_PRODUCER})
CASES: collections.Counter = collections.Counter()
# Cases run per test (``module::function``, all its parametrizations) in this session, as the
# ``fuzz`` wrapper measured them.
RAN: dict[str, int] = {}
# Tests started per ``module::function`` in this session (one per parametrization), as the
# wall-clock guard saw them begin: when every fuzz test started all of its, every one ran.
STARTED: collections.Counter = collections.Counter()
MIN_TOTAL_CASES = 20_000
# No case takes more than a few hundred milliseconds, even on a loaded 2-core machine; a
# test whose next case has not begun this long after the previous one is hanging.
CASE_LIMIT_S = 10.0
# The slowest test takes about 20 s here; past this, a hang that never gives Python the chance to
# raise (C code holding the GIL) ends the run, printing where every thread was.
TEST_LIMIT_S = 300.0


class FuzzTimeout(BaseException):
    """Raised by the wall-clock guard. A BaseException so that Hypothesis does not catch it
    and shrink the input, re-running a case that hangs again and again."""


class _Guard:
    nodeid = ""  # the running test's node id (for messages)
    test = ""  # and its ``module::function`` (a key of RAN)
    declared: int | None = None
    last = 0.0
    slowest = 0.0
    slowest_where = ""


def fuzz_test(cases: int):
    """A fuzz test (marked slow) that runs ``cases`` Hypothesis cases per parametrization."""
    def mark(test):
        test.fuzz_cases = cases
        return pytest.mark.slow(test)
    return mark


def fuzz(max_examples: int):
    """Derandomized (the same cases on every run) and without an example database. The test
    fails unless Hypothesis ran exactly ``max_examples`` cases, the number ``@fuzz_test``
    declared. (No Hypothesis deadline: ``CASE_LIMIT_S`` bounds each case instead, which also
    stops a case that never returns.)"""
    hypothesis_settings = settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
    )

    def decorate(test):
        test = hypothesis_settings(test)

        @functools.wraps(test)
        def run(*args, **kwargs):
            assert _Guard.declared == max_examples, (
                f"{_Guard.nodeid} declares @fuzz_test({_Guard.declared}) but runs fuzz({max_examples})")
            before = sum(CASES.values())
            test(*args, **kwargs)
            ran = sum(CASES.values()) - before
            RAN[_Guard.test] = RAN.get(_Guard.test, 0) + ran
            assert ran == max_examples, f"Hypothesis ran {ran} cases, not the {max_examples} this test declares"
        return run
    return decorate


def count(name: str) -> None:
    """Called first thing in every case: counts it and restarts the per-case clock."""
    CASES[name] += 1
    now = time.monotonic()
    if now - _Guard.last > _Guard.slowest:
        _Guard.slowest, _Guard.slowest_where = now - _Guard.last, _Guard.nodeid
    _Guard.last = now
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)


def real_stderr(config):
    """The terminal's stderr, not pytest's capture of it (lost when the process exits): the
    copy pytest's own faulthandler plugin keeps (pytest is pinned), else sys.stderr."""
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        return config.stash[fault_handler_stderr_fd_key]
    except (ImportError, KeyError):
        return sys.stderr


def fuzz_key(module: str, function: str) -> str:
    """How RAN and ``planned_cases`` name a test: ``module::function`` (all its parametrizations)."""
    return f"{module}::{function}"


@contextlib.contextmanager
def wall_clock(request):
    """Around one test (the ``wall_clock_guard`` fixture): fails it (FuzzTimeout) when no case
    began for CASE_LIMIT_S; ends the process (faulthandler, every thread's traceback on stderr)
    when the test runs past TEST_LIMIT_S."""
    def on_alarm(_signum, _frame):
        raise FuzzTimeout(f"{request.node.nodeid}: no new fuzz case within {CASE_LIMIT_S:.0f} s "
                          f"(after {sum(CASES.values())} cases in this session): a case hangs or is far too slow")

    _Guard.nodeid, _Guard.declared = request.node.nodeid, getattr(request.function, "fuzz_cases", None)
    _Guard.test = fuzz_key(request.module.__name__, request.function.__name__)
    STARTED[_Guard.test] += 1
    _Guard.last = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    faulthandler.dump_traceback_later(TEST_LIMIT_S, exit=True, file=real_stderr(request.config))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def vector(name: str) -> dict:
    return json.loads((VECTORS / f"{name}.json").read_text())


# == generic byte mutations ====================================================================
INTERESTING_BYTES = [0x00, 0x01, 0x02, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x2D, 0x2E, 0x41, 0x53, 0x5F]


def interesting_ints(size: int, original: int) -> list[int]:
    """Twelve edge values for a ``size``-byte field that holds ``original`` (always twelve, so
    that what the fuzzer draws does not depend on the data)."""
    top = (1 << (8 * size)) - 1
    return [0, 1, 2, 3, top, top - 1, top >> 1, (top >> 1) + 1, max(original - 1, 0),
            min(original + 1, top), (original * 2) & top, original ^ 1]


@dataclass(frozen=True)
class Seed:
    """A valid message and where its integer and length fields are: (offset, size)."""

    name: str
    data: bytes
    fields: tuple[tuple[int, int], ...] = ()


# A mutation program is drawn independently of the bytes it is applied to (Hypothesis needs
# its draws not to depend on state such as a fresh sealed box's random bytes); a position is
# an offset from the start or from the end, or anywhere (the offset hashed, since Hypothesis
# favours small numbers, which would put most edits on the first bytes).
POSITION = st.tuples(st.sampled_from(["start", "end", "anywhere", "anywhere"]), st.integers(0, 1 << 16))
INSERTS = st.binary(min_size=1, max_size=16) | st.sampled_from([b"\x00", b"\xff", b"\x00" * 4, b"\xff" * 4, "magic"])
FIELD_VALUE = (st.tuples(st.just("edge"), st.integers(0, 11)) | st.tuples(st.just("random"), st.integers(0, (1 << 64) - 1))
               | st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=8)))
IN_PLACE = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("byte"), POSITION, st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255)),
    st.tuples(st.just("field"), st.integers(0, 255), FIELD_VALUE),
)
OPERATION = st.one_of(
    st.tuples(st.just("flip"), POSITION, st.integers(0, 7)),
    st.tuples(st.just("byte"), POSITION, st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255)),
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("cut"), POSITION),
    st.tuples(st.just("insert"), POSITION, INSERTS),
    st.tuples(st.just("delete"), POSITION, st.integers(1, 16)),
    st.tuples(st.just("duplicate"), POSITION, st.integers(1, 64), POSITION),
    st.tuples(st.just("splice"), st.integers(0, 255), POSITION, POSITION),
    st.tuples(st.just("field"), st.integers(0, 255), FIELD_VALUE),
    st.tuples(st.just("field"), st.integers(0, 255), FIELD_VALUE),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


def programs(max_ops: int = 4, in_place: bool = False):
    """One to ``max_ops`` operations; with ``in_place``, mostly edits that keep the length (so
    that more mutated envelopes still parse and reach the checks behind the parser)."""
    return st.lists(st.one_of(*[IN_PLACE] * 5, OPERATION) if in_place else OPERATION,
                    min_size=1, max_size=max_ops)


def _at_position(position, n: int) -> int:
    """A position in [0, n) (n > 0)."""
    mode, k = position
    if mode == "anywhere":
        return (k * 2654435761 + 12345) % n
    return n - 1 - k % n if mode == "end" else k % n


def apply_program(seed: Seed, program, pool: tuple[bytes, ...] = ()) -> bytes:
    """``seed`` after the byte-level and field-level edits of ``program``."""
    data = bytearray(seed.data)
    for op, *args in program:
        n = len(data)
        if op == "flip" and n:
            data[_at_position(args[0], n)] ^= 1 << args[1]
        elif op == "byte" and n:
            data[_at_position(args[0], n)] = args[1]
        elif op == "truncate" and n:
            data = data[: _at_position(args[0], n)]
        elif op == "cut" and n:
            data = data[_at_position(args[0], n) + 1:]
        elif op == "insert":
            i = _at_position(args[0], n + 1)
            data[i:i] = seed.data[:4] if args[1] == "magic" else args[1]
        elif op == "delete" and n:
            i = _at_position(args[0], n)
            del data[i: i + args[1]]
        elif op == "duplicate" and n:
            i = _at_position(args[0], n)
            chunk = data[i: i + args[1]]
            j = _at_position(args[2], n + 1)
            data[j:j] = chunk
        elif op == "splice" and pool:
            other = pool[args[0] % len(pool)]
            data = data[: _at_position(args[1], n + 1)] + other[_at_position(args[2], len(other) + 1):]
        elif op == "field" and seed.fields:
            off, size = seed.fields[args[0] % len(seed.fields)]
            if size and off + size <= n:
                kind, value = args[1]
                if kind == "edge":
                    value = interesting_ints(size, int.from_bytes(data[off: off + size], "big"))[value]
                    data[off: off + size] = value.to_bytes(size, "big")
                elif kind == "random":
                    data[off: off + size] = (value % (1 << (8 * size))).to_bytes(size, "big")
                else:  # a few bytes written at the start of the field
                    data[off: off + min(size, len(value))] = value[:size]
        elif op == "append":
            data += args[0]
    return bytes(data)


def mutated(seed: Seed, pool: tuple[bytes, ...] = (), max_ops: int = 4):
    """``seed`` (fixed, not drawn) after one to ``max_ops`` mutations."""
    return programs(max_ops).map(lambda program: apply_program(seed, program, pool))


# == layouts (docs/protocol.md): where the integer and length fields of each message are ==========
def envelope_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    name_len = data[56]
    count, width = struct.unpack(">HH", data[57 + name_len: 61 + name_len])
    cts = tuple((61 + name_len + i * width, width) for i in range(min(count, 4)))
    pw, after = wire.plaintext_width(width), 61 + name_len + count * width
    plaintexts = tuple((after + i * pw, pw) for i in range(min(count, 4)))
    return ((0, 4), (4, 16), (20, 16), (36, 4), (40, 8), (48, 8), (56, 1), (57, name_len),
            (57 + name_len, 2), (59 + name_len, 2)) + cts + plaintexts


def key_bundle_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    return (0, 4), (4, 4), (8, 32), (40, 32), (72, 2), (74, len(data) - 74)


QUOTE_FIELDS = ((0, 4), (4, 32), (36, 32), (68, 8), (76, 64))
ATTEST_REQUEST_FIELDS = ((0, 4), (4, 32))


def budget_request_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    return (0, 4), (4, 32), (36, 1), (37, len(data) - 37)


def attest_reply_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    out, pos = [(0, 4), (4, 32), (36, 32)], 68
    for _ in range(3):
        n = int.from_bytes(data[pos: pos + 4], "big")
        out.append((pos, 4))
        pos += 4 + n
    quote_start = pos - int.from_bytes(data[out[-1][0]: out[-1][0] + 4], "big")
    return tuple(out) + ((quote_start + 68, 8),)  # the quote's issued_at_ms


def signed_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    return (0, 4), (4, 4), (len(data) - 64, 64)


def signed_envelope_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    """Magic, identity key, signature, then the envelope's own fields."""
    return ((0, 4), (4, 32), (36, 64)) + tuple((100 + off, size) for off, size in envelope_fields(data[100:]))


PARSERS = {
    # name: (decode, magic, layout)
    "envelope": (wire.Envelope.from_bytes, wire.ENVELOPE_MAGIC, envelope_fields),
    "key_bundle": (wire.KeyBundle.from_bytes, wire.KEYS_MAGIC, key_bundle_fields),
    "quote": (wire.Quote.from_bytes, wire.QUOTE_MAGIC, lambda d: QUOTE_FIELDS),
    "attest_request": (wire.AttestRequest.from_bytes, wire.ATTEST_REQUEST_MAGIC, lambda d: ATTEST_REQUEST_FIELDS),
    "attest_reply": (wire.AttestReply.from_bytes, wire.ATTEST_REPLY_MAGIC, attest_reply_fields),
    "budget_request": (wire.BudgetRequest.from_bytes, wire.BUDGET_REQUEST_MAGIC, budget_request_fields),
    "signed_message": (wire.SignedMessage.from_bytes, wire.SIGNED_MAGIC, signed_fields),
    "signed_envelope": (wire.SignedEnvelope.from_bytes, wire.SIGNED_ENVELOPE_MAGIC, signed_envelope_fields),
}
PAYLOADS = {"release": Release, "budget_exhausted": BudgetExhausted, "budget_report": BudgetReport}


def decode_strictly(name: str, data: bytes):
    """Decode ``data``; only ``InvalidMessage`` may escape, and a success is canonical."""
    decode = PARSERS[name][0]
    try:
        message = decode(data)
    except InvalidMessage:
        return None
    assert message.to_bytes() == data, (name, data.hex())
    return message


def decode_policy(data: bytes):
    try:
        policy = policy_from_bytes(data)
    except InvalidMessage:
        return None
    canonical = policy.to_bytes()
    again = policy_from_bytes(canonical)
    assert again == policy and again.to_bytes() == canonical, data[:200]
    for stream in policy.streams.values():  # and the enclave can noise its releases
        plan = stream.noise_plan()
        assert math.isfinite(plan.sum_scale) and (plan.count_scale is None or math.isfinite(plan.count_scale))
    return policy


def decode_payload(cls, data: bytes):
    try:
        message = cls.from_payload(data)
    except InvalidMessage:
        return None
    again = cls.from_payload(message.to_payload())
    assert again == message and again.to_payload() == message.to_payload(), data[:200]
    return message


# == JSON mutations =============================================================================
HOSTILE_SCALARS = [
    None, True, False, 0, 1, -1, 2, 3, 64, 65, 4096, 4097, 1_000_000, 1_000_001, 0.0, -0.0, 0.5, 1.0, -1.0,
    5e-324, 1e-300, 1e-6, 0.999999, 1e308, -1e308, 2**31, 2**32, 2**53 + 1, 2**62, 2**63, 2**64, -(2**63),
    10**30, float("nan"), float("inf"), float("-inf"), "", "x", "laplace", "gaussian", "sum", "mean",
    "histogram", "vector", "result", "budget", "budget_exhausted", "a" * 64, "0" * 64, "é", "\u0000", "s.t",
    "s", "1", "1.0", [], {}, [0.0], [0.0, 1.0], [1.0, 0.0], [None], {"version": 1},
]
FIELD_NAMES = sorted({
    "version", "enclave", "streams", "kind", "dimension", "lower", "upper", "l2_bound", "edges", "min_batch",
    "mechanism", "epsilon", "delta", "budget_epsilon", "budget_delta", "window_records", "window_seconds",
    "fraction_bits", "count_share", "max_records_per_producer", "paillier_bits", "max_record_age_seconds",
    "max_clock_skew_seconds", "insecure_test_keys", "stream", "window", "aggregate", "count", "sum",
    "sum_fixed", "mean", "rho", "sum_noise_scale", "count_noise_scale", "key_epoch", "measurement",
    "closed_at_ms", "budget", "releases", "spent_epsilon", "spent_rho", "remaining_releases", "ledger_head",
    "nonce", "exhausted", "at_ms", "s", "S", "", "é",
})
hostile_json = st.recursive(
    st.sampled_from(HOSTILE_SCALARS) | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    max_leaves=6,
).map(copy.deepcopy)  # never hand out (and later edit) the shared lists and dicts above
NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
HOSTILE_NUMBERS = [b"9" * 5000, b"1" + b"0" * 4299, b"1" * 4301, b"1e400", b"-1e400", b"1e-400", b"NaN",
                   b"Infinity", b"-Infinity", b"00", b"1.", b".5", b"0x10", b"-0", b"1E+2", b"9" * 400,
                   b"1e308", b"-1e308", b"1.7976931348623157e308", b"5e-324", b"4.9e-324", b"-0.0"]
HOSTILE_TEXTS = [b"", b"null", b"[]", b"{}", b"NaN", b"\xff", b"\"\\ud800\"", b"[" * 100_000, b"{\"a\":" * 50_000,
                 b"[" * 1_000 + b"]" * 1_000, b"{\"version\":" + b"9" * 5000 + b"}", b"1e999999",
                 b"{\"version\":1,\"version\":1}", b"\xef\xbb\xbf{}", b"{\"kind\":\"result\"}"]


def _paths(obj, prefix=()):
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _pick(draw, items: list):
    """One of ``items``, spread over all of them (Hypothesis favours small indices)."""
    return items[(draw(st.integers(0, 1 << 16)) * 2654435761 + 12345) % len(items)]


def _at(obj, path):
    for p in path:
        obj = obj[p]
    return obj


@st.composite
def mutated_document(draw, doc):
    """``doc`` with one to three edits: a value replaced, a key deleted, added or renamed."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = _pick(draw, _paths(doc))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add", "rename"]))
        if not path:
            if op == "set":
                doc = draw(hostile_json)
            continue
        parent, key = _at(doc, path[:-1]), path[-1]
        if op == "set":
            parent[key] = draw(hostile_json)
        elif op == "delete":
            del parent[key]
        elif op == "add":
            target = parent[key]
            if isinstance(target, dict):
                target[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = draw(hostile_json)
            elif isinstance(target, list):
                target.insert(draw(st.integers(0, len(target))), draw(hostile_json))
            else:
                parent[key] = [target, draw(hostile_json)]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = parent.pop(key)
    return doc


HOSTILE_LEAVES = [1e308, -1e308, 1.7976931348623157e308, 1e300, 5e-324, -5e-324, 2e-323, 1e-310, 1e-300, 0, 0.0,
                  -0.0, -1, 2**62, 2**63, 2**64, 10**30, 10**400, float("nan"), float("inf"), True, None, "1", []]


def _numeric_leaves(doc) -> list:
    return [p for p in _paths(doc) if p and isinstance(_at(doc, p), (int, float)) and not isinstance(_at(doc, p), bool)]


@st.composite
def json_text(draw, doc) -> bytes:
    """``doc`` mutated as a document (keys, values of every type), at its numbers (huge,
    tiny, non-finite), or as text (hostile numbers, deep nesting, damaged bytes), then
    serialized in some style."""
    mode = draw(st.sampled_from(["document", "document", "leaf", "leaf", "number", "deep", "bytes", "whole"]))
    if mode == "document":
        doc = draw(mutated_document(doc))
    elif mode == "leaf":
        doc = copy.deepcopy(doc)
        leaves = _numeric_leaves(doc)
        for _ in range(draw(st.integers(1, 2)) if leaves else 0):
            path = _pick(draw, leaves)
            _at(doc, path[:-1])[path[-1]] = copy.deepcopy(draw(st.sampled_from(HOSTILE_LEAVES)))
    style = draw(st.sampled_from(["canonical", "canonical", "spaced", "unsorted"]))
    text = json.dumps(doc, sort_keys=style != "unsorted", allow_nan=True,
                      separators=(",", ":") if style != "spaced" else (", ", ": "),
                      ensure_ascii=draw(st.integers(0, 9)) > 0).encode("utf-8")
    if mode == "number":
        numbers = list(NUMBER.finditer(text))
        if numbers:
            m = _pick(draw, numbers)
            text = text[: m.start()] + draw(st.sampled_from(HOSTILE_NUMBERS)) + text[m.end():]
    elif mode == "deep":
        depth = draw(st.sampled_from([10, 500, 1_000, 5_000, 100_000]))
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + b"[" * depth + text[cut:] + b"]" * depth
    elif mode == "bytes":
        text = draw(mutated(Seed("json", text), max_ops=2))
    elif mode == "whole":
        text = draw(st.sampled_from(HOSTILE_TEXTS))
    return text


# == seeds ======================================================================================
STREAMS = {
    # sum, one value: count-closed windows
    "s": stream_table(),
    # vector with an L2 bound, gaussian, at most two records per producer and window
    "v": stream_table(kind="vector", dimension=3, lower=None, upper=None, l2_bound=2.0, fraction_bits=8,
                      window_records=4, min_batch=2, mechanism="gaussian", epsilon=1.0, delta=1e-6,
                      max_records_per_producer=2),
    # histogram, time-closed windows
    "h": {"kind": "histogram", "edges": [0.0, 1.0, 5.0, 10.0], "window_seconds": 10, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 0.5, "budget_epsilon": 1e6},
    # mean of two values, small budget: it runs out during the fuzzing
    "m": stream_table(kind="mean", dimension=2, lower=-10.0, upper=10.0, window_records=2, min_batch=1,
                      epsilon=1.0, budget_epsilon=10.0),
}
VALUES = {"s": [[0.0], [1.5], [100.0], [250.0], [-3.0]], "v": [[0.1, 0.2, 0.3], [3.0, -4.0, 0.0], [0.0, 0.0, 0.0]],
          "h": [[0.5], [1.0], [7.0], [-1.0], [99.0]], "m": [[1.0, -1.0], [10.0, 10.0], [-20.0, 3.25]]}


class FuzzWorld:
    """An attested enclave core with four streams, a clock, and what the oracle needs."""

    def __init__(self, keys) -> None:
        self.world: World = make_world(keys, make_policy(STREAMS))
        self.enclave = self.world.enclave
        self.attested = self.world.attested
        self.box = SealedBox(PublicKey(self.attested.keys.x25519))
        paillier = PaillierPublicKey(self.attested.keys.paillier_n)
        self.n, self.nsquare = paillier.n, paillier.nsquare
        self.width = self.attested.keys.ciphertext_width
        self.keys = keys  # the private keys behind the enclave (a test may open its boxes)
        self.identity = Ed25519PrivateKey.generate()  # a producer identity the policy does not enroll
        self.identity_public = self.identity.public_key().public_bytes_raw()
        self.p, self.q = keys._paillier.p, keys._paillier.q
        self.clock = now_ms()
        self._ids = 0
        self.deliveries = 0
        self.publications: list = []
        self.accepted_ids: list[tuple[str, bytes]] = []
        self.producers = [bytes([i + 1]) * 16 for i in range(3)]
        # Valid ciphertexts to reuse (one Paillier encryption costs milliseconds), and the
        # plaintexts they encrypt, as an envelope states them.
        self.pool: dict[str, list[tuple[int, ...]]] = {}
        self.plain: dict[str, list[tuple[int, ...]]] = {}
        for name, values in VALUES.items():
            policy = self.enclave.policy.streams[name]
            self.plain[name] = [tuple(q % self.n for q in policy.encode(v)[0]) for v in values]
            self.pool[name] = [tuple(paillier.raw_encrypt(m) for m in ms) for ms in self.plain[name]]
        self.special = {
            "0": 0, "1": 1, "n": self.n, "n-1": self.n - 1, "n+1": self.n + 1, "n2": self.nsquare,
            "n2-1": self.nsquare - 1, "n2+1": self.nsquare + 1, "p": self.p, "q": self.q, "2p": 2 * self.p,
            "p2": self.p * self.p, "q3": self.q * 3, "top": (1 << (8 * self.width)) - 1,
            "enc(-1)": paillier.raw_encrypt(self.n - 1), "enc(n/2)": paillier.raw_encrypt(self.n // 2),
            "enc(2^62)": paillier.raw_encrypt(1 << 62),
        }

    def fresh_id(self) -> bytes:
        self._ids += 1
        return b"fz" + self._ids.to_bytes(14, "big")

    def signed_envelope(self, stream: str, choice: int = 0) -> bytes:
        """A valid envelope, signed with :attr:`identity` (refused: the key is not enrolled)."""
        envelope = self.envelope(stream, choice, pid=wire.producer_id_of(self.identity_public))
        return wire.SignedEnvelope(self.identity_public, signing.sign(self.identity, signing.ENVELOPE, envelope),
                                   envelope).to_bytes()

    def seal(self, plaintext: bytes) -> bytes:
        return self.box.encrypt(plaintext)

    def envelope(self, stream: str, choice: int = 0, **changes) -> bytes:
        """A valid envelope for ``stream`` now, as raw bytes (``changes`` edit fields)."""
        pick = choice % len(self.pool[stream])
        fields = {"name": stream.encode(), "rid": self.fresh_id(), "pid": self.producers[choice % 3], "epoch": 1,
                  "sent": self.clock, "window": 0, "width": self.width,
                  "cts": list(self.pool[stream][pick]), "ms": list(self.plain[stream][pick])}
        fields.update(changes)
        return raw_envelope(**fields)

    # -- the oracle: docs/protocol.md section 11.1, in order -------------------------------------------
    def expected(self, body_len: int, plaintext: bytes | None, now: int):
        """The reason ``on_record`` must give (``None``: accepted), or a set of possible ones."""
        e = self.enclave
        if body_len > e.size_limit:
            return RejectReason.TOO_LARGE
        if plaintext is None:
            return RejectReason.UNDECRYPTABLE
        if plaintext[:4] == wire.SIGNED_ENVELOPE_MAGIC:
            return IDENTITY_REASONS
        try:
            env = wire.Envelope.from_bytes(plaintext)
        except InvalidMessage:
            return RejectReason.MALFORMED
        policy = e.policy.streams.get(env.stream)
        if policy is None:
            return RejectReason.UNKNOWN_STREAM
        if env.key_epoch != self.attested.keys.epoch:
            return RejectReason.WRONG_EPOCH
        if len(env.ciphertexts) != policy.dimension:
            return RejectReason.WRONG_DIMENSION
        if env.width != self.width or any(not 0 < c < self.nsquare or math.gcd(c, self.n) != 1
                                          for c in env.ciphertexts):
            return RejectReason.BAD_CIPHERTEXT
        if not self.honest_plaintexts(policy, env.plaintexts):
            return RejectReason.OUT_OF_RANGE
        state = e.streams[env.stream]
        if env.record_id in state.seen:
            return RejectReason.DUPLICATE
        if env.stream in e.exhausted:
            return RejectReason.BUDGET_EXHAUSTED
        if (now - env.sent_at_ms) / 1000 > e.policy.max_record_age_seconds:
            return RejectReason.EXPIRED
        if (env.sent_at_ms - now) / 1000 > e.policy.max_clock_skew_seconds:
            return RejectReason.FROM_FUTURE
        if env.window and env.window < state.current.index:
            return RejectReason.LATE_WINDOW
        if env.window > state.current.index:
            return RejectReason.FUTURE_WINDOW
        limit = policy.max_records_per_producer
        if limit is not None and (env.producer_id == ANONYMOUS
                                  or state.current.contributors.get(env.producer_id, 0) >= limit):
            return RejectReason.CONTRIBUTION_LIMIT
        if any(self.keys._paillier.raw_decrypt(c) != m for c, m in zip(env.ciphertexts, env.plaintexts)):
            return RejectReason.OUT_OF_RANGE  # found by the check of the counted records
        return None

    def honest_plaintexts(self, policy, plaintexts) -> bool:
        """Whether an honest producer of ``policy`` could state these (protocol section 11.5),
        written out here apart from the enclave's code."""
        if any(not 0 <= m < self.n for m in plaintexts):
            return False
        values = [m - self.n if m > self.n // 2 else m for m in plaintexts]
        if any(not lo <= v <= hi for v, (lo, hi) in zip(values, policy.coordinate_ranges(1))):
            return False
        if policy.kind == "histogram":
            return sum(values) == 1
        if policy.l2_bound is not None:
            scaled, d = policy.l2_bound * (1 << policy.fraction_bits), policy.dimension
            return (sum(v * v for v in values) <= (scaled + math.sqrt(d) / 2) ** 2
                    and sum(abs(v) for v in values) <= math.ceil(math.sqrt(d) * scaled + d / 2))
        return True

    # -- delivering one record and checking every invariant ---------------------------------------------
    def snapshot(self) -> dict:
        e = self.enclave
        return {
            "accepted": e.stats.accepted,
            "rejected": collections.Counter({k: v for k, v in e.stats.rejected.items() if v}),
            "streams": {name: (st_.current.index, st_.current.count,
                               window_totals(st_.current),
                               len(st_.seen), dict(st_.current.contributors))
                        for name, st_ in e.streams.items()},
            "pending": set(e.pending),
            "exhausted": set(e.exhausted),
            "released": e.stats.windows_released,
            "withheld": e.stats.windows_withheld,
        }

    def tick(self, advance_ms: int) -> None:
        self.clock += advance_ms
        self.check_publications(self.enclave.on_tick(self.clock).publish)

    def check_publications(self, publications) -> None:
        for pub in publications:
            parsed = verify_signed(pub.body, self.attested)
            assert parsed == pub.message and pub.stream == parsed.stream
            assert self.enclave.pending[pub.key] is pub
            self.publications.append(pub)

    def deliver(self, body: bytes, expected=..., replay: bool = True):
        """Feed one record; check the outcome against ``expected`` (when given) and the books."""
        e = self.enclave
        now = self.clock
        before = self.snapshot()
        outcome = e.on_record(body, now)  # must never raise
        self.deliveries += 1
        after = self.snapshot()
        rejection = outcome.rejection
        if rejection is not None:
            assert isinstance(rejection, RecordRejected) and isinstance(rejection.reason, RejectReason)
            assert not rejection.detail.startswith("internal error"), rejection
            assert outcome.publish == ()
            moved = collections.Counter(before["rejected"])
            moved[rejection.reason.value] += 1
            assert after["rejected"] == moved
            for key in ("accepted", "streams", "pending", "exhausted", "released", "withheld"):
                assert after[key] == before[key], (key, rejection)
        else:
            env = wire.Envelope.from_bytes(self.plaintext_of(body))
            assert after["accepted"] == before["accepted"] + 1
            assert after["rejected"] == before["rejected"]
            changed = {name for name in before["streams"] if before["streams"][name] != after["streams"][name]}
            assert changed == {env.stream}, changed
            index, n, _, seen, _ = before["streams"][env.stream]
            index2, n2, _, seen2, _ = after["streams"][env.stream]
            assert seen2 == seen + 1
            policy = e.policy.streams[env.stream]
            if index2 == index:
                assert n2 == n + 1 and not outcome.publish
            else:  # this record filled the window
                assert (index2, n2, n + 1) == (index + 1, 0, policy.max_window_records)
                closed = after["released"] + after["withheld"] - before["released"] - before["withheld"]
                assert closed == 1
            for pub in outcome.publish:
                assert pub.stream == env.stream
            self.check_publications(outcome.publish)
            self.accepted_ids.append((env.stream, env.record_id))
            if replay:  # counted once: the same bytes again are a duplicate
                assert self.deliver(body, RejectReason.DUPLICATE, replay=False).rejection is not None
        if expected is not ...:
            got = rejection.reason if rejection is not None else None
            if isinstance(expected, frozenset):
                assert got in expected, (got, expected, rejection)
            else:
                assert got == expected, (got, expected, rejection)
        return outcome

    def plaintext_of(self, body: bytes) -> bytes | None:
        try:
            return self.keys.open_sealed_box(body)
        except Exception:  # noqa: BLE001 - nacl's CryptoError: not a box for this key
            return None

    def still_works(self) -> None:
        """After the fuzzing: every stream with budget left accepts a valid record, the
        books add up, and every release and notice the enclave signed verifies."""
        e = self.enclave
        e.on_tick(self.clock)
        for name in STREAMS:
            sealer = RecordSealer(self.attested, producer_id=os.urandom(16))
            body = sealer.seal(name, VALUES[name][0], now_ms=self.clock).body
            exhausted = name in e.exhausted  # before: this record may close the stream's last window
            outcome = self.deliver(body)
            if exhausted:
                assert outcome.rejection.reason is RejectReason.BUDGET_EXHAUSTED
            else:
                assert outcome.rejection is None, outcome.rejection
        assert e.stats.accepted + sum(e.stats.rejected.values()) == self.deliveries
        assert "internal error" not in str(e.stats.rejected)
        for pub in list(e.pending.values()) + self.publications:
            assert verify_signed(pub.body, self.attested) == pub.message
        assert len({p.key for p in self.publications}) == len(self.publications)  # each window once


def window_totals(window) -> tuple[int, ...]:
    """A window's folded ciphertexts, as integers."""
    if hasattr(window, "ciphertexts"):  # totals per key epoch
        # An epoch whose totals are the identity (1) has added nothing: the enclave drops such an
        # entry when withdrawing a record brings it back there (Window.unfold), while folding a
        # record whose ciphertext is 1 may leave one, so its presence alone is no change of state.
        return tuple(int(t) for e in sorted(window.totals) if any(x != 1 for x in window.totals[e])
                     for t in window.totals[e])
    return tuple(int(t) for t in window.totals)


def raw_envelope(name: bytes, rid: bytes, pid: bytes, epoch: int, sent: int, window: int, width: int,
                 cts: list[int], count: int | None = None, ms: list[int] | None = None) -> bytes:
    """Envelope bytes with no checks, so that any field can hold any value its size allows.
    ``ms`` (the stated plaintexts, zeros by default) follow ``cts`` in length, repeated or cut."""
    count = len(cts) if count is None else count
    ms = [0] if not ms else ms
    ms = (ms * (len(cts) // len(ms) + 1))[:len(cts)]
    pw = wire.plaintext_width(width)
    body = b"".join((c % (1 << (8 * width))).to_bytes(width, "big") for c in cts) if width else b""
    body += b"".join((m % (1 << (8 * pw))).to_bytes(pw, "big") for m in ms) if pw else b""
    return (wire.ENVELOPE_MAGIC + rid + pid + struct.pack(">IQQB", epoch, sent, window, len(name)) + name
            + struct.pack(">HH", count, width) + body)


# == the total over every fuzz module ===========================================================
def fuzz_modules() -> list:
    """Every fuzz test module (``tests/unit/fuzz/test_*.py``), imported whether or not this
    session collected it (pytest imported the collected ones under the same names)."""
    return [importlib.import_module(f"{FUZZ_PACKAGE}.{path.stem}") for path in sorted(FUZZ_DIR.glob("test_*.py"))]


def fuzz_tests() -> dict[str, object]:
    """Every test function of the fuzz modules (selected or not), by ``module::function``."""
    return {fuzz_key(module.__name__, name): test for module in fuzz_modules()
            for name, test in vars(module).items() if name.startswith("test_") and callable(test)}


def parametrizations(test) -> int:
    """How many tests pytest makes of ``test`` (the product of its ``parametrize`` marks)."""
    return math.prod(len(m.args[1]) for m in getattr(test, "pytestmark", []) if m.name == "parametrize")


def planned_cases() -> dict[str, int]:
    """Every fuzz test (selected or not) and the cases it declares in all (``@fuzz_test(N)``
    times its parametrizations)."""
    return {key: test.fuzz_cases * parametrizations(test) for key, test in fuzz_tests().items()
            if hasattr(test, "fuzz_cases")}


def slowest_gap() -> str:
    """The longest wait for a next case in this session, and in which test."""
    return f"slowest gap between cases {_Guard.slowest * 1000:.0f} ms ({_Guard.slowest_where})"
