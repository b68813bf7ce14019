"""Producer edge: pika, confirms, persistence, and reconnecting after broker loss."""

from __future__ import annotations

import pika.exceptions as pe

from common import amqp
from common.attestation import AttestedEnclave, TrustAnchors
from common.config import BrokerSettings


class RecordPublisher:
    """Publishes sealed records with a publisher confirm each. If the broker goes away
    it reconnects (within ``reconnect_seconds``) and publishes the unconfirmed record
    again: a record the broker did store before the loss arrives twice, and the
    enclave counts it once (same record id)."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.backoff = amqp.Backoff(settings.reconnect_seconds)
        self.connection = None
        self.channel = None
        self._open()

    def _open(self) -> None:
        self.close()
        self.connection = amqp.connect(self.settings)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        return amqp.attest(self.connection, self.settings, trust)

    def publish(self, body: bytes) -> None:
        # No message id or stream in the properties: the broker sees only the sealed box.
        def once() -> None:
            if self.channel is None or not self.channel.is_open:
                self._open()
            amqp.publish_confirmed(self.channel, self.settings.topology.records_exchange, "record", body,
                                   amqp.properties("record"))

        self.backoff.retry(once, self._open, "publish record")

    def close(self) -> None:
        if self.connection is not None and self.connection.is_open:
            try:
                self.connection.close()
            except pe.AMQPError:
                pass
        self.connection = self.channel = None
