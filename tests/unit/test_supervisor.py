"""The platform's restart policy (sidecar/supervisor.py), on a scripted enclave and a fake
clock: a crashed enclave is restarted after 1, 2, 4, ... seconds, capped at 30 s, the
backoff starts again at 1 s after a run of over a minute, and an enclave that refuses to
start (exit code 2: a configuration error, changed code, state it cannot unseal or a
rolled-back state) is not restarted at all: the platform exits with 2 as well."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from sealedsum.common.errors import ExitCode
from sealedsum.sidecar.platform import process as supervisor
from sealedsum.sidecar.platform.process import EXIT_CONFIG, MAX_BACKOFF_S, PlatformProcess


class Script:
    """Stands in for the enclave and the clock: each run lasts its given seconds and exits
    with its code; sleeps only move the fake clock forward, and are recorded."""

    def __init__(self, runs: list[tuple[float, int]]) -> None:
        self.runs = list(runs)
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.started = 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def run_once(self) -> int:
        if not self.runs:
            raise AssertionError("the platform started the enclave again after the script ended")
        self.started += 1
        seconds, code = self.runs.pop(0)
        self.now += seconds
        return code


def platform(tmp_path, monkeypatch, runs) -> tuple[PlatformProcess, Script]:
    script = Script(runs)
    sc = PlatformProcess.__new__(PlatformProcess)  # no platform key or config needed for the restart loop
    sc.config = SimpleNamespace(trust=None)
    sc.state_dir = tmp_path
    sc.measurement = sc.code_digest = b"\x00" * 32
    sc.stopping, sc.child, sc.restarts = False, None, 0
    monkeypatch.setattr(sc, "_run_once", script.run_once)
    monkeypatch.setattr(sc, "_pause", script.sleep)
    monkeypatch.setattr(supervisor, "time", SimpleNamespace(monotonic=script.monotonic, sleep=script.sleep))
    return sc, script


def restarts_logged(caplog) -> list[float]:
    return [r.fields["restart_in_s"] for r in caplog.records if r.getMessage() == "enclave exited; restarting"]


def test_crashes_back_off_doubling_to_a_30_s_cap(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sealedsum.platform")
    sc, script = platform(tmp_path, monkeypatch, [(0.5, -9)] * 9 + [(0.5, EXIT_CONFIG)])
    assert sc.run() == EXIT_CONFIG
    expected = [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert MAX_BACKOFF_S == 30.0
    assert script.sleeps == expected and restarts_logged(caplog) == expected
    assert script.started == 10 and sc.restarts == 9


def test_a_run_of_over_a_minute_starts_the_backoff_again(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sealedsum.platform")
    runs = [(1, -9), (1, -9), (1, -9), (61, -9), (1, -9), (59, 1), (1, EXIT_CONFIG)]
    sc, script = platform(tmp_path, monkeypatch, runs)
    assert sc.run() == EXIT_CONFIG
    assert script.sleeps == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0]  # a 59 s run does not reset it


@pytest.mark.parametrize("earlier_crashes", [0, 3])
def test_an_enclave_that_refuses_to_start_is_not_restarted(tmp_path, monkeypatch, caplog, earlier_crashes):
    caplog.set_level(logging.INFO, logger="sealedsum.platform")
    sc, script = platform(tmp_path, monkeypatch, [(0.2, -9)] * earlier_crashes + [(0.2, EXIT_CONFIG)])
    assert sc.run() == EXIT_CONFIG
    assert script.started == earlier_crashes + 1 and len(script.sleeps) == earlier_crashes
    (refused,) = [r for r in caplog.records if r.getMessage() == "the enclave refused to start; not restarting"]
    assert refused.levelno == logging.ERROR and refused.fields["exit_code"] == EXIT_CONFIG


def test_other_exit_codes_are_crashes_and_are_restarted(tmp_path, monkeypatch):
    """Only 2 and 3 mean "do not retry": an enclave that died of an uncaught error (exit 1), a
    signal or a clean exit it was not asked for comes back."""
    sc, script = platform(tmp_path, monkeypatch, [(0.1, 1), (0.1, -11), (0.1, 0), (0.1, 4), (0.1, EXIT_CONFIG)])
    assert sc.run() == EXIT_CONFIG
    assert script.sleeps == [1.0, 2.0, 4.0, 8.0]


def test_an_enclave_that_could_not_write_its_state_directory_is_restarted(tmp_path, monkeypatch):
    """Exit 5 (a full disk at start-up, say) is no refusal: space may come back."""
    assert ExitCode.STORAGE != EXIT_CONFIG
    sc, script = platform(tmp_path, monkeypatch, [(0.1, ExitCode.STORAGE)] * 3 + [(0.1, EXIT_CONFIG)])
    assert sc.run() == EXIT_CONFIG
    assert script.started == 4 and script.sleeps == [1.0, 2.0, 4.0]


def test_a_stop_while_it_waits_to_restart_ends_the_platform_cleanly(tmp_path, monkeypatch):
    sc, script = platform(tmp_path, monkeypatch, [(0.1, -9)])

    def sleep_then_stop(seconds):
        script.sleeps.append(seconds)
        sc.stop()  # SIGTERM arrives during the backoff

    monkeypatch.setattr(sc, "_pause", sleep_then_stop)
    assert sc.run() == 0
    assert script.started == 1 and script.sleeps == [1.0]


def test_the_backoff_wait_ends_within_a_tenth_of_a_second_of_a_stop(tmp_path):
    import threading
    import time

    sc = PlatformProcess.__new__(PlatformProcess)
    sc.stopping, sc.child = False, None
    threading.Timer(0.2, sc.stop).start()
    started = time.monotonic()
    sc._pause(30.0)
    assert 0.15 < time.monotonic() - started < 0.5


def test_an_enclave_that_reached_no_broker_at_start_is_not_restarted(tmp_path, monkeypatch):
    """Exit 3: the enclave gave up waiting for the broker at start (broker.reconnect_seconds);
    restarting it would only wait again, so the platform exits 3 too."""
    sc, script = platform(tmp_path, monkeypatch, [(0.1, ExitCode.TRANSPORT)])
    assert sc.run() == ExitCode.TRANSPORT
    assert script.started == 1 and script.sleeps == []


def test_an_enclave_that_cannot_even_be_started_is_tried_again(tmp_path, monkeypatch):
    """An OSError starting the child (no memory, no pipes) is a failed start, not the
    platform's end."""
    sc, script = platform(tmp_path, monkeypatch, [(0.1, EXIT_CONFIG)])
    calls = []

    def run_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(12, "Cannot allocate memory")
        return script.run_once()

    monkeypatch.setattr(sc, "_run_once", run_once)
    assert sc.run() == EXIT_CONFIG
    assert len(calls) == 2 and script.sleeps == [1.0]
