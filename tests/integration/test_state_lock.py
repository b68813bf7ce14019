"""One sidecar per state directory: a second ``sealedsum sidecar`` on the state of a running
one exits 2 with one line naming the first's pid, writes nothing there, and the first runs on
untouched; ``sidecar rotate`` finds the one that holds the lock, and says so when none does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import relaunch
from tests.integration.test_crash import wait_for

pytestmark = [pytest.mark.integration]

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 5, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 1e6}


def sealedsum(sc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealedsum", *args], env=sc.env, capture_output=True, text=True,
                          timeout=120)


def state_files(sc) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(sc.state)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sc.state.rglob("*") if p.is_file()}


def test_a_second_sidecar_on_the_same_state_exits_2_and_the_first_runs_on(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    platform_pid, enclave_pid = sc.process.pid, sc.enclave_pid()
    wait_for("the first checkpoint", lambda: any(sc.state.rglob("state.sealed")))
    before = state_files(sc)

    second = sealedsum(sc, "sidecar", "--config", str(sc.config_path), "--state", str(sc.state))
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.splitlines()  # one line, no log, no traceback
    assert line.startswith("error: another sidecar (pid %d) holds the state directory" % platform_pid), line
    assert second.stdout == ""
    assert state_files(sc) == before  # it wrote nothing there (the first is idle: nor did it)

    assert sc.alive() and sc.enclave_pid() == enclave_pid and len(sc.events("enclave running")) == 1
    # The enclave does not hold the lock file open: it goes with the platform process.
    assert not any(os.readlink(fd).endswith("sidecar.lock") for fd in Path(f"/proc/{enclave_pid}/fd").iterdir())
    sc.wait_attestable(10)  # the first goes on answering

    init = sealedsum(sc, "platform", "init", "--state", str(sc.state))
    assert init.returncode == 2 and "another sidecar (pid %d)" % platform_pid in init.stderr

    rotate = sealedsum(sc, "sidecar", "rotate", "--state", str(sc.state))
    assert rotate.returncode == 0, rotate.stderr
    assert f"pid {platform_pid}" in rotate.stderr
    wait_for("the keys to rotate", lambda: sc.events("keys rotated"), 60)
    assert sc.alive() and sc.enclave_pid() == enclave_pid

    sc.kill()  # SIGKILL: the kernel drops the lock, whatever the lock file says
    rotate = sealedsum(sc, "sidecar", "rotate", "--state", str(sc.state))
    assert rotate.returncode == 2 and "no sidecar runs on" in rotate.stderr, rotate.stderr
    relaunch(sc)  # a new sidecar takes the state over at once
    rotate = sealedsum(sc, "sidecar", "rotate", "--state", str(sc.state))
    assert rotate.returncode == 0 and f"pid {sc.process.pid}" in rotate.stderr, rotate.stderr
