"""Consumer edge: a queue of the consumer's own bound to the results exchange for some
streams, re-established after broker loss."""

from __future__ import annotations

import logging
import time
from typing import Iterator

import pika.exceptions as pe

from sealedsum.common import amqp, topology
from sealedsum.common.attestation import AttestedEnclave, TrustAnchors
from sealedsum.common.backoff import Backoff
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import TransportError

log = logging.getLogger("sealedsum.consumer")


class ResultSubscriber:
    """:param queue: a durable named queue (keeps releases while the consumer is away);
    default: a private server-named queue. While no queue is bound for a stream the
    enclave holds its releases, so a reconnecting consumer still gets them."""

    def __init__(self, settings: BrokerSettings, streams: tuple[str, ...], *, queue: str | None = None) -> None:
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
            if self.named_queue:
                self.queue = self.channel.queue_declare(self.named_queue, durable=True).method.queue
            else:
                # Exclusive: it goes away with the connection. Not auto-delete, so that pausing
                # consumption (a caller that reads one release at a time) does not delete it.
                self.queue = self.channel.queue_declare("", exclusive=True).method.queue
            for stream in self.streams:
                self.channel.queue_bind(self.queue, t.results_exchange, routing_key=topology.result_routing_key(stream))
        except pe.ChannelClosedByBroker as err:
            self.close()
            raise amqp.channel_refused(err, "cannot subscribe to results",
                                       hint="is the sidecar running? it declares the results exchange") from err
        self.channel.basic_qos(prefetch_count=16)

    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        return amqp.attest(self.connection, self.settings, trust)

    def budget(self, enclave: AttestedEnclave, stream: str):
        return amqp.budget(self.connection, self.settings, enclave, stream)

    def bodies(self, *, idle_timeout: float | None = None) -> Iterator[tuple[bytes, bool]]:
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
                    for method, _props, body in self.channel.consume(self.queue, inactivity_timeout=0.5):
                        if method is None:
                            if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                                return
                            continue
                        last = time.monotonic()
                        unacked = method.delivery_tag
                        yield body, bool(method.redelivered)
                        self.channel.basic_ack(unacked)
                        unacked = None
                    return
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

    def _reopen(self) -> None:
        try:
            self._open()
        except TransportError:
            raise
        except pe.AMQPError as err:
            raise TransportError(f"resubscribing failed: {err!r}") from err

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except pe.AMQPError:
                pass
        self.connection = self.channel = None
