"""Hints for what the broker refuses: a 403 is the account's permissions, not a missing sidecar."""

from __future__ import annotations

import pika.exceptions as pe

from sealedsum.common import amqp
from sealedsum.common.errors import ExitCode


def test_access_refused_points_at_the_account_and_broker_setup():
    err = amqp.channel_refused(pe.ChannelClosedByBroker(403, "ACCESS_REFUSED - access to exchange 'p.results' "
                                                              "refused for user 'p-producer'"),
                               "cannot subscribe to results", hint="is the sidecar running?")
    text = err.diagnostics()
    assert "sidecar running" not in text and "lacks this permission" in text
    assert "broker setup" in text and "docs/broker-accounts.md" in text and "p-producer" in text
    assert err.exit_code == ExitCode.TRANSPORT and not err.retryable


def test_a_missing_object_keeps_its_own_hint():
    err = amqp.channel_refused(pe.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'p.results'"),
                               "cannot subscribe to results", hint="is the sidecar running?")
    assert err.hint == "is the sidecar running?" and "NOT_FOUND" in str(err)


def test_a_listener_that_never_speaks_amqp_is_a_transport_error(monkeypatch):
    """pika gives up on such a socket with a stack timeout, which is no AMQPConnectionError:
    it escaped as a traceback."""
    import socket

    import pytest

    from sealedsum.common.config import BrokerSettings
    from sealedsum.common.errors import TransportError

    real = amqp.parameters

    def quick(*args, **kwargs):
        params = real(*args, **kwargs)
        params.stack_timeout = 1
        return params
    monkeypatch.setattr(amqp, "parameters", quick)
    with socket.create_server(("127.0.0.1", 0)) as server:  # accepts (in the backlog), never answers
        settings = BrokerSettings(f"amqp://guest:guest@127.0.0.1:{server.getsockname()[1]}/%2F")
        with pytest.raises(TransportError, match="cannot reach the broker"):
            amqp.connect(settings)
