"""Issue 12: a producer learns which of its records the enclave rejected and why, from signed
notices to its own token, and learns nothing about anyone else's; a spent stream is refused
before anything is sent; `sealedsum rejected` shows the operator the dead letters."""

from __future__ import annotations

import json
import os
import time

import pika
import pytest

from sealedsum.common import amqp, topology, wire
from sealedsum.common.errors import StreamExhausted
from sealedsum.common.results import RecordRefused, RecordsCounted, verify_notice
from sealedsum.producers.client import Producer, SealedRecord
from tests.integration.test_cli import run
from tests.integration.test_end_to_end import capture_queue, drain
from tests.integration.test_validity_over_broker import forged

pytestmark = pytest.mark.integration

OPEN = {"dimension": 1, "lower": -100.0, "upper": 100.0, "window_records": 1000, "min_batch": 1,
        "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 100.0}
# One record closes a window and spends the whole budget: the next records are budget_exhausted.
ONE_SHOT = dict(OPEN, window_records=1, budget_epsilon=1.0)


def raw_record(sc, body: bytes, token: str | None) -> None:
    """Publish a sealed record as any client could, with ``token`` in the notice header."""
    conn = amqp.connect(sc.config.broker)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        headers = {topology.NOTIFY_HEADER: token} if token else None
        ch.basic_publish(sc.config.broker.topology.records_exchange, topology.RECORD_ROUTING_KEY, body,
                         amqp.properties(wire.RECORD_TYPE, headers=headers), mandatory=True)
    finally:
        conn.close()


def notices_to(sc, conn, queue, enclave, token: str, settle_s: float = 3.0) -> list:
    """Every notice that reached ``queue`` (bound with ``token``), verified."""
    time.sleep(settle_s)
    return [verify_notice(body, enclave, token) for _, body in drain(conn, queue, timeout=2)]


def test_a_made_up_token_hears_only_about_the_records_that_carried_it(sidecar_factory):
    """The dishonest case first: a producer that puts a token of its own making on records
    hears, on that token, about those records only; the honest producers' records, sent at the
    same time, never reach it, and it cannot make another token's holder believe anything."""
    sc = sidecar_factory({"s": OPEN})
    t = sc.config.broker.topology
    made_up = os.urandom(16).hex()
    spy_conn, spy_q = capture_queue(sc, t.notices_exchange, made_up)
    with Producer(sc.config) as honest, Producer(sc.config, notices=False) as dishonest:
        mine = [dishonest.sealer.seal("s", [1.0]), dishonest.sealer.seal("s", [2.0], window=999)]
        for record in mine:
            raw_record(sc, record.body, made_up)
        theirs = [honest.send("s", [3.0]), honest.send("s", [4.0], window=999)]
        # The dishonest one also puts the honest producer's token on a record of its own
        # (as if it had learnt it): the honest one must not take it for one of its records.
        stray = dishonest.sealer.seal("s", [5.0], window=999)
        raw_record(sc, stray.body, honest.token)
        honest.wait_outcomes(15)
        heard = notices_to(sc, spy_conn, spy_q, dishonest.enclave, made_up)
        out = honest.outcomes()  # the stray record's notice has come by now too
    ids = {r.record_id.hex() for r in mine}
    about = [n.record_id for n in heard if isinstance(n, RecordRefused)]
    about += [rid for n in heard if isinstance(n, RecordsCounted) for _, rid in n.record_ids()]
    assert sorted(about) == sorted(ids)
    assert not {r.record_id.hex() for r in theirs + [stray]} & set(about)
    assert [n.reason for n in heard if isinstance(n, RecordRefused)] == ["future_window"]
    # The honest producer: its own two records, and nothing from the stray one.
    assert (out.counted, out.rejected, out.unknown) == (1, 1, 0)
    assert out.by_reason == {"future_window": 1}
    assert [r.record_id for r in out.rejections] == [theirs[1].record_id.hex()]
    assert honest._book.ignored == 1


def test_a_notice_whose_signature_does_not_verify_is_ignored(sidecar_factory, caplog):
    sc = sidecar_factory({"s": OPEN})
    with Producer(sc.config) as p:
        record = p.send("s", [1.0], window=999)
        real = None
        deadline = time.monotonic() + 15
        while real is None and time.monotonic() < deadline:
            bodies = p._transport.take_record_notices()
            real = next(iter(bodies), None)
            time.sleep(0.05)
        assert real is not None
        forged_body = real[:-1] + bytes([real[-1] ^ 1])  # the signature's last byte
        conn = amqp.connect(sc.config.broker)  # an administrator: a producer may not publish there
        conn.channel().basic_publish(sc.config.broker.topology.notices_exchange, p.token, forged_body)
        conn.close()
        time.sleep(1)
        assert p.outcomes().rejected == 0 and p.notices_refused == 1
        assert p.outcomes().unknown == 1
        p._transport.listener._record_notices.append(real)  # the genuine one, heard late, counts
        out = p.outcomes()
    assert (out.rejected, out.unknown) == (1, 0) and out.rejections[0].record_id == record.record_id.hex()
    assert "does not verify" in caplog.text


def test_rejections_reach_their_producer_and_a_second_producer_learns_nothing(sidecar_factory):
    sc = sidecar_factory({"s": OPEN, "b": ONE_SHOT})
    t = sc.config.broker.topology
    with Producer(sc.config) as a, Producer(sc.config) as b:
        # The second producer's token, watched from outside too: what reaches it, all of it.
        watch_conn, watch_q = capture_queue(sc, t.notices_exchange, b.token)
        spent = a.send("b", [1.0])  # closes b's only window: its budget is spent
        time.sleep(2)
        late = [a.send("b", [2.0]), a.send("b", [3.0])]  # checked once per attestation: sent, and refused
        future = a.send("s", [4.0], window=999)
        rid = os.urandom(16)
        policy = a.enclave.policy.streams["s"]
        hi = policy.coordinate_ranges(1)[0][1]
        a.publish(SealedRecord(forged(a, "s", [hi + 1], record_id=rid), rid, 0, "s"))
        good = a.send("s", [5.0])
        b_records = [b.send("s", [6.0]), b.send("s", [7.0])]
        out_a = a.wait_outcomes(20)
        out_b = b.wait_outcomes(20)
        watched = notices_to(sc, watch_conn, watch_q, b.enclave, b.token)
    assert out_a.by_reason == {"budget_exhausted": 2, "future_window": 1, "out_of_range": 1}
    assert (out_a.counted, out_a.rejected, out_a.unknown) == (2, 4, 0)
    by_id = {r.record_id: r for r in out_a.rejections}
    assert by_id[future.record_id.hex()].detail.startswith("window 999 is not open yet")
    assert by_id[rid.hex()].reason == "out_of_range" and by_id[rid.hex()].stream == "s"
    assert {by_id[r.record_id.hex()].reason for r in late} == {"budget_exhausted"}
    assert spent.record_id.hex() not in by_id and good.record_id.hex() not in by_id
    # The second producer heard of its own two records and of nothing else.
    assert (out_b.counted, out_b.rejected, out_b.unknown) == (2, 0, 0) and b._book.ignored == 0
    assert all(isinstance(n, RecordsCounted) for n in watched)
    assert sorted(rid for n in watched for _, rid in n.record_ids()) == sorted(r.record_id.hex() for r in b_records)


def test_produce_names_the_reason_and_exits_4_and_a_spent_stream_gets_nothing(sidecar_factory):
    sc = sidecar_factory({"s": OPEN, "b": ONE_SHOT})
    t = sc.config.broker.topology
    env = {"AMQP_URL": sc.config.broker.url}
    out = run("produce", "--config", str(sc.config_path), "--stream", "s", "--window", "999", "--json",
              input="1\n2\n3\n", env=env)
    assert out.returncode == 4, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["confirmed"], summary["counted"], summary["rejected_by_enclave"], summary["unknown"]) == (3, 0, 3, 0)
    assert summary["rejected_by_reason"] == {"future_window": 3}
    assert "error: the enclave rejected 3 record(s): future_window (3)" in out.stderr
    ok = run("produce", "--config", str(sc.config_path), "--stream", "s", "--json", input="1\n2\n", env=env)
    assert ok.returncode == 0, ok.stderr
    assert (json.loads(ok.stdout)["counted"], json.loads(ok.stdout)["rejected_by_enclave"]) == (2, 0)
    # Spend b's budget, then nothing may be sent to it: exit 4 before a record is published.
    assert run("produce", "--config", str(sc.config_path), "--stream", "b", input="1\n", env=env).returncode == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with Producer(sc.config) as p:
            try:
                p.check_stream("b")
            except StreamExhausted:
                break
        time.sleep(0.5)
    copy_conn, copy_q = capture_queue(sc, t.records_exchange, topology.RECORD_ROUTING_KEY)
    refused = run("produce", "--config", str(sc.config_path), "--stream", "b", input="1\n2\n3\n4\n5\n", env=env)
    assert refused.returncode == 4, refused.stderr
    assert "has spent its privacy budget" in refused.stderr and "nothing was sent" in refused.stderr
    assert drain(copy_conn, copy_q, timeout=2) == []
    with Producer(sc.config) as p, pytest.raises(StreamExhausted):
        p.send("b", [1.0])


def test_rejected_shows_the_dead_letters_without_consuming_them_until_drain(sidecar_factory):
    sc = sidecar_factory({"s": OPEN, "b": ONE_SHOT})
    t = sc.config.broker.topology
    env = {"AMQP_URL": sc.config.broker.url}
    with Producer(sc.config) as p:
        p.send("b", [1.0])
        time.sleep(2)
        for v in (2.0, 3.0):
            p.send("b", [v])
        for v in (4.0, 5.0, 6.0):
            p.send("s", [v], window=999)
        assert p.wait_outcomes(20).rejected == 5
    raw_record(sc, b"junk", None)  # no stream: undecryptable
    time.sleep(1)
    args = ("rejected", "--config", str(sc.config_path))
    for _ in range(2):  # a peek leaves them where they are
        shown = run(*args, "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        assert view["total"] == 6
        assert view["by_reason"] == {"budget_exhausted": 2, "future_window": 3, "undecryptable": 1}
        assert view["by_stream"] == {"b": 2, "s": 3, "": 1}
    assert view["recent"][-1]["reason"] == "undecryptable" and view["recent"][-1]["bytes"] == 4
    assert view["recent"][0]["stream"] == "b" and "spent its privacy budget" in view["recent"][0]["detail"]
    text = run(*args, "--peek", "2", env=env)
    assert text.returncode == 0 and "future_window" in text.stdout and "budget_exhausted  2" in text.stdout
    drained = run(*args, "--drain", "--json", env=env)
    assert drained.returncode == 0 and json.loads(drained.stdout)["drained"] == 6
    conn = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
    assert conn.channel().queue_declare(t.rejected_queue, passive=True).method.message_count == 0
    conn.close()
