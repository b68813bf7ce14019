"""Helper processes precomputing the fast path's randomizers.

``FastEncryptor(pk, workers=N)`` (or ``SEALEDSUM_ENCRYPT_WORKERS=N`` for the encryptor
``encryptor_from_env`` makes) starts ``N`` helper processes that precompute randomizers into a
bounded pipe each (``capacity`` randomizers in all); ``encrypt`` takes one from a pipe when one
is ready and computes its own otherwise, so the pool only ever adds throughput. Threads do not
help (gmpy2 holds the GIL for these multiplications: two threads measured no faster than one),
hence processes. Each randomizer read from a pipe is used once and dropped; each process draws
its exponents from the OS CSPRNG (``secrets``), so no state is shared that could repeat.
``close()`` (also at exit and on garbage collection) stops the helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from collections import deque
from pathlib import Path

from sealedsum.producers.encryption.arithmetic import HAVE_GMPY2, mpz
from sealedsum.producers.encryption.randomizers import FixedBase

DEFAULT_CAPACITY = 4096  # randomizers waiting in the pool's pipes, in all (512-768 bytes each)

_REPO = Path(__file__).resolve().parents[2]


class RandomizerPool:
    """Helper processes that precompute randomizers ``hs^a mod n²`` into bounded pipes.

    Each helper (``python -c ... producers.encryption.pool._worker_main``) rebuilds the comb
    from ``(n, hs)``, then writes fixed-width randomizers to its stdout until the pipe is
    full (the bound: ``capacity / workers`` randomizers each) or it is closed. :meth:`take`
    reads what is ready without blocking and returns ``None`` when nothing is.
    """

    def __init__(self, n: int, hs: int, exponent_bits: int, window: int, *, workers: int,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.width = (2 * n.bit_length() + 7) // 8  # bytes of a number mod n²
        self._ready: deque = deque()
        self._buffers: list[bytearray] = []
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        per_worker = max(1, capacity // workers)
        params = json.dumps({"n": hex(n), "hs": hex(hs), "exponent_bits": exponent_bits, "window": window,
                             "width": self.width, "gmpy2": HAVE_GMPY2}) + "\n"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
        code = "from sealedsum.producers.encryption.pool import _worker_main; _worker_main()"
        try:
            for _ in range(workers):
                proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                        cwd=str(_REPO), start_new_session=True)
                proc.stdin.write(params.encode())
                proc.stdin.close()
                fd = proc.stdout.fileno()
                os.set_blocking(fd, False)
                _set_pipe_size(fd, per_worker * self.width)
                self._procs.append(proc)
                self._buffers.append(bytearray())
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _stop_procs, list(self._procs))  # also runs at exit
        self.taken = 0

    @property
    def workers(self) -> int:
        return len(self._procs)

    def take(self):
        """One randomizer no one else got, or ``None`` if none is ready."""
        with self._lock:
            if not self._ready:
                self._fill()
            if not self._ready:
                return None
            self.taken += 1
            return self._ready.popleft()

    def _fill(self) -> None:
        width = self.width
        for i, proc in enumerate(self._procs):
            if proc.stdout is None or proc.stdout.closed:
                continue
            try:
                chunk = os.read(proc.stdout.fileno(), 64 * width)
            except BlockingIOError:
                continue
            except OSError:
                continue
            if not chunk:
                continue  # the helper exited; encrypt computes its own
            buf = self._buffers[i]
            buf += chunk
            whole = len(buf) - len(buf) % width
            for off in range(0, whole, width):
                self._ready.append(mpz(int.from_bytes(buf[off:off + width], "big")))
            del buf[:whole]

    def close(self) -> None:
        """Stop the helpers and drop whatever they had precomputed."""
        with self._lock:
            self._ready.clear()
            procs, self._procs = self._procs, []
        _stop_procs(procs)
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin.detach()


def _set_pipe_size(fd: int, size: int) -> None:
    import fcntl

    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    try:
        fcntl.fcntl(fd, setsz, max(4096, min(size, 1 << 20)))
    except OSError:
        pass  # the default pipe size (64 KiB on Linux) bounds the pool instead


def _stop_procs(procs: list) -> None:
    for proc in procs:
        if proc.stdout is not None:
            try:
                proc.stdout.close()  # the helper's next write fails with EPIPE and it exits
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker_main() -> None:
    """A pool helper: read the key's parameters on stdin, write randomizers to stdout forever."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing the pipe
    params = json.loads(sys.stdin.readline())
    base = FixedBase(int(params["n"], 16), int(params["hs"], 16), params["exponent_bits"], params["window"])
    width = params["width"]
    out = sys.stdout.buffer
    try:
        while True:
            batch = b"".join(int(base.random_factor()).to_bytes(width, "big") for _ in range(8))
            out.write(batch)
            out.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            sys.stdout = None  # nothing left to flush into a closed pipe at exit
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)
