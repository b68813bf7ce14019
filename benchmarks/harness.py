"""A real ``sealedsum sidecar`` process for the benchmarks, on the project's testbed
(:class:`sealedsum.testbed.Testbed`): a fresh platform key, a config pinning it and the
measurement of the code on disk, and the sidecar started exactly as a user would. Every
broker name starts with a unique ``bench-…`` prefix and is deleted by
:meth:`BenchSidecar.cleanup`.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path


from sealedsum.common.policy import SECURE_PAILLIER_BITS
from sealedsum.sidecar import measurement as measure
from sealedsum.testbed import Testbed

REPO = Path(__file__).resolve().parents[1]
STREAM = "bench"
VEC_STREAM = "benchvec"  # kind "vector"
LOWER, UPPER = 0.0, 100.0


def packing_available() -> bool:
    """Whether this tree's policy knows ``packing`` (the vector stream then turns it on)."""
    from sealedsum.common.policy import StreamPolicy

    return "packing" in StreamPolicy.KEYS

ENCLAVE_EXTRA = "max_record_age_seconds = 3600   # long runs queue records for a while before the ingest\n"
STREAMS = """\
[streams.{stream}]
dimension = 1
lower = {lower}
upper = {upper}
window_records = {window}
min_batch = {min_batch}
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 1e9            # benchmarks measure speed; the budget must not stop them

[streams.{vec_stream}]
kind = "vector"
dimension = {vec_dim}
lower = {lower}
upper = {upper}
window_records = {vec_window}
min_batch = {vec_window}
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 1e9
{vec_packing}"""


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def parse_log_ts(ts: str) -> float:
    """``2024-05-01T22:10:10.123Z`` (sealedsum.common.logs) → seconds since the epoch."""
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


class BenchSidecar(Testbed):
    """The project's testbed with the benchmark's two streams, a unique ``bench-`` prefix and
    one log file per start."""

    def __init__(self, workdir: Path, url: str, *, bits: int, window_records: int, queue_type: str,
                 vec_dim: int = 1000, vec_window: int = 10) -> None:
        self.packed = packing_available()
        streams = STREAMS.format(stream=STREAM, lower=LOWER, upper=UPPER, window=window_records,
                                 min_batch=min(10, window_records), vec_stream=VEC_STREAM, vec_dim=vec_dim,
                                 vec_window=vec_window, vec_packing="packing = true" if self.packed else "")
        super().__init__(workdir, url, streams, prefix=f"bench-{uuid.uuid4().hex[:12]}", bits=bits,
                         queue_type=queue_type, enclave_extra=ENCLAVE_EXTRA)
        self.insecure = bits not in SECURE_PAILLIER_BITS
        self.policy = self.config.require_policy()
        self.policy_bytes = self.policy.to_bytes()
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.process

    # -- process --------------------------------------------------------------------
    def start(self) -> None:
        """Start the sidecar (platform + enclave); return at once (see :meth:`wait_consuming`)."""
        _, now = measure.measure(self.policy_bytes)
        if now != self.measurement:
            raise BenchError("the code of the sidecar or common packages changed on disk during the run; "
                             "its measurement no longer matches: run the benchmark again")
        self.starts += 1
        super().start(log_path=self.workdir / f"sidecar-{self.starts}.log")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError(f"the sidecar exited (code {self.proc.returncode if self.proc else None}):\n"
                             + self.log_tail())

    def wait_consuming(self, timeout: float = 120.0) -> float:
        """Wait until the enclave consumes; return the wall-clock time it started to (from its log)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events("consuming"):
                return parse_log_ts(e["ts"])
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"the enclave did not start consuming within {timeout:.0f} s:\n" + self.log_tail())
            time.sleep(0.05)

    def stop(self) -> dict | None:
        """Stop the sidecar gracefully; return its final ``stats`` event (None if it logged none)."""
        if self.process is None:
            return None
        super().stop(timeout=30)
        self.process = None
        stats = self.events("stats")
        return stats[-1] if stats else None

    # -- broker ---------------------------------------------------------------------
    def cleanup(self, extra_queues: tuple[str, ...] = (), extra_exchanges: tuple[str, ...] = ()) -> None:
        """Delete everything this run declared (best effort)."""
        self.delete_topology(extra_queues, extra_exchanges)
