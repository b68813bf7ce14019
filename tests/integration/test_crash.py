"""Fault injection: kill -9 the enclave under steady load, several times. Every
accepted record is counted exactly once, and no window is released twice with
different values.

Each kill is tied to the producer's progress, not to a timer, so that every kill lands
while records are still being published: once 1/4, 1/2 and 3/4 of the records are
confirmed by the broker (and the enclave has counted and checkpointed some since it last
started), and once more right after the enclave the first kill restarted logs
``consuming``, as the records published while it was down come in."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
import time
from datetime import datetime

import pytest

from sealedsum.common import amqp, wire
from sealedsum.common.results import verify_signed
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.enclave_process.store import SealedStateStore
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from sealedsum.sidecar.enclave_process.runtime import HELD_RETRY_S
from sealedsum.sidecar.platform.process import MAX_BACKOFF_S
from tests.integration.conftest import launch, stream_bodies
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS, WINDOW = 800, 50
# One record every 50 ms, on the clock: 40 s of steady load, long enough for four kills and
# the restarts between them (1 + 2 + 4 s of backoff, and a few seconds to start each time).
PACE_S = 0.05
QUARTERS = (RECORDS // 4, RECORDS // 2, 3 * RECORDS // 4)
# Noise this small rounds to zero, so released counts and sums can be checked exactly.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": WINDOW, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def wait_for(what: str, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_new_enclave(sc, old_pid: int, timeout: float = 60) -> int:
    wait_for("the platform to restart the enclave", lambda: sc.enclave_pid() != old_pid, timeout)
    return sc.enclave_pid()


def log_time(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def test_kill_9_of_the_enclave_loses_nothing_and_counts_nothing_twice(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    values = [float(i % 10) for i in range(RECORDS)]
    confirmed = [0]  # records the broker confirmed so far
    done, failures = threading.Event(), []

    def produce():
        try:
            with Producer(sc.config) as producer:
                start = time.monotonic()
                for i, v in enumerate(values):
                    time.sleep(max(0.0, start + i * PACE_S - time.monotonic()))
                    producer.send("s", [v])  # returns once the broker confirmed it
                    confirmed[0] = i + 1
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            failures.append(err)
        finally:
            done.set()

    kills: list[tuple[str, int, bool]] = []  # (when, records confirmed then, producer still sending)

    def kill(when: str) -> None:
        pid = sc.enclave_pid()
        at, sending = confirmed[0], not done.is_set()
        os.kill(pid, signal.SIGKILL)
        kills.append((when, at, sending))
        assert sending and at < RECORDS, f"kill {when!r} came after the producer finished: {kills}"
        wait_for_new_enclave(sc, pid)

    def consuming(starts: int) -> None:
        wait_for(f"enclave start {starts} to consume", lambda: len(sc.events("consuming")) >= starts)

    # Every start writes a fresh base and empties the journal: a journal that is not empty
    # means this enclave has counted and checkpointed records since it started.
    journal = sc.state / "enclave" / sc.measurement.hex()[:32] / "state.journal"

    def counting(starts: int) -> None:
        consuming(starts)
        wait_for(f"enclave start {starts} to checkpoint records",
                 lambda: journal.exists() and journal.stat().st_size > 0 or done.is_set())

    bodies: dict[int, set[bytes]] = {}
    releases = []
    with Consumer(sc.config, "s") as consumer:
        threading.Thread(target=produce, daemon=True).start()
        for k, quarter in enumerate(QUARTERS):
            counting(len(kills) + 1)  # the enclave is at work again before it is killed
            wait_for(f"{quarter} records confirmed", lambda: confirmed[0] >= quarter or done.is_set(), 120)
            kill(f"after {quarter} records confirmed")
            if k == 0:
                consuming(len(kills) + 1)
                kill("right after the restarted enclave logged consuming")
        assert done.wait(120), "the producer did not finish"
        assert not failures, failures
        assert confirmed[0] == RECORDS
        for message in consumer.releases(idle_timeout=30):
            releases.append(message)
            bodies.setdefault(message.window, set()).add(message.to_payload())
            if len(bodies) == RECORDS // WINDOW:
                break
    # Four kills (at least three are required), each while records were still being published.
    assert len(kills) == 4 and all(sending and at < RECORDS for _, at, sending in kills), kills
    # The platform restarted the enclave after each, backing off 1, 2, 4, 8 s (the 30 s cap is
    # tested in tests/unit/test_supervisor.py), and really waited that long before each start.
    restarts = sc.events("enclave exited; restarting")
    assert [e["exit_code"] for e in restarts] == [-signal.SIGKILL] * 4
    assert [e["restart_in_s"] for e in restarts] == [1.0, 2.0, 4.0, 8.0]
    assert [e["restarts"] for e in restarts] == [1, 2, 3, 4]
    assert all(e["restart_in_s"] <= MAX_BACKOFF_S for e in restarts)
    running = sc.events("enclave running")
    assert len(running) == 5 and len({e["pid"] for e in running}) == 5
    for exited, started in zip(restarts, running[1:]):
        assert log_time(started) - log_time(exited) >= exited["restart_in_s"] - 0.05
    # Each window was released with one value (republished copies are byte-identical).
    assert all(len(v) == 1 for v in bodies.values()), "a window was released twice with different values"
    by_window = {r.window: r for r in releases}
    assert sorted(by_window) == list(range(1, RECORDS // WINDOW + 1))
    assert sum(r.count for r in by_window.values()) == RECORDS
    assert sum(r.sum[0] for r in by_window.values()) == pytest.approx(sum(values), abs=1e-3)
    # Redelivered records the checkpoint held were acknowledged as counted, not dead-lettered.
    assert drain(dead_conn, dead_q, expect=0, timeout=1.0) == []


# A real noise scale (epsilon 1 on values up to 10: the sum's noise has a scale of about
# 1.3 million fixed-point units), so that a second draw could not give the first's values.
HELD_STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 5, "min_batch": 1,
               "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 100.0}
HOLDING = "no queue bound for this stream (is the release stream missing?); holding the release"


def stored_pending(sc, tmp_path) -> dict[str, bytes]:
    """What only the platform owner can read: the signed releases the sealed state holds as
    not yet confirmed, by publication key. Read from a copy of the files, so that nothing the
    running enclave writes is touched, with a counter that never moves."""
    src = sc.state / "enclave" / sc.measurement.hex()[:32]
    copy = tmp_path / f"state-copy-{time.monotonic_ns()}"
    copy.mkdir()
    for name in ("state.sealed", "state.journal"):
        if (src / name).exists():
            shutil.copy(src / name, copy / name)
    platform = EmulatedPlatform.load(sc.state)

    class Counter:
        def read(self):
            return platform.counter_read(sc.measurement)

        def advance(self, value):
            return value

    checkpoints = SealedStateStore(copy, platform.sealing_key(sc.measurement), sc.measurement, Counter()).load()
    pending = checkpoints[-1]["core"]["pending"]  # docs/protocol.md, section 17
    return {key: base64.b64decode(p["body"]) for key, p in pending.items()}


def test_a_signed_release_held_for_want_of_a_queue_survives_kill_9_byte_for_byte(sidecar_factory, tmp_path):
    """The operator deleted the release stream and no consumer has a queue bound, so the
    enclave holds its first release, signed and stored. kill -9; the platform restarts the
    enclave, which declares the stream again on connecting and publishes the stored release
    into it: exactly one release of the window is there, and its bytes are the ones stored
    before the kill (a second draw would differ in its noise, its closed_at_ms and its signature)."""
    sc = sidecar_factory({"s": HELD_STREAM})
    conn = amqp.connect(sc.config.broker)
    conn.channel().queue_delete(sc.config.broker.topology.releases_stream)
    conn.close()
    with Producer(sc.config) as producer:
        for i in range(HELD_STREAM["window_records"]):
            producer.send("s", [float(i)])
    wait_for("the enclave to hold the release", lambda: sc.events(HOLDING))
    (held,) = sc.events(HOLDING)
    assert held["publication"] == "s/1"
    wait_for("the held release in the sealed state", lambda: "s/1" in stored_pending(sc, tmp_path))
    stored = stored_pending(sc, tmp_path)["s/1"]
    first = json.loads(wire.SignedMessage.from_bytes(stored).payload)
    assert first["window"] == 1 and first["kind"] == "result"

    pid = sc.enclave_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for_new_enclave(sc, pid)
    wait_for("the restarted enclave to consume", lambda: len(sc.events("consuming")) >= 2)
    wait_for("the release in the stream", lambda: stream_bodies(sc.config.broker, expect=1, timeout=1))
    time.sleep(HELD_RETRY_S + 1.5)  # a second copy would come by now
    assert stream_bodies(sc.config.broker, timeout=2) == [stored], "the release after the restart is not the one stored"
    assert len(sc.events(HOLDING)) == 1  # the restarted enclave found the stream declared again
    assert len(sc.events("window released")) == 1  # drawn once, by the enclave that was killed
    restarts = sc.events("enclave exited; restarting")
    assert [e["exit_code"] for e in restarts] == [-signal.SIGKILL]
    # Confirmed by the broker, it leaves the sealed state's pending set.
    wait_for("the confirmed release to leave the sealed state", lambda: stored_pending(sc, tmp_path) == {}, 10)
    # And it verifies: signed by the key the (restarted) enclave attests.
    check = amqp.connect(sc.config.broker)
    try:
        attested = amqp.attest(check, sc.config.broker, sc.config.require_trust())
    finally:
        check.close()
    release = verify_signed(stored, attested)
    assert (release.window, release.count, release.closed_at_ms) == (1, first["count"], first["closed_at_ms"])


def _damage_keys(sc) -> str:
    (keys,) = list(sc.state.rglob("keys.sealed"))
    damaged = bytearray(keys.read_bytes())
    damaged[-1] ^= 1  # the AES-GCM tag no longer matches
    keys.write_bytes(bytes(damaged))
    return "cannot unseal keys or state"


def _state_of_unknown_version(sc) -> str:
    """A genuinely sealed state (the test is the platform owner) that this code cannot read."""
    from sealedsum.sidecar.enclave_process.store import SealedStateStore
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform
    from tests.conftest import PlatformCounter

    (keys,) = list(sc.state.rglob("keys.sealed"))
    platform = EmulatedPlatform.load(sc.state)  # the counters as the sidecar left them
    store = SealedStateStore(keys.parent, platform.sealing_key(sc.measurement), sc.measurement,
                             PlatformCounter(platform, sc.measurement))
    state = store.load()
    state[-1]["core"]["version"] = 99
    store.save(state[-1])
    return "sealed state does not fit this code; refusing to start"


@pytest.mark.parametrize("spoil", [_damage_keys, _state_of_unknown_version], ids=["damaged-keys", "state-version"])
def test_an_enclave_that_refuses_to_start_is_not_restarted_in_a_loop(sidecar_factory, spoil):
    """Exit code 2 (here: sealed keys that no longer unseal, or a sealed state of a version this
    code does not know) means a restart cannot help: the platform logs it once and exits with 2
    itself, instead of restarting every 30 s forever.
    (A rolled-back sealed state takes the same path: tests/integration/test_budget.py.)"""
    sc = sidecar_factory({"s": STREAM})
    assert sc.stop() == 0
    event = spoil(sc)
    proc = launch(sc)
    assert proc.wait(timeout=60) == 2
    (refused,) = sc.events(event)
    assert refused["level"] == "error"
    (gave_up,) = sc.events("the enclave refused to start; not restarting")
    assert gave_up["exit_code"] == 2
    assert sc.events("enclave exited; restarting") == []
    assert len(sc.events("hardening")) == 2  # enclave starts: the first run's, and the refused one
