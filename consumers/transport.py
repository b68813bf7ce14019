"""Consumer edge: the release stream read from an offset of the consumer's own, or a
durable queue of its own bound to the results exchange for some streams; either is
re-established after broker loss."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator, NamedTuple

import pika.exceptions as pe

from sealedsum.common import amqp, topology
from sealedsum.common.attestation import AttestedEnclave, TrustAnchors
from sealedsum.common.backoff import Backoff
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError

log = logging.getLogger("sealedsum.consumer")

# Deliveries in flight from the release stream (RabbitMQ serves a stream over AMQP 0.9.1 only
# to a consumer with a prefetch, which acknowledgements move on); as many as from a queue.
PREFETCH = 16
# Finding the newest offset: how long to wait for the first message of the stream's last chunk
# (none by then: the stream is empty), and for each next one before taking the chunk as read.
TAIL_FIRST_S = 1.0
TAIL_QUIET_S = 0.3
# How long closing a connection may take before its socket is shut under it.
CLOSE_WITHIN_S = 5.0
# A reader that started at "next" and lost the broker before its first delivery subscribes again
# from the time it first subscribed, this much earlier: "next" again would skip what was
# published meanwhile. A timestamp selects whole chunks, and a chunk written just before a
# release came may hold it; the broker may start at the chunk before, so earlier releases can
# come again (verified as always: never fewer).
NEXT_MARGIN = timedelta(seconds=1)
MISSING_STREAM_HINT = ("is the sidecar running? it declares the release stream on every connect (a sidecar of a "
                       "version before the stream does not: read a durable queue with --queue instead)")


class Delivery(NamedTuple):
    body: bytes
    redelivered: bool  # the broker's flag: given to this queue before and not acknowledged
    routing_key: str  # the stream name the enclave published it under
    offset: int | None  # its offset in the release stream; None from a queue


@contextmanager
def _ctrl_c_after():
    """Hold a Ctrl-C that comes during a pika call until the call returns, then raise it.
    Raised inside pika (mid-frame), KeyboardInterrupt can leave the connection waiting for a
    frame that never comes, and the consumer did not exit. Only the main thread with Python's
    default handler is changed: an application's own handler stays as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


class _Subscription:
    """What both ways of reading releases share: the connection, attestation and budget RPCs
    on it, reconnecting and closing."""

    settings: BrokerSettings
    connection = None
    channel = None

    def _open(self, *args) -> None:
        raise NotImplementedError

    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        return amqp.attest(self.connection, self.settings, trust)

    def budget(self, enclave: AttestedEnclave, stream: str):
        return amqp.budget(self.connection, self.settings, enclave, stream)

    def _reopen(self, *args) -> None:
        try:
            self._open(*args)
        except TransportError:
            raise
        except pe.AMQPError as err:
            raise TransportError(f"resubscribing failed: {err!r}") from err

    def close(self) -> None:
        _close_quietly(self.connection)
        self.connection = self.channel = None


class ReleaseReader(_Subscription):
    """The release stream (``PREFIX.releases``, docs/protocol.md section 2), read from
    ``start``: ``"first"``, ``"next"`` or an offset, passed to the broker as the
    ``x-stream-offset`` consume argument. Reading takes nothing away from other consumers.
    After broker loss it reads on from the offset after the last one handed over (from the time
    it first subscribed, when that was ``"next"`` and nothing came yet)."""

    def __init__(self, settings: BrokerSettings, start: str | int) -> None:
        self.settings = settings
        self.start = start
        self.queue = settings.topology.releases_stream
        self.backoff = Backoff(settings.reconnect_seconds)
        self.connection = None
        self.channel = None
        self._pending: deque[tuple[int, Delivery]] = deque()
        self._since = datetime.now(timezone.utc) - NEXT_MARGIN
        self._open(start)

    def _resume_point(self) -> str | int | datetime:
        return self._since if self.start == "next" else self.start

    def _open(self, start: str | int) -> None:
        self.close()
        self._pending.clear()
        self.connection = amqp.connect(self.settings)
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=PREFETCH)
        try:
            self.channel.basic_consume(self.queue, self._deliver, arguments={"x-stream-offset": start})
        except pe.ChannelClosedByBroker as err:
            self.close()
            raise amqp.channel_refused(err, f"cannot read the release stream {self.queue!r}",
                                       hint=MISSING_STREAM_HINT) from err

    def _deliver(self, _channel, method, props, body: bytes) -> None:
        offset = (props.headers or {}).get("x-stream-offset")
        self._pending.append((method.delivery_tag, Delivery(body, bool(method.redelivered), method.routing_key,
                                                            offset if isinstance(offset, int) else None)))

    def bodies(self, *, idle_timeout: float | None = None) -> Iterator[Delivery]:
        """Yield the stream's messages in offset order, each acknowledged (which only moves
        the prefetch on: a stream keeps what it was given) once the caller asks for the next
        one. Stops after ``idle_timeout`` seconds without a message, if given."""
        last = time.monotonic()
        unacked = None
        try:
            while True:
                try:
                    if not self._pending:
                        with _ctrl_c_after():
                            self.connection.process_data_events(time_limit=0.5)
                        if not self._pending:
                            if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                                return
                            continue
                    unacked, delivery = self._pending.popleft()
                    last = time.monotonic()
                    if delivery.offset is not None:
                        self.start = delivery.offset + 1  # where a reconnect reads on: it is handed over
                    yield delivery
                    with _ctrl_c_after():
                        self.channel.basic_ack(unacked)
                    unacked = None
                except (pe.AMQPConnectionError, pe.ChannelWrongStateError) as err:
                    unacked = None
                    log.warning("lost the broker while reading releases; reconnecting",
                                extra={"fields": {"error": repr(err), "offset": self.start}})
                    self.backoff.retry(lambda: self._reopen(self._resume_point()), lambda: None, "resubscribe")
                    last = time.monotonic()
        finally:
            # A caller that reads one release at a time must not stall at the prefetch limit.
            if unacked is not None and self.channel is not None and self.channel.is_open:
                try:
                    self.channel.basic_ack(unacked)
                except pe.AMQPError:
                    pass

    def refuse_last(self) -> None:
        """Nothing to do: a stream keeps every message, and the refused one was not admitted,
        so a later run that resumes after what memory admitted reads it (and refuses it) again."""



def _close_quietly(connection, within: float = CLOSE_WITHIN_S) -> None:
    if connection is None or not connection.is_open:
        return
    # Closing cancels the consumer, and pika rejects what it still holds; a stream answers a
    # reject by closing the connection (540 NOT_IMPLEMENTED), which pika logs as an error.
    # It is the way out either way: keep pika's log of it off the user's terminal.
    pika_log = logging.getLogger("pika")
    level = pika_log.level
    pika_log.setLevel(logging.CRITICAL)
    # A Ctrl-C that landed inside pika can leave it waiting for a frame that never comes:
    # past ``within`` the socket is shut, which ends any wait (the process is leaving anyway).
    sock = getattr(getattr(getattr(connection, "_impl", None), "_transport", None), "_sock", None)
    watchdog = threading.Timer(within, _shut, args=(sock,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.close()
    except (pe.AMQPError, OSError, ValueError):
        pass
    finally:
        watchdog.cancel()
        pika_log.setLevel(level)


def _shut(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except (OSError, AttributeError):
        pass


def stream_tail(settings: BrokerSettings) -> int | None:
    """The offset of the newest message in the release stream now, or ``None`` when it is empty.

    The broker's own ``last`` is the first message of the last chunk, which may hold many;
    this reads that chunk (on a connection of its own, acknowledging as it goes, so the
    prefetch does not cut the chunk short) and takes the highest offset in it."""
    connection = amqp.connect(settings)
    newest: list[int] = []

    def seen(channel, method, props, _body) -> None:
        offset = (props.headers or {}).get("x-stream-offset")
        if isinstance(offset, int):
            newest.append(offset)
        channel.basic_ack(method.delivery_tag)

    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=PREFETCH)
        try:
            channel.basic_consume(settings.topology.releases_stream, seen, arguments={"x-stream-offset": "last"})
        except pe.ChannelClosedByBroker as err:
            raise amqp.channel_refused(err, f"cannot read the release stream {settings.topology.releases_stream!r}",
                                       hint=MISSING_STREAM_HINT) from err
        deadline = time.monotonic() + TAIL_FIRST_S
        count = 0
        while time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.05)
            if len(newest) > count:
                count, deadline = len(newest), time.monotonic() + TAIL_QUIET_S
        return max(newest, default=None)
    finally:
        _close_quietly(connection)


class ResultSubscriber(_Subscription):
    """A durable named queue (keeps releases while the consumer is away), for clients that
    do not read the release stream. While no queue takes a stream's releases (neither the
    release stream nor a consumer's queue) the enclave holds them, so a reconnecting
    consumer still gets them."""

    def __init__(self, settings: BrokerSettings, streams: tuple[str, ...], *, queue: str) -> None:
        self.settings = settings
        self.streams = streams
        self.named_queue = queue
        self.backoff = Backoff(settings.reconnect_seconds)
        self.connection = None
        self.channel = None
        self._refused = False
        self._open()

    def _open(self) -> None:
        self.close()
        self.connection = amqp.connect(self.settings)
        self.channel = self.connection.channel()
        t = self.settings.topology
        try:
            self.queue = self.channel.queue_declare(self.named_queue, durable=True).method.queue
            for stream in self.streams:
                self.channel.queue_bind(self.queue, t.results_exchange, routing_key=topology.result_routing_key(stream))
        except pe.ChannelClosedByBroker as err:
            self.close()
            raise amqp.channel_refused(err, "cannot subscribe to results",
                                       hint="is the sidecar running? it declares the results exchange") from err
        self.channel.basic_qos(prefetch_count=16)

    def bodies(self, *, idle_timeout: float | None = None) -> Iterator[Delivery]:
        """Yield result bodies, each with the broker's ``redelivered`` flag (it gave the message
        to a consumer of this queue before, which did not acknowledge it), acknowledged once the
        caller asks for the next one. Stops after ``idle_timeout`` seconds without a message, if
        given. Reconnects after broker loss within ``reconnect_seconds``."""
        last = time.monotonic()
        unacked = None
        self._refused = False
        try:
            while True:
                try:
                    deliveries = self.channel.consume(self.queue, inactivity_timeout=0.5)
                    while True:
                        with _ctrl_c_after():
                            item = next(deliveries, None)
                        if item is None:  # the broker cancelled the consumer
                            return
                        method, _props, body = item
                        if method is None:
                            if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                                return
                            continue
                        last = time.monotonic()
                        unacked = method.delivery_tag
                        yield Delivery(body, bool(method.redelivered), method.routing_key, None)
                        with _ctrl_c_after():
                            self.channel.basic_ack(unacked)
                        unacked = None
                except (pe.AMQPConnectionError, pe.ChannelWrongStateError) as err:
                    unacked = None  # the broker redelivers it on the new channel
                    log.warning("lost the broker while consuming; reconnecting", extra={"fields": {"error": repr(err)}})
                    self.backoff.retry(self._reopen, lambda: None, "resubscribe")
                    last = time.monotonic()
        finally:
            # A caller that stops after a message has taken it: acknowledge it, or a
            # consumer that reads one release at a time would stall at the prefetch limit.
            if unacked is not None and not self._refused and self.channel is not None and self.channel.is_open:
                try:
                    self.channel.basic_ack(unacked)
                    self.channel.cancel()
                except pe.AMQPError:
                    pass

    def refuse_last(self) -> None:
        """The caller refuses the body it was given last and stops: leave it unacknowledged, so
        that the broker gives it back when the connection closes (a durable queue keeps it for
        the next run, which refuses it again) instead of taking it as read."""
        self._refused = True


