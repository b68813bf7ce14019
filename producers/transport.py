"""Producer edge: pika, confirms, persistence."""

from __future__ import annotations

from common import amqp
from common.attestation import AttestedEnclave, TrustAnchors
from common.config import BrokerSettings


class RecordPublisher:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.connection = amqp.connect(settings)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def attest(self, trust: TrustAnchors) -> AttestedEnclave:
        return amqp.attest(self.connection, self.settings, trust)

    def publish(self, body: bytes) -> None:
        # No message id or stream in the properties: the broker sees only the sealed box.
        amqp.publish_confirmed(
            self.channel, self.settings.topology.records_exchange, "record", body, amqp.properties("record"),
        )

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
