"""The enclave's broker edge: turns deliveries and ticks into calls on
:class:`sealedsum.sidecar.enclave.service.Enclave` and carries out the effects it answers
with, through :func:`sealedsum.sidecar.enclave_process.checkpoint.commit`.

Order per record: a rejected record is published to the dead-letter exchange with
its reason, in one broker transaction per batch committed *before* the batch is
acknowledged, so a record is never lost between the two. A record that carried a notice
token (``topology.NOTIFY_HEADER``) also gets a signed notice to that token: its refusal in
the same transaction, or its receipt once a checkpoint holds it (best effort: a notice is
never stored or republished). Releases are checkpointed in the
enclave's sealed state before they are published and republished unchanged after a
reconnect until the broker confirms them.

The records connection holds the prefix's release lock; requests (attestation, budget)
are consumed and answered on a second connection, after records and rate-limited per
broker account, so no client can cut or starve the first (docs/protocol.md, sections 2 and 8).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pika
import pika.exceptions as pe

from sealedsum.common import amqp, topology, wire
from sealedsum.common.backoff import Backoff
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import AnotherReleaser, ExitCode, InvalidMessage, RecordRejected, StorageError, TransportError, \
    Unroutable
from sealedsum.sidecar.enclave.release import Notice, Publication
from sealedsum.sidecar.enclave.service import NOTHING, Effects, Enclave
from sealedsum.sidecar.enclave.state import Closing
from sealedsum.sidecar.enclave_process.checkpoint import StateWriter, StorageStall, commit

log = logging.getLogger("sealedsum.runtime")

# Deliveries in flight to the enclave: up to PREFETCH_MAX records, fewer when records can
# be large, so that what the broker has handed over stays within PREFETCH_BYTES.
# Measured on the benchmark (2 cores, 2048-bit keys, 1-value records): ingest went from
# about 3,900 records/s at prefetch 64 / batches of 32 to about 5,600 at 512 / 256.
PREFETCH_MAX = 512
PREFETCH_MIN = 16
PREFETCH_BYTES = 128 << 20
PREFETCH = PREFETCH_MAX  # for 1-value records; see prefetch_for()
# Acknowledge in batches, each after one checkpoint covering it (multiple=True): at most
# half the prefetch, so the broker can keep delivering while a batch waits for its fsync.
ACK_BATCH_MAX = 256


def prefetch_for(max_record_bytes: int) -> int:
    """The prefetch for records of at most ``max_record_bytes``."""
    return max(PREFETCH_MIN, min(PREFETCH_MAX, PREFETCH_BYTES // max(1, max_record_bytes)))


def enclave_prefetch(enclave: Enclave) -> int:
    """The prefetch for this enclave: a delivery is one record or a record batch, whichever
    can be larger."""
    return prefetch_for(enclave.max_delivery_bytes())


def ack_batch_for(prefetch: int) -> int:
    return max(1, min(ACK_BATCH_MAX, prefetch // 2))


# Batches at least this large are opened on two threads (libsodium's box opening releases
# the GIL); smaller ones are not worth the hand-off.
PARALLEL_OPEN_MIN = 8
# How often the loop looks for a finished draw while one runs (its release waits for it).
DRAW_POLL_S = 0.002
# How long a delivery may wait for its batch when records trickle in.
FLUSH_EVERY_S = 0.1
# How long a delivery may wait for others to share its batch: each batch's records are
# checked together with one decryption per ciphertext slot (validity.mismatched), so a batch
# of one would cost a decryption per record. At most ack_batch records wait.
INGEST_WAIT_S = 0.02
# How long the loop waits on the records connection before it looks at the requests.
RPC_POLL_S = 0.01
STATS_EVERY_S = 10.0
MAX_BACKOFF_S = 30.0
HELD_RETRY_S = 5.0
# While another enclave holds the prefix's release lock, look again this often.
LOCK_RETRY_S = 2.0
# Requests (attestation, budget) are handled on a connection of their own, after records:
# up to RPC_PER_PASS looked at per pass of the loop. Each broker account (the user_id the
# broker checks; none set: one shared account) gets RPC_ACCOUNT_RATE_PER_S answers a second
# (bursts of RPC_ACCOUNT_BURST), all together RPC_RATE_PER_S (bursts of RPC_BURST). A request
# over its account's rate is dropped unanswered, which costs next to nothing, so one
# account's flood drains fast and other accounts are still answered; past the total rate
# requests wait in the broker's bounded queue (topology.ATTEST_QUEUE_MAX_LENGTH, oldest
# dropped). RPC_PREFETCH bounds what the enclave holds of them.
RPC_PREFETCH = 64
RPC_PER_PASS = 64
RPC_RATE_PER_S = 200.0
RPC_BURST = 50
RPC_ACCOUNT_RATE_PER_S = 20.0
RPC_ACCOUNT_BURST = 20
RPC_ACCOUNTS_MAX = 10_000
RPC_MAX_REQUEST_BYTES = 4096
RPC_REOPEN_S = 1.0
# A dead letter of a delivery larger than any record the policy allows keeps this much of it
# (and its size in a header), so junk cannot fill the broker's disk through the rejected queue.
DEAD_LETTER_PREFIX_BYTES = 4096


def now_ms() -> int:
    return int(time.time() * 1000)


def declare_topology(channel, settings: BrokerSettings, reopen=None, shards: int | None = None):
    """Declare every exchange and queue the system uses (the sidecar owns them); return the
    channel to go on with.

    The request queue and the dead-letter queue gained length bounds: one declared by an
    earlier version without them makes the broker refuse the declaration (406), which closes
    the channel. The request queue only holds requests seconds old: it is deleted and declared
    again. The dead-letter queue holds what the operator has not read yet: it is kept as it is,
    with a warning. ``reopen()`` gives a fresh channel after such a refusal."""
    t = settings.topology
    for d in topology.declarations(t, settings.queue_type, settings.max_queued_records, shards):
        if isinstance(d, topology.ExchangeDecl):
            extra = {"arguments": dict(d.arguments)} if d.arguments else {}
            channel.exchange_declare(d.name, exchange_type=d.type, durable=d.durable, **extra)
        elif isinstance(d, topology.QueueDecl):
            try:
                channel.queue_declare(d.name, durable=d.durable, arguments=dict(d.arguments))
            except pe.ChannelClosedByBroker as err:
                if reopen is None or err.reply_code != 406 or d.name not in (t.attest_queue, t.rejected_queue):
                    raise
                channel = reopen()
                if d.name == t.attest_queue:
                    channel.queue_delete(d.name)
                    channel.queue_declare(d.name, durable=d.durable, arguments=dict(d.arguments))
                else:
                    channel.queue_declare(d.name, passive=True)
                    log.warning("the dead-letter queue was declared by an earlier version without a length bound; "
                                "drain and delete it to bound it", extra={"fields": {"queue": d.name}})
        else:
            channel.queue_bind(d.queue, d.exchange, routing_key=d.routing_key)
    return channel


class RequestBucket:
    """A token bucket: ``rate`` requests a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def refund(self) -> None:
        self._tokens = min(self.burst, self._tokens + 1.0)


def _drawn_now(fn) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn())
    except Exception as err:  # noqa: BLE001 - handed on to Enclave.complete
        future.set_exception(err)
    return future


def draws_on_a_thread() -> bool:
    """Closed windows are drawn on a thread of their own where there is a second core (the
    decryption's long powmods release the GIL); with one core, inline."""
    return (os.cpu_count() or 1) > 1


class EnclaveRuntime:
    """Runs one enclave core against the broker until :meth:`stop`.

    :param writer: where checkpoints and sealed keys go (``StateWriter(enclave)`` keeps
        the state in memory only: tests of the broker edge).
    :param start: what the core owed when it was built (:meth:`Enclave.start`); carried
        out on the first connection.
    """

    def __init__(self, enclave: Enclave, settings: BrokerSettings, writer: StateWriter | None = None,
                 start: Effects = NOTHING, start_timeout_s: float | None = None) -> None:
        self.enclave = enclave
        self.settings = settings
        self._writer = writer or StateWriter(enclave)
        self._rotation_requested = False
        # Owed since the last commit: effects of the records, ticks and draws handled, and
        # the deliveries they came in (acknowledged once a checkpoint holds them).
        self._owed = NOTHING
        self._unacked: list[int] = []
        self._storage = StorageStall()  # while the disk refuses checkpoints, both wait for it
        # Publications not yet confirmed by the broker, by key: republished after a
        # reconnect, and every HELD_RETRY_S while no queue is bound for their stream.
        self._outbox: dict[str, Publication] = {}
        self._held: set[str] = set()
        # Deliveries received but not yet opened, in order: (delivery method, AMQP type, body,
        # the body's full size, the notice token it carried or None).
        self._inbox: list[tuple[object, str | None, bytes, int, str | None]] = []
        self._inbox_since = 0.0  # when the oldest delivery in the inbox arrived
        # A second thread opens half of each batch where there is a second core.
        two_cores = (os.cpu_count() or 1) > 1
        self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open") if two_cores else None
        self._releaser = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="release") if draws_on_a_thread()
                          else None)
        self._drawing: dict[str, tuple[Closing, Future]] = {}  # in closing order
        self._channel = None
        self.stopping = False
        self._connection = None
        self._publish = None
        # Dead letters of this batch, published in one transaction before its ack, with the
        # notices of their refusals to the producers' tokens.
        self._dead_letters: list[tuple[bytes, dict]] = []
        self._refusals: list[Notice] = []
        self._dead = None
        # Counted records that carried a token, by token: receipted after the next checkpoint,
        # on a channel without confirms (a receipt lost with the connection is only a receipt).
        self._counted: dict[str, list[tuple[str, bytes]]] = {}
        self._notify = None
        self.notices: collections.Counter = collections.Counter()  # published to producers, by kind
        self._standing_by = False
        # The request connection: its own, so that a broker error on a reply never touches
        # the connection that consumes records.
        self._rpc = None
        self._rpc_channel = None
        self._rpc_retry_at = 0.0
        self._requests: collections.deque = collections.deque()
        # Broker nodes whose direct reply-to names this enclave has seen the broker hand out:
        # a well-formed name naming any other node makes the broker close the publishing
        # connection (541), so a reply goes only to a node in here.
        self.reply_nodes: set[bytes] = set()
        # Where reply-to probes go: a queue only this enclave's records connection can read.
        self.probe_queue = settings.topology.release_lock
        self._bucket = RequestBucket(RPC_RATE_PER_S, RPC_BURST)
        self._accounts: dict[str, RequestBucket] = {}
        self.ignored_requests: collections.Counter = collections.Counter()
        self.rpc_reopens = 0
        self.max_delivery = enclave.max_delivery_bytes()
        # With no broker at start, give up after this long (None: never); once connected, a
        # lost broker is waited for however long it takes.
        self.start_timeout_s = start_timeout_s
        self.exit_code = 0
        self._connected_once = False
        self._last_stats = time.monotonic()
        self._last_held_retry = time.monotonic()
        self.prefetch = enclave_prefetch(enclave)
        self.ack_batch = ack_batch_for(self.prefetch)
        self._owe(start)

    def stop(self) -> None:
        self.stopping = True

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Consume until :meth:`stop`; reconnect with capped backoff on broker loss. With no
        broker within ``start_timeout_s`` of the start, stop with ``exit_code`` 3."""
        backoff = Backoff(first=1.0, cap=MAX_BACKOFF_S)
        started = time.monotonic()
        while not self.stopping:
            try:
                self._connect()
                self._connected_once = True
                backoff.reset()
                while not self.stopping:
                    # While a window is being drawn, look back soon: its release waits for us.
                    self._connection.process_data_events(time_limit=self._wait())
                    if self._ingest_due():
                        self.ingest()
                    self.release_closed()
                    self.flush()
                    self._tick()
                    self.serve_requests()
            except AnotherReleaser as err:
                if not self._standing_by:
                    self._standing_by = True
                    log.warning("another enclave holds this prefix's release lock; standing by", extra={"fields": {
                        "lock": self.settings.topology.release_lock, "detail": str(err),
                        "retry_every_s": LOCK_RETRY_S}})
                self._close()
                self._pause(LOCK_RETRY_S)
            except (TransportError, pe.AMQPConnectionError, pe.AMQPChannelError) as err:
                if self.stopping:
                    break
                self._close()
                waited = time.monotonic() - started
                if not self._connected_once and self.start_timeout_s is not None and waited >= self.start_timeout_s:
                    log.error("no broker since the start; giving up", extra={"fields": {
                        "error": type(err).__name__, "detail": str(err), "waited_s": round(waited, 1),
                        "hint": "start RabbitMQ, or check broker.url; broker.reconnect_seconds sets this wait"}})
                    self.exit_code = ExitCode.TRANSPORT
                    break
                delay = backoff.next_delay()
                if not self._connected_once and self.start_timeout_s is not None:
                    delay = min(delay, max(0.1, self.start_timeout_s - waited))
                log.warning("broker connection lost; reconnecting", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err), "retry_in_s": delay}})
                self._pause(delay)
        if self._connection is not None and self._connection.is_open:
            try:
                self.ingest()
                self.release_closed(wait=True)
                self.flush()  # a clean stop leaves nothing to redeliver
            except (TransportError, pe.AMQPError):
                pass
        self._close()
        for pool in (self._opener, self._releaser):
            if pool is not None:
                pool.shutdown(wait=True)
        self.log_stats()

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on :meth:`stop` (SIGTERM must stop the sidecar within seconds
        even while it waits for a lost broker)."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _wait(self) -> float:
        wait = DRAW_POLL_S if self._drawing else FLUSH_EVERY_S
        if self._rpc is not None:
            wait = min(wait, RPC_POLL_S)
        if self._inbox:
            wait = min(wait, max(0.0, self._inbox_since + INGEST_WAIT_S - time.monotonic()))
        return wait

    def _ingest_due(self) -> bool:
        return bool(self._inbox) and (len(self._inbox) >= self.ack_batch
                                      or time.monotonic() - self._inbox_since >= INGEST_WAIT_S)

    def _connect(self) -> None:
        self._unacked.clear()  # the broker redelivers them on the new channel
        self._inbox.clear()
        self._dead_letters.clear()  # their records are redelivered, and refused again
        self._refusals.clear()
        t = self.settings.topology
        self._connection = amqp.connect(self.settings, name=f"sealedsum-enclave {t.prefix}")
        # Before anything is consumed or published: every release goes out on a connection
        # that holds the lock, so two enclaves can never both count and release for a prefix.
        lock = topology.release_lock(t)
        try:
            self._connection.channel().queue_declare(lock.name, durable=lock.durable, exclusive=lock.exclusive)
        except pe.ChannelClosedByBroker as err:
            if err.reply_code == 405:  # RESOURCE_LOCKED
                raise AnotherReleaser(err.reply_text) from err
            raise
        if self._standing_by:
            self._standing_by = False
            log.info("release lock taken", extra={"fields": {"lock": lock.name}})
        channel = declare_topology(self._connection.channel(), self.settings, reopen=self._connection.channel)
        self._publish = self._connection.channel()
        self._publish.confirm_delivery()
        self._dead = self._connection.channel()
        self._dead.tx_select()
        self._notify = self._connection.channel()
        self._channel = channel
        self.republish_unconfirmed()
        channel.basic_qos(prefetch_count=self.prefetch)
        channel.basic_consume(t.records_queue, self._on_record, auto_ack=False)
        self._open_requests()
        log.info("consuming", extra={"fields": {"records_queue": t.records_queue, "attest_queue": t.attest_queue,
                                                "prefetch": self.prefetch, "ack_batch": self.ack_batch}})

    def _close(self) -> None:
        self._close_requests()
        conn, self._connection = self._connection, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except pe.AMQPError:
                pass

    # -- carrying out effects -------------------------------------------------------------
    def request_rotation(self) -> None:
        """Called from a signal handler: rotate at the next tick, on the runtime's thread."""
        self._rotation_requested = True

    def _owe(self, effects: Effects) -> None:
        for closing in effects.draw:
            self._start_draw(closing)
        self._owed |= effects

    def republish_unconfirmed(self) -> None:
        """After a (re)connect: what was signed before a broker failure or restart and not
        confirmed goes out again, byte for byte (the start's checkpoint first)."""
        self._owed |= Effects(publish=tuple(self._outbox.values()))
        self.flush()

    def flush(self) -> None:
        """Checkpoint what changed, then acknowledge every delivery the checkpoint covers (in
        one ack), then publish what the checkpoint holds. The batch's dead letters go first.

        While the disk refuses the checkpoint nothing is acknowledged or published: what is
        owed and the deliveries wait (the broker sends no more than the prefetch meanwhile)
        and the commit is tried again, after a capped backoff, until it succeeds."""
        if not self._storage.due():
            return
        self._send_dead_letters()
        owed, self._owed = self._owed, NOTHING
        deliveries, self._unacked = self._unacked, []
        counted, self._counted = self._counted, {}
        for publication in owed.publish:  # unconfirmed until the broker takes it, even if this fails
            self._outbox.setdefault(publication.key, publication)
        try:
            commit(owed, deliveries, seal_keys=self._writer.seal_keys, checkpoint=self._writer.checkpoint,
                   ack=self._ack, publish=self._publish_release)
        except StorageError as err:  # raised before the ack: nothing went out
            self._owed, self._unacked = owed | self._owed, deliveries + self._unacked
            for token, records in self._counted.items():
                counted.setdefault(token, []).extend(records)
            self._counted = counted
            self._storage.failed(err, len(self._unacked))
            return
        self._storage.succeeded()
        if counted:
            self._send_receipts(counted)

    def _send_receipts(self, counted: dict[str, list[tuple[str, bytes]]]) -> None:
        """One signed receipt per token for what the checkpoint just taken holds. Not
        mandatory, not confirmed: a producer that stopped listening gets nothing, and ingest
        never waits for a receipt."""
        exchange = self.settings.topology.notices_exchange
        try:
            for notice in self.enclave.receipts(counted, now_ms()):
                self._notify.basic_publish(exchange, notice.token, notice.body, amqp.properties("notice"))
                self.notices["counted"] += 1
        except pe.AMQPError as err:
            log.warning("receipts not sent", extra={"fields": {"error": type(err).__name__, "detail": str(err),
                                                               "tokens": len(counted)}})
    def _ack(self, last_delivery_tag: int) -> None:
        self._channel.basic_ack(last_delivery_tag, multiple=True)

    # -- records ----------------------------------------------------------------------
    def _on_record(self, channel, method, props, body: bytes) -> None:
        # pika hands over every delivery that has arrived before process_data_events
        # returns; ingest() then takes them as one batch.
        self._channel = channel
        if not self._inbox:
            self._inbox_since = time.monotonic()
        size = len(body)
        if size > self.max_delivery:
            # Refused without being read; only a prefix is kept (for the dead letter), and it is
            # handled at once, so an oversized message is held no longer than its delivery.
            body = body[:DEAD_LETTER_PREFIX_BYTES]
            self._inbox_since = 0.0
        self._inbox.append((method, getattr(props, "type", None), body, size,
                            topology.notice_token(getattr(props, "headers", None))))

    def ingest(self) -> None:
        """Open the records received so far, on two threads where that helps, then count or
        dead-letter each in delivery order on this thread. A delivery is acknowledged (by
        the next :meth:`flush`) once every record it carries is counted or dead-lettered."""
        batch, self._inbox = self._inbox, []
        if not batch:
            return
        now = now_ms()
        deliveries = [(method, kind, body, self.enclave.oversized(size) if size > self.max_delivery
                       else self.enclave.records_in(body, kind)) for method, kind, body, size, _ in batch]
        bodies = [part for *_, parts in deliveries if not isinstance(parts, RecordRejected) for part in parts]
        if self._opener is None or len(bodies) < PARALLEL_OPEN_MIN:
            opened = [self.enclave.open(part) for part in bodies]
        else:
            half = len(bodies) // 2
            later = self._opener.submit(lambda: [self.enclave.open(part) for part in bodies[half:]])
            opened = [self.enclave.open(part) for part in bodies[:half]]
            opened += later.result()
        results = iter(self.enclave.accept_batch(opened, now))
        for (method, kind, body, parts), (*_, size, token) in zip(deliveries, batch):
            if isinstance(parts, RecordRejected):  # oversized, or a batch that does not parse: refused whole
                self._dead_letter(body, Effects(rejection=parts), token=token,
                                  original_bytes=size if size > len(body) else None)
            else:
                batched = kind == wire.RECORD_BATCH_TYPE
                for i, part in enumerate(parts):
                    self._account(method, part, next(results), i if batched else None, token)
            self._unacked.append(method.delivery_tag)
            if len(self._unacked) >= self.ack_batch:
                self.flush()

    def _account(self, method, body: bytes, effects: Effects, index: int | None, token: str | None) -> None:
        """Carry out one record's refusal at once; owe the rest to the next flush."""
        self._owe(effects)  # a refused record's effects may still hold a window another one closed
        r = effects.rejection
        if r is None or (r.reason.value == "duplicate" and method.redelivered):
            if r is not None:  # our own ack was lost: this record is already counted
                log.info("redelivered record already counted", extra={"fields": {"detail": r.detail}})
            if token is not None and effects.record is not None:
                self._counted.setdefault(token, []).append(effects.record)
            return
        self._dead_letter(body, effects, index, token)

    def _dead_letter(self, body: bytes, effects: Effects, index: int | None = None, token: str | None = None,
                     original_bytes: int | None = None) -> None:
        """Owe a rejected record's dead letter, with its reason, and the notice to its
        producer's token: published (:meth:`_send_dead_letters`) before the flush that
        acknowledges its delivery.

        :param original_bytes: the delivery's size, when ``body`` is only its prefix."""
        r = effects.rejection
        at = now_ms()
        headers = {"x-sealedsum-reason": r.reason.value, "x-sealedsum-detail": r.detail,
                   "x-sealedsum-rejected-at": at}
        if effects.record is not None:
            headers["x-sealedsum-stream"] = effects.record[0]
        if index is not None:
            headers["x-sealedsum-batch-index"] = index  # which record of a batch this was
        if original_bytes is not None:
            headers["x-sealedsum-original-bytes"] = original_bytes
        self._dead_letters.append((body, headers))
        if token is not None:
            self._refusals.append(self.enclave.refusal_notice(token, effects, index, at))
        log.info("record dead-lettered", extra={"fields": {"reason": r.reason.value, "detail": r.detail}})

    def _send_dead_letters(self) -> None:
        """The batch's dead letters in one transaction: the broker has taken them all once the
        commit returns (a confirm per dead letter let a stream of junk stall honest ingest)."""
        if not self._dead_letters:
            return
        t = self.settings.topology
        try:
            for body, headers in self._dead_letters:
                self._dead.basic_publish(t.rejected_exchange, "", body, amqp.properties("rejected-record", headers=headers))
            # Not mandatory: a token nobody listens to costs the broker nothing.
            for notice in self._refusals:
                self._dead.basic_publish(t.notices_exchange, notice.token, notice.body, amqp.properties("notice"))
            self._dead.tx_commit()
        except pe.AMQPError as err:  # their records stay unacknowledged, so they are redelivered
            raise TransportError(f"dead letters not taken by the broker: {type(err).__name__}: {err}") from err
        self._dead_letters.clear()
        self.notices["rejected"] += len(self._refusals)
        self._refusals.clear()

    # -- releases ---------------------------------------------------------------------
    def _start_draw(self, closing: Closing) -> None:
        if closing.key not in self._drawing:
            def draw() -> Publication:
                return self.enclave.draw(closing)  # decrypt once, noise once, sign

            future = self._releaser.submit(draw) if self._releaser else _drawn_now(draw)
            self._drawing[closing.key] = (closing, future)

    def release_closed(self, wait: bool = False) -> None:
        """Store the draws that are done (all of them with ``wait``) in closing order; the
        next flush checkpoints, then publishes them."""
        while self._drawing:
            key, (closing, future) = next(iter(self._drawing.items()))
            if not (wait or future.done()):
                break
            del self._drawing[key]
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - complete() withholds the window and logs why
                outcome = err
            self._owe(self.enclave.complete(closing, outcome, now_ms()))

    # -- requests -------------------------------------------------------------------
    def _open_requests(self) -> None:
        """Consume the request queue on a connection of its own (acknowledged, RPC_PREFETCH at a
        time); if it cannot be opened, records go on and it is tried again in RPC_REOPEN_S."""
        t = self.settings.topology
        try:
            self._rpc = amqp.connect(self.settings, name=f"sealedsum-enclave {t.prefix} requests")
            self._rpc_channel = self._rpc.channel()
            self._rpc_channel.basic_qos(prefetch_count=RPC_PREFETCH)
            self._rpc_channel.basic_consume(t.attest_queue, self._on_request, auto_ack=False)
            self._learn_reply_node()
        except (TransportError, pe.AMQPError) as err:
            self._close_requests()
            self._rpc_retry_at = time.monotonic() + RPC_REOPEN_S
            log.warning("cannot open the request connection; retrying", extra={"fields": {
                "error": type(err).__name__, "detail": str(err), "retry_in_s": RPC_REOPEN_S}})

    def _learn_reply_node(self) -> None:
        """Learn how the broker names the node of the request connection in direct reply-to
        names (:meth:`_probe_reply_node` from that connection)."""
        if self._connection is None:
            return
        self._probe_reply_node(self._rpc)

    def _probe_reply_node(self, connection) -> None:
        """A probe from ``connection``, with direct reply-to, into the release lock (which only
        this enclave can read), read back on the records connection: the node's name as the
        broker writes it in reply-to names goes into :attr:`reply_nodes`."""
        probe = connection.channel()
        try:
            probe.basic_consume(amqp.DIRECT_REPLY_TO, lambda *_: None, auto_ack=True)
            probe.basic_publish("", self.probe_queue, b"", pika.BasicProperties(
                reply_to=amqp.DIRECT_REPLY_TO, type="reply-to-probe", app_id=amqp.APP_ID))
            lock = self._connection.channel()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                method, props, _ = lock.basic_get(self.probe_queue, auto_ack=True)
                if method is not None:
                    node = amqp.reply_to_node(props.reply_to)
                    if node is not None and node not in self.reply_nodes:
                        self.reply_nodes.add(node)
                        log.info("broker node for replies learned", extra={"fields": {"node": node.decode(
                            "utf-8", "replace")}})
                    break
                connection.process_data_events(time_limit=0.01)
            lock.close()
        finally:
            if probe.is_open:
                probe.close()

    def _close_requests(self) -> None:
        conn, self._rpc, self._rpc_channel = self._rpc, None, None
        self._requests.clear()  # unacknowledged: the broker hands them out again
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except pe.AMQPError:
                pass

    def _on_request(self, _channel, method, props, body: bytes) -> None:
        self._requests.append((method, props, body))

    def serve_requests(self) -> None:
        """Answer the requests that arrived, as many as this pass and the rate allow."""
        if self._rpc is None:
            if self._connection is not None and time.monotonic() >= self._rpc_retry_at:
                self._open_requests()
            return
        try:
            if not self.reply_nodes and time.monotonic() >= self._rpc_retry_at:
                self._rpc_retry_at = time.monotonic() + RPC_REOPEN_S
                self._learn_reply_node()  # the probe at connect did not come back: nothing can be answered
            self._rpc.process_data_events(time_limit=0)
            last = None
            for _ in range(RPC_PER_PASS):
                if not self._requests:
                    break
                method, props, body = self._requests[0]
                if not self._account_bucket(props.user_id).take():
                    self._ignore("over its account's request rate")
                elif self._bucket.take():
                    self._answer(props, body)
                else:
                    self._account_bucket(props.user_id).refund()
                    break  # the total rate is reached: the rest wait
                self._requests.popleft()
                last = method.delivery_tag
            if last is not None:
                self._rpc_channel.basic_ack(last, multiple=True)
        except (pe.AMQPError, TransportError) as err:
            # E.g. a reply the broker chokes on: only this connection is lost, and reopened.
            self.rpc_reopens += 1
            log.warning("request connection lost; reopening it", extra={"fields": {
                "error": type(err).__name__, "detail": str(err), "reopens": self.rpc_reopens}})
            self._close_requests()
            self._rpc_retry_at = time.monotonic() + RPC_REOPEN_S

    def _account_bucket(self, user_id: str | None) -> RequestBucket:
        key = user_id or ""
        bucket = self._accounts.get(key)
        if bucket is None:
            if len(self._accounts) >= RPC_ACCOUNTS_MAX:
                self._accounts.clear()
            bucket = self._accounts[key] = RequestBucket(RPC_ACCOUNT_RATE_PER_S, RPC_ACCOUNT_BURST)
        return bucket

    def _answer(self, props, body: bytes) -> None:
        node = amqp.reply_to_node(props.reply_to)
        if node is None:
            # Never a named queue on a client's say-so: the enclave would be a confused deputy,
            # delivering signed replies into queues the client may not write to.
            self._ignore("reply_to is not a direct reply-to name")
            return
        if node not in self.reply_nodes:
            self._ignore("reply_to names a broker node this enclave has not seen")
            return
        if len(body) > RPC_MAX_REQUEST_BYTES:
            self._ignore("request too large")
            return
        try:
            reply = self.enclave.answer(body, now_ms())
        except InvalidMessage:
            self._ignore("malformed request")
            return
        self._rpc_channel.basic_publish("", props.reply_to, reply, pika.BasicProperties(
            correlation_id=props.correlation_id, type="reply", app_id=amqp.APP_ID))

    def _ignore(self, reason: str) -> None:
        """Counted, and logged the first time for each reason (a flood would flood the log)."""
        self.ignored_requests[reason] += 1
        if self.ignored_requests[reason] == 1:
            log.warning("request ignored", extra={"fields": {"reason": reason}})

    def _tick(self) -> None:
        if self._rotation_requested or self.enclave.rotation_due(now_ms()):
            self.flush()  # records folded so far are checkpointed under the epoch they came in
            if not self._storage.stalled:  # else not yet: they are not checkpointed
                self._rotation_requested = False
                self._owe(self.enclave.rotate(now_ms()))
        self._owe(self.enclave.on_tick(now_ms()))
        self.flush()
        if self._held and time.monotonic() - self._last_held_retry >= HELD_RETRY_S:
            self._last_held_retry = time.monotonic()
            self._owe(Effects(publish=tuple(self._outbox[k] for k in sorted(self._held) if k in self._outbox)))
            self.flush()
        if time.monotonic() - self._last_stats >= STATS_EVERY_S:
            self.log_stats()

    def _publish_release(self, release: Publication) -> None:
        if release.key not in self._outbox:
            return  # confirmed already (listed twice in one flush)
        if release.announce:
            # Not mandatory: with no producer listening there is nobody to tell (producers
            # that attest later get the new epoch anyway). Pending until the broker confirms.
            amqp.publish_confirmed(self._publish, self.settings.topology.announce_exchange, "",
                                   release.body, amqp.properties("announce"), mandatory=False)
            self._confirmed(release)
            log.info("key rotation announced", extra={"fields": {
                "key_epoch": release.message.key_epoch, "previous_epoch": release.message.previous_epoch}})
            return
        # mandatory: with no queue bound (the release stream deleted, say) the broker would drop
        # the release and still confirm it; its noise was drawn once, so it must wait here instead.
        try:
            amqp.publish_confirmed(self._publish, self.settings.topology.results_exchange,
                                   topology.result_routing_key(release.stream),
                                   release.body, amqp.properties("result"), mandatory=True)
        except Unroutable:
            if release.key not in self._held:
                self._held.add(release.key)
                log.warning("no queue bound for this stream (is the release stream missing?); holding the release", extra={"fields": {
                    "stream": release.stream, "publication": release.key, "retry_every_s": HELD_RETRY_S}})
            return
        self._held.discard(release.key)
        self._confirmed(release)

    def _confirmed(self, release: Publication) -> None:
        del self._outbox[release.key]
        self._owed |= self.enclave.confirm_published(release)  # checkpointed at the next flush

    def log_stats(self) -> None:
        self._last_stats = time.monotonic()
        log.info("stats", extra={"fields": self.enclave.stats_json() | {
            "ignored_requests": dict(self.ignored_requests), "request_reopens": self.rpc_reopens,
            "producer_notices": dict(self.notices)}})
