"""Attestation verification against replies from the real in-memory enclave: each check
fails with its own typed error, and no byte of a reply can be changed unnoticed."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import wire
from sealedsum.common.attestation import (
    FUTURE_SKEW_SECONDS,
    AttestedEnclave,
    TrustAnchors,
    decode_measurement,
    decode_platform_key,
    encode_platform_key,
    verify_attestation,
)
from sealedsum.common.errors import (
    AttestationError,
    ConfigError,
    NonceMismatch,
    ReportDataMismatch,
    StaleQuote,
    UnknownMeasurement,
    UntrustedPlatform,
)
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import World, make_policy, make_world, now_ms, stream_table

REPO = Path(__file__).resolve().parents[2]


def ask(world: World, nonce: bytes | None = None) -> tuple[bytes, bytes]:
    nonce = nonce or os.urandom(wire.NONCE_SIZE)
    return world.enclave.attest(wire.AttestRequest(nonce).to_bytes()), nonce


def issued_at(reply: bytes) -> int:
    return wire.Quote.from_bytes(wire.AttestReply.from_bytes(reply).quote).issued_at_ms


def rebuild(reply: bytes, **fields) -> bytes:
    """The same reply (same quote) with some fields replaced."""
    parsed = wire.AttestReply.from_bytes(reply)
    parts = {f: getattr(parsed, f) for f in ("nonce", "code_digest", "keys", "policy", "quote")}
    parts.update(fields)
    return wire.AttestReply(**parts).to_bytes()


def test_genuine_reply_verifies(world):
    reply, nonce = ask(world)
    att = verify_attestation(reply, nonce, world.trust, now_ms())
    assert isinstance(att, AttestedEnclave)
    assert att.keys == world.enclave.keys.bundle
    assert att.policy == world.enclave.policy
    assert att.policy_bytes == world.enclave.policy_bytes
    assert att.measurement == world.measurement
    assert att.code_digest == world.enclave.code_digest
    assert world.enclave.stats.attestations == 2  # make_world's and ours
    doc = att.to_json()
    assert doc["measurement"] == world.measurement.hex() and doc["platform"] == "emulated"


def test_wrong_platform_key(world):
    reply, nonce = ask(world)
    other = EmulatedPlatform.generate().public_key()
    trust = TrustAnchors(other, world.trust.measurements)
    with pytest.raises(UntrustedPlatform):
        verify_attestation(reply, nonce, trust, now_ms())


def test_quote_signed_by_another_platform(world):
    """A look-alike platform signs the right measurement and report data: still untrusted."""
    reply, nonce = ask(world)
    parsed = wire.AttestReply.from_bytes(reply)
    q = wire.Quote.from_bytes(parsed.quote)
    forged = EmulatedPlatform.generate().quote(q.measurement, q.report_data)
    with pytest.raises(UntrustedPlatform):
        verify_attestation(rebuild(reply, quote=forged), nonce, world.trust, now_ms())


def test_platform_check_comes_first(world):
    reply, nonce = ask(world)
    trust = TrustAnchors(EmulatedPlatform.generate().public_key(), frozenset({os.urandom(32)}))
    with pytest.raises(UntrustedPlatform):
        verify_attestation(reply, os.urandom(32), trust, now_ms() + 10**9)


def test_measurement_not_allowed(world):
    reply, nonce = ask(world)
    trust = TrustAnchors(world.trust.platform_key, frozenset({os.urandom(32), os.urandom(32)}))
    with pytest.raises(UnknownMeasurement):
        verify_attestation(reply, nonce, trust, now_ms())
    # Allowed alongside others, it passes.
    trust = TrustAnchors(world.trust.platform_key, frozenset({os.urandom(32), world.measurement}))
    verify_attestation(reply, nonce, trust, now_ms())


def test_other_policy_is_another_measurement(small_keys):
    """An enclave with a weaker policy (bigger epsilon) is a measurement the client never allowed."""
    strict = make_world(small_keys)
    loose = make_world(small_keys, make_policy({"s": stream_table(epsilon=100.0)}))
    assert loose.measurement != strict.measurement
    reply, nonce = ask(loose)
    # Same platform key pinned (make_world gives each world its own platform).
    trust = TrustAnchors(loose.trust.platform_key, strict.trust.measurements)
    with pytest.raises(UnknownMeasurement):
        verify_attestation(reply, nonce, trust, now_ms())


def test_altered_keys(world, other_keys):
    reply, nonce = ask(world)
    with pytest.raises(ReportDataMismatch):
        verify_attestation(rebuild(reply, keys=other_keys.bundle_bytes), nonce, world.trust, now_ms())


def test_altered_policy(world):
    reply, nonce = ask(world)
    looser = make_policy({"s": stream_table(epsilon=50.0)}).to_bytes()
    assert looser != world.enclave.policy_bytes
    with pytest.raises(ReportDataMismatch):
        verify_attestation(rebuild(reply, policy=looser), nonce, world.trust, now_ms())


def test_altered_code_digest(world):
    reply, nonce = ask(world)
    with pytest.raises(ReportDataMismatch):
        verify_attestation(rebuild(reply, code_digest=os.urandom(32)), nonce, world.trust, now_ms())


def test_rewritten_nonce_field(world):
    """Swapping in the client's nonce does not help a replayed reply: the quote covers the nonce."""
    reply, _ = ask(world)
    mine = os.urandom(32)
    with pytest.raises(ReportDataMismatch):
        verify_attestation(rebuild(reply, nonce=mine), mine, world.trust, now_ms())


def test_reply_for_another_nonce(world):
    reply, nonce = ask(world)
    with pytest.raises(NonceMismatch):
        verify_attestation(reply, os.urandom(32), world.trust, now_ms())
    # A second, honest round with our own nonce passes.
    reply2, nonce2 = ask(world)
    verify_attestation(reply2, nonce2, world.trust, now_ms())
    with pytest.raises(NonceMismatch):
        verify_attestation(reply, nonce2, world.trust, now_ms())


def test_stale_quote(world):
    reply, nonce = ask(world)
    t = issued_at(reply)
    max_age_ms = int(world.trust.max_quote_age_seconds * 1000)
    verify_attestation(reply, nonce, world.trust, t + max_age_ms)  # at the limit
    with pytest.raises(StaleQuote) as info:
        verify_attestation(reply, nonce, world.trust, t + max_age_ms + 1)
    # Precise enough to see why: one millisecond over, not "300 s old (limit 300 s)".
    assert str(info.value) == "quote is 300.001 s old (limit 300 s)"
    with pytest.raises(StaleQuote):
        verify_attestation(reply, nonce, world.trust, t + 86_400_000)
    short = TrustAnchors(world.trust.platform_key, world.trust.measurements, max_quote_age_seconds=1)
    with pytest.raises(StaleQuote):
        verify_attestation(reply, nonce, short, t + 1_001)


def test_a_captured_reply_replayed_later_is_refused(world):
    """A real reply, captured and replayed after its quote aged past the limit on the real
    clock: stale for the client it answered, another nonce's answer for any other client."""
    import re
    import time

    trust = TrustAnchors(world.trust.platform_key, world.trust.measurements, max_quote_age_seconds=0.2)
    reply, nonce = ask(world)
    verify_attestation(reply, nonce, trust, now_ms())  # fresh: accepted
    time.sleep(0.35)
    with pytest.raises(StaleQuote) as info:
        verify_attestation(reply, nonce, trust, now_ms())
    m = re.fullmatch(r"quote is (\d+\.\d{3}) s old \(limit 0\.2 s\)", str(info.value))
    assert m, str(info.value)
    assert 0.35 <= float(m.group(1)) < 30
    # Replayed to a client that asked with its own nonce: refused for that, whatever its age.
    with pytest.raises(NonceMismatch, match="answers another nonce"):
        verify_attestation(reply, os.urandom(32), trust, now_ms())
    with pytest.raises(NonceMismatch, match="answers another nonce"):
        verify_attestation(reply, os.urandom(32), world.trust, now_ms())


def test_a_quote_issued_ten_minutes_ago_is_stale(small_keys):
    """A genuine quote whose platform dated it ten minutes back, checked now at the default limit."""
    import re

    policy = make_policy()
    behind = EmulatedPlatform(Ed25519PrivateKey.generate(), os.urandom(32), clock_ms=lambda: now_ms() - 600_000)
    pb = policy.to_bytes()
    digest, m = measure.measure(pb)
    enclave = Enclave(small_keys, policy, pb, digest, m, lambda rd: behind.quote(m, rd))
    nonce = os.urandom(32)
    reply = enclave.attest(wire.AttestRequest(nonce).to_bytes())
    with pytest.raises(StaleQuote) as info:
        verify_attestation(reply, nonce, TrustAnchors(behind.public_key(), frozenset({m})), now_ms())
    got = re.fullmatch(r"quote is (\d+\.\d{3}) s old \(limit 300 s\)", str(info.value))
    assert got and 600 <= float(got.group(1)) < 630, str(info.value)


def test_quote_from_the_future(world):
    reply, nonce = ask(world)
    t = issued_at(reply)
    skew_ms = int(FUTURE_SKEW_SECONDS * 1000)
    verify_attestation(reply, nonce, world.trust, t - skew_ms)  # within the tolerated skew
    with pytest.raises(StaleQuote) as info:
        verify_attestation(reply, nonce, world.trust, t - skew_ms - 1)
    assert str(info.value) == "quote is dated 30.001 s in the future (limit 30 s)"


def test_platform_with_a_clock_far_ahead(small_keys):
    """A quote really dated an hour ahead by the platform is refused."""
    policy = make_policy()
    ahead = EmulatedPlatform(Ed25519PrivateKey.generate(), os.urandom(32), clock_ms=lambda: now_ms() + 3_600_000)
    pb = policy.to_bytes()
    digest, m = measure.measure(pb)
    enclave = Enclave(small_keys, policy, pb, digest, m, lambda rd: ahead.quote(m, rd))
    nonce = os.urandom(32)
    reply = enclave.attest(wire.AttestRequest(nonce).to_bytes())
    with pytest.raises(StaleQuote):
        verify_attestation(reply, nonce, TrustAnchors(ahead.public_key(), frozenset({m})), now_ms())


def test_quoted_but_unparseable_keys(world):
    """Even with a genuine quote over them, keys that do not parse are not trusted."""
    nonce = os.urandom(32)
    bad_keys = b"SSK\x01" + b"\x00" * 10
    pb, digest = world.enclave.policy_bytes, world.enclave.code_digest
    quote = world.platform.quote(world.measurement, wire.report_data(bad_keys, pb, nonce))
    reply = wire.AttestReply(nonce, digest, bad_keys, pb, quote).to_bytes()
    with pytest.raises(AttestationError) as exc:
        verify_attestation(reply, nonce, world.trust, now_ms())
    assert type(exc.value) is AttestationError


@pytest.mark.parametrize("reply", [b"", b"SSD\x01", b"\x00" * 64, os.urandom(700)])
def test_garbage_replies(world, reply):
    with pytest.raises(AttestationError) as exc:
        verify_attestation(reply, os.urandom(32), world.trust, now_ms())
    assert type(exc.value) is AttestationError


def test_truncated_and_extended_reply(world):
    reply, nonce = ask(world)
    for bad in (reply[:-1], reply + b"\x00", reply[: len(reply) // 2]):
        with pytest.raises(AttestationError):
            verify_attestation(bad, nonce, world.trust, now_ms())


def _regions(reply: bytes) -> dict[str, tuple[int, int, type | None]]:
    """Byte ranges of a reply and the exact error a flip in each must raise (``None``:
    some ``AttestationError``, as a changed length shifts what follows)."""
    p = wire.AttestReply.from_bytes(reply)
    off = 4 + 32 + 32
    klen, plen = len(p.keys), len(p.policy)
    k0 = off + 4
    p0 = k0 + klen + 4
    q0 = p0 + plen + 4
    return {
        "magic": (0, 4, AttestationError),  # malformed: the base type itself
        "nonce": (4, 36, ReportDataMismatch),
        "code-digest": (36, 68, ReportDataMismatch),
        "keys-length": (off, k0, None),
        "keys": (k0, k0 + klen, ReportDataMismatch),
        "policy-length": (k0 + klen, p0, None),
        "policy": (p0, p0 + plen, ReportDataMismatch),
        "quote-length": (p0 + plen, q0, None),
        "quote-magic": (q0, q0 + 4, AttestationError),
        "quote-body": (q0 + 4, len(reply), UntrustedPlatform),
    }


@pytest.mark.parametrize("region", ["magic", "nonce", "code-digest", "keys-length", "keys", "policy-length",
                                    "policy", "quote-length", "quote-magic", "quote-body"])
def test_tamper_matrix_every_byte_of_a_reply(world, region):
    reply, nonce = ask(world)
    start, end, exact = _regions(reply)[region]
    now = now_ms()
    assert end > start
    for i in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            t = bytearray(reply)
            t[i] ^= mask
            with pytest.raises(AttestationError) as exc:
                verify_attestation(bytes(t), nonce, world.trust, now)
            if exact is not None:
                assert type(exc.value) is exact, (region, i, mask, exc.value)
    verify_attestation(reply, nonce, world.trust, now)  # the original still verifies


def test_regions_cover_the_whole_reply(world):
    reply, _ = ask(world)
    spans = sorted((s, e) for s, e, _ in _regions(reply).values())
    assert spans[0][0] == 0 and spans[-1][1] == len(reply)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


# -- trust anchors -----------------------------------------------------------------------
def test_trust_anchor_validation():
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ConfigError):
        TrustAnchors(key[:31], frozenset({b"\x00" * 32}))
    with pytest.raises(ConfigError):
        TrustAnchors(key, frozenset())
    with pytest.raises(ConfigError):
        TrustAnchors(key, frozenset({b"\x00" * 32}), max_quote_age_seconds=0)
    assert decode_platform_key(encode_platform_key(key)) == key
    for bad in ("not base64!", encode_platform_key(key[:16]), ""):
        with pytest.raises(ConfigError):
            decode_platform_key(bad)
    assert decode_measurement("ab" * 32) == b"\xab" * 32
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ConfigError):
            decode_measurement(bad)


# -- only verification creates trust ---------------------------------------------------------
def test_only_verify_attestation_constructs_attested_enclave():
    """Nothing in the library builds an ``AttestedEnclave`` except ``verify_attestation``,
    so a sealer can only ever be given keys that passed every check."""
    makers = []
    for package in ("common", "sidecar", "producers", "consumers", "sealedsum"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                for call in ast.walk(fn):
                    if isinstance(call, ast.Call) and (
                        (isinstance(call.func, ast.Name) and call.func.id == "AttestedEnclave")
                        or (isinstance(call.func, ast.Attribute) and call.func.attr == "AttestedEnclave")
                    ):
                        makers.append((path.relative_to(REPO).as_posix(), fn.name))
    assert makers == [("common/attestation.py", "verify_attestation")]


class _FakeChannel:
    is_open = True

    def __init__(self, log):
        self.log = log

    def confirm_delivery(self):
        pass

    def basic_publish(self, **kw):
        self.log.append(kw)


class _FakeConnection:
    def __init__(self):
        self.published: list = []
        self.is_open = True

    def channel(self):
        return _FakeChannel(self.published)

    def close(self):
        self.is_open = False


def _producer_with_reply(monkeypatch, world: World, tamper, trust: TrustAnchors):
    from sealedsum.common import amqp, config as config_mod
    from sealedsum.producers.client import Producer

    conn = _FakeConnection()
    monkeypatch.setattr(amqp, "connect", lambda settings, **kw: conn)

    def fake_rpc(connection, settings, nonce):
        reply = world.enclave.attest(wire.AttestRequest(nonce).to_bytes())
        return tamper(reply)

    monkeypatch.setattr(amqp, "request_attestation", fake_rpc)
    monkeypatch.setattr(amqp, "call_enclave", lambda connection, settings, request, kind:
                        world.enclave.answer(request, now_ms()))
    cfg = config_mod.Config(config_mod.BrokerSettings(), trust, None)
    return Producer, cfg, conn


@pytest.mark.parametrize("case", ["untrusted-platform", "altered-keys", "replayed"])
def test_producer_sends_nothing_when_attestation_fails(monkeypatch, world, other_keys, case):
    trust = world.trust
    if case == "untrusted-platform":
        trust = TrustAnchors(EmulatedPlatform.generate().public_key(), world.trust.measurements)
        tamper, error = (lambda r: r), UntrustedPlatform
    elif case == "altered-keys":
        tamper, error = (lambda r: rebuild(r, keys=other_keys.bundle_bytes)), ReportDataMismatch
    else:
        old, _ = ask(world)
        tamper, error = (lambda r: old), NonceMismatch
    Producer, cfg, conn = _producer_with_reply(monkeypatch, world, tamper, trust)
    with pytest.raises(error):
        Producer(cfg)
    assert conn.published == []
    assert not conn.is_open


def test_producer_publishes_after_a_genuine_attestation(monkeypatch, world):
    """The same fake edge with an untouched reply: the producer does seal and publish,
    so the refusal above is due to the failed check."""
    from sealedsum.producers import transport

    Producer, cfg, conn = _producer_with_reply(monkeypatch, world, lambda r: r, world.trust)
    # The publishing side's stand-in: what would go to the broker, confirmed at once.
    monkeypatch.setattr(transport.RecordPublisher, "publish", lambda self, body: conn.published.append({"body": body}))
    with Producer(cfg) as p:
        rec = p.send("s", [5.0])
    assert [m["body"] for m in conn.published] == [rec.body]
    assert world.enclave.on_record(rec.body, now_ms()).rejection is None


def test_the_allow_list_can_hold_several_measurements_for_rolling_upgrades(small_keys):
    """Two enclave versions (here: two policies) on one platform; a client allowing both
    attests either, and one allowing only the new one refuses the old."""
    import dataclasses

    from tests.conftest import make_policy, stream_table

    old = make_world(small_keys, make_policy({"s": stream_table()}))
    new_world = make_world(small_keys, make_policy({"s": stream_table(min_batch=4)}))
    platform = old.platform
    new_world.enclave._quote = lambda rd: platform.quote(new_world.measurement, rd)
    both = dataclasses.replace(old.trust, measurements=frozenset({old.measurement, new_world.measurement}))
    for w in (old, new_world):
        nonce = os.urandom(32)
        verify_attestation(w.enclave.attest(wire.AttestRequest(nonce).to_bytes()), nonce, both, now_ms())
    only_new = dataclasses.replace(both, measurements=frozenset({new_world.measurement}))
    nonce = os.urandom(32)
    with pytest.raises(UnknownMeasurement):
        verify_attestation(old.enclave.attest(wire.AttestRequest(nonce).to_bytes()), nonce, only_new, now_ms())
