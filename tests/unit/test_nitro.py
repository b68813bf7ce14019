"""Nitro attestation documents (common/nitro.py, docs/protocol.md 7.2): real documents from
AWS's chain (tests/data/nitro/) verify as of their own time, and every departure is its own
typed error; documents of a test-only chain exercise the sealedsum binding and the producer."""

from __future__ import annotations

import dataclasses
import logging
import time

import cbor2
import pytest

from sealedsum.common import config as config_mod
from sealedsum.common import errors, nitro, wire
from sealedsum.common.attestation import TrustAnchors, verify_attestation
from tests.conftest import now_ms
from tests.nitro_chain import (
    AWS_ROOT,
    BAD_SIGNATURE,
    PCRS,
    REAL_NONCE,
    VALID_DOCUMENTS,
    TestChain,
    chain,  # noqa: F401  (a fixture)
    aws_root,
    random_nonce,
    real_document,
)
from tests.unit.test_attestation import _producer_with_reply, ask

AGE = 300.0


def timestamp(data: bytes) -> int:
    return nitro.decode(data).document.timestamp_ms


def debug_allowed() -> nitro.NitroTrust:
    return nitro.NitroTrust(aws_root(), frozenset({PCRS}), allow_debug=True)


# -- real documents (AWS Nitro root G1) -------------------------------------------------------

@pytest.mark.parametrize("name", VALID_DOCUMENTS)
def test_real_document_verifies_as_of_its_own_timestamp(name, caplog):
    data = real_document(name)
    with caplog.at_level(logging.WARNING, logger="sealedsum.attestation"):
        doc = nitro.verify_document(data, debug_allowed(), REAL_NONCE, timestamp(data), AGE)
    assert doc.nonce == REAL_NONCE and doc.digest == "SHA384" and len(doc.pcrs) == 16
    assert doc.debug and doc.public_key == b"dummy" and len(doc.user_data) == 68
    assert doc.module_id.startswith("i-0bbf1bfe232b8c2ce-enc")
    assert "DEBUG-MODE" in caplog.text  # visibly, at every attestation


@pytest.mark.parametrize("name", VALID_DOCUMENTS)
def test_real_document_refusals(name, chain):
    data = real_document(name)
    at = timestamp(data)
    strict = dataclasses.replace(debug_allowed(), allow_debug=False)
    with pytest.raises(errors.DebugEnclave):
        nitro.verify_document(data, strict, REAL_NONCE, at, AGE)
    with pytest.raises(errors.CertificateExpired):
        nitro.verify_document(data, debug_allowed(), REAL_NONCE, int(time.time() * 1000), AGE)
    with pytest.raises(errors.CertificateChainError):  # another root, pinned instead of AWS's
        nitro.verify_document(data, chain.trust(allow_debug=True), REAL_NONCE, at, AGE)
    with pytest.raises(errors.NonceMismatch):
        nitro.verify_document(data, debug_allowed(), bytes(20), at, AGE)
    with pytest.raises(errors.StaleQuote):  # certificates still valid, the document too old
        nitro.verify_document(data, debug_allowed(), REAL_NONCE, at + 301_000, AGE)


def test_bad_signature_document_is_refused_for_its_signature():
    data = real_document(BAD_SIGNATURE)
    with pytest.raises(errors.QuoteSignatureError):
        nitro.verify_document(data, debug_allowed(), bytes(20), timestamp(data), AGE)


def _regions(data: bytes) -> dict[str, range]:
    """Where the payload, the signature and each certificate lie in the COSE bytes."""
    signed = nitro.decode(data)
    start = data.index(signed.payload)
    regions = {"protected": range(0, start - 3), "payload": range(start, start + len(signed.payload)),
               "signature": range(len(data) - 96, len(data))}
    for i, der in enumerate((signed.document.certificate, *signed.document.cabundle)):
        at = data.index(der)
        regions[f"certificate-{i}"] = range(at, at + len(der))
    return regions


@pytest.mark.parametrize("name", VALID_DOCUMENTS)
def test_every_changed_byte_is_a_typed_refusal(name):
    data = real_document(name)
    at, trust = timestamp(data), debug_allowed()
    seen = {}
    regions = _regions(data)
    # Every byte of the document, each changed once (the low bit, the high bit or all bits, by
    # position), named by the innermost region holding it ("heads": the CBOR heads between them).
    for i in range(len(data)):
        region = next((name for name, where in sorted(regions.items(), key=lambda r: len(r[1])) if i in where),
                      "heads")
        tampered = bytearray(data)
        tampered[i] ^= (0x01, 0x80, 0xff)[i % 3]
        with pytest.raises(errors.AttestationError) as info:
            nitro.verify_document(bytes(tampered), trust, REAL_NONCE, at, AGE)
        assert type(info.value) is not errors.AttestationError, (region, i, info.value)
        seen.setdefault(region, set()).add(type(info.value))
    assert errors.QuoteSignatureError in seen["signature"] and seen["protected"] == {errors.MalformedQuote}
    assert errors.CertificateChainError in seen["certificate-0"] | seen["certificate-2"]


# -- documents of the test-only chain --------------------------------------------------------

def test_a_production_document_of_pinned_pcrs_verifies(chain):
    nonce, at = random_nonce(), now_ms()
    data = chain.sign(chain.document(at, nonce=nonce))
    doc = nitro.verify_document(data, chain.trust(), nonce, at, AGE)
    assert not doc.debug and doc.measured_pcrs == PCRS
    assert nitro.verify_document(nitro.COSE_SIGN1_TAG + data, chain.trust(), nonce, at, AGE) == doc  # tag 18


def test_each_rule_of_the_document_is_its_own_refusal(chain):
    at, nonce = now_ms(), random_nonce()

    def refused(error, doc=None, trust=None, *, protected=nitro.PROTECTED_ES384):
        data = chain.sign(doc if doc is not None else chain.document(at, nonce=nonce), protected=protected)
        with pytest.raises(error):
            nitro.verify_document(data, trust or chain.trust(), nonce, at, AGE)

    other_pcrs = (bytes(47) + b"\x01", PCRS[1], PCRS[2])
    refused(errors.UnknownMeasurement, trust=chain.trust(pcrs=frozenset({other_pcrs})))
    refused(errors.DebugEnclave, chain.document(at, nonce=nonce, pcrs={i: bytes(48) for i in range(16)}))
    refused(errors.MalformedQuote, protected=cbor2.dumps({1: -35, 4: b"kid"}))
    refused(errors.MalformedQuote, protected=cbor2.dumps({1: -7}))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, digest="SHA256"))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, user_data=bytes(513)))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, nonce_=b""))  # unknown field
    refused(errors.MalformedQuote, chain.document(at, nonce=bytes(513)))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, public_key=b""))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, pcrs={0: PCRS[0], 1: PCRS[1]}))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, pcrs={**{i: PCRS[0] for i in range(3)}, 32: bytes(48)}))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, timestamp=0))
    refused(errors.StaleQuote, chain.document(at, nonce=nonce, timestamp=at + 31_000))  # dated ahead of the skew
    refused(errors.StaleQuote, chain.document(at, nonce=nonce, timestamp=(1 << 64) - 1))
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, cabundle=[]))
    refused(errors.NonceMismatch, chain.document(at))
    refused(errors.CertificateChainError, chain.document(at, nonce=nonce, cabundle=[chain.intermediate.public_bytes(
        nitro.Encoding.DER)]))  # the bundle's first certificate is not the pinned root
    leafless = chain.document(at, nonce=nonce, certificate=chain.intermediate.public_bytes(nitro.Encoding.DER))
    refused(errors.CertificateChainError, leafless)  # a CA as the signing certificate
    # X.509 version 5 (the DER INTEGER after [0]): cryptography raises InvalidVersion, no ValueError.
    leaf = chain.leaf.public_bytes(nitro.Encoding.DER)
    version = leaf.index(b"\xa0\x03\x02\x01\x02") + 4
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, certificate=leaf[:version] + b"\x04" + leaf[version + 1:]))
    bundle = [chain.root.public_bytes(nitro.Encoding.DER), leaf[:version] + b"\x04" + leaf[version + 1:]]
    refused(errors.MalformedQuote, chain.document(at, nonce=nonce, cabundle=bundle))


def _leaf_under(chain: TestChain, *extensions) -> tuple[bytes, object]:
    """A signing certificate of the test chain's intermediate with only ``extensions``
    (each ``(extension, critical)``), and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP384R1())
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    builder = (x509.CertificateBuilder().subject_name(chain.leaf.subject).issuer_name(chain.intermediate.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(hours=3)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(chain.intermediate_key, hashes.SHA384()).public_bytes(Encoding.DER), key


def test_a_signing_certificate_that_may_sign_certificates_is_refused(chain):
    """RFC 5280 4.2.1.3 and AWS 3.2.3.3: keyCertSign is for CAs only. A signing certificate
    asserting it is refused even without basic constraints (which would say it is a CA)."""
    from cryptography import x509

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 crl_sign=False, encipher_only=False, decipher_only=False)
    at, nonce = now_ms(), random_nonce()
    for key_cert_sign, expected in ((False, None), (True, errors.CertificateChainError)):
        der, key = _leaf_under(chain, (x509.KeyUsage(digital_signature=True, key_cert_sign=key_cert_sign, **usage), True))
        signer = dataclasses.replace(chain, leaf=x509.load_der_x509_certificate(der), leaf_key=key)
        data = signer.sign(signer.document(at, nonce=nonce, certificate=der))
        if expected is None:  # the same certificate without keyCertSign verifies: only that bit is refused
            nitro.verify_document(data, chain.trust(), nonce, at, AGE)
        else:
            with pytest.raises(expected, match="keyCertSign"):
                nitro.verify_document(data, chain.trust(), nonce, at, AGE)


def test_verification_time_is_injectable(chain):
    nonce = random_nonce()
    late = now_ms() + 4 * 3600 * 1000  # past the three-hour leaf
    data = chain.sign(chain.document(late, nonce=nonce))
    with pytest.raises(errors.CertificateExpired):
        nitro.verify_document(data, chain.trust(), nonce, late, AGE)


def test_a_bundle_that_does_not_chain_in_order_is_refused_at_once(chain):
    """An unsigned document can carry any certificates: sixteen of another chain behind the
    pinned root are refused by the in-order pass, before any path is searched."""
    from cryptography.hazmat.primitives.serialization import Encoding

    other = TestChain.generate(now_ms())
    clones = [TestChain.generate(now_ms(), (7, 7, 7)).intermediate.public_bytes(Encoding.DER) for _ in range(2)]
    at, nonce = now_ms(), random_nonce()
    bundle = [chain.root.public_bytes(Encoding.DER), *(clones * 8)]
    data = other.sign(other.document(at, nonce=nonce, cabundle=bundle))
    started = time.monotonic()
    with pytest.raises(errors.CertificateChainError):
        nitro.verify_document(data, chain.trust(), nonce, at, AGE)
    assert time.monotonic() - started < 2.0


# -- the sealedsum flow: user_data binds keys, policy and nonce (acceptance 3) ---------------

def _nitro_world(world, chain, **fields):
    world.enclave._quote = chain.quoter(world.measurement, now_ms, **fields)
    return TrustAnchors(None, world.trust.measurements, nitro=chain.trust())


def test_a_nitro_reply_verifies_through_the_one_attestation_path(world, chain):
    trust = _nitro_world(world, chain)
    reply, nonce = ask(world)
    enclave = verify_attestation(reply, nonce, trust, now_ms())
    assert enclave.platform == "nitro" and enclave.pcrs == PCRS and enclave.measurement == world.measurement
    assert enclave.to_json()["pcrs"]["pcr0"] == PCRS[0].hex()
    with pytest.raises(errors.UntrustedPlatform):  # a client pinning only the emulated platform
        verify_attestation(reply, nonce, world.trust, now_ms())
    emulated = world.platform.quote(world.measurement, wire.report_data(
        wire.AttestReply.from_bytes(reply).keys, world.enclave.policy_bytes, nonce))
    with pytest.raises(errors.UntrustedPlatform):  # and one pinning only Nitro
        verify_attestation(_with_quote(reply, emulated), nonce, trust, now_ms())


def test_an_allowed_debug_enclave_is_named_in_what_the_client_verified(world, chain, caplog):
    """allow_debug is visible where the verified enclave is shown (``sealedsum attest`` prints
    ``to_json``), not only in the log: an operator reading the output cannot miss it."""
    world.enclave._quote = chain.quoter(world.measurement, now_ms, pcrs={i: bytes(48) for i in range(16)})
    trust = TrustAnchors(None, world.trust.measurements, nitro=chain.trust(allow_debug=True))
    reply, nonce = ask(world)
    with caplog.at_level(logging.WARNING, logger="sealedsum.attestation"):
        shown = verify_attestation(reply, nonce, trust, now_ms()).to_json()
    assert shown["debug_mode"] is True and "DEBUG-MODE" in caplog.text
    _nitro_world(world, chain)
    reply, nonce = ask(world)
    assert verify_attestation(reply, nonce, trust, now_ms()).to_json()["debug_mode"] is False
    world.enclave._quote = lambda rd: world.platform.quote(world.measurement, rd)
    assert "debug_mode" not in verify_attestation(*ask(world), world.trust, now_ms()).to_json()  # emulated: as before


def _with_quote(reply: bytes, quote: bytes) -> bytes:
    return dataclasses.replace(wire.AttestReply.from_bytes(reply), quote=quote).to_bytes()


def test_user_data_of_other_keys_is_refused(world, chain, other_keys):
    trust = _nitro_world(world, chain)
    reply, nonce = ask(world)
    parsed = wire.AttestReply.from_bytes(reply)
    wrong = wire.report_data(other_keys.bundle_bytes, parsed.policy, nonce)
    forged = chain.quoter(world.measurement, now_ms)(wrong)
    with pytest.raises(errors.ReportDataMismatch):
        verify_attestation(_with_quote(reply, forged), nonce, trust, now_ms())
    no_binding = chain.sign(chain.document(now_ms(), user_data=b"\x12\x20" + bytes(32)))
    with pytest.raises(errors.MalformedQuote):
        verify_attestation(_with_quote(reply, no_binding), nonce, trust, now_ms())


def test_the_document_nonce_field_is_absent_or_the_clients(world, chain):
    """The client's nonce is bound through user_data's report data (docs/nitro.md, "The nonce");
    a document that also carries a nonce field must carry the client's own there."""
    trust = _nitro_world(world, chain)
    reply, nonce = ask(world)
    parsed = wire.AttestReply.from_bytes(reply)
    rd = wire.report_data(parsed.keys, parsed.policy, nonce)
    with_own = chain.quoter(world.measurement, now_ms, nonce=nonce)(rd)
    assert verify_attestation(_with_quote(reply, with_own), nonce, trust, now_ms()).platform == "nitro"
    for other in (random_nonce(), b"", nonce[:-1]):
        quote = chain.quoter(world.measurement, now_ms, nonce=other)(rd)
        with pytest.raises(errors.NonceMismatch):
            verify_attestation(_with_quote(reply, quote), nonce, trust, now_ms())
    # A replayed document: its report data was made for another nonce, whatever its nonce field.
    old_reply, _ = ask(world)
    with pytest.raises(errors.ReportDataMismatch):
        verify_attestation(_with_quote(reply, wire.AttestReply.from_bytes(old_reply).quote), nonce, trust, now_ms())


def test_producer_sends_nothing_on_a_nitro_document_of_other_keys(monkeypatch, world, chain, other_keys):
    trust = _nitro_world(world, chain)
    quoter = chain.quoter(world.measurement, now_ms)

    def rebind(reply: bytes) -> bytes:
        parsed = wire.AttestReply.from_bytes(reply)
        return _with_quote(reply, quoter(wire.report_data(other_keys.bundle_bytes, parsed.policy, parsed.nonce)))

    Producer, cfg, conn = _producer_with_reply(monkeypatch, world, rebind, trust)
    with pytest.raises(errors.ReportDataMismatch):
        Producer(cfg)
    assert conn.published == [] and not conn.is_open


def test_producer_publishes_after_a_genuine_nitro_attestation(monkeypatch, world, chain):
    from sealedsum.producers import transport

    trust = _nitro_world(world, chain)
    Producer, cfg, conn = _producer_with_reply(monkeypatch, world, lambda r: r, trust)
    monkeypatch.setattr(transport.RecordPublisher, "publish", lambda self, body: conn.published.append({"body": body}))
    with Producer(cfg) as p:
        assert p.enclave.platform == "nitro"
        rec = p.send("s", [5.0])
    assert [m["body"] for m in conn.published] == [rec.body]
    assert world.enclave.on_record(rec.body, now_ms()).rejection is None


class _ConsumerChannel:
    """Enough of a pika channel for a consumer to subscribe; it records what was called to
    read results (nothing is ever delivered)."""

    def __init__(self, log: list) -> None:
        self.log = log

    def queue_declare(self, queue, **_kw):
        return type("Ok", (), {"method": type("M", (), {"queue": queue or "amq.gen-test"})()})()

    def queue_bind(self, *args, **kw):
        pass

    def basic_qos(self, **kw):
        pass

    def __getattr__(self, name):  # basic_consume, consume, basic_get ...: reading results
        def record(*args, **kw):
            self.log.append(name)
        return record


@pytest.mark.parametrize("case", ["signature", "binding", "debug"])
def test_consumer_refuses_a_bad_nitro_document_through_the_shared_attest(monkeypatch, world, chain, other_keys, case):
    """The consumer attests through ``amqp.attest``, the producers' and the CLI's path (pinned
    here: a consumer verifying on its own would be a second path to keep right): a Nitro
    document with a changed signature, a user_data binding other keys, or a debug-mode enclave
    is refused with its own error, the connection closed, and no result read."""
    from sealedsum.common import amqp, config as config_mod
    from sealedsum.consumers.client import Consumer

    trust = _nitro_world(world, chain)
    quoter = chain.quoter(world.measurement, now_ms)

    def tamper(reply: bytes) -> bytes:
        parsed = wire.AttestReply.from_bytes(reply)
        if case == "signature":
            return _with_quote(reply, parsed.quote[:-1] + bytes([parsed.quote[-1] ^ 1]))
        if case == "binding":
            return _with_quote(reply, quoter(wire.report_data(other_keys.bundle_bytes, parsed.policy, parsed.nonce)))
        debug = chain.quoter(world.measurement, now_ms, pcrs={i: bytes(48) for i in range(16)})
        return _with_quote(reply, debug(wire.report_data(parsed.keys, parsed.policy, parsed.nonce)))

    consumed: list = []
    conn = type("Conn", (), {"is_open": True, "channel": lambda self: _ConsumerChannel(consumed),
                             "close": lambda self: setattr(self, "is_open", False)})()
    monkeypatch.setattr(amqp, "connect", lambda settings, **kw: conn)
    monkeypatch.setattr(amqp, "request_attestation",
                        lambda connection, settings, nonce: tamper(world.enclave.attest(wire.AttestRequest(nonce).to_bytes())))
    shared = amqp.attest
    calls = []
    monkeypatch.setattr(amqp, "attest", lambda *a, **kw: calls.append(a) or shared(*a, **kw))
    expected = {"signature": errors.QuoteSignatureError, "binding": errors.ReportDataMismatch,
                "debug": errors.DebugEnclave}[case]
    with pytest.raises(expected):
        Consumer(config_mod.Config(config_mod.BrokerSettings(), trust, None), "s", chain_state=None)
    assert len(calls) == 1 and calls[0][2] is trust  # the shared path, with this client's anchors
    # It subscribes to the release stream before it attests (docs/protocol.md section 2.1: so
    # nothing published after it started is missed), but reads nothing: no delivery, no get.
    assert consumed in ([], ["basic_consume"]) and not conn.is_open
    # The same edge with the reply untouched: the consumer attests, so the refusals are the checks'.
    monkeypatch.setattr(amqp, "request_attestation",
                        lambda connection, settings, nonce: world.enclave.attest(wire.AttestRequest(nonce).to_bytes()))
    conn.is_open = True
    consumer = Consumer(config_mod.Config(config_mod.BrokerSettings(), trust, None), "s", chain_state=None)
    assert consumer.enclave.platform == "nitro" and consumer.enclave.pcrs == PCRS


# -- [trust.nitro] ---------------------------------------------------------------------------

def _root_of_version_5() -> str:
    """The AWS root's PEM with its X.509 version changed to 5 (no version cryptography knows)."""
    import base64

    der = nitro.load_root(AWS_ROOT.read_bytes()).public_bytes(nitro.Encoding.DER)
    at = der.index(b"\x02\x01\x02") + 2
    body = base64.encodebytes(der[:at] + b"\x04" + der[at + 1:]).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"


def _trust_table(**nitro_table) -> dict:
    return {"trust": {"measurements": ["ab" * 32], "nitro": nitro_table}}


def test_trust_nitro_from_config(tmp_path):
    (tmp_path / "root.pem").write_bytes(AWS_ROOT.read_bytes())
    pcrs = [{"pcr0": PCRS[0].hex(), "pcr1": PCRS[1].hex(), "pcr2": PCRS[2].hex()}]
    cfg = config_mod.from_mapping(_trust_table(root_certificate="root.pem", pcrs=pcrs), {}, tmp_path / "c.toml")
    assert cfg.trust.platform_key is None and cfg.trust.nitro.pcrs == {PCRS} and not cfg.trust.nitro.allow_debug
    assert cfg.trust.nitro.root == aws_root() and cfg.trust.root_id().startswith("nitro:641a0321")
    inline = config_mod.from_mapping(_trust_table(root_certificate_pem=AWS_ROOT.read_text(), allow_debug=True), {})
    assert inline.trust.nitro.allow_debug and inline.trust.nitro.pcrs == frozenset()


@pytest.mark.parametrize("table", [
    {},  # no root
    {"root_certificate_pem": "not PEM", "pcrs": []},
    {"root_certificate_pem": AWS_ROOT.read_text()},  # no PCRs and no debug: nothing could be trusted
    {"root_certificate_pem": AWS_ROOT.read_text(), "pcrs": [{"pcr0": "00" * 48, "pcr1": "00" * 48}]},
    {"root_certificate_pem": AWS_ROOT.read_text(), "pcrs": [{"pcr0": "00" * 32, "pcr1": "00" * 48, "pcr2": "00" * 48}]},
    {"root_certificate_pem": AWS_ROOT.read_text(), "allow_debug": "yes"},
    {"root_certificate": "/nonexistent/root.pem", "pcrs": []},
    {"root_certificate_pem": _root_of_version_5(), "allow_debug": True},
])
def test_bad_trust_nitro_tables(table):
    with pytest.raises(errors.ConfigError):
        config_mod.from_mapping(_trust_table(**table), {})




@pytest.mark.parametrize("tampered", [False, True])
def test_cli_attest_verifies_a_nitro_enclave(monkeypatch, tmp_path, capsys, world, chain, other_keys, tampered):
    """`sealedsum attest` goes through the same path: it prints the Nitro enclave it verified,
    or exits 1 naming the failed check."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from sealedsum.commands import main

    _nitro_world(world, chain)
    quoter = chain.quoter(world.measurement, now_ms)

    def rebind(reply: bytes) -> bytes:
        parsed = wire.AttestReply.from_bytes(reply)
        return _with_quote(reply, quoter(wire.report_data(other_keys.bundle_bytes, parsed.policy, parsed.nonce)))

    _producer_with_reply(monkeypatch, world, rebind if tampered else (lambda r: r), None)
    (tmp_path / "root.pem").write_bytes(chain.root.public_bytes(Encoding.PEM))
    pcrs = "".join(f'pcr{i} = "{p.hex()}"\n' for i, p in enumerate(PCRS))
    (tmp_path / "client.toml").write_text(f'[trust]\nmeasurements = ["{world.measurement.hex()}"]\n'
                                          f'[trust.nitro]\nroot_certificate = "root.pem"\n[[trust.nitro.pcrs]]\n{pcrs}')
    code = main(["attest", "--config", str(tmp_path / "client.toml")])
    out = capsys.readouterr()
    if tampered:
        assert code == 1 and "keys, policy or nonce differ" in out.err and out.out == ""
    else:
        assert code == 0 and '"platform": "nitro"' in out.out and PCRS[0].hex() in out.out
