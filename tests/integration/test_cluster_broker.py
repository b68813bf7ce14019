"""The three-node RabbitMQ cluster of ``deploy/cluster.sh`` (``$SEALEDSUM_CLUSTER_URLS``), which
enclave replicas run on: it is one cluster; a quorum queue on all three nodes keeps taking
and delivering messages, each exactly once, while one node is down, and the node rejoins;
a consistent-hash exchange on ``message_id`` spreads messages over three quorum queues.

Only the cluster's nodes are stopped here, never the default broker node (``$AMQP_URL``).
"""

from __future__ import annotations

import json
import time
import uuid

import pika
import pika.exceptions as pe
import pytest

from sealedsum import cluster_nodes
from sealedsum.common import amqp
from sealedsum.common.config import BrokerSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STOPPED = 2  # the node the failover test stops


def node_names() -> set[str]:
    return {cluster_nodes.node_name(n) for n in cluster_nodes.NODES}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s")
        time.sleep(0.5)


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 3
    params.retry_delay = 1
    return pika.BlockingConnection(params)


def confirmed_channel(conn: pika.BlockingConnection):
    ch = conn.channel()
    ch.confirm_delivery()
    return ch


def queue_row(name: str, n: int = 1) -> dict:
    rows = cluster_nodes.ctl(n, "list_queues", "name", "type", "members", "online", "leader",
                             "--formatter", "json").stdout
    (row,) = [r for r in json.loads(rows) if r["name"] == name]
    return row


def drain(conn: pika.BlockingConnection, queue: str, expect: int, *, idle: float = 2.0) -> list[str]:
    """Consume ``queue`` (acknowledging each message) until ``expect`` came and then nothing
    for ``idle`` s, or nothing for 20 s; the message_ids in delivery order."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=200)
    got: list[str] = []

    def on_message(c, method, props, _body):
        got.append(props.message_id)
        c.basic_ack(method.delivery_tag)

    tag = ch.basic_consume(queue, on_message)
    last, seen = time.monotonic(), 0
    while time.monotonic() - last < (idle if len(got) >= expect else 20.0):
        conn.process_data_events(time_limit=0.2)
        if len(got) > seen:
            seen, last = len(got), time.monotonic()
    ch.basic_cancel(tag)
    ch.close()
    return got


@pytest.fixture
def names(request):
    """Unique queue and exchange names for a test; deleted afterwards through node 1."""
    prefix = f"sealedsum.test.cluster.{uuid.uuid4().hex[:10]}"
    made: dict[str, list[str]] = {"queue": [], "exchange": []}

    def name(kind: str, suffix: str) -> str:
        made[kind].append(f"{prefix}.{suffix}")
        return made[kind][-1]

    yield name
    urls = cluster_nodes.urls_from_env()
    conn = connect(urls[0])
    try:
        for kind in ("exchange", "queue"):
            for n in made[kind]:
                ch = conn.channel()
                try:
                    ch.exchange_delete(n) if kind == "exchange" else ch.queue_delete(n)
                    ch.close()
                except pe.AMQPError:
                    pass
    finally:
        conn.close()


def test_the_three_nodes_form_one_cluster(cluster_urls):
    everyone = node_names()
    assert len(everyone) == 3
    for n in cluster_nodes.NODES:
        status = cluster_nodes.cluster_status(n)
        assert set(status["running_nodes"]) == everyone, (n, status["running_nodes"])
        assert set(status["disk_nodes"]) == everyone, (n, status["disk_nodes"])
        assert not status.get("partitions"), status.get("partitions")
    # Each URL reaches a different node of that one cluster.
    seen = set()
    for url in cluster_urls:
        conn = connect(url)
        try:
            seen.add(conn._impl.server_properties.get("cluster_name"))
        finally:
            conn.close()
    assert len(seen) == 1, seen
    ports = {pika.URLParameters(u).port for u in cluster_urls}
    assert len(ports) == 3 and 5672 not in ports, "the cluster must not be the default node"


def test_a_quorum_queue_survives_a_stopped_node_and_the_node_rejoins(cluster_urls, names):
    queue = names("queue", "qq")
    first, stopped = cluster_urls[0], STOPPED
    survivor = cluster_urls[2]
    conn = connect(first)
    try:
        ch = confirmed_channel(conn)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": 3})
        row = queue_row(queue)
        assert row["type"] == "quorum" and set(row["members"]) == node_names(), row
        for i in range(200):  # each basic_publish returns once confirmed (or raises)
            ch.basic_publish("", queue, f"a{i}".encode(), pika.BasicProperties(message_id=f"a{i}", delivery_mode=2),
                             mandatory=True)
    finally:
        conn.close()

    cluster_nodes.stop_node(stopped)
    try:
        assert not cluster_nodes.node_running(stopped)
        name = cluster_nodes.node_name(stopped)
        wait_for(lambda: name not in cluster_nodes.running_nodes(3), 30, f"node 3 still sees {name} running")
        # A client given every node (broker.urls) connects, whichever node it tries first.
        urls = tuple(cluster_urls)
        for _ in urls:
            c = amqp.connect(BrokerSettings(url=urls[0], urls=urls))
            try:
                assert c._impl.params.port != pika.URLParameters(cluster_urls[stopped - 1]).port
            finally:
                c.close()
        conn = connect(survivor)
        try:
            ch = confirmed_channel(conn)
            for i in range(200):
                ch.basic_publish("", queue, f"b{i}".encode(),
                                 pika.BasicProperties(message_id=f"b{i}", delivery_mode=2), mandatory=True)
            got = drain(conn, queue, 400)
        finally:
            conn.close()
        expected = [f"a{i}" for i in range(200)] + [f"b{i}" for i in range(200)]
        assert len(got) == len(set(got)), f"{len(got) - len(set(got))} messages came twice"
        assert sorted(got) == sorted(expected), f"missing {sorted(set(expected) - set(got))[:10]}"
        assert got == expected, "a quorum queue delivers in publishing order"
    finally:
        cluster_nodes.start_node(stopped)  # returns once it is back in the three-node cluster

    assert cluster_nodes.node_running(stopped)
    for n in cluster_nodes.NODES:
        assert cluster_nodes.running_nodes(n) == node_names(), n
    # Its queue member is back too, and the (now empty) queue works through it.
    row = wait_for(lambda: (r := queue_row(queue)) and set(r["online"]) == node_names() and r,
                   60, "the stopped node's quorum queue member did not come back online")
    assert set(row["members"]) == node_names()
    conn = connect(cluster_urls[stopped - 1])
    try:
        ch = confirmed_channel(conn)
        assert ch.queue_declare(queue, passive=True).method.message_count == 0
        ch.basic_publish("", queue, b"c", pika.BasicProperties(message_id="c0"), mandatory=True)
        assert drain(conn, queue, 1, idle=0.5) == ["c0"]
    finally:
        conn.close()


HASHED = 3000


def test_a_consistent_hash_exchange_on_message_id_spreads_over_three_quorum_queues(cluster_urls, names):
    exchange = names("exchange", "hash")
    queues = [names("queue", f"shard{i}") for i in range(3)]
    conn = connect(cluster_urls[0])
    try:
        ch = confirmed_channel(conn)
        ch.exchange_declare(exchange, "x-consistent-hash", durable=True, arguments={"hash-property": "message_id"})
        for q in queues:
            ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(q, exchange, routing_key="1")  # the weight: one bucket each

        def counts() -> list[int]:
            return [ch.queue_declare(q, passive=True).method.message_count for q in queues]

        ids = [uuid.uuid4().hex for _ in range(HASHED)]
        for i, mid in enumerate(ids):
            # The routing key is ignored when hash-property is set: vary it to show that.
            ch.basic_publish(exchange, f"key{i % 7}", b"x", pika.BasicProperties(message_id=mid), mandatory=True)
        spread = counts()
        assert sum(spread) == HASHED, spread
        # Three equal buckets: about 1000 each (a standard deviation of ~26).
        assert all(HASHED * 0.25 < c < HASHED * 0.42 for c in spread), spread

        # The same message_id always goes to the same queue.
        before = counts()
        for _ in range(10):
            ch.basic_publish(exchange, "", b"x", pika.BasicProperties(message_id=ids[0]), mandatory=True)
        grew = [a - b for a, b in zip(counts(), before)]
        assert sorted(grew) == [0, 0, 10], grew

        # Without a message_id the message is neither returned to a mandatory publisher nor
        # dropped: it is routed, always to the same one queue (whatever the routing key) — a
        # publisher that forgets message_id piles everything onto one shard.
        before = counts()
        for i in range(20):
            ch.basic_publish(exchange, f"other{i}", b"no id", pika.BasicProperties(), mandatory=True)
        grew = [a - b for a, b in zip(counts(), before)]
        assert sorted(grew) == [0, 0, 20], grew
    finally:
        conn.close()


def test_direct_reply_to_works_across_nodes_and_names_each_node_apart(cluster_urls, names):
    """A client on node 1 asks through a queue that a server on node 3 consumes; the server's
    reply to ``amq.rabbitmq.reply-to.*`` reaches the client. The node a reply-to name encodes
    (an obfuscated ``reply@N``, not the node's name) differs per node the client is on: an
    enclave that only answers names of nodes it has seen must learn every node's."""
    queue = names("queue", "rpc")
    server = connect(cluster_urls[2])
    client = connect(cluster_urls[0])
    try:
        sch = server.channel()
        sch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        cch = client.channel()
        replies = []
        cch.basic_consume(amqp.DIRECT_REPLY_TO, lambda _c, _m, p, b: replies.append((p.correlation_id, b)),
                          auto_ack=True)
        cch.basic_publish("", queue, b"ping", pika.BasicProperties(reply_to=amqp.DIRECT_REPLY_TO,
                                                                   correlation_id="c1"))

        def request():
            method, props, _ = sch.basic_get(queue, auto_ack=True)
            if method is None:
                server.process_data_events(time_limit=0.1)
            return props if method is not None else None

        props = wait_for(request, 10, "the request did not reach node 3")
        assert amqp.is_direct_reply_to(props.reply_to), props.reply_to
        sch.basic_publish("", props.reply_to, b"pong", pika.BasicProperties(correlation_id="c1"))
        wait_for(lambda: replies or client.process_data_events(time_limit=0.1), 10,
                 "the reply from node 3 did not reach the client on node 1")
        assert replies == [("c1", b"pong")]

        seen = {}
        for n, url in enumerate(cluster_urls, 1):
            other = connect(url)
            try:
                och = other.channel()
                och.basic_consume(amqp.DIRECT_REPLY_TO, lambda *_: None, auto_ack=True)
                och.basic_publish("", queue, b"", pika.BasicProperties(reply_to=amqp.DIRECT_REPLY_TO))
                seen[n] = amqp.reply_to_node(wait_for(request, 10, "no probe").reply_to)
            finally:
                other.close()
        assert len(set(seen.values())) == 3, seen
        assert all(node.startswith(b"reply@") for node in seen.values()), seen
    finally:
        client.close()
        server.close()
