"""The broker layout of one deployment, as data: exchange and queue names, routing keys,
what the sidecar declares, and what each role's account may touch.

Pure (no pika, no I/O), so every role, the enclave included, reads the same layout;
``sidecar/enclave_process/runtime.py`` turns :func:`declarations` into pika calls and ``sealedsum broker
setup`` grants :func:`role_permissions`, which are derived from the same names.

The rejected and announce exchanges are fanout, so their routing keys are ignored
(publishers use ``""``). The notices exchange is direct: a producer binds its queue with its
notice token, which its records carry in the ``NOTIFY_HEADER`` header.
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


# The AMQP header a producer puts on its record messages to hear what became of them, and
# the shape of its value: 16 random bytes in lowercase hex (docs/protocol.md section 11.6).
NOTIFY_HEADER = "x-sealedsum-notify"
NOTICE_TOKEN_CHARS = 32
_HEX = frozenset("0123456789abcdef")


def is_notice_token(value: object) -> bool:
    return isinstance(value, str) and len(value) == NOTICE_TOKEN_CHARS and set(value) <= _HEX


def notice_token(headers: Mapping | None) -> str | None:
    """The notice token a record message carries, or ``None`` (no header, or not a token:
    such a record gets no notices)."""
    value = (headers or {}).get(NOTIFY_HEADER)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if is_notice_token(value) else None


# Where a consumer's named queues must live: PREFIX.consumer.NAME.
CONSUMER_QUEUE_INFIX = "consumer"


def _named(suffix: str, doc: str | None = None) -> property:
    """A name of the topology: the prefix, a dot, ``suffix``."""
    return property(lambda self: f"{self.prefix}.{suffix}", doc=doc)


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchange and queue names, all derived from one prefix."""

    prefix: str = "sealedsum"

    records_exchange = _named("records")
    records_queue = _named("records")
    rejected_exchange = _named("rejected")
    rejected_queue = _named("rejected")
    attest_exchange = _named("attest", "Requests to the enclave (attestation, budget) go through this exchange, "
                                       "so clients never need to publish to the default exchange.")
    attest_queue = _named("attest")
    announce_exchange = _named("announce", "Signed notices to producers (key rotations): a fanout exchange each "
                                           "producer binds a server-named exclusive queue of its own to.")
    results_exchange = _named("results")
    releases_stream = _named("releases", "A RabbitMQ stream bound to the results exchange for every stream: each "
                                         "consumer reads it from an offset of its own, so nobody drains releases "
                                         "for anyone else, and a release stays for consumers that come later.")
    notices_exchange = _named("notices", "What became of a producer's records (counted, or rejected and why): a "
                                         "direct exchange, routing key = the producer's notice token.")
    release_lock = _named("lock", "An exclusive queue the releasing enclave declares on its connection before it "
                                  "consumes anything: the broker lets one connection hold it, so one enclave per "
                                  "prefix counts and releases, and a second one stands by.")
    consumer_queue_prefix = property(lambda self: f"{self.prefix}.{CONSUMER_QUEUE_INFIX}.",
                                     doc="Named consumer queues (``sealedsum consume --queue``) start with this.")
    # Replicas ([cluster]): shard queues, and what replicas tell one another.
    cluster_partials = _named("cluster.partials", "Increments (ciphertext partial totals and the record ids they "
                                                  "hold) from every replica to the release holder, and heartbeats.")
    cluster_join = _named("cluster.join", "Key requests of replicas that have no keys yet, answered by any "
                                          "replica that has them once each side has checked the other's quote.")
    cluster_state = _named("cluster.state", "The release holder's sealed state: a RabbitMQ stream, replicated by the "
                                            "broker cluster, that whichever replica takes the release role reads.")
    cluster_role = _named("cluster.role", "The release role: a quorum queue holding one token message; the replica "
                                          "whose consumer holds it unacknowledged is the release holder, and when "
                                          "its connection goes the broker hands the token to another.")
    cluster_genesis = _named("cluster.genesis", "The deployment's public keys, put there by the replica that created "
                                                "them: while it holds a message, no other replica creates keys.")
    cluster_reply_prefix = property(lambda self: f"{self.prefix}.cluster.reply.",
                                    doc="Each replica's own exclusive reply queue starts with this.")

    def shard_queue(self, shard: int) -> str:
        """The records queue of one shard: ``PREFIX.records.K``."""
        return f"{self.prefix}.records.{shard}"

    def shard_queues(self, shards: int) -> tuple[str, ...]:
        return tuple(self.shard_queue(k) for k in range(shards))

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.records_exchange, self.rejected_exchange, self.attest_exchange, self.results_exchange,
                self.announce_exchange, self.notices_exchange)

    @property
    def queues(self) -> tuple[str, ...]:
        return (self.records_queue, self.rejected_queue, self.attest_queue, self.release_lock, self.releases_stream)



# --- what the sidecar declares ------------------------------------------------------------

# Quorum queues count deliveries: a message that crashes the enclave again and again
# is dead-lettered by the broker after this many attempts instead of looping forever.
DELIVERY_LIMIT = 20
ATTEST_REQUEST_TTL_MS = 30_000
# Requests waiting for the enclave: past these the broker drops the oldest, so a flood of
# requests costs the broker a bounded queue and the enclave nothing (it answers at its own
# pace, records first: runtime.py).
ATTEST_QUEUE_MAX_LENGTH = 1_000
ATTEST_QUEUE_MAX_BYTES = 4 << 20
# Dead letters kept for the operator: past these the broker drops the oldest, so junk
# records cannot fill the broker's disk, and the enclave never waits for the operator to
# drain the queue (reject-publish would stop it acknowledging records).
REJECTED_QUEUE_MAX_LENGTH = 100_000
REJECTED_QUEUE_MAX_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    name: str
    type: str  # "direct", "fanout", "topic" or "x-consistent-hash"
    durable: bool = True
    arguments: Mapping[str, object] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class QueueDecl:
    name: str
    durable: bool
    arguments: Mapping[str, object] = field(default_factory=dict, hash=False)
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class Binding:
    queue: str
    exchange: str
    routing_key: str | None = None  # None: pika binds with the queue's name (fanout ignores it)


Declaration = ExchangeDecl | QueueDecl | Binding


def release_lock(topology: Topology) -> QueueDecl:
    """The lock the releasing enclave holds for as long as its connection lives (exclusive:
    no other connection may declare, consume or delete it; it goes with the connection)."""
    return QueueDecl(topology.release_lock, durable=False, exclusive=True)


# Sharded records: the records exchange hashes each message's message_id (which producers
# set to a digest of the body, docs/protocol.md section 10.6) onto the shard queues, each
# bound with this weight.
SHARD_HASH_PROPERTY = "message_id"
SHARD_WEIGHT = "1"
CLUSTER_JOIN_TTL_MS = 30_000


def declarations(topology: Topology, queue_type: str, max_queued_records: int,
                 shards: int | None = None) -> tuple[Declaration, ...]:
    """Every exchange, queue and binding the sidecar declares, in declaration order: the
    dead-letter exchange before the queue that names it, each exchange before its bindings.

    :param queue_type: ``"quorum"`` or ``"classic"`` (``broker.queue_type``).
    :param max_queued_records: past this the records queue refuses new records
        (reject-publish), which producers see as a nack.
    :param shards: with replicas (``[cluster]``), the records exchange is a consistent-hash
        exchange over this many shard queues (``PREFIX.records.K``, each bounded as the one
        records queue is), and the replicas' own queues are declared too.
    """
    t = topology
    durable_args = {"x-queue-type": queue_type}
    records_args = dict(durable_args, **{"x-dead-letter-exchange": t.rejected_exchange,
                                         "x-max-length": max_queued_records,
                                         "x-overflow": "reject-publish"})
    if queue_type == "quorum":
        records_args["x-delivery-limit"] = DELIVERY_LIMIT
    if shards is None:
        records: tuple[Declaration, ...] = (
            ExchangeDecl(t.records_exchange, "direct"),
            QueueDecl(t.records_queue, durable=True, arguments=records_args),
            Binding(t.records_queue, t.records_exchange, RECORD_ROUTING_KEY),
        )
        replicas: tuple[Declaration, ...] = ()
    else:
        records = (ExchangeDecl(t.records_exchange, "x-consistent-hash",
                                arguments={"hash-property": SHARD_HASH_PROPERTY}),)
        for name in t.shard_queues(shards):
            records += (QueueDecl(name, durable=True, arguments=records_args),
                        Binding(name, t.records_exchange, SHARD_WEIGHT))
        replicas = (
            # Increments wait here for the release holder, whoever it is by then.
            QueueDecl(t.cluster_partials, durable=True, arguments={"x-queue-type": queue_type}),
            QueueDecl(t.cluster_state, durable=True, arguments={"x-queue-type": "stream"}),
            QueueDecl(t.cluster_genesis, durable=True, arguments={"x-queue-type": queue_type}),
            QueueDecl(t.cluster_role, durable=True, arguments={"x-queue-type": queue_type}),
            QueueDecl(t.cluster_join, durable=True, arguments={
                "x-queue-type": "quorum", "x-message-ttl": CLUSTER_JOIN_TTL_MS, "x-max-length": ATTEST_QUEUE_MAX_LENGTH,
                "x-overflow": "drop-head"}),
        )
    return (
        ExchangeDecl(t.rejected_exchange, "fanout"),
        QueueDecl(t.rejected_queue, durable=True, arguments=dict(durable_args, **{
            "x-max-length": REJECTED_QUEUE_MAX_LENGTH, "x-max-length-bytes": REJECTED_QUEUE_MAX_BYTES,
            "x-overflow": "drop-head"})),
        Binding(t.rejected_queue, t.rejected_exchange),
        *records,
        ExchangeDecl(t.results_exchange, "topic"),
        # Every release and budget-exhausted notice, kept for every consumer. No retention bound
        # in the declaration: the broker refuses to redeclare a queue with other arguments, so
        # an operator bounds it with a broker policy instead (docs/protocol.md section 2).
        QueueDecl(t.releases_stream, durable=True, arguments={"x-queue-type": "stream"}),
        Binding(t.releases_stream, t.results_exchange, ALL_RESULTS_KEY),
        ExchangeDecl(t.attest_exchange, "direct"),
        # With replicas the requests queue is a quorum queue: a classic one lives on one broker
        # node, and goes when that node does (the replicas' other queues are quorum queues too).
        QueueDecl(t.attest_queue, durable=shards is not None, arguments={
            **({"x-queue-type": "quorum"} if shards is not None else {}),
            "x-message-ttl": ATTEST_REQUEST_TTL_MS, "x-max-length": ATTEST_QUEUE_MAX_LENGTH,
            "x-max-length-bytes": ATTEST_QUEUE_MAX_BYTES, "x-overflow": "drop-head"}),
        Binding(t.attest_queue, t.attest_exchange, ATTEST_ROUTING_KEY),
        # Key-rotation notices; each producer binds a server-named exclusive queue of its own.
        ExchangeDecl(t.announce_exchange, "fanout"),
        # Notices about records, routed by the token the records carried.
        ExchangeDecl(t.notices_exchange, "direct"),
        *replicas,
    )


# --- what each role's account may do -------------------------------------------------------
#
# RabbitMQ's rules (checked against a real broker by ``tests/integration/test_acl.py``):
# ``queue.declare`` needs *configure* on the queue; ``queue.bind`` needs *write* on the queue
# and *read* on the exchange; ``basic.publish`` needs *write* on the exchange (the default
# exchange is called ``amq.default`` for this); ``basic.consume`` and ``basic.get`` need
# *read* on the queue. Consuming from the ``amq.rabbitmq.reply-to`` pseudo-queue needs no
# permission at all, and a passive declare needs none either. Permissions are regular
# expressions over names, matched unanchored, so every pattern here is anchored with ``^``
# and ``$``; they cannot tell an exchange from a queue of the same name.

ROLES = ("sidecar", "producer", "consumer")
DEFAULT_EXCHANGE = "amq.default"  # what RabbitMQ calls the default exchange ("") in permission checks
SERVER_NAMED_QUEUES = r"amq\.gen-.*"  # queue.declare with an empty name; clients cannot choose amq.* names
NOTHING = "^$"  # matches no exchange or queue name
# PCRE metacharacters outside a character class (RabbitMQ uses Erlang's re, which is PCRE).
_REGEX_SPECIAL = set("\\^$.|?*+()[]{}")


def escape(name: str) -> str:
    """``name`` as a PCRE literal (only the characters that are special outside a class)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name)


def _names(prefix: str, names) -> str:
    """An unanchored alternation matching exactly ``names``; shared ``PREFIX.`` factored out."""
    names = sorted(set(names))
    head = prefix + "."
    if len(names) > 1 and all(n.startswith(head) and len(n) > len(head) for n in names):
        return escape(head) + "(" + "|".join(escape(n[len(head):]) for n in names) + ")"
    if len(names) == 1:
        return escape(names[0])
    return "(" + "|".join(escape(n) for n in names) + ")"


def _anchored(*alternatives: str) -> str:
    if not alternatives:
        return NOTHING
    if len(alternatives) == 1:
        return f"^{alternatives[0]}$"
    return "^(" + "|".join(alternatives) + ")$"


@dataclass(frozen=True, slots=True)
class Permissions:
    configure: str
    write: str
    read: str

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.configure, self.write, self.read)


def role_permissions(topology: Topology) -> dict[str, Permissions]:
    """The configure/write/read patterns of each role, for one prefix."""
    p = topology.prefix
    own = _names(p, set(topology.exchanges) | set(topology.queues))
    # Replicas ([cluster]): the shard queues and the replicas' own queues and stream.
    replicas = (escape(f"{p}.records.") + "[0-9]+",
                escape(f"{p}.cluster.") + r"(genesis|join|partials|role|state|reply\.[0-9a-f]{32})")
    mine = escape(topology.consumer_queue_prefix) + ".*"
    return {
        # Declares and binds its objects (configure; write on the queues, read on the
        # exchanges), consumes records and requests (read), publishes dead letters and
        # results (write), answers RPCs on the default exchange (write amq.default). Declaring
        # PREFIX.records with a dead-letter exchange also needs read on it and write on
        # PREFIX.rejected, which "own" covers.
        "sidecar": Permissions(_anchored(own, *replicas), _anchored(own, *replicas, escape(DEFAULT_EXCHANGE)),
                               _anchored(own, *replicas)),
        # Publishes records and RPC requests; the reply comes through direct reply-to,
        # which needs no permission. Its one queue is server-named (configure; write on it
        # to bind, read to consume) and bound to PREFIX.announce for key-rotation notices and
        # to PREFIX.notices for its records' (read on those exchanges); it may read no other
        # exchange, so it binds to nothing else.
        "producer": Permissions(_anchored(SERVER_NAMED_QUEUES),
                                _anchored(_names(p, (topology.records_exchange, topology.attest_exchange)),
                                          SERVER_NAMED_QUEUES),
                                _anchored(SERVER_NAMED_QUEUES,
                                          _names(p, (topology.announce_exchange, topology.notices_exchange)))),
        # Reads the release stream (read; consuming a stream declares nothing). Its own queues:
        # declare (configure), bind (write on the queue, read on PREFIX.results), consume
        # (read). RPC requests: write on PREFIX.attest.
        "consumer": Permissions(_anchored(SERVER_NAMED_QUEUES, mine),
                                _anchored(SERVER_NAMED_QUEUES, mine, escape(topology.attest_exchange)),
                                _anchored(SERVER_NAMED_QUEUES, mine,
                                          _names(p, (topology.results_exchange, topology.releases_stream)))),
    }
