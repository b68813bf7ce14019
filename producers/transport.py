"""Producer edge: pika, pipelined publisher confirms, persistence, reconnecting after broker loss.

:class:`RecordPublisher` publishes sealed records on a confirm-mode channel of a
``pika.SelectConnection`` driven by its own I/O thread, with up to ``max_unconfirmed``
records awaiting their confirms at once (pika's ``BlockingChannel`` can only wait for one
confirm at a time: a round trip per record). Each record gets a :class:`Ticket` that
resolves once, to *confirmed* (the broker took it) or to a :class:`TransportError`:

- **nack** (the broker refused it, e.g. the records queue is at ``max_queued_records``):
  the record is published again after a capped exponential backoff; it stays
  outstanding meanwhile, so the pipeline fills and :meth:`RecordPublisher.submit` blocks
  (back-pressure). After ``reconnect_seconds`` of nacks it fails.
- **returned** (``mandatory`` and no queue bound, e.g. no sidecar yet): fails at once with
  :class:`Unroutable`, not retried.
- **connection lost**: the I/O thread reconnects with backoff and publishes every
  unconfirmed record again, in order, on the new channel (a record the broker had
  stored before the loss arrives twice; the enclave counts it once, by record id).
  Records still unconfirmed ``reconnect_seconds`` after their trouble began fail.

A failed record's error is raised once, by the next :meth:`~RecordPublisher.submit`,
:meth:`~RecordPublisher.flush` or :meth:`~RecordPublisher.publish`; the ticket keeps it.
Attestation RPCs use a short-lived ``BlockingConnection`` of their own.

**Notices.** After :meth:`~RecordPublisher.listen`, every connection of the I/O thread also
opens a second channel with a server-named, exclusive, auto-delete queue bound to
``PREFIX.announce`` and keeps what arrives there (the enclave's signed key-rotation notices;
unverified here, see :meth:`~RecordPublisher.take_notices`). :attr:`~RecordPublisher.sessions`
counts the connections on which that is in place (or failed, e.g. an account without the
permission): when it moves, the broker connection was lost and notices sent meanwhile may be
lost with it, so the producer attests again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import pika
import pika.exceptions as pe
from pika.adapters.select_connection import IOLoop

from sealedsum.common import amqp, topology, wire
from sealedsum.common.attestation import AttestedEnclave, TrustAnchors
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError, Unroutable

log = logging.getLogger("sealedsum.producer")

DEFAULT_MAX_UNCONFIRMED = 256  # records awaiting a confirm at once
FIRST_RETRY_S, MAX_RETRY_S = 0.5, 5.0  # as sealedsum.common.amqp.Backoff
TICK_S = 0.1  # how often the I/O thread looks at deadlines and retries

NACK_HINT = ("the records queue may be full (broker.max_queued_records): is the sidecar "
             "running and keeping up?")
UNROUTABLE_HINT = "is the sidecar running? it declares the queues"

PENDING, CONFIRMED, FAILED = "pending", "confirmed", "failed"


class Ticket:
    """One record's way through the broker: ``state`` is pending, confirmed or failed."""

    __slots__ = ("body", "kind", "state", "error", "trouble_since", "retry_at", "retry_delay", "reported", "nacks",
                 "in_flight")

    def __init__(self, body: bytes, kind: str = wire.RECORD_TYPE) -> None:
        self.body = body
        self.kind = kind  # the AMQP type: one sealed record, or a record batch
        self.state = PENDING
        self.error: TransportError | None = None
        self.trouble_since: float | None = None  # first nack or connection loss while pending
        self.retry_at = 0.0
        self.retry_delay = FIRST_RETRY_S
        self.reported = False
        self.nacks = 0
        self.in_flight = False  # published on the current channel, confirm not yet in

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def confirmed(self) -> bool:
        return self.state == CONFIRMED

    def __repr__(self) -> str:
        return f"Ticket({self.state}, {len(self.body)} bytes)"


class RecordPublisher:
    """Publishes sealed records with pipelined publisher confirms (see the module docstring).

    :param max_unconfirmed: records awaiting a confirm at once (the pipeline's depth); :meth:`submit`
        blocks while that many are.
    """

    def __init__(self, settings: BrokerSettings, *, max_unconfirmed: int = DEFAULT_MAX_UNCONFIRMED) -> None:
        if max_unconfirmed < 1:
            raise ValueError("max_unconfirmed must be at least 1")
        self.settings = settings
        self.max_unconfirmed = max_unconfirmed
        self._cond = threading.Condition()
        # Guarded by _cond: every ticket not yet resolved (in submit order), those not yet
        # handed to the I/O thread, and failures the caller has not been told about.
        self._outstanding: dict[int, Ticket] = {}
        self._queued: deque[Ticket] = deque()
        self._unreported: deque[Ticket] = deque()
        self._closed = False
        self._wake_pending = False
        self.confirmed = 0
        self.failed = 0
        # Owned by the I/O thread.
        self._ioloop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._connection = None
        self._channel = None
        self._ready = False  # channel open and in confirm mode
        self._connecting = False
        self._by_tag: dict[int, Ticket] = {}
        self._next_tag = 1
        self._retry: list[Ticket] = []  # nacked, waiting for their retry time
        self._returned: set[bytes] = set()
        self._down_since: float | None = None
        self._reconnect_delay = FIRST_RETRY_S
        self._reconnect_at = 0.0
        self._fatal: TransportError | None = None  # connection refused for good (bad login)
        self.reconnects = 0
        self.republished = 0  # records published again after a connection loss
        # Notices (see the module docstring). _notices and sessions are guarded by _cond.
        self._listen = False
        self._notices: deque[bytes] = deque(maxlen=64)
        self.sessions = 0
        self._announce_channel = None  # I/O thread
        self._announce_refused_logged = False

    # -- notices from the enclave ----------------------------------------------------------------
    def listen(self, timeout: float) -> bool:
        """Keep a queue bound to ``PREFIX.announce`` on every connection from now on (and keep
        connected while idle, so as not to miss notices). Waits up to ``timeout`` s for the
        first binding; returns whether the producer is listening now."""
        with self._cond:
            if self._closed:
                raise TransportError("the publisher is closed", retryable=False)
            start = self.sessions
            self._listen = True
            started = self._thread is not None
            self._start()
        if started:
            self._ioloop.add_callback_threadsafe(self._open_announce)
        deadline = time.monotonic() + timeout
        with self._cond:
            # Not past a failed connection attempt: attestation then fails at once, as before.
            while self.sessions == start and self._fatal is None and not self._closed \
                    and self._down_since is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 1.0))
            return self._announce_channel is not None and self.sessions > start

    def take_notices(self) -> list[bytes]:
        """The notice bodies received since the last call, oldest first, as they came: they
        are not verified yet (anyone able to publish to the exchange could have sent them)."""
        with self._cond:
            out = list(self._notices)
            self._notices.clear()
            return out

    def _open_announce(self) -> None:
        conn = self._connection
        if self._listen and self._announce_channel is None and conn is not None and conn.is_open:
            conn.channel(on_open_callback=self._on_announce_channel)

    def _on_announce_channel(self, channel) -> None:
        self._announce_channel = channel
        channel.add_on_close_callback(self._on_announce_closed)
        exchange = self.settings.topology.announce_exchange

        def declared(frame) -> None:
            queue = frame.method.queue
            channel.queue_bind(queue, exchange, callback=lambda _f: channel.basic_consume(
                queue, self._on_notice, auto_ack=True, callback=self._on_announce_consuming))

        # Server-named (amq.gen-*: all a producer account may declare), gone with the connection.
        channel.queue_declare("", exclusive=True, auto_delete=True, callback=declared)

    def _on_announce_consuming(self, _frame) -> None:
        log.debug("listening for enclave notices", extra={"fields": {
            "exchange": self.settings.topology.announce_exchange}})
        self._new_session()

    def _on_announce_closed(self, channel, err) -> None:
        if channel is not self._announce_channel:
            return
        self._announce_channel = None
        if isinstance(err, pe.ChannelClosedByBroker) and not self._closed:
            # No permission (an account from before PREFIX.announce existed) or no exchange (an
            # older sidecar): publish anyway, and attest only every producer.reattest_seconds.
            if not self._announce_refused_logged:
                self._announce_refused_logged = True
                log.warning("cannot listen for key-rotation notices; falling back to periodic "
                            "re-attestation", extra={"fields": {
                                "exchange": self.settings.topology.announce_exchange, "error": str(err),
                                "hint": "run `sealedsum broker setup` again, and a sidecar that declares it"}})
            self._new_session()  # this connection's view is as good as it gets

    def _on_notice(self, _channel, _method, _props, body: bytes) -> None:
        with self._cond:
            self._notices.append(body)

    def _new_session(self) -> None:
        with self._cond:
            self.sessions += 1
            self._cond.notify_all()

    # -- attestation (its own short-lived blocking connection) ------------------------------
    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        connection = amqp.connect(self.settings)
        try:
            return amqp.attest(connection, self.settings, trust)
        finally:
            try:
                connection.close()
            except pe.AMQPError:
                pass

    # -- the caller's side ----------------------------------------------------------------------
    def submit(self, body: bytes, timeout: float | None = None, kind: str = wire.RECORD_TYPE) -> Ticket:
        """Hand a record (or, with ``kind`` records, a record batch) to the I/O thread; return
        its ticket without waiting for the confirm.

        Blocks while ``max_unconfirmed`` records await confirms.

        :raises TransportError: an earlier record failed (raised once per failure), or no
            room opened up within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._raise_unreported()
            self._start()
            while len(self._outstanding) >= self.max_unconfirmed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(
                        f"no confirms for {self.max_unconfirmed} outstanding records within {timeout} s")
                self._cond.wait(remaining if remaining is not None else 1.0)
                self._raise_unreported()
            if self._closed:
                raise TransportError("the publisher is closed", retryable=False)
            ticket = Ticket(body, kind)
            self._outstanding[id(ticket)] = ticket
            self._queued.append(ticket)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._ioloop.add_callback_threadsafe(self._pump)
        return ticket

    def wait(self, ticket: Ticket, timeout: float | None = None) -> None:
        """Wait until ``ticket`` is resolved; raise its error if it failed (marking it reported)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not ticket.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"no confirm within {timeout} s")
                self._cond.wait(remaining if remaining is not None else 1.0)
            if ticket.state == FAILED:
                if not ticket.reported:
                    ticket.reported = True
                    try:
                        self._unreported.remove(ticket)
                    except ValueError:
                        pass
                raise ticket.error

    def publish(self, body: bytes) -> None:
        """Publish one record and return once the broker confirmed it."""
        self.wait(self.submit(body))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted record is resolved.

        :raises TransportError: the first failure not raised before (the others stay on
            their tickets and are raised by the following calls).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"{len(self._outstanding)} records still unconfirmed after {timeout} s")
                self._cond.wait(remaining if remaining is not None else 1.0)
            self._raise_unreported()

    @property
    def outstanding(self) -> int:
        with self._cond:
            return len(self._outstanding)

    def close(self) -> None:
        """Stop the I/O thread. Records still unconfirmed fail (call :meth:`flush` first)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        if self._ioloop is not None and self._thread is not None and self._thread.is_alive():
            self._ioloop.add_callback_threadsafe(self._shutdown)
            self._thread.join(timeout=10)
        with self._cond:
            for ticket in list(self._outstanding.values()):
                self._resolve(ticket, TransportError("the publisher was closed before the broker confirmed"))
            self._unreported.clear()
            self._cond.notify_all()

    def _raise_unreported(self) -> None:
        # caller holds _cond
        if self._unreported:
            ticket = self._unreported.popleft()
            ticket.reported = True
            raise ticket.error

    def _start(self) -> None:
        # caller holds _cond
        if self._thread is None:
            self._ioloop = IOLoop()
            self._thread = threading.Thread(target=self._run, name="sealedsum-publisher", daemon=True)
            self._thread.start()

    def _resolve(self, ticket: Ticket, error: TransportError | None) -> None:
        # caller holds _cond
        if ticket.done:
            return
        self._outstanding.pop(id(ticket), None)
        if error is None:
            ticket.state = CONFIRMED
            self.confirmed += 1
        else:
            ticket.state, ticket.error = FAILED, error
            self.failed += 1
            self._unreported.append(ticket)

    # -- the I/O thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        ioloop = self._ioloop
        ioloop.call_later(0, self._connect)
        ioloop.call_later(TICK_S, self._tick)
        try:
            ioloop.start()
        except Exception as err:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            log.error("publisher I/O thread failed", extra={"fields": {"error": repr(err)}})
            with self._cond:
                for ticket in list(self._outstanding.values()):
                    self._resolve(ticket, TransportError(f"publisher I/O thread failed: {err!r}", retryable=False))
                self._closed = True
                self._cond.notify_all()
        finally:
            try:
                ioloop.close()
            except Exception:  # noqa: BLE001
                pass

    def _shutdown(self) -> None:
        conn = self._connection
        self._ready = False
        if conn is not None and not (conn.is_closed or conn.is_closing):
            try:
                conn.close()
            except pe.AMQPError:
                pass
        # Stop once the close went out (or at once if nothing is open).
        self._ioloop.call_later(0.05 if conn is not None else 0, self._ioloop.stop)

    def _connect(self) -> None:
        if self._closed or self._connecting or self._connection is not None:
            return
        self._connecting = True
        try:
            pika.SelectConnection(amqp.parameters(self.settings), on_open_callback=self._on_open,
                                  on_open_error_callback=self._on_open_error,
                                  on_close_callback=self._on_closed, custom_ioloop=self._ioloop)
        except Exception as err:  # noqa: BLE001 - e.g. a bad URL
            self._connecting = False
            self._lost(amqp.connection_error(err, self.settings))

    def _on_open(self, connection) -> None:
        self._connecting = False
        self._connection = connection
        connection.channel(on_open_callback=self._on_channel)
        if self._listen:
            self._open_announce()
        else:
            self._new_session()

    def _on_channel(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self._ready = True
        self._by_tag.clear()
        self._next_tag = 1
        self._returned.clear()
        if self._down_since is not None:
            self.reconnects += 1
            log.info("broker connection back; publishing the unconfirmed records again",
                     extra={"fields": {"down_s": round(time.monotonic() - self._down_since, 2)}})
        self._down_since = None
        self._reconnect_delay = FIRST_RETRY_S
        with self._cond:
            for ticket in self._outstanding.values():
                ticket.trouble_since = None if ticket.nacks == 0 else ticket.trouble_since
        self._pump()

    def _on_open_error(self, _connection, err) -> None:
        self._connecting = False
        self._connection = None
        self._lost(amqp.connection_error(err, self.settings))

    def _on_closed(self, _connection, err) -> None:
        self._connection = self._channel = self._announce_channel = None
        self._ready = False
        if self._closed:
            return
        self._lost(TransportError(f"lost the broker connection while publishing ({type(err).__name__})"))

    def _on_channel_closed(self, channel, err) -> None:
        if channel is not self._channel:
            return
        self._ready = False
        self._channel = None
        if self._closed:
            return
        conn = self._connection
        if isinstance(err, pe.ChannelClosedByBroker):
            error = TransportError(f"channel error: {err}", retryable=False)
            with self._cond:  # what was in flight on it may or may not have been stored: fail it
                for ticket in list(self._by_tag.values()):
                    ticket.in_flight = False
                    self._resolve(ticket, error)
                self._cond.notify_all()
            self._by_tag.clear()
        if conn is not None and not (conn.is_closed or conn.is_closing):
            conn.close()  # _on_closed reconnects and publishes the rest again

    def _lost(self, error: TransportError) -> None:
        """The connection is down: requeue what was in flight, schedule a reconnect."""
        self._ready = False
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("broker unavailable; retrying", extra={"fields": {
                "operation": "publish records", "error": str(error), "retry_in_s": self._reconnect_delay}})
        in_flight = list(self._by_tag.values())
        self._by_tag.clear()
        for ticket in in_flight:
            ticket.in_flight = False
        self.republished += sum(1 for t in in_flight if not t.done)
        with self._cond:
            if not error.retryable:
                self._fatal = error
            self._requeue(in_flight, now)
            for ticket in self._outstanding.values():
                if ticket.trouble_since is None:
                    ticket.trouble_since = now
                ticket.error = error  # what it fails with if the budget runs out
            self._expire(now)
            self._cond.notify_all()
        self._reconnect_at = now + self._reconnect_delay
        self._reconnect_delay = min(self._reconnect_delay * 2, MAX_RETRY_S)

    def _requeue(self, tickets: list[Ticket], now: float) -> None:
        # caller holds _cond; in flight first, in publish order, before what was never sent
        pending = [t for t in tickets if not t.done]
        self._queued.extendleft(reversed(pending))

    def _expire(self, now: float) -> None:
        # caller holds _cond
        budget = self.settings.reconnect_seconds
        for ticket in list(self._outstanding.values()):
            if self._fatal is not None:
                self._resolve(ticket, self._fatal)
            elif ticket.trouble_since is not None and now - ticket.trouble_since >= budget \
                    and not ticket.in_flight:
                self._resolve(ticket, ticket.error or TransportError("the broker did not confirm in time"))
        if self._fatal is not None or budget <= 0:
            self._queued = deque(t for t in self._queued if not t.done)
            self._retry = [t for t in self._retry if not t.done]

    def _tick(self) -> None:
        if self._closed:
            return
        now = time.monotonic()
        with self._cond:
            if self._retry:
                due = [t for t in self._retry if t.retry_at <= now]
                if due:
                    self._retry = [t for t in self._retry if t.retry_at > now]
                    self._queued.extend(t for t in due if not t.done)
            if self._down_since is not None:
                for ticket in self._outstanding.values():  # submitted while the broker is away
                    if ticket.trouble_since is None:
                        ticket.trouble_since = now
            if self._down_since is not None or self._retry:
                self._expire(now)
                self._queued = deque(t for t in self._queued if not t.done)
                self._retry = [t for t in self._retry if not t.done]
            self._cond.notify_all()
            want_connection = bool(self._outstanding) or self._listen
        if self._connection is None and not self._connecting and want_connection and self._fatal is None \
                and now >= self._reconnect_at:
            self._connect()
        self._pump()
        self._ioloop.call_later(TICK_S, self._tick)

    def _pump(self) -> None:
        """Publish what is queued (I/O thread)."""
        with self._cond:
            self._wake_pending = False
            if self._fatal is not None:
                self._expire(time.monotonic())
                self._cond.notify_all()
                return
            if not self._ready:
                if self._connection is None and not self._connecting and self._queued \
                        and time.monotonic() >= self._reconnect_at:
                    self._ioloop.call_later(0, self._connect)
                return
            batch = [t for t in self._queued if not t.done]
            self._queued.clear()
        channel, exchange = self._channel, self.settings.topology.records_exchange
        props = {kind: amqp.properties(kind) for kind in (wire.RECORD_TYPE, wire.RECORD_BATCH_TYPE)}
        for i, ticket in enumerate(batch):
            try:
                # No message id or stream in the properties: the broker sees only the sealed box.
                channel.basic_publish(exchange, topology.RECORD_ROUTING_KEY, ticket.body, props[ticket.kind],
                                      mandatory=True)
            except Exception as err:  # noqa: BLE001 - channel or connection closing under us
                with self._cond:
                    self._queued.extendleft(reversed(batch[i:]))
                log.info("publish interrupted", extra={"fields": {"error": repr(err)}})
                return
            ticket.in_flight = True
            self._by_tag[self._next_tag] = ticket
            self._next_tag += 1

    def _on_return(self, _channel, method, _props, body: bytes) -> None:
        # The broker returns a mandatory message before it confirms it; the confirm resolves it.
        self._returned.add(body)

    def _on_confirm(self, frame) -> None:
        method = frame.method
        tag, multiple = method.delivery_tag, method.multiple
        nack = isinstance(method, pika.spec.Basic.Nack)
        if multiple:
            tickets = []
            while self._by_tag:
                first = next(iter(self._by_tag))
                if first > tag:
                    break
                tickets.append(self._by_tag.pop(first))
        else:
            t = self._by_tag.pop(tag, None)
            tickets = [t] if t is not None else []
        now = time.monotonic()
        with self._cond:
            for ticket in tickets:
                ticket.in_flight = False
                if ticket.done:
                    continue
                if nack:
                    ticket.nacks += 1
                    if ticket.trouble_since is None:
                        ticket.trouble_since = now
                    ticket.error = TransportError("the broker refused the message (nack)", hint=NACK_HINT)
                    if now - ticket.trouble_since + ticket.retry_delay > self.settings.reconnect_seconds:
                        self._resolve(ticket, ticket.error)
                        continue
                    if not self._retry:  # once per episode, not per record
                        log.warning("broker refused a record (nack); retrying", extra={"fields": {
                            "operation": "publish record", "retry_in_s": ticket.retry_delay}})
                    ticket.retry_at = now + ticket.retry_delay
                    ticket.retry_delay = min(ticket.retry_delay * 2, MAX_RETRY_S)
                    self._retry.append(ticket)
                elif self._returned and ticket.body in self._returned:
                    self._returned.discard(ticket.body)
                    exchange = self.settings.topology.records_exchange
                    self._resolve(ticket, Unroutable(
                        f"no queue takes messages sent to {exchange} with key {topology.RECORD_ROUTING_KEY!r}",
                        retryable=False, hint=UNROUTABLE_HINT))
                else:
                    self._resolve(ticket, None)
            self._cond.notify_all()
