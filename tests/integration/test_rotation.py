"""Key rotation on a running sidecar: `sealedsum sidecar rotate` moves the enclave to a new
key epoch, records of the old epoch still count during the grace period, then are
dead-lettered with wrong_epoch until their producer attests again; a producer that listens
on PREFIX.announce is told, attests again at once, and never sends a record the enclave refuses."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest

from sealedsum.common import amqp
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.conftest import launch
from tests.integration.test_cli import run
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = pytest.mark.integration

GRACE_S = 3
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 14, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def wait_for(sc, event, n=1, timeout=20):
    deadline = time.monotonic() + timeout
    while len(sc.events(event)) < n:
        assert time.monotonic() < deadline, f"no {event!r} in the sidecar log"
        time.sleep(0.1)


def wait_until_read(sc, timeout=20):
    """Until the enclave has taken every record off its queue (and a moment to count them)."""
    conn = amqp.connect(sc.config.broker)
    try:
        ch, deadline = conn.channel(), time.monotonic() + timeout
        while ch.queue_declare(sc.config.broker.topology.records_queue, passive=True).method.message_count:
            assert time.monotonic() < deadline, "the enclave did not read its queue"
            time.sleep(0.1)
    finally:
        conn.close()
    time.sleep(0.5)


def test_rotation_drains_the_old_epoch_then_refuses_it(sidecar_factory):
    sc = sidecar_factory({"s": STREAM}, enclave_extra=f"key_grace_seconds = {GRACE_S}")
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as old:
        assert old.enclave.keys.epoch == 1
        for _ in range(5):
            old.send("s", [1.0])
        # A producer that did not hear of the rotation: it keeps sealing with epoch 1's keys.
        stale = old.sealer
        out = run("sidecar", "rotate", "--state", str(sc.state))
        assert out.returncode == 0, out.stderr
        wait_for(sc, "keys rotated")
        with Producer(sc.config) as new:
            assert new.enclave.keys.epoch == 2
            assert new.enclave.keys.ed25519 == old.enclave.keys.ed25519  # results verify across epochs
            for _ in range(5):
                new.send("s", [2.0])
        for _ in range(2):
            old.publish(stale.seal("s", [1.0]))  # still epoch 1, within the grace period: counted
        time.sleep(GRACE_S + 1.5)
        old.publish(stale.seal("s", [1.0]))  # epoch 1 is retired now: dead-lettered
        assert old.reattest().keys.epoch == 2
        for _ in range(2):
            old.send("s", [1.0])
        (release,) = [m for _, m in zip(range(1), consumer.releases(idle_timeout=30))]
    assert release.count == 14 and release.sum[0] == pytest.approx(5 + 10 + 2 + 2, abs=1e-3)
    ((props, _),) = drain(dead_conn, dead_q, expect=1)
    assert props.headers["x-sealedsum-reason"] == "wrong_epoch"
    assert "attest again" in props.headers["x-sealedsum-detail"]
    sc.stop()
    assert sc.events("stats")[-1]["decryptions"] == 2  # one window, two epochs, one coordinate


def test_a_producer_told_of_a_rotation_attests_again_and_is_never_refused(sidecar_factory, caplog):
    """A long-lived producer with a large reattest_seconds keeps sending across a rotation and
    past the end of the grace period: it attests again because the enclave told it, so every
    record counts and none is dead-lettered wrong_epoch. After a lost connection it attests
    again too."""
    sc = sidecar_factory({"s": dict(STREAM, window_records=1000)}, enclave_extra=f"key_grace_seconds = {GRACE_S}")
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    config = dataclasses.replace(sc.config, reattest_seconds=3600.0)  # never due within this test
    sent = 0
    caplog.set_level(logging.INFO, logger="sealedsum")
    with Producer(config) as producer:
        assert producer.listening and producer.enclave.keys.epoch == 1
        for _ in range(3):
            producer.send("s", [1.0])
            sent += 1
        out = run("sidecar", "rotate", "--state", str(sc.state))
        assert out.returncode == 0, out.stderr
        wait_for(sc, "key rotation announced")
        rotated = time.monotonic()
        told_after = None
        while time.monotonic() < rotated + GRACE_S + 1.5:  # on past the old epoch's retirement
            producer.send("s", [1.0])
            sent += 1
            if told_after is None and producer.enclave.keys.epoch == 2:
                told_after = time.monotonic() - rotated
            time.sleep(0.2)
        assert told_after is not None and told_after < 1.0, told_after
        assert producer.enclave.keys.epoch == 2 and producer.notices_refused == 0
        # Its connection drops (notices sent meanwhile would be lost with its queue): it
        # listens again on the new one and attests again before the next record.
        publisher = producer._transport
        sessions = publisher.sessions
        driver = publisher.driver
        driver._ioloop.add_callback_threadsafe(lambda: driver._connection.close())
        deadline = time.monotonic() + 15
        while publisher.sessions == sessions:
            assert time.monotonic() < deadline, "the producer did not reconnect"
            time.sleep(0.05)
        producer.send("s", [1.0])
        sent += 1
    wait_until_read(sc)
    assert drain(dead_conn, dead_q, timeout=0.5) == []  # no wrong_epoch, nor anything else
    sc.stop()
    stats = sc.events("stats")[-1]
    assert stats["accepted"] == sent and stats["rejected"] == {}
    assert sc.events("key rotation announced")[0]["key_epoch"] == 2
    # Told once and reconnected once, so attested twice more: not once per record.
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("enclave announced a key rotation; attesting again before the next record") == 1
    assert messages.count("attesting again after a broker reconnect") == 1
    assert messages.count("enclave attested") == 3


def test_a_rolled_back_key_file_is_refused(sidecar_factory):
    """The operator holds the state directory: putting back the key file of before a rotation
    would bring the enclave back on the old epoch, undoing the rotation. The state names the
    epoch it was written under, so the enclave refuses it like any other rollback (exit 2)."""
    sc = sidecar_factory({"s": STREAM})
    (keys,) = list(sc.state.rglob("keys.sealed"))
    before_rotation = keys.read_bytes()
    assert run("sidecar", "rotate", "--state", str(sc.state)).returncode == 0
    wait_for(sc, "keys rotated")
    with Producer(sc.config) as producer:  # the new epoch is in the checkpointed state
        assert producer.enclave.keys.epoch == 2
        producer.send("s", [1.0])
    assert sc.stop() == 0
    keys.write_bytes(before_rotation)
    proc = launch(sc)
    assert proc.wait(timeout=60) == 2
    (refused,) = sc.events("sealed state rolled back; refusing to start")
    assert "older key file" in refused["detail"]
    assert not sc.events("enclave exited; restarting")
