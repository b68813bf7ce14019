"""Fault injection: kill -9 the enclave under steady load, several times. Every
accepted record is counted exactly once, and no window is released twice with
different values."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from consumers.client import Consumer
from producers.client import Producer
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS, WINDOW, KILLS = 600, 50, 3
# Noise this small rounds to zero, so released counts and sums can be checked exactly.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": WINDOW, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def wait_for_new_enclave(sc, old_pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = sc.enclave_pid()
        if pid != old_pid:
            return pid
        time.sleep(0.1)
    raise AssertionError("the platform did not restart the enclave")


def test_kill_9_of_the_enclave_loses_nothing_and_counts_nothing_twice(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    values = [float(i % 10) for i in range(RECORDS)]
    done = threading.Event()

    def produce():
        with Producer(sc.config) as producer:
            for v in values:
                producer.send("s", [v])
                time.sleep(0.01)  # steady load over the kills, rather than one burst
        done.set()

    bodies: dict[int, set[bytes]] = {}
    releases = []
    with Consumer(sc.config, "s") as consumer:
        threading.Thread(target=produce, daemon=True).start()
        pid = sc.enclave_pid()
        for k in range(KILLS):
            time.sleep(1.0 + 0.7 * k)
            os.kill(pid, signal.SIGKILL)
            pid = wait_for_new_enclave(sc, pid)
        assert done.wait(120), "the producer did not finish"
        for message in consumer.releases(idle_timeout=30):
            releases.append(message)
            bodies.setdefault(message.window, set()).add(message.to_payload())
            if len(bodies) == RECORDS // WINDOW:
                break
    restarts = sc.events("enclave exited; restarting")
    assert len(restarts) == KILLS
    # Each window was released with one value (republished copies are byte-identical).
    assert all(len(v) == 1 for v in bodies.values()), "a window was released twice with different values"
    by_window = {r.window: r for r in releases}
    assert sorted(by_window) == list(range(1, RECORDS // WINDOW + 1))
    assert sum(r.count for r in by_window.values()) == RECORDS
    assert sum(r.sum[0] for r in by_window.values()) == pytest.approx(sum(values), abs=1e-3)
    # Redelivered records the checkpoint held were acknowledged as counted, not dead-lettered.
    assert drain(dead_conn, dead_q, expect=0, timeout=1.0) == []
