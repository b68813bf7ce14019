"""The broker layout as data (``sealedsum.common.topology``) and the pika calls the
sidecar makes of it; ``tests/integration/test_queues.py`` checks the broker's side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sealedsum.common import topology
from sealedsum.common.config import BrokerSettings
from sealedsum.common.topology import (
    DELIVERY_LIMIT,
    Binding,
    ExchangeDecl,
    QueueDecl,
    Topology,
    declarations,
    release_lock,
)
from sealedsum.sidecar.enclave_process.runtime import declare_topology
from tests.unit.test_layering import imported_modules


class CallLog:
    """Records the declaring calls made on a pika channel, as made."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def exchange_declare(self, *args, **kwargs):
        self.calls.append(("exchange_declare", args, kwargs))

    def queue_declare(self, *args, **kwargs):
        self.calls.append(("queue_declare", args, kwargs))

    def queue_bind(self, *args, **kwargs):
        self.calls.append(("queue_bind", args, kwargs))


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_the_sidecar_declares_exactly_the_topology_names(queue_type):
    t = Topology("p.x")
    decls = declarations(t, queue_type, 10)
    assert {d.name for d in decls if isinstance(d, ExchangeDecl)} == set(t.exchanges)
    # The release lock is declared on its own, first, by the connection that holds it.
    assert {d.name for d in decls if isinstance(d, QueueDecl)} == set(t.queues) - {t.release_lock}
    assert release_lock(t) == QueueDecl(t.release_lock, durable=False, exclusive=True)


def test_everything_a_declaration_refers_to_is_declared_before_it():
    t = Topology()
    seen: set[str] = set()
    for d in declarations(t, "quorum", 10):
        if isinstance(d, Binding):
            assert {d.queue, d.exchange} <= seen, d
            continue
        if isinstance(d, QueueDecl) and "x-dead-letter-exchange" in d.arguments:
            assert d.arguments["x-dead-letter-exchange"] in seen, d
        seen.add(d.name)


def test_only_quorum_queues_get_a_delivery_limit():
    t = Topology()
    for queue_type, limit in (("quorum", {"x-delivery-limit": DELIVERY_LIMIT}), ("classic", {})):
        (records,) = [d for d in declarations(t, queue_type, 7)
                      if isinstance(d, QueueDecl) and d.name == t.records_queue]
        assert dict(records.arguments) == {"x-queue-type": queue_type, "x-dead-letter-exchange": t.rejected_exchange,
                                           "x-max-length": 7, "x-overflow": "reject-publish", **limit}


def test_declare_topology_makes_the_same_pika_calls_as_before_the_layout_was_data():
    """Pinned call for call: the broker refuses a redeclaration with other arguments, so
    any change here would stop a new sidecar from starting on an existing deployment (the
    request and dead-letter queues gained bounds: declare_topology handles their refusal,
    tests/integration/test_queues.py)."""
    t = Topology("p")
    channel = CallLog()
    declare_topology(channel, BrokerSettings(topology=t, queue_type="quorum", max_queued_records=99))
    records_args = {"x-queue-type": "quorum", "x-dead-letter-exchange": "p.rejected", "x-max-length": 99,
                    "x-overflow": "reject-publish", "x-delivery-limit": 20}
    assert channel.calls == [
        ("exchange_declare", ("p.rejected",), {"exchange_type": "fanout", "durable": True}),
        ("queue_declare", ("p.rejected",), {"durable": True, "arguments": {
            "x-queue-type": "quorum", "x-max-length": 100_000, "x-max-length-bytes": 256 << 20,
            "x-overflow": "drop-head"}}),
        ("queue_bind", ("p.rejected", "p.rejected"), {"routing_key": None}),
        ("exchange_declare", ("p.records",), {"exchange_type": "direct", "durable": True}),
        ("queue_declare", ("p.records",), {"durable": True, "arguments": records_args}),
        ("queue_bind", ("p.records", "p.records"), {"routing_key": "record"}),
        ("exchange_declare", ("p.results",), {"exchange_type": "topic", "durable": True}),
        ("queue_declare", ("p.releases",), {"durable": True, "arguments": {"x-queue-type": "stream"}}),
        ("queue_bind", ("p.releases", "p.results"), {"routing_key": "#"}),
        ("exchange_declare", ("p.attest",), {"exchange_type": "direct", "durable": True}),
        ("queue_declare", ("p.attest",), {"durable": False, "arguments": {
            "x-message-ttl": 30_000, "x-max-length": 1_000, "x-max-length-bytes": 4 << 20, "x-overflow": "drop-head"}}),
        ("queue_bind", ("p.attest", "p.attest"), {"routing_key": "request"}),
        ("exchange_declare", ("p.announce",), {"exchange_type": "fanout", "durable": True}),
        # New, and a new exchange cannot clash with an existing deployment's declarations.
        ("exchange_declare", ("p.notices",), {"exchange_type": "direct", "durable": True}),
    ]


def test_the_layout_imports_nothing_but_the_standard_library_types():
    """No pika and no I/O: every role, the enclave included, imports it."""
    tree = ast.parse(Path(topology.__file__).read_text(encoding="utf-8"))
    assert {m.split(".")[0] for m in imported_modules(tree)} <= {"__future__", "dataclasses", "typing"}
