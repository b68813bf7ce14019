"""Issue 12 in the core: the notices that tell a producer what became of its records (docs/protocol.md
sections 11.6, 13.8, 13.9), what a producer accepts of them, and how it ties them to its records.
The dishonest cases come first."""

from __future__ import annotations

import dataclasses
import logging
import os
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import signing, topology, wire
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import InvalidMessage, InvalidResultSignature, RecordRejected, RejectReason
from sealedsum.common.results import (PRODUCER_KINDS, RecordRefused, RecordsCounted, verify_notice,
                                      verify_signed)
from sealedsum.producers.outcomes import OutcomeBook
from sealedsum.sidecar.enclave import release
from sealedsum.sidecar.enclave.service import Effects
from sealedsum.sidecar.enclave_process.runtime import EnclaveRuntime
from tests.conftest import make_policy, make_world, now_ms, stream_table
from tests.unit.test_announce import producer  # noqa: F401 - the fixture: a Producer on a fake transport
from tests.unit.test_runtime import RecordingChannel, deliver

TOKEN = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def refusal(world, token=TOKEN, reason=RejectReason.FUTURE_WINDOW, record=("s", bytes(16)), index=None):
    r = RecordRejected(reason, "window 9 is not open yet; open window is 1")
    return world.enclave.refusal_notice(token, Effects(rejection=r, record=record), index, 1000)


def test_a_notice_signed_by_another_key_or_altered_or_for_another_token_is_refused(world):
    notice = refusal(world)
    assert verify_notice(notice.body, world.attested, TOKEN) == notice.message
    payload = wire.SignedMessage.from_bytes(notice.body).payload
    forger = Ed25519PrivateKey.generate()
    forged = wire.SignedMessage(payload, signing.sign(forger, signing.RESULT, payload)).to_bytes()
    altered = bytearray(notice.body)
    altered[20] ^= 1
    for body in (forged, bytes(altered), notice.body[:-1], b"", b"SSS\x01" + bytes(70)):
        with pytest.raises(InvalidResultSignature):
            verify_notice(body, world.attested, TOKEN)
    with pytest.raises(InvalidResultSignature):  # a genuine notice, but another producer's
        verify_notice(notice.body, world.attested, OTHER)
    with pytest.raises(InvalidMessage):  # not something a consumer of PREFIX.results takes
        verify_signed(notice.body, world.attested)
    other_world = make_world(world.enclave.keys, make_policy({"s": stream_table(min_batch=4)}))
    with pytest.raises(InvalidResultSignature):  # the same key in another deployment (measurement)
        verify_notice(refusal(other_world).body, world.attested, TOKEN)


def test_a_producer_ignores_a_notice_that_does_not_verify_with_a_warning(producer, caplog):  # noqa: F811
    p, fake, world = producer
    record = p.seal_current("s", [1.0])
    p._track(record, None)
    genuine = refusal(world, token=p.token, record=("s", record.record_id)).body
    fake.record_notices = [genuine[:-1] + bytes([genuine[-1] ^ 1]),  # signature altered
                           refusal(world, token=OTHER, record=("s", record.record_id)).body]
    with caplog.at_level(logging.WARNING, "sealedsum.producer"):
        out = p.outcomes()
    assert (out.rejected, out.unknown, p.notices_refused) == (0, 1, 2)
    assert caplog.text.count("does not verify") == 2
    fake.record_notices = [genuine]
    out = p.outcomes()
    assert (out.rejected, out.unknown, out.by_reason) == (1, 0, {"future_window": 1})


def test_notices_about_records_this_session_did_not_publish_change_nothing(world):
    book = OutcomeBook()
    mine = os.urandom(16)
    book.track(mine, "s")
    strangers = [refusal(world, record=("s", os.urandom(16))).message,
                 refusal(world, record=("t", mine)).message,  # my id, another stream: not mine
                 release.receipts(world.enclave.keys, world.measurement, 0, {TOKEN: [("s", os.urandom(16))]})[0].message]
    for n in strangers:
        book.heard(n)
    out = book.outcomes()
    assert (out.counted, out.rejected, out.unknown, book.ignored) == (0, 0, 1, 3)


def test_a_rejection_notice_round_trips_with_the_fields_of_the_dead_letter(world):
    n = refusal(world, index=3)
    assert RecordRefused.from_payload(n.message.to_payload()) == n.message
    assert (n.token, n.message.stream, n.message.record_id, n.message.batch_index, n.message.reason) == \
        (TOKEN, "s", "00" * 16, 3, "future_window")
    assert n.message.detail == "window 9 is not open yet; open window is 1" and n.message.at_ms == 1000
    unopened = refusal(world, reason=RejectReason.UNDECRYPTABLE, record=None)
    assert verify_notice(unopened.body, world.attested, TOKEN).record_id is None
    bad = dataclasses.replace(n.message, record_id=None)  # a stream without its record
    with pytest.raises(InvalidMessage):
        RecordRefused.from_payload(bad.to_payload())
    for kind in PRODUCER_KINDS:
        assert kind in ("key_rotated", "rejected", "counted")


def test_receipts_count_each_tokens_records_once_per_flush_and_split_past_the_limit(world, monkeypatch):
    keys, meas = world.enclave.keys, world.measurement
    a = [("s", os.urandom(16)) for _ in range(3)]
    b = [("t", os.urandom(16)), ("s", os.urandom(16))]
    out = release.receipts(keys, meas, 5, {TOKEN: a, OTHER: b})
    assert [n.token for n in out] == [TOKEN, OTHER]
    first = verify_notice(out[0].body, world.attested, TOKEN)
    assert first.count == 3 and first.record_ids() == [(s, r.hex()) for s, r in a]
    second = RecordsCounted.from_payload(wire.SignedMessage.from_bytes(out[1].body).payload)
    assert second.records == {"t": [b[0][1].hex()], "s": [b[1][1].hex()]} and second.count == 2
    monkeypatch.setattr(release, "RECEIPT_MAX_RECORDS", 2)
    split = release.receipts(keys, meas, 5, {TOKEN: a})
    assert [n.message.count for n in split] == [2, 1]
    with pytest.raises(InvalidMessage):  # a count that is not the number of ids
        RecordsCounted.from_payload(dataclasses.replace(first, count=4).to_payload())


def test_the_core_names_the_record_of_each_outcome(world):
    """What a notice can say: the stream and id of counted records and of records refused once
    their envelope opened (check 11 included), nothing for a box that does not open."""
    e, sealer = world.enclave, world.sealer
    good, future = sealer.seal("s", [1.0]), sealer.seal("s", [2.0], window=99)
    effects = e.accept_batch([e.open(good.body), e.open(future.body), e.open(b"junk" * 20)], now_ms())
    assert [x.record for x in effects] == [("s", good.record_id), ("s", future.record_id), None]
    assert [x.rejection and x.rejection.reason.value for x in effects] == [None, "future_window", "undecryptable"]
    env = wire.Envelope("s", os.urandom(16), world.attested.keys.epoch, now_ms(), 0, world.attested.keys.ciphertext_width,
                        (sealer.encryptor.encrypt(5),), sealer.producer_id, (world.attested.keys.paillier_n - 1,))
    lying = sealer._box.encrypt(env.to_bytes())
    opened = e.open(lying)
    assert opened.reason == RejectReason.OUT_OF_RANGE and opened.record == ("s", env.record_id)


def test_the_runtime_sends_refusals_with_the_dead_letters_and_receipts_after_the_checkpoint(world):
    runtime = EnclaveRuntime(world.enclave, BrokerSettings())
    consume, runtime._publish = RecordingChannel(), RecordingChannel()
    runtime._publish.log = consume.log  # one timeline
    runtime._dead = runtime._notify = runtime._publish
    header = SimpleNamespace(type=None, headers={topology.NOTIFY_HEADER: TOKEN})
    good, future = world.sealer.seal("s", [1.0]), world.sealer.seal("s", [2.0], window=99)
    deliver(runtime, consume, good.body, 1, props=header)
    deliver(runtime, consume, future.body, 2, props=header)
    deliver(runtime, consume, b"junk" * 20, 3, props=SimpleNamespace(type=None, headers=None))  # no token: no notice
    assert consume.log == ["ack 1 multiple", "publish sealedsum.notices",
                           "publish sealedsum.rejected", "publish sealedsum.notices", "commit", "ack 2 multiple",
                           "publish sealedsum.rejected", "commit", "ack 3 multiple"]
    receipt, dead, refused, junk = runtime._publish.published
    assert receipt[:2] == refused[:2] == ("sealedsum.notices", TOKEN)
    assert verify_notice(receipt[2], world.attested, TOKEN).record_ids() == [("s", good.record_id.hex())]
    assert verify_notice(refused[2], world.attested, TOKEN).record_id == future.record_id.hex()
    assert dead[3]["x-sealedsum-stream"] == "s" and "x-sealedsum-stream" not in junk[3]
    assert runtime.notices == {"counted": 1, "rejected": 1}  # in the stats line


@pytest.mark.parametrize("value", [TOKEN.upper(), TOKEN[:-1], TOKEN + "0", 12, None, "g" * 32])
def test_a_header_that_is_not_a_token_gets_no_notices(value):
    assert topology.notice_token({topology.NOTIFY_HEADER: value}) is None
    assert topology.notice_token(None) is None and topology.notice_token({topology.NOTIFY_HEADER: TOKEN}) == TOKEN


def test_the_book_counts_duplicates_as_counted_and_the_first_notice_about_a_record_decides(world):
    book = OutcomeBook()
    ids = [os.urandom(16) for _ in range(5)]
    failed = SimpleNamespace(failed=True)
    for i, rid in enumerate(ids):
        book.track(rid, "s", failed if i == 4 else None)  # the broker refused the last one
    book.heard(refusal(world, reason=RejectReason.DUPLICATE, record=("s", ids[0])).message)
    book.heard(refusal(world, reason=RejectReason.BUDGET_EXHAUSTED, record=("s", ids[1])).message)
    book.heard(release.receipts(world.enclave.keys, world.measurement, 0, {TOKEN: [("s", ids[1])]})[0].message)
    book.heard(refusal(world, reason=RejectReason.UNDECRYPTABLE, record=None).message)  # names no record
    out = book.outcomes()
    assert (out.counted, out.already_counted, out.rejected, out.unknown, book.ignored) == (1, 1, 2, 1, 1)
    assert out.by_reason == {"budget_exhausted": 1, "undecryptable": 1}
    assert out.reasons_text() == "budget_exhausted (1), undecryptable (1)"
    assert [r.record_id for r in out.rejections] == [ids[1].hex(), None]  # the second names no record


def test_a_budget_check_nobody_answers_sends_anyway_once_per_attestation(producer, monkeypatch, caplog):  # noqa: F811
    from sealedsum.common.errors import TransportError

    p, fake, world = producer
    asked = []

    def silent(enclave, stream):
        asked.append(stream)
        raise TransportError("no reply to budget-request within 10 s")

    monkeypatch.setattr(fake, "budget", silent)
    with caplog.at_level(logging.WARNING, "sealedsum.producer"):
        for _ in range(3):
            p.seal_current("s", [1.0])
    assert asked == ["s"] and "sending anyway" in caplog.text
