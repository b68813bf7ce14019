"""A real RabbitMQ for integration tests, and real sidecar processes on it.

The broker is ``$AMQP_URL`` when set (it must answer: a set but dead URL fails),
else a testcontainers RabbitMQ where a Docker engine runs. With neither, tests skip
locally but fail when ``SEALEDSUM_REQUIRE_BROKER=1`` (CI sets it): a CI run that
silently skipped its integration tests would prove nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pika
import pytest

from sealedsum import cluster_nodes
from sealedsum.common.errors import TransportError
from sealedsum.testbed import Testbed

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


@pytest.fixture(scope="session")
def cluster_urls() -> list[str]:
    """The AMQP URLs of the three-node cluster (``deploy/cluster.sh``), node 1 first, from
    ``$SEALEDSUM_CLUSTER_URLS``; each must answer. Unset: skipped locally, failed in CI."""
    urls = cluster_nodes.urls_from_env()
    if not urls:
        _no_broker(f"{cluster_nodes.URLS_ENV} unset (start the cluster with `deploy/cluster.sh start` "
                   "and export the variable it prints)")
    if len(urls) != 3:
        pytest.fail(f"{cluster_nodes.URLS_ENV} must hold three comma-separated URLs, not {len(urls)}")
    for n, url in enumerate(urls, 1):
        try:
            pika.BlockingConnection(pika.URLParameters(url)).close()
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"{cluster_nodes.URLS_ENV} is set but cluster node {n} does not answer: {err!r}")
    return urls


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


def stream_bodies(settings, *, start="first", expect: int | None = None, timeout: float = 3.0) -> list[bytes]:
    """The release stream's message bodies from ``start``, read raw, as an operator could:
    what came within ``timeout`` s, or as soon as ``expect`` came."""
    conn = pika.BlockingConnection(pika.URLParameters(settings.url))
    got: list[bytes] = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=100)
        ch.basic_consume(settings.topology.releases_stream,
                         lambda c, m, _p, body: (got.append(body), c.basic_ack(m.delivery_tag)),
                         arguments={"x-stream-offset": start})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (expect is None or len(got) < expect):
            conn.process_data_events(time_limit=0.1)
    finally:
        try:
            conn.close()
        except pika.exceptions.AMQPError:
            pass
    return got


# What the tests call a running sidecar is the project's one local testbed.
RunningSidecar = Testbed


def start_sidecar(tmp: Path, url: str, streams: dict, *, bits: int = 1024, extra_toml: str = "",
                  enclave_extra: str = "", **kw) -> Testbed:
    """A testbed (1024-bit test keys, a 600 s replay horizon) with its sidecar answering attestation.

    :param process_url: AMQP_URL for the sidecar process only (default: ``url``)."""
    sc = Testbed(tmp, url, streams_toml(streams) + "\n" + extra_toml, bits=bits,
                 enclave_extra="max_record_age_seconds = 600\n" + enclave_extra, **kw)
    return relaunch(sc)


def launch(sc: Testbed):
    """Start the sidecar process on sc's config and state; its log is appended to."""
    return sc.start(log_level="debug")


def relaunch(sc: Testbed) -> Testbed:
    """(Re)start the sidecar and wait until its enclave answers attestation."""
    launch(sc)
    try:
        sc.wait_attestable(30)
    except TransportError as err:
        alive = sc.alive()
        sc.stop()
        raise AssertionError(f"sidecar {'never answered attestation' if alive else 'exited early'} ({err}):\n"
                             f"{sc.log_path.read_text()}") from None
    return sc


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
        sc.delete_topology()
