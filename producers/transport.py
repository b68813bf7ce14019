"""Producer edge: pika, pipelined publisher confirms, persistence, reconnecting after broker loss.

This is the only producer module that imports pika. Three pieces, composed by
:class:`RecordPublisher`:

- :class:`~sealedsum.producers.confirms.ConfirmPipeline` (no pika; ``producers/confirms.py``)
  keeps the books of the records awaiting confirms, up to ``max_unconfirmed`` at once, and says
  what becomes of each on a nack, a return or a lost connection.
- :class:`ConnectionDriver` runs a ``pika.SelectConnection`` on its own I/O thread with a
  confirm-mode channel (pika's ``BlockingChannel`` can only wait for one confirm at a time: a
  round trip per record), publishes what the pipeline has queued, tells it what the broker
  answered, and after broker loss reconnects with the waits of ``common.backoff.Backoff``, for as
  long as records are outstanding or notices are listened for.
- :class:`AnnounceListener`: after :meth:`RecordPublisher.listen`, every connection of the I/O
  thread also opens a second channel with a server-named, exclusive, auto-delete queue bound
  to ``PREFIX.announce`` and keeps what arrives there (the enclave's signed key-rotation
  notices; unverified here, see :meth:`~RecordPublisher.take_notices`). With a notice token,
  the same queue is also bound to ``PREFIX.notices`` with the token as routing key, and every
  record message carries the token in the ``x-sealedsum-notify`` header: the enclave's signed
  notices about those records arrive there too (:meth:`~RecordPublisher.take_record_notices`).
  :attr:`~RecordPublisher.sessions` counts the connections on which that is in place (or
  failed, e.g. an account without the permission): when it moves, the broker connection was
  lost and notices sent meanwhile may be lost with it, so the producer attests again.

Attestation RPCs use a short-lived ``BlockingConnection`` of their own (``common.amqp.attested``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import pika
import pika.exceptions as pe
from pika.adapters.select_connection import IOLoop

from sealedsum.common import amqp, topology, wire
from sealedsum.common.attestation import AttestedEnclave, TrustAnchors
from sealedsum.common.backoff import Backoff
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError
from sealedsum.producers.confirms import ConfirmPipeline, Ticket

log = logging.getLogger("sealedsum.producer")

DEFAULT_MAX_UNCONFIRMED = 256  # records awaiting a confirm at once
TICK_S = 0.1  # how often the I/O thread looks at deadlines and retries
# Notices about records kept until the producer reads them: one per rejected record and one
# receipt per flush of the enclave, so a long run that is not read meanwhile can pile up.
MAX_RECORD_NOTICES = 1_000_000


class AnnounceListener:
    """A queue of this producer's own on ``PREFIX.announce``, opened again on every connection
    once :meth:`want` was called (see the module docstring).

    :meth:`want`, :meth:`take_notices` and :attr:`sessions` are for any thread (guarded by the
    publisher's ``cond``); the rest runs on the I/O thread.
    """

    def __init__(self, exchange: str, cond: threading.Condition, closed: Callable[[], bool],
                 notices_exchange: str | None = None, token: str | None = None) -> None:
        self.exchange = exchange
        self.notices_exchange = notices_exchange
        self.token = token
        self._cond = cond
        self._closed = closed
        self.wanted = False
        self._notices: deque[bytes] = deque(maxlen=64)
        self._record_notices: deque[bytes] = deque(maxlen=MAX_RECORD_NOTICES)
        self.sessions = 0
        # Whether the current connection's queue is bound to the notices exchange (any thread, under cond).
        self.hearing_records = False
        self._channel = None  # I/O thread
        self._connection = None  # I/O thread
        self._binding_notices = False  # I/O thread: a refusal now is the notices binding's
        self._hearing_next = False  # I/O thread: the channel being set up binds the notices exchange
        self._notices_refused = False  # this account or sidecar does not offer them: stop asking
        self._refused_logged = False

    def want(self) -> int:
        """Listen on every connection from now on; return :attr:`sessions` so far."""
        with self._cond:
            self.wanted = True
            return self.sessions

    @property
    def listening(self) -> bool:
        return self._channel is not None

    def take_notices(self) -> list[bytes]:
        with self._cond:
            out = list(self._notices)
            self._notices.clear()
            return out

    def take_record_notices(self) -> list[bytes]:
        with self._cond:
            out = list(self._record_notices)
            self._record_notices.clear()
            return out

    def wait_record_notices(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for a notice about records; whether one is there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._record_notices:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- the I/O thread --------------------------------------------------------------------------
    def on_connection(self, connection) -> None:
        """A new connection is open: listen on it, or (not listening) just count it."""
        if self.wanted:
            self.open(connection)
        else:
            self._new_session()

    def on_connection_closed(self) -> None:
        self._channel = self._connection = None
        self._set_hearing(False)

    def open(self, connection) -> None:
        if self.wanted and self._channel is None and connection is not None and connection.is_open:
            self._connection = connection
            connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        hear_records = self.token is not None and self.notices_exchange is not None and not self._notices_refused

        def consume(_frame=None) -> None:
            self._binding_notices = False
            channel.queue_bind(queue, self.exchange, callback=lambda _f: channel.basic_consume(
                queue, self._on_notice, auto_ack=True, callback=self._on_consuming))

        def declared(frame) -> None:
            nonlocal queue
            queue = frame.method.queue
            if hear_records:
                # First: refused (an account or a sidecar from before notices), it closes the
                # channel, and the next one listens for key rotations without it.
                self._binding_notices = True
                channel.queue_bind(queue, self.notices_exchange, routing_key=self.token, callback=consume)
            else:
                consume()

        queue = ""
        self._hearing_next = hear_records
        # Server-named (amq.gen-*: all a producer account may declare), gone with the connection.
        channel.queue_declare("", exclusive=True, auto_delete=True, callback=declared)

    def _on_consuming(self, _frame) -> None:
        log.debug("listening for enclave notices", extra={"fields": {
            "exchange": self.exchange, "notices_exchange": self.notices_exchange if self._hearing_next else None}})
        self._set_hearing(self._hearing_next)
        self._new_session()

    def _set_hearing(self, value: bool) -> None:
        with self._cond:
            self.hearing_records = value
            self._cond.notify_all()

    def _on_channel_closed(self, channel, err) -> None:
        if channel is not self._channel:
            return
        self._channel = None
        self._set_hearing(False)
        if self._binding_notices and isinstance(err, pe.ChannelClosedByBroker) and not self._closed():
            self._binding_notices = False
            self._notices_refused = True
            log.warning("cannot listen for notices about this producer's records; it will not learn which the "
                        "enclave rejects", extra={"fields": {
                            "exchange": self.notices_exchange, "error": str(err),
                            "hint": "run `sealedsum broker setup` again, and a sidecar that declares it"}})
            self.open(self._connection)  # key-rotation notices still
            return
        if isinstance(err, pe.ChannelClosedByBroker) and not self._closed():
            # No permission (an account from before PREFIX.announce existed) or no exchange (an
            # older sidecar): publish anyway, and attest only every producer.reattest_seconds.
            if not self._refused_logged:
                self._refused_logged = True
                log.warning("cannot listen for key-rotation notices; falling back to periodic "
                            "re-attestation", extra={"fields": {
                                "exchange": self.exchange, "error": str(err),
                                "hint": "run `sealedsum broker setup` again, and a sidecar that declares it"}})
            self._new_session()  # this connection's view is as good as it gets

    def _on_notice(self, _channel, method, _props, body: bytes) -> None:
        with self._cond:
            if self.notices_exchange is not None and method.exchange == self.notices_exchange:
                self._record_notices.append(body)
            else:
                self._notices.append(body)
            self._cond.notify_all()

    def _new_session(self) -> None:
        with self._cond:
            self.sessions += 1
            self._cond.notify_all()


class ConnectionDriver:
    """The I/O thread: one ``SelectConnection`` at a time with a confirm-mode channel, the
    pipeline's records published on it, and a new connection after each loss.

    A lost connection is opened again after the waits of ``backoff`` (starting again from the
    first once a channel is ready), while records are outstanding or the listener wants notices;
    an error that waiting cannot fix (a refused login) stops it for good.
    """

    def __init__(self, settings: BrokerSettings, backoff: Backoff, pipeline: ConfirmPipeline,
                 listener: AnnounceListener, headers: dict | None = None) -> None:
        self.settings = settings
        self._headers = headers
        self._backoff = backoff
        self._pipeline = pipeline
        self._listener = listener
        self._start_lock = threading.Lock()
        self._ioloop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        # Owned by the I/O thread.
        self._connection = None
        self._channel = None
        self._ready = False  # channel open and in confirm mode
        self._connecting = False
        self.down_since: float | None = None  # the broker went away (or never answered) then
        self._reconnect_delays = backoff.delays()
        self._reconnect_at = 0.0
        self.reconnects = 0

    # -- any thread ----------------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the I/O thread unless it runs; return whether it was running already."""
        if self._thread is not None:
            return True
        with self._start_lock:
            if self._thread is not None:
                return True
            self._ioloop = IOLoop()
            self._thread = threading.Thread(target=self._run, name="sealedsum-publisher", daemon=True)
            self._thread.start()
            return False

    def wake(self) -> None:
        """Publish what the pipeline has queued, soon."""
        self._ioloop.add_callback_threadsafe(self._pump)

    def listen_now(self) -> None:
        """Open the listener's queue on the current connection too (the thread already runs)."""
        self._ioloop.add_callback_threadsafe(lambda: self._listener.open(self._connection))

    def stop(self) -> None:
        """Close the connection and end the I/O thread (waits up to 10 s)."""
        if self._ioloop is not None and self._thread is not None and self._thread.is_alive():
            self._ioloop.add_callback_threadsafe(self._shutdown)
            self._thread.join(timeout=10)

    # -- the I/O thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        ioloop = self._ioloop
        ioloop.call_later(0, self._connect)
        ioloop.call_later(TICK_S, self._tick)
        try:
            ioloop.start()
        except Exception as err:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            log.error("publisher I/O thread failed", extra={"fields": {"error": repr(err)}})
            self._pipeline.fail_all(TransportError(f"publisher I/O thread failed: {err!r}", retryable=False))
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
        if self._pipeline.closed or self._connecting or self._connection is not None:
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
        self._listener.on_connection(connection)

    def _on_channel(self, channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(lambda _ch, _method, _props, body: self._pipeline.on_return(body))
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame) -> None:
        self._ready = True
        self._pipeline.on_channel_ready()
        if self.down_since is not None:
            self.reconnects += 1
            log.info("broker connection back; publishing the unconfirmed records again",
                     extra={"fields": {"down_s": round(time.monotonic() - self.down_since, 2)}})
        self.down_since = None
        self._reconnect_delays = self._backoff.delays()
        self._pump()

    def _on_open_error(self, _connection, err) -> None:
        self._connecting = False
        self._connection = None
        self._lost(amqp.connection_error(err, self.settings))

    def _on_closed(self, _connection, err) -> None:
        self._connection = self._channel = None
        self._listener.on_connection_closed()
        self._ready = False
        if self._pipeline.closed:
            return
        self._lost(TransportError(f"lost the broker connection while publishing ({type(err).__name__})"))

    def _on_channel_closed(self, channel, err) -> None:
        if channel is not self._channel:
            return
        self._ready = False
        self._channel = None
        if self._pipeline.closed:
            return
        conn = self._connection
        if isinstance(err, pe.ChannelClosedByBroker):
            self._pipeline.on_channel_failed(amqp.channel_refused(err, "channel error"))
        if conn is not None and not (conn.is_closed or conn.is_closing):
            conn.close()  # _on_closed reconnects and publishes the rest again

    def _lost(self, error: TransportError) -> None:
        """The connection is down: the pipeline requeues what was in flight; reconnect later."""
        self._ready = False
        now = time.monotonic()
        delay = next(self._reconnect_delays)
        if self.down_since is None:
            self.down_since = now
            log.warning("broker unavailable; retrying", extra={"fields": {
                "operation": "publish records", "error": str(error), "retry_in_s": delay}})
        self._pipeline.on_connection_lost(error, now)
        self._reconnect_at = now + delay

    def _may_connect(self, now: float) -> bool:
        return self._connection is None and not self._connecting and self._pipeline.fatal is None \
            and now >= self._reconnect_at

    def _tick(self) -> None:
        if self._pipeline.closed:
            return
        now = time.monotonic()
        outstanding = self._pipeline.on_tick(now, down=self.down_since is not None)
        if (outstanding or self._listener.wanted) and self._may_connect(now):
            self._connect()
        self._pump()
        self._ioloop.call_later(TICK_S, self._tick)

    def _pump(self) -> None:
        """Publish what the pipeline has queued."""
        batch = self._pipeline.take_batch(self._ready)
        if not self._ready:
            if self._pipeline.has_queued and self._may_connect(time.monotonic()):
                self._ioloop.call_later(0, self._connect)
            return
        channel, exchange = self._channel, self.settings.topology.records_exchange
        for i, ticket in enumerate(batch):
            try:
                # Nothing about the record or stream in the properties: the broker sees only the
                # sealed box, the session's notice token (which names no record) and a digest of
                # the box it sees anyway, which a sharded deployment's exchange hashes.
                props = amqp.properties(ticket.kind, headers=self._headers, message_id=wire.shard_key(ticket.body))
                channel.basic_publish(exchange, topology.RECORD_ROUTING_KEY, ticket.body, props, mandatory=True)
            except Exception as err:  # noqa: BLE001 - channel or connection closing under us
                self._pipeline.requeue(batch[i:])
                log.info("publish interrupted", extra={"fields": {"error": repr(err)}})
                return
            self._pipeline.published(ticket)

    def _on_confirm(self, frame) -> None:
        method = frame.method
        self._pipeline.on_confirm(method.delivery_tag, method.multiple, isinstance(method, pika.spec.Basic.Nack),
                                  time.monotonic())


class RecordPublisher:
    """Publishes sealed records with pipelined publisher confirms, and listens for the enclave's
    notices (see the module docstring and ``producers/confirms.py`` for what becomes of a record).

    Its pieces are attributes: :attr:`pipeline` (counts ``confirmed``, ``failed`` and
    ``republished`` records), :attr:`driver` (counts ``reconnects``) and :attr:`listener`.

    :param max_unconfirmed: records awaiting a confirm at once (the pipeline's depth); :meth:`submit`
        blocks while that many are.
    :param token: this session's notice token (32 lowercase hex digits): sent with every record
        message, and the routing key the notices queue is bound with to ``PREFIX.notices``.
    """

    def __init__(self, settings: BrokerSettings, *, max_unconfirmed: int = DEFAULT_MAX_UNCONFIRMED,
                 token: str | None = None) -> None:
        self.settings = settings
        backoff = Backoff(settings.reconnect_seconds)
        # One lock for the three: a caller waiting on any of them wakes on any progress.
        self._cond = threading.Condition()
        self.pipeline = ConfirmPipeline(max_unconfirmed, backoff, settings.topology.records_exchange, self._cond)
        self.listener = AnnounceListener(settings.topology.announce_exchange, self._cond,
                                         lambda: self.pipeline.closed, settings.topology.notices_exchange, token)
        self.driver = ConnectionDriver(settings, backoff, self.pipeline, self.listener,
                                       {topology.NOTIFY_HEADER: token} if token is not None else None)

    @property
    def max_unconfirmed(self) -> int:
        return self.pipeline.max_unconfirmed

    # -- notices from the enclave ----------------------------------------------------------------
    def listen(self, timeout: float) -> bool:
        """Keep a queue bound to ``PREFIX.announce`` on every connection from now on (and keep
        connected while idle, so as not to miss notices). Waits up to ``timeout`` s for the
        first binding; returns whether the producer is listening now."""
        pipeline, driver = self.pipeline, self.driver
        with self._cond:
            if pipeline.closed:
                raise TransportError("the publisher is closed", retryable=False)
            start = self.listener.want()
            if driver.start():
                driver.listen_now()
        deadline = time.monotonic() + timeout
        with self._cond:
            # Not past a failed connection attempt: attestation then fails at once, as before.
            while self.listener.sessions == start and pipeline.fatal is None and not pipeline.closed \
                    and driver.down_since is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 1.0))
            return self.listener.listening and self.listener.sessions > start

    def take_notices(self) -> list[bytes]:
        """The notice bodies received since the last call, oldest first, as they came: they
        are not verified yet (anyone able to publish to the exchange could have sent them)."""
        return self.listener.take_notices()

    def take_record_notices(self) -> list[bytes]:
        """The notices about records received since the last call (unverified, like :meth:`take_notices`)."""
        return self.listener.take_record_notices()

    def wait_record_notices(self, timeout: float) -> bool:
        return self.listener.wait_record_notices(timeout)

    @property
    def hearing_records(self) -> bool:
        """Whether the notices queue is bound to ``PREFIX.notices`` with the token now."""
        with self._cond:
            return self.listener.hearing_records

    def budget(self, enclave: AttestedEnclave, stream: str):
        """Ask the enclave for ``stream``'s signed budget report (protocol section 8.3), on a
        short-lived connection of its own; verified against ``enclave``, the one attested last
        (its key and measurement bind the reply to it, whatever connection it came on)."""
        connection = amqp.connect(self.settings)
        try:
            return amqp.budget(connection, self.settings, enclave, stream)
        finally:
            if connection.is_open:
                connection.close()

    @property
    def sessions(self) -> int:
        """Connections on which the notices queue was bound (or refused); see the module docstring."""
        with self._cond:
            return self.listener.sessions

    # -- attestation (its own short-lived blocking connection) ------------------------------
    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        with amqp.attested(self.settings, trust) as (_, enclave):
            return enclave

    # -- records ----------------------------------------------------------------------------------
    def submit(self, body: bytes, timeout: float | None = None, kind: str = wire.RECORD_TYPE) -> Ticket:
        """Hand a record (or, with ``kind`` records, a record batch) to the I/O thread; return
        its ticket without waiting for the confirm.

        Blocks while ``max_unconfirmed`` records await confirms.

        :raises TransportError: an earlier record failed (raised once per failure), or no
            room opened up within ``timeout`` seconds.
        """
        ticket, wake = self.pipeline.submit(body, kind, timeout)
        self.driver.start()
        if wake:
            self.driver.wake()
        return ticket

    def wait(self, ticket: Ticket, timeout: float | None = None) -> None:
        """Wait until ``ticket`` is resolved; raise its error if it failed (marking it reported)."""
        self.pipeline.wait(ticket, timeout)

    def publish(self, body: bytes) -> None:
        """Publish one record and return once the broker confirmed it."""
        self.wait(self.submit(body))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted record is resolved.

        :raises TransportError: the first failure not raised before (the others stay on
            their tickets and are raised by the following calls).
        """
        self.pipeline.flush(timeout)

    @property
    def outstanding(self) -> int:
        return self.pipeline.outstanding

    def close(self) -> None:
        """Stop the I/O thread. Records still unconfirmed fail (call :meth:`flush` first)."""
        if not self.pipeline.close():
            return
        self.driver.stop()
        self.pipeline.abandon(TransportError("the publisher was closed before the broker confirmed"))
