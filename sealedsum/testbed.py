"""A trusted local deployment: a platform key in a state directory, a config that pins
exactly that platform and the measurement of the installed code under a policy, and the
real ``sealedsum sidecar`` process on them.

The demo, the benchmarks, the integration tests and the compose entry point
(``sealedsum platform client-config``) all set the system up through this module, so
that there is one way to do it.

.. warning::
   Whoever sets up a testbed acts as operator *and* platform owner and takes the trust
   anchors from the machine it checks: trust on first use, right for a demo, a test or a
   benchmark. Real clients pin the platform key out of band and review the measurements
   they allow (README, "Using it").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
import uuid
from pathlib import Path

from sealedsum.common import amqp
from sealedsum.common import config as config_mod
from sealedsum.common.attestation import AttestedEnclave, encode_platform_key
from sealedsum.common.errors import ConfigError
from sealedsum.common.policy import SECURE_PAILLIER_BITS
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.emulated import KEY_FILE, EmulatedPlatform

CONFIG = """\
[broker]
url = "{url}"
prefix = "{prefix}"
queue_type = "{queue_type}"
{broker_extra}
[consumer]
chain_state = "{chain_state}"

[enclave]
paillier_bits = {bits}
{enclave_extra}
{streams}
"""
TRUST_COMMENT = "# Trust on first use, for a demo or test deployment only: real clients pin these out of band."


def trust_table(platform_key: bytes, measurement: bytes) -> str:
    """The ``[trust]`` table that pins one platform key and one measurement."""
    return (f"\n{TRUST_COMMENT}\n[trust]\nplatform_key = \"{encode_platform_key(platform_key)}\"\n"
            f"measurements = [\"{measurement.hex()}\"]\n")


def measurement_of(config_text: str) -> tuple[bytes, bytes]:
    """``(code_digest, measurement)`` of the installed enclave code under the text's policy."""
    policy = config_mod.from_mapping(tomllib.loads(config_text), env={}).require_policy()
    return measure.measure(policy.to_bytes())


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, so that
    nobody ever reads a half-written config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_client_config(base: Path, state: Path, out: Path) -> tuple[bytes, bytes]:
    """Write ``out``: the base config plus a ``[trust]`` table pinning the platform key in
    ``state`` (created there on first use) and the measurement of the base config's policy.

    :returns: ``(platform public key, measurement)``.
    :raises ConfigError: the base config does not load, or has a ``[trust]`` table already.
    """
    out.unlink(missing_ok=True)  # clients starting now must wait for the new measurement
    text = base.read_text()
    if "trust" in tomllib.loads(text):
        raise ConfigError(f"base config {base} already has a [trust] table; remove it (the client config adds one)")
    platform = EmulatedPlatform.load(state) if (state / KEY_FILE).exists() else EmulatedPlatform.init(state)
    _, measurement = measurement_of(text)
    client = text.rstrip("\n") + "\n" + trust_table(platform.public_key(), measurement)
    if measurement_of(client)[1] != measurement:
        raise ConfigError(f"the client config for {base} does not keep its measurement")
    write_text_atomic(out, client)  # it holds only public values
    return platform.public_key(), measurement


class Running:
    """As a context manager: start the sidecar process(es), wait until the deployment attests
    and, on exit, stop and delete the prefix's broker objects."""

    def __enter__(self):
        self.start()
        try:
            self.wait_attestable()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.delete_topology()


class Testbed(Running):
    """One platform, its enclave's config and the sidecar process, in ``workdir``.

    :param streams: the ``[streams.*]`` tables (TOML text) of the policy.
    :param state: the state directory (default ``workdir/state``); the platform key is created in it.
    :param bits: Paillier key size; sizes below the secure ones turn on ``insecure_test_keys``.
    :param measurement: pin this measurement (hex) instead of the real one (tests of refusal).
    :param process_url: the broker URL the sidecar process uses, when it differs from ``url``
        (the process runs as its own least-privilege account).

    As a context manager it starts the sidecar, waits until its enclave attests and, on exit,
    stops it and deletes the prefix's broker objects.
    """

    def __init__(self, workdir: Path, url: str, streams: str, *, state: Path | None = None,
                 prefix: str | None = None, bits: int = 2048, queue_type: str = "quorum",
                 broker_extra: str = "", enclave_extra: str = "", measurement: str | None = None,
                 process_url: str | None = None, log_name: str = "sidecar.log") -> None:
        self.workdir = Path(workdir)
        self.url = url
        self.process_url = process_url
        self.prefix = prefix or f"t-{uuid.uuid4().hex[:10]}"
        self.state = Path(state) if state is not None else self.workdir / "state"
        # A replica of a cluster shares its platform with the others (a key file copied in).
        self.platform = (EmulatedPlatform.load(self.state) if (self.state / KEY_FILE).exists()
                         else EmulatedPlatform.init(self.state))
        insecure = "insecure_test_keys = true\n" if bits not in SECURE_PAILLIER_BITS else ""
        # The consumers of a testbed remember its chains beside it, not in the user's state
        # directory, which would collect the chains of every test and demo run ever made.
        text = CONFIG.format(url=url, prefix=self.prefix, queue_type=queue_type, broker_extra=broker_extra,
                             chain_state=config_mod.CHAIN_STATE_FILE,
                             bits=bits, enclave_extra=insecure + enclave_extra, streams=streams)
        self.code_digest, self.measurement = measurement_of(text)
        pinned = bytes.fromhex(measurement) if measurement else self.measurement
        self.config_path = self.workdir / "sealedsum.toml"
        self.config_path.write_text(text + trust_table(self.platform.public_key(), pinned))
        self.config = config_mod.load(self.config_path, env={})
        self.log_path = self.workdir / log_name
        self.process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment the sidecar and the demo's client processes run with."""
        env = dict(os.environ, AMQP_URL=self.process_url or self.url)
        env.pop("SEALEDSUM_CONFIG", None)
        return env

    # -- the process ------------------------------------------------------------------
    def start(self, *, log_level: str = "info", log_path: Path | None = None) -> subprocess.Popen:
        """Start ``sealedsum sidecar`` (platform and enclave); return at once. Its log (JSON
        lines) is appended to ``log_path`` (default :attr:`log_path`, which it then becomes)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the sidecar is running already")
        self.log_path = log_path or self.log_path
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sealedsum", "sidecar", "--config", str(self.config_path),
                 "--state", str(self.state), "--log-level", log_level],
                stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        return self.process

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_attestable(self, timeout: float = 60.0) -> AttestedEnclave:
        """Attest the enclave as soon as it answers.

        :raises TransportError: it did not within ``timeout`` s, or the sidecar exited.
        """
        return amqp.wait_attestable(self.config.broker, self.config.require_trust(), timeout, alive=self.alive)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; the exit code (None if never started)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return proc.wait()

    def kill(self) -> None:
        """SIGKILL the two processes this testbed started: the enclave child and the platform."""
        for e in self.events("enclave running"):
            try:
                os.kill(int(e["pid"]), signal.SIGKILL)
            except (ProcessLookupError, ValueError, KeyError):
                pass
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def delete_topology(self, extra_queues: tuple[str, ...] = (), extra_exchanges: tuple[str, ...] = ()) -> None:
        amqp.delete_topology(self.config.broker, extra_queues, extra_exchanges)

    # -- the log ----------------------------------------------------------------------
    def log_lines(self) -> list[dict]:
        if not self.log_path.exists():
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
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def enclave_pid(self) -> int:
        for e in reversed(self.events("enclave running")):
            return int(e["pid"])
        raise RuntimeError("the enclave never reported running")


CLUSTER_TABLE = """
[cluster]
shards = {shards}
platform_keys = ["{platform_key}"]
window_grace_seconds = {grace}
{extra}
"""


class ClusterTestbed(Running):
    """Enclave replicas of one deployment ([cluster]), each a :class:`Testbed` of its own (its
    state directory, config and sidecar process), all on one emulated platform (its key file
    copied into each state directory), on a RabbitMQ cluster's nodes in turn.

    :param urls: the broker nodes; replica ``i`` connects to ``urls[i % len(urls)]``.
    """

    def __init__(self, workdir: Path, urls: list[str], streams: str, *, replicas: int = 3, shards: int = 3,
                 bits: int = 1024, grace: float = 1.0, cluster_extra: str = "", prefix: str | None = None,
                 broker_extra: str = "", enclave_extra: str = "") -> None:
        self.workdir = Path(workdir)
        self.urls = list(urls)
        self.prefix = prefix or f"c-{uuid.uuid4().hex[:10]}"
        self.streams = streams
        self._kw = dict(bits=bits, broker_extra=broker_extra, enclave_extra=enclave_extra)
        first = self.workdir / "r0" / "state"
        first.mkdir(parents=True, exist_ok=True)
        self.platform = EmulatedPlatform.init(first)
        self.cluster = CLUSTER_TABLE.format(shards=shards, platform_key=encode_platform_key(self.platform.public_key()),
                                            grace=grace, extra=cluster_extra)
        self.replicas: list[Testbed] = []
        for _ in range(replicas):
            self.add_replica()

    def add_replica(self, streams: str | None = None) -> Testbed:
        """One more replica (not started); ``streams`` gives it another policy (another measurement)."""
        i = len(self.replicas)
        state = self.workdir / f"r{i}" / "state"
        state.mkdir(parents=True, exist_ok=True)
        if i:
            shutil.copy(self.workdir / "r0" / "state" / KEY_FILE, state / KEY_FILE)
        # Every node, starting at this replica's own (it moves on to the next if that one goes).
        k = i % len(self.urls)
        nodes = ",".join(self.urls[k:] + self.urls[:k])
        replica = Testbed(self.workdir / f"r{i}", self.urls[k], (streams or self.streams) + self.cluster,
                          state=state, prefix=self.prefix, process_url=nodes, **self._kw)
        self.replicas.append(replica)
        return replica

    @property
    def config(self):
        return self.replicas[0].config

    def client_config(self, node: int = 0):
        """A client's config (the first replica's trust anchors) on broker node ``node``."""
        return self.replicas[0].config.with_broker_url(self.urls[node % len(self.urls)])

    def start(self, *, log_level: str = "info") -> None:
        for replica in self.replicas:
            if not replica.alive():
                replica.start(log_level=log_level)

    def wait_attestable(self, timeout: float = 90.0) -> AttestedEnclave:
        return amqp.wait_attestable(self.config.broker, self.config.require_trust(), timeout,
                                    alive=lambda: any(r.alive() for r in self.replicas))

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()

    def holder(self) -> int | None:
        """Which replica took the release role last (from the logs), if any did."""
        last, who = "", None
        for i, replica in enumerate(self.replicas):
            for e in replica.events("release role taken"):
                if e.get("ts", "") >= last:
                    last, who = e.get("ts", ""), i
        return who

    def delete_topology(self) -> None:
        t = self.config.broker.topology
        shards = self.config.require_policy().cluster.shards
        amqp.delete_topology(self.config.broker, extra_queues=(*t.shard_queues(shards), t.cluster_partials,
                                                               t.cluster_state, t.cluster_genesis, t.cluster_join,
                                                               t.cluster_role))

