"""A full disk, on the real sealed stores and the emulated platform: every write that fails
leaves the files as a loader accepts them, and trying again later goes on from there,
counting nothing twice and skipping no version.

The faults are real OS errors: a file-size limit (RLIMIT_FSIZE, which makes a write fail
part-way with EFBIG, as a full disk does with ENOSPC), a directory where the platform wants
its temporary file, and a platform that answers a counter step it could not persist with
the value it still holds (what EmulatedPlatform answers then)."""

from __future__ import annotations

import logging
import os
import resource
import signal
from contextlib import contextmanager

import pytest

from sealedsum.common.errors import StorageError
from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.enclave_process.store import SealedLedgerStore, SealedStateStore
from sealedsum.sidecar.platform.emulated import COUNTER_FILE, EmulatedPlatform
from tests.conftest import PlatformCounter

M = bytes(range(32))


@contextmanager
def file_size_limit(nbytes: int):
    """No file of this process may grow past ``nbytes``: writes beyond fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class FullPlatformCounter(PlatformCounter):
    """The platform's counter while its disk is full: a step it cannot persist is answered
    with the value it still holds."""

    full = False

    def advance(self, value):
        return self.read() if self.full else super().advance(value)


@pytest.fixture
def platform(tmp_path):
    return EmulatedPlatform.init(tmp_path / "platform")


def state_store(tmp_path, platform, counter=None) -> SealedStateStore:
    return SealedStateStore(tmp_path, platform.sealing_key(M), M, counter or PlatformCounter(platform, M))


def reloaded(tmp_path, platform) -> tuple[list[dict], int]:
    s = state_store(tmp_path, platform)
    return s.load(), s.version


def test_a_torn_append_is_cut_off_and_the_retry_continues_the_journal(tmp_path, platform):
    s = state_store(tmp_path, platform)
    s.save({"n": 0})
    s.append({"n": 1})
    good = s.journal_path.stat().st_size
    with file_size_limit(good + 10), pytest.raises(OSError):
        s.append({"n": 2, "pad": "x" * 200})  # 10 bytes of it reach the disk
    assert s.journal_path.stat().st_size == good  # the torn chunk was cut off at once
    assert platform.counter_read(M) == 2 and s.version == 2
    s.append({"n": 2, "pad": "x" * 200})  # the same checkpoint, tried again
    assert reloaded(tmp_path, platform) == ([{"n": 0}, {"n": 1}, {"n": 2, "pad": "x" * 200}], 3)
    assert platform.counter_read(M) == 3


def test_a_failed_base_leaves_no_temporary_file_and_the_old_base(tmp_path, platform):
    s = state_store(tmp_path, platform)
    s.save({"n": 0})
    s.append({"n": 1})
    with file_size_limit(100), pytest.raises(OSError):
        s.save({"n": 1, "pad": "x" * 1000})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["platform", "state.journal", "state.sealed"]
    assert reloaded(tmp_path, platform) == ([{"n": 0}, {"n": 1}], 2)
    s.save({"n": 1, "pad": "x" * 1000})
    assert reloaded(tmp_path, platform) == ([{"n": 1, "pad": "x" * 1000}], 3)
    assert s.journal_path.read_bytes() == b""


def test_write_atomic_removes_its_temporary_file_when_it_fails(tmp_path):
    path = tmp_path / "f"
    write_atomic(path, b"old")
    with file_size_limit(16), pytest.raises(OSError):
        write_atomic(path, b"n" * 64)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("kind", ["append", "base"])
def test_a_counter_step_that_failed_is_retried_for_its_version_before_the_next(tmp_path, platform, kind):
    """Version 3 is on disk, its counter step failed: no try may write version 4 before the
    counter reached 3 (the loader takes state one version ahead of the counter, not two)."""
    counter = FullPlatformCounter(platform, M)
    s = state_store(tmp_path, platform, counter)
    s.save({"n": 0})
    s.append({"n": 1})
    write = s.append if kind == "append" else s.save
    counter.full = True
    sizes = set()
    for _ in range(3):  # the platform's disk stays full a while: every try fails
        with pytest.raises(StorageError, match="could not advance the state counter to 3"):
            write({"n": 2})
        assert platform.counter_read(M) == 2 and s.version == 2
        sizes.add((s.base_path.stat().st_size, s.journal_path.stat().st_size))
    assert len(sizes) == 1  # only the first try wrote anything
    counter.full = False
    write({"n": 3})
    assert platform.counter_read(M) == 4 and s.version == 4
    expected = [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}] if kind == "append" else [{"n": 3}]
    assert reloaded(tmp_path, platform) == (expected, 4)


class FullLedgerCounter:
    full = False

    def __init__(self, platform) -> None:
        self.platform = platform

    def read(self):
        return self.platform.ledger_counter_read(M)

    def advance(self, value):
        return self.read() if self.full else self.platform.ledger_counter_advance(M, value)


def test_the_sealed_ledger_retries_its_counter_step_and_cleans_a_failed_write(tmp_path, platform):
    counter = FullLedgerCounter(platform)
    path = tmp_path / "ledger" / "x.sealed"
    ledger = SealedLedgerStore(path, platform.ledger_key(M), M, counter)
    ledger.save({"n": 1})
    with file_size_limit(64), pytest.raises(OSError):
        ledger.save({"n": 2, "pad": "x" * 200})
    assert os.listdir(path.parent) == ["x.sealed"]
    counter.full = True
    for _ in range(2):
        with pytest.raises(StorageError, match="ledger counter to 2"):
            ledger.save({"n": 2})
    counter.full = False
    ledger.save({"n": 3})
    assert platform.ledger_counter_read(M) == 3
    assert SealedLedgerStore(path, platform.ledger_key(M), M, FullLedgerCounter(platform)).load() == {"n": 3}


def test_the_platform_answers_a_counter_step_it_cannot_persist_as_not_advanced(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sealedsum.platform")
    platform = EmulatedPlatform.init(tmp_path)
    assert platform.counter_advance(M, 1) == 1
    blocker = tmp_path / (COUNTER_FILE + ".tmp")
    blocker.mkdir()  # its temporary file cannot be created: the write fails as on a full disk
    assert platform.counter_advance(M, 2) == 1
    assert platform.ledger_counter_advance(M, 1) == 0
    assert platform.counter_read(M) == 1 and EmulatedPlatform.load(tmp_path).counter_read(M) == 1
    blocker.rmdir()
    assert platform.counter_advance(M, 2) == 2
    assert EmulatedPlatform.load(tmp_path).counter_read(M) == 2
    events = [r.getMessage() for r in caplog.records]
    assert events == ["cannot persist the platform counters; answering not advanced",
                      "platform counters persisted again"]


def test_a_platform_key_the_disk_refuses_is_not_left_torn(tmp_path):
    with file_size_limit(10), pytest.raises(StorageError, match="cannot write"):
        EmulatedPlatform.init(tmp_path)
    assert not (tmp_path / "platform.key").exists()
    EmulatedPlatform.load(EmulatedPlatform.init(tmp_path)._state_dir)  # once there is space
