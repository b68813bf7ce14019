"""The state directory's lock (sidecar/platform/statelock.py), in one process: flock locks
belong to open files, so a second StateLock conflicts with the first as a second sidecar
process would."""

from __future__ import annotations

import os

import pytest

from sealedsum.common.errors import ConfigError, StateDirectoryLocked
from sealedsum.sidecar.platform import statelock
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from sealedsum.sidecar.platform.statelock import StateLock, running_sidecar


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(statelock, "ACQUIRE_FOR_S", 0.1)


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with pytest.raises(ConfigError, match="no sidecar runs"):
        running_sidecar(tmp_path)  # no lock file yet
    with StateLock(tmp_path) as lock:
        lock.record_pid()
        with pytest.raises(StateDirectoryLocked, match=f"another sidecar \\(pid {os.getpid()}\\) holds") as err:
            StateLock(tmp_path).acquire()
        assert err.value.exit_code == 2 and "\n" not in err.value.diagnostics()
        assert running_sidecar(tmp_path) == os.getpid()
        with pytest.raises(StateDirectoryLocked):  # nor may a platform key be made under it
            EmulatedPlatform.init(tmp_path)
    # Released (as the kernel does when the holder dies): the pid left in the file means nothing.
    assert (tmp_path / statelock.LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(ConfigError, match="nobody holds"):
        running_sidecar(tmp_path)
    StateLock(tmp_path).acquire().release()


def test_a_holder_that_has_not_recorded_its_pid_yet_is_named_so(tmp_path):
    with StateLock(tmp_path):
        with pytest.raises(StateDirectoryLocked, match="pid not recorded"):
            StateLock(tmp_path).acquire()
        with pytest.raises(ConfigError, match="has not recorded its pid"):
            running_sidecar(tmp_path)


def test_the_pid_is_rewritten_in_place_on_a_full_disk(tmp_path):
    """A sidecar started again on a full disk still records its pid: the file keeps its size."""
    with StateLock(tmp_path) as lock:
        lock.record_pid()
    size = (tmp_path / statelock.LOCK_FILE).stat().st_size
    from tests.unit.test_full_disk import file_size_limit

    with file_size_limit(size), StateLock(tmp_path) as lock:
        lock.record_pid()
        assert running_sidecar(tmp_path) == os.getpid()
    assert (tmp_path / statelock.LOCK_FILE).stat().st_size == size == statelock.PID_WIDTH
