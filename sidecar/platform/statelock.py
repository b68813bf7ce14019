"""One sidecar per state directory: an OS lock (``flock``) on ``STATE/sidecar.lock``, held
by the platform process for its whole life, with its pid in the file. Two sidecars on one
state would each release the same windows with their own noise. The kernel drops the lock
when its holder dies, however it dies, so a file left behind never blocks a restart."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from sealedsum.common.errors import ConfigError, StateDirectoryLocked, StorageError

LOCK_FILE = "sidecar.lock"
# A command that only looks (``sidecar rotate``) holds the lock for a moment: whoever wants it
# for good tries for this long before deciding that another sidecar holds it.
ACQUIRE_FOR_S = 1.0
PID_WIDTH = 16


class StateLock:
    """The lock of one state directory; :meth:`acquire` it before writing anything there."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "StateLock":
        """:raises StateDirectoryLocked: a running sidecar holds it."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StorageError(f"cannot create the lock file {self.path}: {err.strerror or err}") from err
        deadline = time.monotonic() + ACQUIRE_FOR_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = recorded_pid(self.path)
                    raise StateDirectoryLocked(
                        f"another sidecar ({f'pid {pid}' if pid else 'pid not recorded'}) holds the state directory "
                        f"{self.state_dir} (lock {self.path})") from None
                time.sleep(0.05)
        self._fd = fd
        if os.fstat(fd).st_size < PID_WIDTH:
            try:  # room for the pid, taken while there is space (see record_pid)
                os.pwrite(fd, b" " * (PID_WIDTH - 1) + b"\n", 0)
            except OSError:
                pass
        return self

    def record_pid(self) -> None:
        """Write this process's pid into the lock file (``sidecar rotate`` signals it).

        :raises OSError: not written (a full disk); the lock is held all the same."""
        if self._fd is None:
            raise RuntimeError("the pid is recorded only under the lock")
        # Always the same length, and left in the file on release: rewritten in place, it
        # needs no free space, so a sidecar started on a full disk can still be found.
        os.pwrite(self._fd, f"{os.getpid():<{PID_WIDTH - 1}}\n".encode(), 0)
        os.ftruncate(self._fd, PID_WIDTH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "StateLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def recorded_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def running_sidecar(state_dir: Path) -> int:
    """The pid of the sidecar that holds ``state_dir``'s lock.

    :raises ConfigError: no sidecar holds it, or the holder has not recorded its pid yet.
    """
    path = state_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ConfigError(f"no sidecar runs on {state_dir} (no {path})",
                          hint="start it with `sealedsum sidecar --config FILE --state DIR`") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: a sidecar runs
        else:
            raise ConfigError(f"no sidecar runs on {state_dir} (nobody holds {path})",
                              hint="start it with `sealedsum sidecar --config FILE --state DIR`")
    finally:
        os.close(fd)
    pid = recorded_pid(path)
    if pid is None:
        raise ConfigError(f"the sidecar holding {path} has not recorded its pid (starting, or its disk is full)",
                          hint="try again in a moment")
    return pid
