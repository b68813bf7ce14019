"""A real RabbitMQ for integration tests, and real sidecar processes on it.

The broker is ``$AMQP_URL`` when set (it must answer: a set but dead URL fails),
else a testcontainers RabbitMQ where a Docker engine runs. With neither, tests skip
locally but fail when ``SEALEDSUM_REQUIRE_BROKER=1`` (CI sets it): a CI run that
silently skipped its integration tests would prove nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

from sealedsum.common import amqp, config as config_mod
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.errors import TransportError
from sealedsum.sidecar.platform import measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SEALEDSUM_REQUIRE_BROKER=1 an integration test that skips (however it came to:
    a ``pytest.skip`` that forgot :func:`_no_broker`, a ``skipif`` marker) fails instead."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and "/integration/" in str(item.fspath)
            and os.environ.get("SEALEDSUM_REQUIRE_BROKER") == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"an integration test skipped with SEALEDSUM_REQUIRE_BROKER=1 (CI must not skip): {reason}"


def _no_broker(reason: str):
    if os.environ.get("SEALEDSUM_REQUIRE_BROKER") == "1":
        pytest.fail(f"integration tests need a broker and SEALEDSUM_REQUIRE_BROKER=1: {reason}")
    pytest.skip(f"no broker: {reason} (set AMQP_URL, or run a Docker engine)")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    url = os.environ.get("AMQP_URL")
    if url:
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"AMQP_URL is set but the broker does not answer: {err!r}")
        yield url
        return
    try:
        import docker.errors  # noqa: F401 - fails fast where the docker SDK is missing
        from testcontainers.community.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13")
    except Exception as err:  # noqa: BLE001 - docker.errors.DockerException and import errors
        _no_broker(f"AMQP_URL unset and no Docker engine ({type(err).__name__})")
    with container:
        p = container.get_connection_params()
        yield f"amqp://{p.credentials.username}:{p.credentials.password}@{p.host}:{p.port}/%2F"


CONFIG = """\
[broker]
url = "{url}"
prefix = "{prefix}"
queue_type = "{queue_type}"
{broker_extra}

[trust]
platform_key = "{platform_key}"
measurements = ["{measurement}"]

[enclave]
paillier_bits = {bits}
insecure_test_keys = {insecure}
max_record_age_seconds = 600
{enclave_extra}

{streams}
"""


def streams_toml(streams: dict[str, dict]) -> str:
    out = []
    for name, table in streams.items():
        out.append(f"[streams.{name}]")
        for k, v in table.items():
            if isinstance(v, bool):
                out.append(f"{k} = {'true' if v else 'false'}")
            else:
                out.append(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"')
        out.append("")
    return "\n".join(out)


@dataclass
class RunningSidecar:
    process: subprocess.Popen
    config_path: Path
    config: config_mod.Config
    state: Path
    log_path: Path
    platform: EmulatedPlatform
    measurement: bytes
    # The broker URL the sidecar process runs with (AMQP_URL), when it differs from the
    # config's (test_acl.py runs it as its own least-privilege account).
    process_url: str | None = None

    def log_lines(self) -> list[dict]:
        import json

        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def enclave_pid(self) -> int:
        for e in reversed(self.events("enclave running")):
            return int(e["pid"])
        raise AssertionError("the enclave never reported running")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return self.process.returncode


def write_config(tmp: Path, url: str, streams: dict, *, bits: int = 1024, prefix: str | None = None,
                 platform: EmulatedPlatform, queue_type: str = "quorum", measurement: str | None = None,
                 broker_extra: str = "", enclave_extra: str = "", extra_toml: str = ""):
    prefix = prefix or f"t-{uuid.uuid4().hex[:10]}"
    text = CONFIG.format(url=url, prefix=prefix, queue_type=queue_type, broker_extra=broker_extra,
                         enclave_extra=enclave_extra,
                         platform_key=encode_platform_key(platform.public_key()),
                         measurement="0" * 64, bits=bits, insecure="true" if bits < 2048 else "false",
                         streams=streams_toml(streams) + "\n" + extra_toml)
    import tomllib

    policy = config_mod.from_mapping(tomllib.loads(text), env={}).require_policy()
    _, m = measure.measure(policy.to_bytes())
    path = tmp / "sealedsum.toml"
    path.write_text(text.replace("0" * 64, measurement or m.hex()))
    return path, m


def start_sidecar(tmp: Path, url: str, streams: dict, *, process_url: str | None = None, **kw) -> RunningSidecar:
    """:param process_url: AMQP_URL for the sidecar process only (default: ``url``)."""
    state = tmp / "state"
    platform = EmulatedPlatform.init(state)
    path, m = write_config(tmp, url, streams, platform=platform, **kw)
    cfg = config_mod.load(path, env={})
    sc = RunningSidecar(None, path, cfg, state, tmp / "sidecar.log", platform, m, process_url)
    return relaunch(sc)


def launch(sc: RunningSidecar) -> subprocess.Popen:
    """Start the sidecar process on sc's config and state; its log is appended to."""
    env = dict(os.environ, AMQP_URL=sc.process_url or sc.config.broker.url)
    sc.process = subprocess.Popen([sys.executable, "-m", "sealedsum", "sidecar", "--config", str(sc.config_path),
                                   "--state", str(sc.state), "--log-level", "debug"],
                                  stderr=open(sc.log_path, "a"), cwd=REPO, env=env)
    return sc.process


def relaunch(sc: RunningSidecar) -> RunningSidecar:
    """(Re)start the sidecar and wait until its enclave answers attestation."""
    proc = launch(sc)
    cfg, log_path = sc.config, sc.log_path
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"sidecar exited early:\n{log_path.read_text()}")
        try:
            conn = amqp.connect(cfg.broker)
            try:
                amqp.attest(conn, cfg.broker, cfg.require_trust())
                return sc
            finally:
                conn.close()
        except TransportError:
            if time.monotonic() > deadline:
                sc.stop()
                raise AssertionError(f"sidecar never answered attestation:\n{log_path.read_text()}")
            time.sleep(0.2)


def delete_topology(cfg: config_mod.Config) -> None:
    amqp.delete_topology(cfg.broker)


@pytest.fixture
def sidecar_factory(tmp_path, amqp_url):
    started: list[RunningSidecar] = []

    def factory(streams: dict, **kw) -> RunningSidecar:
        sub = tmp_path / f"sc{len(started)}"
        sub.mkdir()
        sc = start_sidecar(sub, amqp_url, streams, **kw)
        started.append(sc)
        return sc

    yield factory
    for sc in started:
        sc.stop()
        delete_topology(sc.config)
