"""The broker layout of one deployment, as data: exchange and queue names, routing keys,
and what the sidecar declares.

Pure (no pika, no I/O), so every role, the enclave included, reads the same layout;
``sidecar/runtime.py`` turns :func:`declarations` into pika calls.

The rejected and announce exchanges are fanout, so their routing keys are ignored
(publishers use ``""``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

# Records: records exchange (direct) -> records queue.
RECORD_ROUTING_KEY = "record"
# Attestation and budget requests: attest exchange (direct) -> attest queue.
ATTEST_ROUTING_KEY = "request"
# Binding key for every stream's results on the results exchange (topic).
ALL_RESULTS_KEY = "#"


def result_routing_key(stream: str) -> str:
    """Releases are published to the results exchange under their stream's name, so a
    consumer binds once per stream it wants."""
    return stream


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchange and queue names, all derived from one prefix."""

    prefix: str = "sealedsum"

    @property
    def records_exchange(self) -> str:
        return f"{self.prefix}.records"

    @property
    def records_queue(self) -> str:
        return f"{self.prefix}.records"

    @property
    def rejected_exchange(self) -> str:
        return f"{self.prefix}.rejected"

    @property
    def rejected_queue(self) -> str:
        return f"{self.prefix}.rejected"

    @property
    def attest_exchange(self) -> str:
        """Requests to the enclave (attestation, budget) go through this exchange, so
        clients never need to publish to the default exchange."""
        return f"{self.prefix}.attest"

    @property
    def attest_queue(self) -> str:
        return f"{self.prefix}.attest"

    @property
    def announce_exchange(self) -> str:
        """Signed notices to producers (key rotations): a fanout exchange each producer binds
        a server-named exclusive queue of its own to."""
        return f"{self.prefix}.announce"

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.records_exchange, self.rejected_exchange, self.attest_exchange, self.results_exchange,
                self.announce_exchange)

    @property
    def queues(self) -> tuple[str, ...]:
        return (self.records_queue, self.rejected_queue, self.attest_queue)

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"


# --- what the sidecar declares ------------------------------------------------------------

# Quorum queues count deliveries: a message that crashes the enclave again and again
# is dead-lettered by the broker after this many attempts instead of looping forever.
DELIVERY_LIMIT = 20
ATTEST_REQUEST_TTL_MS = 30_000


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    name: str
    type: str  # "direct", "fanout" or "topic"
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueDecl:
    name: str
    durable: bool
    arguments: Mapping[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str | None = None  # None: pika binds with the queue's name (fanout ignores it)


Declaration = ExchangeDecl | QueueDecl | Binding


def declarations(topology: Topology, queue_type: str, max_queued_records: int) -> tuple[Declaration, ...]:
    """Every exchange, queue and binding the sidecar declares, in declaration order: the
    dead-letter exchange before the queue that names it, each exchange before its bindings.

    :param queue_type: ``"quorum"`` or ``"classic"`` (``broker.queue_type``).
    :param max_queued_records: past this the records queue refuses new records
        (reject-publish), which producers see as a nack.
    """
    t = topology
    durable_args = {"x-queue-type": queue_type}
    records_args = dict(durable_args, **{"x-dead-letter-exchange": t.rejected_exchange,
                                         "x-max-length": max_queued_records,
                                         "x-overflow": "reject-publish"})
    if queue_type == "quorum":
        records_args["x-delivery-limit"] = DELIVERY_LIMIT
    return (
        ExchangeDecl(t.rejected_exchange, "fanout"),
        QueueDecl(t.rejected_queue, durable=True, arguments=durable_args),
        Binding(t.rejected_queue, t.rejected_exchange),
        ExchangeDecl(t.records_exchange, "direct"),
        QueueDecl(t.records_queue, durable=True, arguments=records_args),
        Binding(t.records_queue, t.records_exchange, RECORD_ROUTING_KEY),
        ExchangeDecl(t.results_exchange, "topic"),
        ExchangeDecl(t.attest_exchange, "direct"),
        QueueDecl(t.attest_queue, durable=False, arguments={"x-message-ttl": ATTEST_REQUEST_TTL_MS}),
        Binding(t.attest_queue, t.attest_exchange, ATTEST_ROUTING_KEY),
        # Key-rotation notices; each producer binds a server-named exclusive queue of its own.
        ExchangeDecl(t.announce_exchange, "fanout"),
    )
