"""The scenarios of ``sealedsum demo`` (``analytics``, ``federated``), each on a local
:class:`sealedsum.testbed.Testbed` with the real sidecar, producer and consumer code."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from sealedsum.common import amqp
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.config import DEFAULT_AMQP_URL, BrokerSettings
from sealedsum.common.errors import TransportError
from sealedsum.testbed import Testbed

STARTUP_TIMEOUT_S = 60.0


def broker_url() -> str:
    """The broker to use: $AMQP_URL, the local default, or a throwaway container."""
    url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    try:
        amqp.connect(BrokerSettings(url=url)).close()
        return url
    except TransportError as err:
        first = err
    try:
        import docker  # noqa: F401 - only present with the test extra
        from testcontainers.community.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13")
        container.start()
    except Exception:  # noqa: BLE001 - no Docker engine: say how to get a broker
        raise TransportError(f"{first}; and no Docker engine is available to start one",
                             hint="start RabbitMQ (`rabbitmq-server -detached`, or `docker run -d -p 5672:5672 "
                                  "rabbitmq:3.13`) or set AMQP_URL, then run `sealedsum demo` again") from None
    p = container.get_connection_params()
    print(f"no broker at {DEFAULT_AMQP_URL}; started a RabbitMQ container on port {p.port}", file=sys.stderr)
    return f"amqp://{p.credentials.username}:{p.credentials.password}@{p.host}:{p.port}/%2F"


@contextlib.contextmanager
def demo_testbed(streams: str, state: str | None) -> Iterator[Testbed]:
    """A testbed for a demo, in ``state`` (default: a new temporary directory), which holds
    the platform key, the config and the sidecar's log; running until the block ends."""
    url = broker_url()  # before a temporary directory exists that a missing broker would leave behind
    directory = Path(state) if state else Path(tempfile.mkdtemp(prefix="sealedsum-demo-"))
    finished = False
    try:
        system = Testbed(directory, url, streams, state=directory, prefix=f"sealedsum-demo-{os.getpid()}")
        print(f"state directory {system.state} (config: {system.config_path})")
        print(f"platform key    {encode_platform_key(system.platform.public_key())}")
        print(f"measurement     {system.measurement.hex()} ({system.config.policy.paillier_bits}-bit "
              "Paillier keys)")
        with _running(system):
            yield system
        finished = True
    finally:
        if not state:
            if finished:
                shutil.rmtree(directory, ignore_errors=True)
                print(f"removed the temporary state directory {directory} (--state DIR keeps one)")
            else:  # its sidecar.log says what went wrong
                print(f"kept the state directory {directory} (sidecar.log)", file=sys.stderr)


@contextlib.contextmanager
def _running(system: Testbed) -> Iterator[Testbed]:
    system.start(log_level="info")
    try:
        try:
            system.wait_attestable(STARTUP_TIMEOUT_S)
        except TransportError as err:
            raise TransportError(f"{err}; see {system.log_path}", retryable=False) from err
        print(f"sidecar running (pid {system.process.pid}, log {system.log_path}); enclave attested\n")
        yield system
    finally:
        system.stop(timeout=15)
        system.delete_topology()
