"""Consumer edge: a private queue bound to the results exchange for some streams."""

from __future__ import annotations

import time
from typing import Iterator

import pika.exceptions as pe

from common import amqp
from common.attestation import AttestedEnclave, TrustAnchors
from common.config import BrokerSettings
from common.errors import TransportError


class ResultSubscriber:
    def __init__(self, settings: BrokerSettings, streams: tuple[str, ...], *, queue: str | None = None) -> None:
        self.settings = settings
        self.connection = amqp.connect(settings)
        self.channel = self.connection.channel()
        t = settings.topology
        try:
            if queue:
                self.queue = self.channel.queue_declare(queue, durable=True).method.queue
            else:
                self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for stream in streams:
                self.channel.queue_bind(self.queue, t.results_exchange, routing_key=stream)
        except pe.ChannelClosedByBroker as err:
            self.close()
            raise TransportError(f"cannot subscribe to results: {err.reply_text}", retryable=False,
                                 hint="is the sidecar running? it declares the results exchange") from err
        self.channel.basic_qos(prefetch_count=16)

    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        return amqp.attest(self.connection, self.settings, trust)

    def budget(self, enclave: AttestedEnclave, stream: str):
        return amqp.budget(self.connection, self.settings, enclave, stream)

    def bodies(self, *, idle_timeout: float | None = None) -> Iterator[bytes]:
        """Yield result bodies (acknowledged once the caller asks for the next one).
        Stops after ``idle_timeout`` seconds without a message, if given."""
        last = time.monotonic()
        try:
            for method, _props, body in self.channel.consume(self.queue, inactivity_timeout=0.5):
                if method is None:
                    if idle_timeout is not None and time.monotonic() - last > idle_timeout:
                        return
                    continue
                last = time.monotonic()
                yield body
                self.channel.basic_ack(method.delivery_tag)
        except pe.AMQPConnectionError as err:
            raise TransportError("lost the broker connection while consuming") from err

    def close(self) -> None:
        if self.connection.is_open:
            try:
                self.connection.close()
            except pe.AMQPError:
                pass
