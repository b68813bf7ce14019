"""Key rotation on a running sidecar: `sealedsum sidecar rotate` moves the enclave to a new
key epoch, records of the old epoch still count during the grace period, then are
dead-lettered with wrong_epoch until their producer attests again."""

from __future__ import annotations

import time

import pytest

from consumers.client import Consumer
from producers.client import Producer
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


def test_rotation_drains_the_old_epoch_then_refuses_it(sidecar_factory):
    sc = sidecar_factory({"s": STREAM}, enclave_extra=f"key_grace_seconds = {GRACE_S}")
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as old:
        assert old.enclave.keys.epoch == 1
        for _ in range(5):
            old.send("s", [1.0])
        out = run("sidecar", "rotate", "--state", str(sc.state))
        assert out.returncode == 0, out.stderr
        wait_for(sc, "keys rotated")
        with Producer(sc.config) as new:
            assert new.enclave.keys.epoch == 2
            assert new.enclave.keys.ed25519 == old.enclave.keys.ed25519  # results verify across epochs
            for _ in range(5):
                new.send("s", [2.0])
        for _ in range(2):
            old.send("s", [1.0])  # still epoch 1, within the grace period: counted
        time.sleep(GRACE_S + 1.5)
        old.send("s", [1.0])  # epoch 1 is retired now: dead-lettered
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
