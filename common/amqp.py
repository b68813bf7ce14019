"""The shared broker edge: connecting, attestation RPC, confirmed publishing.

With ``sidecar/enclave_process/runtime.py`` and the ``transport`` modules of producers and consumers,
this is the only code that imports pika. Pika exceptions become ``TransportError``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import pika
import pika.exceptions as pe
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from sealedsum.common.attestation import AttestedEnclave, TrustAnchors, verify_attestation
from sealedsum.common.config import BrokerSettings, redact_url, redact_urls
from sealedsum.common.errors import TransportError, Unroutable
from sealedsum.common import topology, wire

log = logging.getLogger("sealedsum.amqp")

APP_ID = "sealedsum"
MAX_PREFETCH = 65535
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
START_BROKER_HINT = (
    "is RabbitMQ running? start it with `rabbitmq-server -detached`, or `docker compose up -d rabbitmq`, "
    "and point AMQP_URL (or broker.url) at it"
)


# Where each list of cluster nodes starts next: every new connection starts one node further,
# so a reconnect after losing a node tries another first, and clients spread over the nodes.
_next_node: dict[tuple[str, ...], int] = {}
_next_node_lock = threading.Lock()


def node_order(settings: BrokerSettings) -> list[str]:
    """``settings.urls`` in the order the next connection tries them: starting at ``settings.url``
    the first time, one node further each time after (a single URL: always that one)."""
    urls = list(settings.urls)
    if len(urls) < 2:
        return urls
    with _next_node_lock:
        start = _next_node.get(settings.urls, 0) % len(urls)
        _next_node[settings.urls] = start + 1
    return urls[start:] + urls[:start]


def _parameters(url: str, heartbeat: int, name: str | None) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 60
    if name is not None:
        params.client_properties = {"connection_name": name}
    return params


def parameters(settings: BrokerSettings, *, heartbeat: int = 30, name: str | None = None,
               url: str | None = None) -> pika.URLParameters:
    """Connection parameters for one node, with our heartbeat and blocked-connection timeout:
    ``url``, or else the next of ``settings.urls`` (:func:`node_order`; ``settings.url`` when
    there is one), for a connection that reconnects by itself (``pika.SelectConnection`` takes
    one node: each reconnect asks again and so moves on to the next node).

    :param name: shown by the broker as the connection's ``connection_name`` (operators tell
        the enclave's connections apart by it)."""
    return _parameters(url if url is not None else node_order(settings)[0], heartbeat, name)


def all_parameters(settings: BrokerSettings, *, heartbeat: int = 30, name: str | None = None) -> list[pika.URLParameters]:
    """:func:`parameters` for every node of ``settings.urls``, in :func:`node_order`: a
    ``pika.BlockingConnection`` given the list tries them in turn until one answers."""
    return [parameters(settings, heartbeat=heartbeat, name=name, url=u) for u in node_order(settings)]


def where(settings: BrokerSettings) -> str:
    """The broker, for messages: its URL, or its nodes' URLs, passwords redacted."""
    if len(settings.urls) > 1:
        return f"any node of {redact_urls(settings.urls)}"
    return redact_url(settings.url)


def connection_error(err: BaseException, settings: BrokerSettings) -> TransportError:
    """The ``TransportError`` for a failure to connect (blocking or asynchronous); with several
    nodes, the last one tried tells why."""
    # pika's asynchronous connection workflow wraps the cause (one level per phase).
    for _ in range(4):
        inner = getattr(err, "exceptions", None)
        inner = inner[-1] if inner else getattr(err, "exception", None)
        if not isinstance(inner, BaseException):
            break
        err = inner
    if isinstance(err, pe.ProbableAuthenticationError):
        return TransportError(f"the broker at {where(settings)} refused the login",
                              retryable=False, hint="check the user and password in AMQP_URL")
    if isinstance(err, pe.ProbableAccessDeniedError):
        return TransportError(f"no access to the vhost at {where(settings)}",
                              retryable=False, hint="check the vhost and the user's permissions")
    return TransportError(f"cannot reach the broker at {where(settings)}", hint=START_BROKER_HINT)


# A listener that never speaks AMQP ends in a stack timeout, which is no AMQPConnectionError.
CONNECT_ERRORS = (pe.AMQPConnectionError, AMQPConnectorException)


def connect(settings: BrokerSettings, *, heartbeat: int = 30, name: str | None = None) -> pika.BlockingConnection:
    """A blocking connection to the first node of :func:`node_order` that answers.

    :raises TransportError: none did (:func:`connection_error`)."""
    params = all_parameters(settings, heartbeat=heartbeat, name=name)
    try:
        return pika.BlockingConnection(params if len(params) > 1 else params[0])
    except CONNECT_ERRORS as err:
        raise connection_error(err, settings) from err


# A direct reply-to name as RabbitMQ hands it out: the prefix, the base64 of an Erlang
# external-term pid, a dot, the base64 of a 16-byte key. A name that only starts like one
# makes the broker close the publishing connection (541 INTERNAL_ERROR).
_REPLY_TO = re.compile(r"amq\.rabbitmq\.reply-to\.([A-Za-z0-9+/]{4,340}={0,2})\.([A-Za-z0-9+/]{22}==)")
_ATOM_HEADS = {100: 2, 115: 1, 118: 2, 119: 1}  # ATOM_EXT, SMALL_ATOM_EXT, ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT
_PID_TAILS = {103: 9, 88: 12}  # PID_EXT (id, serial, 1-byte creation), NEW_PID_EXT (4-byte creation)


def reply_to_node(name: str | None) -> bytes | None:
    """The broker node a well-formed direct reply-to name points at (as the broker encodes it),
    or ``None`` if ``name`` is not one: the enclave answers no other ``reply_to`` (never a named
    queue, on a client's say-so)."""
    match = _REPLY_TO.fullmatch(name or "")
    if match is None:
        return None
    try:
        pid, key = base64.b64decode(match.group(1), validate=True), base64.b64decode(match.group(2), validate=True)
    except ValueError:
        return None
    if len(key) != 16 or len(pid) < 4 or pid[0] != 131 or pid[1] not in _PID_TAILS or pid[2] not in _ATOM_HEADS:
        return None
    width = _ATOM_HEADS[pid[2]]
    atom_len = int.from_bytes(pid[3:3 + width], "big")
    node = pid[3 + width:3 + width + atom_len]
    if atom_len == 0 or b"@" not in node or len(pid) != 3 + width + atom_len + _PID_TAILS[pid[1]]:
        return None
    return node


def is_direct_reply_to(name: str | None) -> bool:
    return reply_to_node(name) is not None


def properties(kind: str, **extra) -> pika.BasicProperties:
    return pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent,
        content_type="application/octet-stream",
        type=kind,
        app_id=APP_ID,
        **extra,
    )


def publish_confirmed(channel, exchange: str, routing_key: str, body: bytes,
                      props: pika.BasicProperties, *, mandatory: bool = True) -> None:
    """Publish on a confirm-mode channel; return once the broker has taken the message."""
    try:
        channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                              properties=props, mandatory=mandatory)
    except pe.UnroutableError as err:
        raise Unroutable(f"no queue takes messages sent to {exchange or 'the default exchange'}"
                             f" with key {routing_key!r}", retryable=False,
                             hint="is the sidecar running? it declares the queues") from err
    except pe.NackError as err:
        raise TransportError("the broker refused the message (nack)",
                             hint="the records queue may be full (broker.max_queued_records): is the sidecar "
                                  "running and keeping up?") from err
    except pe.AMQPChannelError as err:
        raise TransportError(f"channel error: {err}", retryable=False) from err
    except pe.AMQPConnectionError as err:
        raise TransportError("lost the broker connection while publishing") from err


def connection_user(connection: pika.BlockingConnection) -> str | None:
    """The user name this connection logged in with."""
    params = getattr(getattr(connection, "_impl", None), "params", None)
    return getattr(getattr(params, "credentials", None), "username", None)


def request_attestation(connection: pika.BlockingConnection, settings: BrokerSettings, nonce: bytes) -> bytes:
    """Send an attestation request over direct reply-to; return the raw reply bytes."""
    return call_enclave(connection, settings, wire.AttestRequest(nonce).to_bytes(), "attest-request")


def call_enclave(connection: pika.BlockingConnection, settings: BrokerSettings, request: bytes, kind: str) -> bytes:
    """An RPC to the enclave on its request queue, answered through direct reply-to."""
    channel = connection.channel()
    replies: list[bytes] = []
    returned: list[str] = []
    correlation = uuid.uuid4().hex

    def on_reply(_ch, _method, props, body):
        if props.correlation_id == correlation:
            replies.append(body)

    def on_return(_ch, method, _props, _body):
        returned.append(method.reply_text)

    try:
        channel.add_on_return_callback(on_return)
        channel.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)
        timeout = settings.attest_timeout_seconds
        # mandatory: if no sidecar has declared the queue, the broker says so at once.
        channel.basic_publish(
            exchange=settings.topology.attest_exchange, routing_key=topology.ATTEST_ROUTING_KEY,
            body=request,
            properties=pika.BasicProperties(
                reply_to=DIRECT_REPLY_TO, correlation_id=correlation, type=kind,
                app_id=APP_ID, expiration=str(int(timeout * 1000)),
                # Checked by the broker against the login: the enclave rate-limits requests per
                # account, so another account's flood cannot crowd this one out.
                user_id=connection_user(connection),
            ),
            mandatory=True,
        )
        deadline = time.monotonic() + timeout
        while not replies and not returned and channel.is_open and time.monotonic() < deadline:
            connection.process_data_events(time_limit=min(0.25, max(0.0, deadline - time.monotonic())))
        if not channel.is_open:
            # pika keeps why the broker closed the channel only here; raising it gives the hint below.
            raise getattr(channel, "_closing_reason", None) or pe.ChannelClosed(0, "closed")
    except pe.ChannelClosedByBroker as err:
        # Retryable: a producer started before its sidecar's first start waits for it.
        if err.reply_code == 404:
            raise TransportError(
                f"{kind} refused: the broker has no exchange {settings.topology.attest_exchange!r} on this vhost "
                f"({err.reply_text})",
                hint=f"no sidecar has run with broker.prefix = {settings.topology.prefix!r} on this vhost: check "
                     "broker.prefix and the URL's vhost against the sidecar's, or start the sidecar "
                     "(`sealedsum sidecar --config FILE --state DIR`); it declares the exchange") from err
        raise channel_refused(err, f"{kind} refused") from err
    except pe.AMQPChannelError as err:
        raise TransportError(f"{kind} refused: {err}", retryable=False) from err
    except pe.AMQPConnectionError as err:
        raise TransportError(f"lost the broker connection during {kind}") from err
    finally:
        if channel.is_open:
            channel.close()
    if returned and not replies:
        raise TransportError(
            f"no enclave request queue behind {settings.topology.attest_exchange!r} ({returned[0]})",
            hint="start the sidecar (`sealedsum sidecar --config FILE --state DIR`) with the same broker.prefix",
        )
    if not replies:
        raise TransportError(
            f"no reply to {kind} on {settings.topology.attest_queue!r} within {settings.attest_timeout_seconds:.0f} s",
            hint="is the sidecar running (`sealedsum sidecar --config FILE --state DIR`) with the same broker.prefix?",
        )
    return replies[0]


def attest(connection: pika.BlockingConnection, settings: BrokerSettings, trust: TrustAnchors) -> AttestedEnclave:
    """Attested key exchange: fresh nonce, RPC, then every check in ``sealedsum.common.attestation``."""
    nonce = os.urandom(wire.NONCE_SIZE)
    reply = request_attestation(connection, settings, nonce)
    enclave = verify_attestation(reply, nonce, trust, int(time.time() * 1000))
    log.info("enclave attested", extra={"fields": {
        "measurement": enclave.measurement.hex(), "key_epoch": enclave.keys.epoch}})
    return enclave


@contextlib.contextmanager
def attested(settings: BrokerSettings, trust: TrustAnchors) -> Iterator[tuple[pika.BlockingConnection, AttestedEnclave]]:
    """A new connection and the enclave attested over it; the connection is closed on exit.

    :raises TransportError: the broker or the enclave cannot be reached.
    :raises AttestationError: the enclave failed a check (nothing was sent to it).
    """
    connection = connect(settings)
    try:
        yield connection, attest(connection, settings, trust)
    finally:
        if connection.is_open:
            # A close that fails (the broker went away meanwhile) must not replace the
            # attestation's outcome or error.
            with contextlib.suppress(pe.AMQPError):
                connection.close()


def wait_attestable(settings: BrokerSettings, trust: TrustAnchors, timeout: float, *,
                    alive=lambda: True) -> AttestedEnclave:
    """Attest the enclave as soon as it answers: for a sidecar that is starting up.

    :param alive: called between tries; return False to give up at once (the process died).
    :raises TransportError: no answer within ``timeout`` seconds, or ``alive()`` said no.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with attested(settings, trust) as (_, enclave):
                return enclave
        except TransportError:
            if not alive():
                raise TransportError("the sidecar exited during start-up", retryable=False) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def budget(connection: pika.BlockingConnection, settings: BrokerSettings, enclave: AttestedEnclave, stream: str):
    """Ask an attested enclave for a stream's ledger; verify its signature and our nonce.

    :returns: a :class:`sealedsum.common.results.BudgetReport`.
    :raises InvalidResultSignature: forged, altered, or answering another question.
    """
    from sealedsum.common.errors import InvalidResultSignature
    from sealedsum.common.results import BUDGET_KIND, verify_signed

    nonce = os.urandom(wire.NONCE_SIZE)
    reply = call_enclave(connection, settings, wire.BudgetRequest(nonce, stream).to_bytes(), "budget-request")
    report = verify_signed(reply, enclave, (BUDGET_KIND,))
    if report.nonce != nonce.hex() or report.stream != stream:
        raise InvalidResultSignature("the budget report answers another request (replayed?)")
    return report


def delete_topology(settings: BrokerSettings, extra_queues: tuple[str, ...] = (),
                    extra_exchanges: tuple[str, ...] = ()) -> None:
    """Delete every queue and exchange of this prefix (demos and tests clean up with it).
    Best effort: a failed delete closes only its own channel."""
    t = settings.topology
    try:
        conn = connect(settings)
    except TransportError:
        return
    try:
        for kind, names in (("queue", (*t.queues, *extra_queues)), ("exchange", (*t.exchanges, *extra_exchanges))):
            for name in names:
                ch = conn.channel()
                try:
                    ch.queue_delete(name) if kind == "queue" else ch.exchange_delete(name)
                    ch.close()
                except pe.AMQPError:
                    pass
    finally:
        if conn.is_open:
            conn.close()


@contextlib.contextmanager
def marker_queue(settings: BrokerSettings, name: str) -> Iterator[str]:
    """Hold an exclusive queue called ``name`` on the broker of ``settings.url`` (the first
    node, whatever the others) while the block runs (the broker deletes it when the
    connection closes); yield the broker's ``cluster_name`` from its connection.start, for
    messages only.

    ``sealedsum broker setup`` looks for it with rabbitmqctl: the cluster name alone cannot
    tell two nodes apart (it is configurable, and need not be the node's name).

    :raises TransportError: the broker cannot be reached, refuses the login, or refuses the queue."""
    params = parameters(settings, url=settings.url)
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.stack_timeout = 10
    try:
        conn = pika.BlockingConnection(params)
    except CONNECT_ERRORS as err:
        raise connection_error(err, settings) from err
    try:
        props = getattr(conn._impl, "server_properties", None) or {}
        cluster = props.get("cluster_name", b"")
        cluster = cluster.decode("utf-8", "replace") if isinstance(cluster, bytes) else str(cluster)
        try:
            conn.channel().queue_declare(name, exclusive=True, auto_delete=True)
        except pe.AMQPChannelError as err:
            raise TransportError(f"the broker at {redact_url(settings.url)} refused to declare a queue: {err}",
                                 retryable=False, hint="the URL must be an administrator's") from err
        yield cluster
    finally:
        if conn.is_open:
            with contextlib.suppress(pe.AMQPError):
                conn.close()


ACCESS_REFUSED_HINT = ("the broker account in AMQP_URL (or broker.url) lacks this permission: use the URL "
                       "`sealedsum broker setup` wrote for this role (sidecar, producer or consumer), and see "
                       "docs/broker-accounts.md for what each role may do")


def channel_refused(err: pe.ChannelClosedByBroker, what: str, *, hint: str | None = None) -> TransportError:
    """The error for a channel the broker closed on ``what``. A 403 is the account's
    permissions, whatever ``hint`` (for a missing object, say) suggests."""
    code = getattr(err, "reply_code", None)
    text = getattr(err, "reply_text", "") or str(err)
    return TransportError(f"{what}: {text}", retryable=False, hint=ACCESS_REFUSED_HINT if code == 403 else hint)


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """A message read from a queue: its headers (bytes values decoded), type, size and the
    broker's redelivered flag."""

    headers: dict
    type: str | None
    size: int
    redelivered: bool


def read_queue(settings: BrokerSettings, queue: str, limit: int, *, acknowledge: bool,
               idle_s: float = 2.0) -> tuple[int, list[QueuedMessage]]:
    """Read up to ``limit`` messages of ``queue`` (oldest first) without taking them, unless
    ``acknowledge``: unacknowledged, they go back to the queue when the channel closes, as the
    broker does with any consumer's unacknowledged deliveries (``redelivered`` is then set on
    them, and a quorum queue counts one more delivery in ``x-delivery-count``).

    :returns: the queue's message count when reading started, and the messages read.
    :raises TransportError: the broker cannot be reached, or refuses (a 403: the account may
        not read the queue; a 404: no such queue).
    """
    connection = connect(settings)
    out: list[QueuedMessage] = []
    try:
        channel = connection.channel()
        try:
            total = channel.queue_declare(queue, passive=True).method.message_count
            want = min(total, limit)
            if want:
                # Unacknowledged deliveries are bounded by the prefetch, which AMQP carries in 16 bits.
                channel.basic_qos(prefetch_count=min(want, MAX_PREFETCH))
                last = [0]

                def on_message(_ch, method, props, body) -> None:
                    if len(out) < want:
                        headers = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                                   for k, v in (props.headers or {}).items()}
                        out.append(QueuedMessage(headers, props.type, len(body), bool(method.redelivered)))
                        last[0] = method.delivery_tag

                tag = channel.basic_consume(queue, on_message, auto_ack=False)
                idle_until = time.monotonic() + idle_s
                while len(out) < want and time.monotonic() < idle_until:
                    seen = len(out)
                    connection.process_data_events(time_limit=0.1)
                    if len(out) > seen:
                        idle_until = time.monotonic() + idle_s
                channel.basic_cancel(tag)
                if acknowledge and last[0]:
                    channel.basic_ack(last[0], multiple=True)
            channel.close()  # what is not acknowledged goes back to the queue
        except pe.ChannelClosedByBroker as err:
            raise channel_refused(err, f"cannot read {queue}",
                                  hint="is the sidecar running with this broker.prefix? it declares the queue") from err
    except pe.AMQPConnectionError as err:
        raise TransportError(f"lost the broker connection while reading {queue}") from err
    finally:
        if connection.is_open:
            with contextlib.suppress(pe.AMQPError):
                connection.close()
    return total, out
