"""A real ``sealedsum sidecar`` process for the benchmarks: its config, start, stop and logs.

The benchmark acts as the operator *and* the platform owner: it creates a fresh
platform key in a temporary state directory, writes a config whose trust anchors pin
that key and the measurement of the code on disk, and starts the sidecar exactly as a
user would (``python -m sealedsum sidecar --config FILE --state DIR``). Every broker
name starts with a unique ``bench-…`` prefix and is deleted by :meth:`BenchSidecar.cleanup`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pika

from sealedsum.common import config as config_mod
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.policy import SECURE_PAILLIER_BITS
from sealedsum.sidecar.platform import measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform

REPO = Path(__file__).resolve().parents[1]
STREAM = "bench"
VEC_STREAM = "benchvec"  # kind "vector"
LOWER, UPPER = 0.0, 100.0


def packing_available() -> bool:
    """Whether this tree's policy knows ``packing`` (the vector stream then turns it on)."""
    from sealedsum.common.policy import StreamPolicy

    return "packing" in StreamPolicy.KEYS

CONFIG = """\
[broker]
url = "{url}"
prefix = "{prefix}"
queue_type = "{queue_type}"

[trust]
platform_key = "{platform_key}"
measurements = ["{measurement}"]

[enclave]
paillier_bits = {bits}
insecure_test_keys = {insecure}
max_record_age_seconds = 3600   # long runs queue records for a while before the ingest

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


class BenchSidecar:
    def __init__(self, workdir: Path, url: str, *, bits: int, window_records: int, queue_type: str,
                 vec_dim: int = 1000, vec_window: int = 10) -> None:
        self.workdir = workdir
        self.url = url
        self.prefix = f"bench-{uuid.uuid4().hex[:12]}"
        self.insecure = bits not in SECURE_PAILLIER_BITS
        self.state = workdir / "state"
        self.platform = EmulatedPlatform.init(self.state)
        text = CONFIG.format(
            url=url, prefix=self.prefix, queue_type=queue_type,
            platform_key=encode_platform_key(self.platform.public_key()), measurement="0" * 64,
            bits=bits, insecure="true" if self.insecure else "false", stream=STREAM,
            lower=LOWER, upper=UPPER, window=window_records, min_batch=min(10, window_records),
            vec_stream=VEC_STREAM, vec_dim=vec_dim, vec_window=vec_window,
            vec_packing="packing = true" if packing_available() else "",
        )
        self.packed = packing_available()
        self.policy = config_mod.from_mapping(tomllib.loads(text), env={}).require_policy()
        self.policy_bytes = self.policy.to_bytes()
        self.code_digest, self.measurement = measure.measure(self.policy_bytes)
        self.config_path = workdir / "sealedsum.toml"
        self.config_path.write_text(text.replace("0" * 64, self.measurement.hex()))
        self.config = config_mod.load(self.config_path, env={"AMQP_URL": url})
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.starts = 0

    # -- process --------------------------------------------------------------------
    def start(self) -> None:
        """Start the sidecar (platform + enclave); return at once (see :meth:`wait_consuming`)."""
        if self.proc is not None and self.proc.poll() is None:
            raise BenchError("the sidecar is already running")
        _, now = measure.measure(self.policy_bytes)
        if now != self.measurement:
            raise BenchError("the code of the sidecar or common packages changed on disk during the run; "
                             "its measurement no longer matches: run the benchmark again")
        self.starts += 1
        self.log_path = self.workdir / f"sidecar-{self.starts}.log"
        env = dict(os.environ, AMQP_URL=self.url)
        env.pop("SEALEDSUM_CONFIG", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sealedsum", "sidecar", "--config", str(self.config_path),
                 "--state", str(self.state), "--log-level", "info"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, env=env,
            )

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
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill(proc)
        stats = self.events("stats")
        return stats[-1] if stats else None

    def _kill(self, proc: subprocess.Popen) -> None:
        # Only the two processes this benchmark started: the platform and its enclave child.
        for e in self.events("enclave running"):
            try:
                os.kill(int(e["pid"]), signal.SIGKILL)
            except (ProcessLookupError, ValueError, KeyError):
                pass
        proc.kill()
        proc.wait()

    # -- logs -----------------------------------------------------------------------
    def log_lines(self) -> list[dict]:
        if self.log_path is None or not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def log_tail(self, n: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    # -- broker ---------------------------------------------------------------------
    def cleanup(self, extra_queues: tuple[str, ...] = (), extra_exchanges: tuple[str, ...] = ()) -> None:
        """Delete everything this run declared (best effort)."""
        t = self.config.broker.topology
        try:
            conn = pika.BlockingConnection(pika.URLParameters(self.url))
        except Exception:  # noqa: BLE001 - cleanup only
            return
        try:
            for q in (*t.queues, *extra_queues):
                ch = conn.channel()
                try:
                    ch.queue_delete(q)
                    ch.close()
                except Exception:  # noqa: BLE001 - a failed delete closes the channel; go on
                    pass
            for x in (*t.exchanges, *extra_exchanges):
                ch = conn.channel()
                try:
                    ch.exchange_delete(x)
                    ch.close()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
