"""The broker edge of an enclave replica ([cluster]): getting the keys, the replica's work on
the shard queues, the release holder's state in a RabbitMQ stream, and the holder itself.

Every replica runs a :class:`Worker` on a thread of its own: it consumes every shard queue as
a competing consumer, opens and checks the records, and sends each batch as one increment to
``PREFIX.cluster.partials``; it acknowledges the batch's deliveries only once the holder has
answered that the increment is counted and durable (or dead-letters the records the holder
refused). A replica that dies leaves its unacknowledged deliveries to the others, and an
increment it sent to the holder is counted or not as a whole, so nothing is lost or counted
twice (a record counted already is a ``duplicate`` the second time, and a redelivered one is
acknowledged as counted).

One replica at a time holds the prefix's release lock (the exclusive queue ``PREFIX.lock``)
and runs the :class:`Holder`: the single enclave's runtime with increments for records. It
keeps the sealed state in the stream ``PREFIX.cluster.state`` (replicated by the broker
cluster) instead of a local directory, so whichever replica takes the lock next reads the same
ledger, windows, record ids and unpublished releases, and carries on from them.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
import json
import logging
import threading
import time
import uuid

import nacl.exceptions
import nacl.secret
import pika
import pika.exceptions as pe

from sealedsum.common import amqp, signing, topology, wire
from sealedsum.common.results import EXHAUSTED_KIND, PAYLOADS, RESULT_KIND
from sealedsum.common.cluster import Cluster
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import AnotherReleaser, AttestationError, InvalidMessage, InvalidResultSignature, \
    RecordRejected, RejectReason, RollbackDetected, TransportError
from sealedsum.common.wire import strict_json
from sealedsum.sidecar.cluster import join, worker as work
from sealedsum.sidecar.enclave import frames
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.service import Effects, Enclave, OpenedRecord
from sealedsum.sidecar.enclave_process.checkpoint import StateWriter
from sealedsum.sidecar.enclave_process.runtime import (
    DEAD_LETTER_PREFIX_BYTES, PREFETCH_MIN, EnclaveRuntime, ack_batch_for, declare_topology, enclave_prefetch, now_ms)

log = logging.getLogger("sealedsum.cluster")

# A replica sends a heartbeat this often while it has nothing in flight, and the holder counts
# a replica as gone (and stops waiting for it to report a window) after WORKER_TIMEOUT_S.
HEARTBEAT_S = 0.2
WORKER_TIMEOUT_S = 3.0
# How long a replica waits for the holder's answer before it sends the increment again
# (marked as a resend: the holder may have counted it, and lost only the answer).
REPLY_TIMEOUT_S = 5.0
# How long deliveries may wait for others to share their increment.
INGEST_WAIT_S = 0.02
# A replica without keys asks for them this often.
JOIN_EVERY_S = 5.0
STATE_LOAD_TIMEOUT_S = 60.0
STATE_KEY_INFO = b"sealedsum/v1/cluster-state"
ROLE_TOKEN = b"sealedsum release role"
# How long a replica waits for the release-role token before it stands by (and tries again).
ROLE_WAIT_S = 1.0
# Increments carry a delta per coordinate: a wide vector's can exceed a record's size.
MAX_FRAME_BYTES = 64 << 20


def state_key(keyring: Keyring) -> bytes:
    return hashlib.sha256(STATE_KEY_INFO + keyring.cluster_key()).digest()


def reply_queue(t: topology.Topology, worker: bytes) -> str:
    return t.cluster_reply_prefix + worker.hex()


# -- keys ---------------------------------------------------------------------------------
def obtain_keys(settings: BrokerSettings, cluster: Cluster, measurement: bytes, code_digest: bytes,
                policy_bytes: bytes, paillier_bits: int, quote, stopping) -> Keyring | None:
    """The deployment's keys: from a running replica, after each side attested to the other
    (:mod:`.join`), or, for the first replica of a deployment, new ones. Only the holder of the
    release lock may create them, and only while ``PREFIX.cluster.genesis`` is empty (it then
    puts the new public keys there): a deployment has one set of keys, however its replicas
    start. Returns ``None`` if ``stopping()`` became true first."""
    t = settings.topology
    me = uuid.uuid4().bytes
    waited_since = time.monotonic()
    warned = 0.0
    while not stopping():
        try:
            conn = amqp.connect(settings, name=f"sealedsum-replica {t.prefix} join")
        except TransportError as err:
            log.warning("no broker to ask for keys; retrying", extra={"fields": {"detail": str(err)}})
            _sleep(JOIN_EVERY_S, stopping)
            continue
        try:
            channel = declare_topology(conn.channel(), settings, reopen=conn.channel, shards=cluster.shards)
            inbox = reply_queue(t, me)
            channel.queue_declare(inbox, exclusive=True, auto_delete=True)
            answers: list[bytes] = []
            channel.basic_consume(inbox, lambda _c, _m, _p, body: answers.append(body), auto_ack=True)
            # Every request of this connection stays answerable: a busy replica may answer one
            # after this replica sent the next.
            pending: dict[bytes, tuple[join.JoinRequest, object]] = {}
            while not stopping():
                req, box = join.request(quote, code_digest, policy_bytes)
                pending[req.nonce] = (req, box)
                channel.basic_publish("", t.cluster_join, req.to_bytes(), pika.BasicProperties(
                    type=join.REQUEST_TYPE, reply_to=inbox, app_id=amqp.APP_ID))
                deadline = time.monotonic() + JOIN_EVERY_S
                while time.monotonic() < deadline and not answers:
                    conn.process_data_events(time_limit=0.1)
                for body in answers:
                    try:
                        reply = join.JoinReply.from_bytes(body)
                        asked = pending.get(wire.AttestReply.from_bytes(reply.attestation).nonce)
                        if asked is None:
                            raise InvalidMessage("an answer to no request of this replica")
                        keyring = join.accept(reply, asked[0], asked[1], cluster, measurement, now_ms())
                    except (AttestationError, InvalidMessage) as err:
                        log.error("a replica answered with keys that do not attest; ignored", extra={"fields": {
                            "error": type(err).__name__, "detail": str(err)}})
                        continue
                    log.info("keys received from an attested replica", extra={"fields": {
                        "key_epoch": keyring.current_epoch}})
                    return keyring
                answers.clear()
                founded = _found(conn, settings, paillier_bits)
                if founded is not None:
                    return founded
                if time.monotonic() - warned > 30.0:
                    warned = time.monotonic()
                    log.warning("waiting for keys: no attested replica has answered", extra={"fields": {
                        "waited_s": round(time.monotonic() - waited_since, 1),
                        "hint": "a replica gets the keys only from a running replica of an accepted measurement "
                                "(its own, or one in cluster.peer_measurements) on a platform in cluster.platform_keys"}})
        except (TransportError, pe.AMQPError) as err:
            log.warning("broker lost while asking for keys; retrying", extra={"fields": {
                "error": type(err).__name__, "detail": str(err)}})
            _sleep(JOIN_EVERY_S, stopping)
        finally:
            if conn.is_open:
                try:
                    conn.close()
                except pe.AMQPError:
                    pass
    return None


def _found(conn, settings: BrokerSettings, paillier_bits: int) -> Keyring | None:
    """New keys, if this replica can take the release lock and no deployment has keys yet."""
    t = settings.topology
    lock = topology.release_lock(t)
    probe = conn.channel()
    try:
        probe.queue_declare(lock.name, durable=lock.durable, exclusive=lock.exclusive)
    except pe.ChannelClosedByBroker as err:
        if err.reply_code == 405:  # another replica holds it: it has keys, or is founding
            return None
        raise
    genesis = probe.queue_declare(t.cluster_genesis, durable=True, passive=True)
    if genesis.method.message_count:
        probe.queue_delete(lock.name)
        return None
    log.info("first replica of this deployment: creating its keys", extra={"fields": {"paillier_bits": paillier_bits}})
    keyring = Keyring.single(EnclaveKeys.generate(paillier_bits))
    keyring.rotated_at_ms = now_ms()
    probe.confirm_delivery()
    amqp.publish_confirmed(probe, "", t.cluster_genesis, keyring.current.bundle_bytes, amqp.properties("genesis"))
    # The one release-role token of the deployment, put there once, with the keys.
    amqp.publish_confirmed(probe, "", t.cluster_role, ROLE_TOKEN, amqp.properties("role"))
    probe.queue_delete(lock.name)
    return keyring


def _sleep(seconds: float, stopping) -> None:
    deadline = time.monotonic() + seconds
    while not stopping() and time.monotonic() < deadline:
        time.sleep(0.05)


# -- the holder's state, in a stream ----------------------------------------------------
def state_line(entries: list[dict]) -> tuple[list[dict] | None, tuple[str, int] | None]:
    """The state the stream's entries (opened, in stream order) hold: the last base and the
    journal entries after it, along one line of entries. A journal entry joins the line only if
    it follows its head (``prev``); a base joins it if it follows any entry on it, and then
    cuts off what came after that entry: a new holder's first base follows the head it read,
    and anything that landed between (a deposed holder's late write) was never confirmed to its
    writer, since a confirm needs the connection that held the lock. Markers are skipped.
    Returns the state (``None`` if there is none) and the head, as ``(writer, version)``."""
    line: list[tuple[tuple[str, int], bool, dict]] = []
    for doc in entries:
        if "marker" in doc:
            continue
        key = (doc["writer"], doc["v"])
        prev = tuple(doc["prev"]) if doc["prev"] is not None else None
        keys = [k for k, _, _ in line]
        if doc["base"]:
            if prev is None and not line:
                line = [(key, True, doc["state"])]
            elif prev is not None and prev in keys:
                line = line[:keys.index(prev) + 1] + [(key, True, doc["state"])]
        elif line and prev == keys[-1]:
            line.append((key, False, doc["state"]))
    if not line:
        return None, None
    last_base = max(i for i, (_, base, _) in enumerate(line) if base)
    return [state for _, _, state in line[last_base:]], line[-1][0]


class StreamStateStore:
    """The holder's sealed state as entries of the stream ``PREFIX.cluster.state``: a base (the
    whole state) now and then, journal entries in between, each a secret box under the
    deployment's state key naming the entry it follows. Written on the holder's own connection,
    the one that holds the lock, and confirmed (a stream entry is confirmed once a majority of
    the broker nodes has it); read back to the end by whichever replica takes the lock.

    An entry that does not follow the head (written by a holder that lost the lock and did not
    know it yet) is skipped by every reader, so the history is one line.
    """

    def __init__(self, settings: BrokerSettings, key: bytes, writer: bytes) -> None:
        self._settings = settings
        self._box = nacl.secret.SecretBox(key)
        self._writer = writer.hex()
        self._channel = None
        self.version = 0  # the head's version: what the next entry follows
        self.head: tuple[str, int] | None = None
        self.journal_bytes = 0

    def attach(self, connection) -> list[dict] | None:
        """Read the stream to its end on ``connection`` (which holds the lock); write on it from
        now on. Returns the state (a base and the journal entries after it), or ``None``."""
        t = self._settings.topology
        self._channel = connection.channel()
        self._channel.confirm_delivery()
        marker = uuid.uuid4().hex
        self._publish({"marker": marker})
        reader = connection.channel()
        reader.basic_qos(prefetch_count=256)
        bodies: list[bytes] = []
        seen_marker = []

        def on_entry(ch, method, _props, body):
            ch.basic_ack(method.delivery_tag)
            if not seen_marker:
                doc = self._open(body)
                if doc is not None and doc.get("marker") == marker:
                    seen_marker.append(True)
                elif doc is not None:
                    bodies.append(doc)

        tag = reader.basic_consume(t.cluster_state, on_entry, auto_ack=False, arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + STATE_LOAD_TIMEOUT_S
        while not seen_marker:
            if time.monotonic() > deadline:
                raise TransportError("the holder's state stream did not play back to its end in time")
            connection.process_data_events(time_limit=0.05)
        reader.basic_cancel(tag)
        reader.close()
        chain, self.head = state_line(bodies)
        self.version = self.head[1] if self.head else 0
        self.journal_bytes = 0
        return chain

    def _open(self, body: bytes) -> dict | None:
        try:
            return strict_json(self._box.decrypt(body).decode("ascii"))
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            log.warning("an entry of the state stream that is not this deployment's; skipped")
            return None

    def _publish(self, doc: dict) -> int:
        body = bytes(self._box.encrypt(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()))
        try:
            amqp.publish_confirmed(self._channel, "", self._settings.topology.cluster_state, body,
                                   amqp.properties("state"), mandatory=True)
        except pe.AMQPError as err:
            raise TransportError(f"state entry not written: {type(err).__name__}: {err}") from err
        return len(body)

    def _entry(self, state: dict, base: bool) -> None:
        v = self.version + 1
        size = self._publish({"writer": self._writer, "v": v, "prev": list(self.head) if self.head else None,
                              "base": base, "state": state})
        self.head, self.version = (self._writer, v), v
        self.journal_bytes = 0 if base else self.journal_bytes + size

    def save(self, snapshot: dict) -> None:
        self._entry(snapshot, True)

    def append(self, entry: dict) -> None:
        self._entry(entry, False)


def published_releases(connection, settings: BrokerSettings, signing_key: bytes, measurement: bytes,
                       idle_s: float = 1.0) -> dict[str, int]:
    """Per stream, how many releases the ledger had charged at the latest signed release or
    budget notice in the release stream (``budget.releases``): what a state that is not rolled
    back holds at least. Only messages signed by this deployment's key count; the stream is
    read from its first offset until it has been quiet for ``idle_s``."""
    out: dict[str, int] = {}
    reader = connection.channel()
    reader.basic_qos(prefetch_count=256)
    last = [time.monotonic()]

    def on_message(ch, method, _props, body):
        ch.basic_ack(method.delivery_tag)
        last[0] = time.monotonic()
        try:
            message = wire.SignedMessage.from_bytes(body)
            signing.verify(signing_key, signing.RESULT, message.payload, message.signature,
                           error=InvalidResultSignature, what="result")
            kind = strict_json(message.payload).get("kind")
            if kind not in (RESULT_KIND, EXHAUSTED_KIND):
                return
            parsed = PAYLOADS[kind].from_payload(message.payload)
        except (InvalidMessage, InvalidResultSignature, ValueError, AttributeError):
            return  # not ours: it proves nothing about our ledger
        if parsed.measurement != measurement.hex():
            return
        releases = parsed.budget.get("releases")
        if isinstance(releases, int):
            out[parsed.stream] = max(out.get(parsed.stream, 0), releases)

    tag = reader.basic_consume(settings.topology.releases_stream, on_message, auto_ack=False,
                               arguments={"x-stream-offset": "first"})
    while time.monotonic() - last[0] < idle_s:
        connection.process_data_events(time_limit=0.1)
    reader.basic_cancel(tag)
    reader.close()
    return out


def check_not_rolled_back(enclave: Enclave, published: dict[str, int]) -> None:
    """:raises RollbackDetected: the state read from the stream has charged fewer releases of
    some stream than a release already published says: it is an earlier copy, put back (its
    budget would be spent a second time)."""
    for stream, releases in sorted(published.items()):
        ledger = enclave.ledgers.get(stream)
        if ledger is not None and ledger.releases < releases:
            raise RollbackDetected(
                f"the holder's state stream holds {ledger.releases} release(s) of stream {stream!r}, but release "
                f"{releases} of it is published already: the state stream was rolled back",
                hint="restore PREFIX.cluster.state to its latest entries; no replica releases until then")


# -- the release holder -------------------------------------------------------------------
class Holder(EnclaveRuntime):
    """The single enclave's runtime, fed increments from the replicas instead of records.

    It stands by while another replica holds the lock. Each time it takes the lock it reads the
    state stream and, if anyone wrote there since it last held the lock, starts over from what
    it reads (a new core: the ledger, windows and held releases of the last holder)."""

    def __init__(self, build, settings: BrokerSettings, cluster: Cluster, store: StreamStateStore,
                 start_timeout_s: float | None = None) -> None:
        self._build = build  # state entries (or None) -> Enclave
        self.cluster = cluster
        self._store = store
        self._cluster_settings = settings
        self._timeout = start_timeout_s
        self._adopt(None)
        self._adopted = False  # whether the core was built from the stream (at a lock taken)

    def _adopt(self, state: list[dict] | None, enclave: Enclave | None = None) -> None:
        """Start over from ``state`` (what the stream holds; ``enclave``, if given, is its core
        already built): a new core and a runtime around it."""
        for pool in (getattr(self, "_opener", None), getattr(self, "_releaser", None)):
            if pool is not None:
                pool.shutdown(wait=True)
        stopping = getattr(self, "stopping", False)
        enclave = enclave or self._build(state)
        EnclaveRuntime.__init__(self, enclave, self._cluster_settings, StateWriter(enclave, self._store),
                                start=enclave.start(), start_timeout_s=self._timeout)
        self.stopping = stopping
        self.max_delivery = MAX_FRAME_BYTES
        self._key = enclave.keyring.cluster_key()
        self._workers: dict[bytes, tuple[float, int]] = {}  # worker -> (last heard, through_ms)
        self._parked: list[tuple[object, frames.Increment]] = []
        self._replies: list[tuple[str, bytes]] = []
        self._acking: list[int] = []
        self.merged = 0

    def _connect(self) -> None:
        self._unacked.clear()
        self._inbox.clear()
        self._parked.clear()
        self._replies.clear()
        t = self.settings.topology
        connection = amqp.connect(self.settings, name=f"sealedsum-replica {t.prefix} holder")
        # Reached: a broker lost later is waited for, however long the stand-by lasted.
        self._connected_once = True
        try:
            channel = declare_topology(connection.channel(), self.settings, reopen=connection.channel,
                                       shards=self.cluster.shards)
            # The release role is the token in PREFIX.cluster.role, held unacknowledged for as long
            # as this connection lives (a quorum queue: it outlives the loss of any one broker node,
            # where an exclusive queue would stay locked until its node came back).
            role = connection.channel()
            role.basic_qos(prefetch_count=1)
            token: list = []
            role.basic_consume(t.cluster_role, lambda _c, m, _p, body: token.append(m), auto_ack=False)
            deadline = time.monotonic() + ROLE_WAIT_S
            while not token and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.05)
            if not token:
                raise AnotherReleaser("another replica holds the release role (the token is not in "
                                      f"{t.cluster_role})")
            # Reply-to probes go to a queue of this connection's own.
            probe = reply_queue(t, uuid.uuid4().bytes)
            channel.queue_declare(probe, exclusive=True, auto_delete=True)
            # The head this core stands on: the last entry it wrote, or the one it was built from.
            previous = self._store.head if self._adopted else False
            state = self._store.attach(connection)
            if previous is False or self._store.head != previous:
                candidate = self._build(state)
                try:
                    check_not_rolled_back(candidate, published_releases(
                        connection, self.settings, candidate.keys.bundle.ed25519, candidate.measurement))
                except RollbackDetected as err:
                    log.error("the holder's state was rolled back; refusing the release role", extra={"fields": {
                        "error": type(err).__name__, "detail": str(err), "hint": err.hint}})
                    raise AnotherReleaser(str(err)) from err
                self._adopt(state, candidate)
                log.info("release role taken", extra={"fields": {
                    "state_version": self._store.version, "journal_entries": len(state) - 1 if state else 0}})
            self._adopted = True
            self.probe_queue = probe  # after _adopt, which starts the runtime's fields afresh
            self._connected_once = True
        except BaseException:
            if connection.is_open:
                connection.close()
            raise
        self._connection = connection
        if self._standing_by:
            self._standing_by = False
        self._publish = connection.channel()
        self._publish.confirm_delivery()
        self._dead = connection.channel()
        self._dead.tx_select()
        self._notify = connection.channel()
        self._channel = channel
        self.republish_unconfirmed()
        channel.basic_qos(prefetch_count=64)
        channel.basic_consume(t.cluster_partials, self._on_record, auto_ack=False)
        self._open_requests()

    def _learn_reply_node(self) -> None:
        """Every node's direct reply-to name, not only the request connection's: clients attest
        through whichever node they are connected to. A probe from a short connection to each
        node (as :meth:`EnclaveRuntime._learn_reply_node` does from the request connection)."""
        super()._learn_reply_node()
        if self._connection is None or len(self.settings.urls) < 2:
            return
        for url in self.settings.urls:
            try:
                conn = pika.BlockingConnection(amqp.parameters(self.settings, url=url))
            except amqp.CONNECT_ERRORS:
                continue  # a node that is down: learned when a replica on it reports it
            try:
                self._probe_reply_node(conn)
            except pe.AMQPError as err:
                log.warning("could not learn a broker node's reply name", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err)}})
            finally:
                if conn.is_open:
                    conn.close()
        log.info("broker nodes for replies", extra={"fields": {
            "nodes": sorted(n.decode("utf-8", "replace") for n in self.reply_nodes)}})

    def _ingest_due(self) -> bool:
        return bool(self._inbox)

    def ingest(self) -> None:
        batch, self._inbox = self._inbox, []
        for method, _kind, body, _size, _token in batch:
            try:
                frame = frames.open_frame(self._key, body)
            except InvalidMessage as err:
                log.warning("a frame that is not this deployment's; dropped", extra={"fields": {"detail": str(err)}})
                self._unacked.append(method.delivery_tag)
                continue
            if isinstance(frame, frames.Heartbeat):
                self._heard(frame.worker, frame.through_ms)
                if frame.reply_node and frame.reply_node not in self.reply_nodes:
                    self.reply_nodes.add(frame.reply_node)
                    log.info("broker node for replies learned from a replica", extra={"fields": {
                        "node": frame.reply_node.decode("utf-8", "replace")}})
                self._unacked.append(method.delivery_tag)
            elif isinstance(frame, frames.Increment):
                self._heard(frame.worker, frame.through_ms)
                self._parked.append((method, frame))
            else:
                self._unacked.append(method.delivery_tag)
        self._merge_parked()

    def _heard(self, worker: bytes, through_ms: int) -> None:
        _, before = self._workers.get(worker, (0.0, 0))
        self._workers[worker] = (time.monotonic(), max(before, through_ms))

    def close_ms(self, now: int) -> int:
        """The clock time-closed windows close by: a window closes once every replica heard from
        lately has reported past its end, or ``window_grace_seconds`` after its end regardless."""
        alive = [through for heard, through in self._workers.values()
                 if time.monotonic() - heard < WORKER_TIMEOUT_S]
        reported = min([now, *alive])
        return max(now - self.cluster.window_grace_ms, reported)

    def _merge_parked(self) -> None:
        now = now_ms()
        close = self.close_ms(now)
        waiting = []
        behind: set[bytes] = set()
        for method, increment in self._parked:
            if increment.worker in behind or self.enclave.parks(increment, close):
                waiting.append((method, increment))  # a replica's frames stay in its order
                behind.add(increment.worker)
                continue
            effects, refused = self.enclave.merge(increment, now, close)
            self._owe(effects)
            if not refused:
                self.merged += len(increment.members)
            self._replies.append((reply_queue(self.settings.topology, increment.worker),
                                  frames.seal(self._key, frames.Reply(increment.worker, increment.seq, refused,
                                                                      increment.resend or method.redelivered))))
            self._unacked.append(method.delivery_tag)
        self._parked = waiting

    def flush(self) -> None:
        self._acking = list(self._unacked)
        super().flush()
        if not self._unacked and self._replies:
            # The checkpoint that counts them is durable: now the replicas may acknowledge.
            replies, self._replies = self._replies, []
            for queue, body in replies:
                self._notify.basic_publish("", queue, body, amqp.properties(frames.FRAME_TYPE))

    def _ack(self, last_delivery_tag: int) -> None:
        # One by one: a parked increment before them stays unacknowledged.
        for tag in self._acking:
            self._channel.basic_ack(tag)
        self._acking = []

    def _tick(self) -> None:
        if self._parked:
            self._merge_parked()
        self._owe(self.enclave.on_tick(self.close_ms(now_ms())))
        self.flush()
        if self._held and time.monotonic() - self._last_held_retry >= 5.0:
            self._last_held_retry = time.monotonic()
            self._owe(Effects(publish=tuple(self._outbox[k] for k in sorted(self._held) if k in self._outbox)))
            self.flush()
        if time.monotonic() - self._last_stats >= 10.0:
            self.log_stats()

    def request_rotation(self) -> None:
        log.warning("key rotation is not available to replicas; ignored")


# -- a replica's work -----------------------------------------------------------------------
@dataclass(slots=True)
class Flight:
    """The increment a replica waits for the holder to answer: its records (with their place:
    delivery, index within a record batch), the batch's deliveries, the records refused so far
    (with their rejections), the records known counted (a resend's duplicates), when sent."""

    increment: frames.Increment
    members: list
    batch: list
    local: list
    counted: list
    sent: float


class Worker:
    """Consumes the shard queues, opens and checks records, sends increments to the holder and
    answers key requests of joining replicas (on a thread of its own)."""

    def __init__(self, enclave: Enclave, settings: BrokerSettings, cluster: Cluster, measurement: bytes) -> None:
        self.enclave = enclave  # keys and policy only: its state is not used
        self.settings = settings
        self.cluster = cluster
        self.measurement = measurement
        self.id = uuid.uuid4().bytes
        self._key = enclave.keyring.cluster_key()
        self.stopping = False
        # What one enclave holds of its one records queue, shared out over the shard queues
        # (a prefetch is per consumer): a replica that dies leaves no more to redeliver, and the
        # first to start on a backlog does not take it all.
        self.prefetch = max(PREFETCH_MIN, enclave_prefetch(enclave) // cluster.shards)
        self.batch = ack_batch_for(enclave_prefetch(enclave))
        self._seq = 0
        self._conn = None
        self._inbox: list[tuple[object, str | None, bytes, int, float]] = []
        # The increment the holder has not answered yet: (increment, its records' places,
        # deliveries, local refusals, when sent).
        self._flight = None
        self._replies: list[bytes] = []
        self._joins: list[tuple[object, bytes]] = []
        self._last_beat = 0.0
        self.stats = collections.Counter()
        self.spans = sorted({s.window_ms for s in enclave.policy.streams.values() if s.window_ms})
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="replica-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True

    def run(self) -> None:
        while not self.stopping:
            try:
                self._connect()
                while not self.stopping:
                    self._conn.process_data_events(time_limit=0.01)
                    self._serve_joins()
                    self._step()
            except (TransportError, pe.AMQPError) as err:
                if self.stopping:
                    break
                log.warning("replica lost the broker; reconnecting", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err)}})
                self._close()
                _sleep(1.0, lambda: self.stopping)
            except Exception:  # noqa: BLE001 - a fault of ours: the deliveries go back, and we start over
                log.exception("replica worker failed; starting over on a new connection")
                self.stats["restarts"] += 1
                self._close()
                _sleep(1.0, lambda: self.stopping)
        self._close()

    def _connect(self) -> None:
        self._inbox.clear()
        self._flight = None  # its deliveries come back to some replica
        self._replies.clear()
        t = self.settings.topology
        self._conn = amqp.connect(self.settings, name=f"sealedsum-replica {t.prefix} worker {self.id.hex()[:8]}")
        channel = declare_topology(self._conn.channel(), self.settings, reopen=self._conn.channel,
                                   shards=self.cluster.shards)
        self._records = self._conn.channel()
        self._records.basic_qos(prefetch_count=self.prefetch)
        for name in t.shard_queues(self.cluster.shards):
            self._records.basic_consume(name, self._on_record, auto_ack=False)
        channel.queue_declare(reply_queue(t, self.id), exclusive=True, auto_delete=True)
        channel.basic_consume(reply_queue(t, self.id), self._on_reply, auto_ack=True)
        # What this node is called in direct reply-to names: a probe to ourselves says.
        self.reply_node = b""
        probe = self._conn.channel()
        probe.basic_consume(amqp.DIRECT_REPLY_TO, lambda *_: None, auto_ack=True)
        probe.basic_publish("", reply_queue(t, self.id), b"", pika.BasicProperties(
            reply_to=amqp.DIRECT_REPLY_TO, type="reply-to-probe", app_id=amqp.APP_ID))
        self._joiners = self._conn.channel()
        self._joiners.basic_qos(prefetch_count=8)
        self._joiners.basic_consume(t.cluster_join, lambda _c, m, p, body: self._joins.append((p, body)),
                                    auto_ack=True)
        self._frames = self._conn.channel()
        self._frames.confirm_delivery()
        self._dead = self._conn.channel()
        self._dead.tx_select()
        self._notify = self._conn.channel()
        log.info("replica consuming", extra={"fields": {"worker": self.id.hex(), "shards": self.cluster.shards,
                                                        "prefetch": self.prefetch}})

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except pe.AMQPError:
                pass

    def _on_reply(self, _channel, _method, props, body: bytes) -> None:
        if getattr(props, "type", None) == "reply-to-probe":
            self.reply_node = amqp.reply_to_node(props.reply_to) or b""
        else:
            self._replies.append(body)

    def _on_record(self, _channel, method, props, body: bytes) -> None:
        size = len(body)
        if size > self.enclave.max_delivery_bytes():
            body = body[:DEAD_LETTER_PREFIX_BYTES]
        self._inbox.append((method, getattr(props, "type", None), body, size, time.time(),
                            topology.notice_token(getattr(props, "headers", None))))

    # -- joining replicas --------------------------------------------------------------
    def _serve_joins(self) -> None:
        while self._joins:
            props, body = self._joins.pop(0)
            reply_to = getattr(props, "reply_to", None) or ""
            if not reply_to.startswith(self.settings.topology.cluster_reply_prefix):
                continue  # replies go only to a replica's own queue, never where a request says
            try:
                req = join.JoinRequest.from_bytes(body)
                joiner = join.check_request(req, self.cluster, self.measurement, now_ms())
            except (AttestationError, InvalidMessage) as err:
                self.stats["joins_refused"] += 1
                log.warning("a replica that does not attest asked for the keys; refused", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err)}})
                continue
            reply = join.answer(req, self.enclave.keyring, self.enclave.attest)
            self._joiners.basic_publish("", reply_to, reply.to_bytes(), pika.BasicProperties(
                type=join.REPLY_TYPE, app_id=amqp.APP_ID))
            self.stats["joins_answered"] += 1
            log.info("keys handed to an attested replica", extra={"fields": {"measurement": joiner.hex()}})

    # -- records -------------------------------------------------------------------------
    def _window_key(self, at_s: float) -> tuple[int, ...]:
        ms = int(at_s * 1000)
        return tuple(ms // span for span in self.spans)

    def _step(self) -> None:
        now = time.monotonic()
        if self._flight is not None:
            self._answer()
            if self._flight is not None and now - self._flight.sent > REPLY_TIMEOUT_S:
                increment = self._flight.increment
                resent = frames.Increment(increment.worker, increment.seq, True, increment.read_ms,
                                          increment.through_ms, increment.groups)
                self._flight.increment, self._flight.sent = resent, now
                self._send(resent)
                self.stats["resent"] += 1
            return
        if self._inbox and (len(self._inbox) >= self.batch or time.time() - self._inbox[0][4] >= INGEST_WAIT_S):
            self._build()
        elif now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            through = int((self._inbox[0][4] if self._inbox else time.time()) * 1000)
            self._send(frames.Heartbeat(self.id, through, self.reply_node))

    def _send(self, frame: frames.Frame) -> None:
        amqp.publish_confirmed(self._frames, "", self.settings.topology.cluster_partials,
                               frames.seal(self._key, frame), amqp.properties(frames.FRAME_TYPE), mandatory=True)

    def _build(self) -> None:
        """The next increment: deliveries received within one window (for every time-closed
        stream), opened and checked."""
        first = self._window_key(self._inbox[0][4])
        take = 0
        while take < min(len(self._inbox), self.batch) and self._window_key(self._inbox[take][4]) == first:
            take += 1
        batch, self._inbox = self._inbox[:take], self._inbox[take:]
        through = int((self._inbox[0][4] if self._inbox else time.time()) * 1000)
        places: list[tuple[int, int | None]] = []  # (delivery, index within a record batch)
        opened: list[OpenedRecord | RecordRejected] = []
        local: list[tuple[int, int | None, RecordRejected]] = []
        for d, (method, kind, body, size, *_) in enumerate(batch):
            parts = (self.enclave.oversized(size) if size > self.enclave.max_delivery_bytes()
                     else self.enclave.records_in(body, kind))
            if isinstance(parts, RecordRejected):
                local.append((d, None, parts))
                continue
            batched = kind == wire.RECORD_BATCH_TYPE
            for i, part in enumerate(parts):
                places.append((d, i if batched else None))
                opened.append(self.enclave.open(part))
        checked = work.checked(opened)
        records, where = [], []
        for place, item in zip(places, checked):
            if isinstance(item, RecordRejected):
                local.append((place[0], place[1], item))
            else:
                records.append(item)
                where.append(place)
        self._submit(batch, records, where, local, [], int(batch[0][4] * 1000), through)

    def _submit(self, batch, records, where, local, counted, read_ms: int, through: int) -> None:
        if not records:
            self._finish(batch, local, counted)
            return
        self._seq += 1
        increment, index = work.increment(self.id, self._seq, records, read_ms, through)
        members = [(records[i], where[i]) for i in index]
        self._flight = Flight(increment, members, batch, local, counted, time.monotonic())
        self._send(increment)

    def _answer(self) -> None:
        while self._replies:
            body = self._replies.pop(0)
            try:
                reply = frames.open_frame(self._key, body)
            except InvalidMessage:
                continue
            if not isinstance(reply, frames.Reply) or self._flight is None or reply.seq != self._flight.increment.seq:
                continue  # an answer to an increment this replica no longer waits for
            flight, self._flight = self._flight, None
            increment, members, batch, local = flight.increment, flight.members, flight.batch, flight.local
            if reply.committed:
                self.stats["counted"] += len(members)
                self._finish(batch, local, flight.counted + members)
                return
            refused = dict(reply.refused)
            keep_records, keep_where = [], []
            for i, (record, place) in enumerate(members):
                rejection = refused.get(i)
                if rejection is None:
                    keep_records.append(record)
                    keep_where.append(place)
                    continue
                method = batch[place[0]][0]
                if rejection.reason == RejectReason.DUPLICATE and (reply.again or increment.resend or method.redelivered):
                    self.stats["counted_before"] += 1  # counted the first time; only the answer was lost
                    flight.counted.append((record, place))
                    continue
                rejection.record = (record.stream.name, record.envelope.record_id)
                local.append((place[0], place[1], rejection))
            self._submit(batch, keep_records, keep_where, local, flight.counted, increment.read_ms,
                         increment.through_ms)
            return

    def _finish(self, batch, local, counted) -> None:
        """Dead-letter what was refused, with the notices of their refusals to the producers'
        tokens (in one transaction), then acknowledge the batch, then send the receipts of what
        was counted (best effort, as a single enclave does: protocol section 11.6)."""
        t = self.settings.topology
        if local:
            for d, index, rejection in local:
                _method, _kind, body, size, _, token = batch[d]
                headers = {"x-sealedsum-reason": rejection.reason.value, "x-sealedsum-detail": rejection.detail,
                           "x-sealedsum-rejected-at": now_ms()}
                if rejection.record is not None:
                    headers["x-sealedsum-stream"] = rejection.record[0]
                if index is not None:
                    headers["x-sealedsum-batch-index"] = index
                if size > len(body):
                    headers["x-sealedsum-original-bytes"] = size
                self._dead.basic_publish(t.rejected_exchange, "", body, amqp.properties("rejected-record",
                                                                                        headers=headers))
                if token is not None:
                    notice = self.enclave.refusal_notice(token, Effects(rejection=rejection, record=rejection.record),
                                                         index, headers["x-sealedsum-rejected-at"])
                    self._dead.basic_publish(t.notices_exchange, notice.token, notice.body, amqp.properties("notice"))
                    self.stats["notices:rejected"] += 1
                self.stats[f"rejected:{rejection.reason.value}"] += 1
            self._dead.tx_commit()
        # The batch is the oldest of what this channel holds (one increment in flight at a time,
        # taken in delivery order): one ack covers it.
        self._records.basic_ack(batch[-1][0].delivery_tag, multiple=True)
        receipts: dict[str, list[tuple[str, bytes]]] = {}
        for record, (d, _) in counted:
            token = batch[d][5]
            if token is not None:
                receipts.setdefault(token, []).append((record.stream.name, record.envelope.record_id))
        if receipts:
            try:
                for notice in self.enclave.receipts(receipts, now_ms()):
                    self._notify.basic_publish(t.notices_exchange, notice.token, notice.body, amqp.properties("notice"))
                    self.stats["notices:counted"] += 1
            except pe.AMQPError as err:
                log.warning("receipts not sent", extra={"fields": {"error": type(err).__name__, "detail": str(err)}})
