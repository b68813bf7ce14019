"""The state directory on a small filesystem (a tmpfs the test mounts) that fills up and then
frees: every accepted record is counted exactly once and releases resume without a manual
restart. While it is full the sidecar stays up, answers attestation, acknowledges nothing
and releases nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time

import pytest

from sealedsum.common import wire
from sealedsum.producers.client import Producer
from sealedsum.sidecar.platform.statelock import running_sidecar
from tests.integration.conftest import relaunch, start_sidecar
from tests.integration.test_crash import wait_for
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = [pytest.mark.integration]

WINDOW = 10
# Noise this small rounds to zero, so released counts and sums can be checked exactly.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": WINDOW, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}
STALLED = "cannot write the sealed state; holding acknowledgements and releases until it can"
RESUMED = "sealed state written again; resuming"


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards."""
    where = tmp_path / "state"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this test mounts a small tmpfs as the state directory, which is not permitted here: "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path) -> int:
    """Write (append) to ``path`` until the filesystem has no byte left; the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    size = 0
    try:
        for block in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    size += os.write(fd, b"\0" * block)
                except OSError as err:
                    assert err.errno == errno.ENOSPC, err
                    break
    finally:
        os.close(fd)
    return size


def unacknowledged(queue: str) -> int | None:
    """What the broker counts as delivered and not yet acknowledged (None: no rabbitmqctl here)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for line in out.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue} not listed")


def payloads(got) -> list[dict]:
    return [json.loads(wire.SignedMessage.from_bytes(body).payload) for _, body in got]


def test_a_full_state_disk_holds_acks_and_releases_and_resumes_by_itself(tmp_path, amqp_url, small_fs):
    sc = start_sidecar(tmp_path, amqp_url, {"s": STREAM}, state=small_fs)
    results = dead = None
    try:
        t = sc.config.broker.topology
        results, results_q = capture_queue(sc, t.results_exchange, "s")
        dead, dead_q = capture_queue(sc, t.rejected_exchange, "")
        values = [float(i % 10) for i in range(4 * WINDOW)]
        with Producer(sc.config) as producer:
            for v in values[:WINDOW]:
                producer.send("s", [v])
            first = payloads(drain(results, results_q, expect=1, timeout=30))
            assert [(p["window"], p["count"]) for p in first] == [(1, WINDOW)]

            # Filled while the enclave writes nothing (a page it frees after the fill would let a
            # checkpoint through), and once more for any page freed meanwhile.
            time.sleep(1)
            filler = small_fs / "filler"
            filled = fill(filler)
            time.sleep(0.5)
            filled += fill(filler)
            # Window 2 and half of window 3 come in while nothing can be written.
            for v in values[WINDOW:2 * WINDOW + WINDOW // 2]:
                producer.send("s", [v])  # confirmed by the broker: accepted
            wait_for("the enclave to find it cannot checkpoint", lambda: sc.events(STALLED), 30)
            time.sleep(3)  # several retries, none of which can succeed
            assert sc.alive() and sc.events("enclave exited; restarting") == []
            assert drain(results, results_q, expect=0, timeout=1) == [], "a release left while the disk was full"
            held = WINDOW + WINDOW // 2
            wait_for(f"the broker to count {held} records unacknowledged",  # its statistics lag a second or so
                     lambda: unacknowledged(t.records_queue) in (None, held), 15)
            sc.wait_attestable(10)  # it goes on answering attestation
            assert unacknowledged(t.records_queue) in (None, held)
            assert drain(results, results_q, expect=0, timeout=1) == []
            stalled_tries = len(sc.events(STALLED))

            filler.unlink()  # space comes back
            second = payloads(drain(results, results_q, expect=1, timeout=30))
            assert [(p["window"], p["count"]) for p in second] == [(2, WINDOW)]
            for v in values[2 * WINDOW + WINDOW // 2:3 * WINDOW]:
                producer.send("s", [v])
            third = payloads(drain(results, results_q, expect=1, timeout=30))
            assert [(p["window"], p["count"]) for p in third] == [(3, WINDOW)]
        wait_for("every record to be acknowledged", lambda: unacknowledged(t.records_queue) in (None, 0), 15)

        assert stalled_tries == 1, "the stall was logged more than once"
        assert len(sc.events(RESUMED)) == 1 and len(sc.events(STALLED)) == 1
        assert sc.events("enclave exited; restarting") == [] and sc.alive()  # no restart, manual or other
        released = first + second + third
        assert [p["sum"][0] for p in released] == [pytest.approx(sum(values[i * WINDOW:(i + 1) * WINDOW]), abs=1e-3)
                                                   for i in range(3)]
        # The state it wrote after the stall opens and goes on: a restart counts the next
        # window from where it left off, nothing twice.
        assert sc.stop() == 0
        relaunch(sc)
        with Producer(sc.config) as producer:
            for v in values[3 * WINDOW:]:
                producer.send("s", [v])
        fourth = payloads(drain(results, results_q, expect=1, timeout=30))
        assert [(p["window"], p["count"]) for p in fourth] == [(4, WINDOW)]
        assert fourth[0]["sum"][0] == pytest.approx(sum(values[3 * WINDOW:]), abs=1e-3)
        assert drain(results, results_q, expect=0, timeout=1) == []  # each window released once
        assert drain(dead, dead_q, expect=0, timeout=1) == []  # nothing dead-lettered
        assert filled > 0
    finally:
        for conn in (results, dead):
            if conn is not None and conn.is_open:
                conn.close()
        sc.stop()
        sc.delete_topology()


def test_an_enclave_that_cannot_start_for_a_full_disk_is_restarted_until_it_can(tmp_path, amqp_url, small_fs):
    """Full before the enclave ever wrote its keys: it exits 5, which is no refusal; the
    platform starts it again with backoff, and once there is space it runs and counts."""
    from sealedsum.testbed import Testbed
    from tests.integration.conftest import launch, streams_toml

    sc = Testbed(tmp_path, amqp_url, streams_toml({"s": STREAM}), state=small_fs, bits=1024,
                 enclave_extra="max_record_age_seconds = 600\n")
    results = None
    try:
        filler = small_fs / "filler"
        fill(filler)
        launch(sc)
        wait_for("the platform to restart the enclave", lambda: sc.events("enclave exited; restarting"), 60)
        (exited, *_) = sc.events("enclave exited; restarting")
        assert exited["exit_code"] == 5
        assert sc.events("cannot write the state directory; exiting for the platform to restart the enclave")
        assert sc.alive() and not sc.events("the enclave refused to start; not restarting")
        filler.unlink()
        sc.wait_attestable(60)
        assert running_sidecar(small_fs) == sc.process.pid  # `sidecar rotate` finds it
        results, results_q = capture_queue(sc, sc.config.broker.topology.results_exchange, "s")
        with Producer(sc.config) as producer:
            for i in range(WINDOW):
                producer.send("s", [float(i)])
        (release,) = payloads(drain(results, results_q, expect=1, timeout=30))
        assert (release["window"], release["count"]) == (1, WINDOW)
        assert release["sum"][0] == pytest.approx(sum(range(WINDOW)), abs=1e-3)
    finally:
        if results is not None and results.is_open:
            results.close()
        sc.stop()
        sc.delete_topology()
