"""Fault injection: restart the broker under load (`rabbitmqctl stop_app` / `start_app`).
Producers finish with every record confirmed, the enclave and the consumer reconnect
by themselves, and the releases count each record exactly once."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest

from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS, WINDOW = 300, 50
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": WINDOW, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def broker_control(amqp_url):
    if shutil.which("rabbitmqctl") is None or "127.0.0.1" not in amqp_url and "localhost" not in amqp_url:
        pytest.fail("this test restarts the local broker with rabbitmqctl; AMQP_URL must point at it")
    yield rabbitmqctl
    rabbitmqctl("start_app")  # whatever happened, leave the broker running
    rabbitmqctl("await_startup")


def test_a_broker_restart_under_load_loses_nothing(sidecar_factory, broker_control):
    sc = sidecar_factory({"s": STREAM})
    values = [float(i % 10) for i in range(RECORDS)]
    confirmed: list[int] = []
    errors: list[BaseException] = []
    half = threading.Event()

    def produce():
        try:
            with Producer(sc.config) as producer:
                for i, v in enumerate(values):
                    producer.send("s", [v])
                    confirmed.append(i)
                    if i == RECORDS // 2:
                        half.set()
                    time.sleep(0.01)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)
            half.set()

    releases = {}
    # A durable named queue keeps releases across the restart; a private one dies with its
    # connection, taking what it had not delivered yet.
    queue = f"{sc.config.broker.topology.prefix}.consumer.restart"
    with Consumer(sc.config, "s", queue=queue) as consumer:
        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        assert half.wait(60)
        broker_control("stop_app")
        time.sleep(3)
        broker_control("start_app")
        broker_control("await_startup")
        worker.join(180)
        assert not errors, errors
        assert confirmed == list(range(RECORDS))  # every record confirmed, none given up
        for message in consumer.releases(idle_timeout=60):
            releases.setdefault(message.window, set()).add(message.to_payload())
            if len(releases) == RECORDS // WINDOW:
                break
    assert all(len(v) == 1 for v in releases.values())
    from sealedsum.common.results import Release

    by_window = {w: Release.from_payload(next(iter(p))) for w, p in releases.items()}
    assert sorted(by_window) == list(range(1, RECORDS // WINDOW + 1))
    assert sum(r.count for r in by_window.values()) == RECORDS
    assert sum(r.sum[0] for r in by_window.values()) == pytest.approx(sum(values), abs=1e-3)
    assert sc.events("broker connection lost; reconnecting"), "the enclave never saw the restart"
    assert not sc.events("enclave exited; restarting")
    from sealedsum.common import amqp

    conn = amqp.connect(sc.config.broker)
    conn.channel().queue_delete(queue)
    conn.close()
