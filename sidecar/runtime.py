"""The enclave's broker edge: turns deliveries and ticks into calls on
:class:`sealedsum.sidecar.enclave.service.Enclave` and carries out the outcomes.

Order per record: a rejected record is published to the dead-letter exchange with
its reason and confirmed *before* the original is acknowledged, so a record is never
lost between the two. Releases are stored in the enclave before they are published
and republished unchanged after a reconnect until the broker confirms them.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import pika
import pika.exceptions as pe

from sealedsum.common import amqp, topology, wire
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import InvalidMessage, RecordRejected, TransportError, Unroutable
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave.state import SealedStateStore

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


def enclave_prefetch(enclave) -> int:
    """The prefetch for this enclave: a delivery is one record or a record batch, whichever
    can be larger."""
    return prefetch_for(max(getattr(enclave, "size_limit", 0) or 1, wire.MAX_BATCH_BYTES))


def ack_batch_for(prefetch: int) -> int:
    return max(1, min(ACK_BATCH_MAX, prefetch // 2))


# Batches at least this large are opened on two threads (libsodium's box opening releases
# the GIL); smaller ones are not worth the hand-off.
PARALLEL_OPEN_MIN = 8
# How often the loop looks for a finished draw while one runs (its release waits for it).
DRAW_POLL_S = 0.002
# How long a delivery may wait for its batch when records trickle in.
FLUSH_EVERY_S = 0.1
# A journal this large, or a base this old, is folded into a fresh base.
JOURNAL_MAX_BYTES = 8 << 20
BASE_EVERY_S = 60.0
STATS_EVERY_S = 10.0
MAX_BACKOFF_S = 30.0
HELD_RETRY_S = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


def declare_topology(channel, settings: BrokerSettings) -> None:
    """Declare every exchange and queue the system uses (the sidecar owns them)."""
    for d in topology.declarations(settings.topology, settings.queue_type, settings.max_queued_records):
        if isinstance(d, topology.ExchangeDecl):
            channel.exchange_declare(d.name, exchange_type=d.type, durable=d.durable)
        elif isinstance(d, topology.QueueDecl):
            channel.queue_declare(d.name, durable=d.durable, arguments=dict(d.arguments))
        else:
            channel.queue_bind(d.queue, d.exchange, routing_key=d.routing_key)


def _drawn_now(fn, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as err:  # noqa: BLE001 - handed on to Enclave.complete
        future.set_exception(err)
    return future


class EnclaveRuntime:
    """:param store: where checkpoints go; written whenever the enclave's state changed,
    before the records behind the change are acknowledged and before anything that
    depends on it leaves the process. ``None`` keeps state in memory only (tests)."""

    def __init__(self, enclave: Enclave, settings: BrokerSettings,
                 store: SealedStateStore | None = None, seal_keys: Callable[[], None] | None = None) -> None:
        self.enclave = enclave
        self.settings = settings
        self._store = store
        self._seal_keys = seal_keys
        self._rotation_requested = False
        self._unacked: list[int] = []
        # Deliveries received but not yet opened: (delivery method, AMQP type, body), in order.
        self._inbox: list[tuple[object, str | None, bytes]] = []
        # A second thread opens half of each batch where there is a second core.
        two_cores = (os.cpu_count() or 1) > 1
        self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="open") if two_cores else None
        # Closed windows are drawn (decrypted, noised, signed) on a thread of their own while
        # ingest goes on: the decryption's long powmods release the GIL.
        self._releaser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="release") if two_cores else None
        enclave.defer_releases = self._releaser is not None
        self._drawing: dict[str, Future] = {}  # closing window key -> its draw, in closing order
        self._channel = None
        self._last_base = time.monotonic()
        self.stopping = False
        self._connection = None
        self._publish = None
        self._last_stats = time.monotonic()
        self._held: set[str] = set()
        self._last_held_retry = time.monotonic()
        self.prefetch = enclave_prefetch(enclave)
        self.ack_batch = ack_batch_for(self.prefetch)

    def stop(self) -> None:
        self.stopping = True

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Consume until :meth:`stop`; reconnect with capped backoff on broker loss."""
        backoff = 1.0
        while not self.stopping:
            try:
                self._connect()
                backoff = 1.0
                while not self.stopping:
                    # While a window is being drawn, look back soon: its release waits for us.
                    self._connection.process_data_events(time_limit=DRAW_POLL_S if self._drawing else FLUSH_EVERY_S)
                    self.ingest()
                    self.release_closed()
                    self.flush()
                    self._tick()
            except (TransportError, pe.AMQPConnectionError, pe.AMQPChannelError) as err:
                if self.stopping:
                    break
                log.warning("broker connection lost; reconnecting", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err), "retry_in_s": backoff}})
                self._close()
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
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

    def _connect(self) -> None:
        self._unacked.clear()  # the broker redelivers them on the new channel
        self._inbox.clear()
        self._connection = amqp.connect(self.settings)
        channel = self._connection.channel()
        declare_topology(channel, self.settings)
        self._publish = self._connection.channel()
        self._publish.confirm_delivery()
        self.persist()
        self.republish_pending()
        channel.basic_qos(prefetch_count=self.prefetch)
        t = self.settings.topology
        channel.basic_consume(t.records_queue, self._on_record, auto_ack=False)
        channel.basic_consume(t.attest_queue, self._on_attest, auto_ack=True)
        log.info("consuming", extra={"fields": {"records_queue": t.records_queue, "attest_queue": t.attest_queue,
                                                "prefetch": self.prefetch, "ack_batch": self.ack_batch}})

    def _close(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except pe.AMQPError:
                pass

    # -- callbacks --------------------------------------------------------------------
    def request_rotation(self) -> None:
        """Called from a signal handler: rotate at the next tick, on the runtime's thread."""
        self._rotation_requested = True

    def persist(self) -> None:
        """Checkpoint what changed: a journal append, or now and then a fresh base."""
        if self.enclave.keys_dirty:
            # New or retired key epochs are sealed before any state that refers to them.
            if self._seal_keys is not None:
                self._seal_keys()
            self.enclave.keys_dirty = False
        if not self.enclave.dirty:
            return
        store = self._store
        if store is None:
            self.enclave.journal_entry()  # nothing to write to; drop the change list
        elif (store.version == 0 or store.journal_bytes > JOURNAL_MAX_BYTES
              or time.monotonic() - self._last_base > BASE_EVERY_S):
            store.save(self.enclave.snapshot())
            self._last_base = time.monotonic()
        else:
            store.append(self.enclave.journal_entry())
        self.enclave.dirty = False

    def flush(self) -> None:
        """Checkpoint, then acknowledge every record the checkpoint covers, in one ack."""
        self.persist()
        if self._unacked:
            self._channel.basic_ack(self._unacked[-1], multiple=True)
            self._unacked.clear()

    def _on_record(self, channel, method, props, body: bytes) -> None:
        # pika hands over every delivery that has arrived before process_data_events
        # returns; ingest() then takes them as one batch.
        self._channel = channel
        self._inbox.append((method, getattr(props, "type", None), body))

    def ingest(self) -> None:
        """Open the records received so far, on two threads where that helps, then count or
        dead-letter each in delivery order on this thread. A delivery is acknowledged (by
        the next :meth:`flush`) once every record it carries is counted or dead-lettered."""
        batch, self._inbox = self._inbox, []
        if not batch:
            return
        now = now_ms()
        deliveries = [(method, kind, body, self.enclave.records_in(body, kind)) for method, kind, body in batch]
        bodies = [part for *_, parts in deliveries if not isinstance(parts, RecordRejected) for part in parts]
        if self._opener is None or len(bodies) < PARALLEL_OPEN_MIN:
            opened = [self.enclave.open(part, now) for part in bodies]
        else:
            half = len(bodies) // 2
            later = self._opener.submit(lambda: [self.enclave.open(part, now) for part in bodies[half:]])
            opened = [self.enclave.open(part, now) for part in bodies[:half]]
            opened += later.result()
        records = iter(opened)
        for method, kind, body, parts in deliveries:
            if isinstance(parts, RecordRejected):  # a batch that does not parse: dead-lettered whole
                self._dead_letter(body, parts)
            else:
                batched = kind == wire.RECORD_BATCH_TYPE
                for i, part in enumerate(parts):
                    self._account(method, part, self.enclave.accept(next(records), now), i if batched else None)
            self._unacked.append(method.delivery_tag)
            if len(self._unacked) >= self.ack_batch:
                self.flush()

    def _account(self, method, body: bytes, outcome, index: int | None) -> None:
        """Carry out one record's outcome; its delivery is acknowledged later, by flush()."""
        if outcome.rejection is None:
            if outcome.releases:
                self.persist()  # a release and its ledger charge are sealed before they leave
                for release in outcome.releases:
                    self._publish_release(release)
            return
        r = outcome.rejection
        if r.reason.value == "duplicate" and method.redelivered:
            # Our own ack was lost: this record is already counted.
            log.info("redelivered record already counted", extra={"fields": {"detail": r.detail}})
        else:
            self._dead_letter(body, r, index)

    def _dead_letter(self, body: bytes, r: RecordRejected, index: int | None = None) -> None:
        """Publish a rejected record with its reason, confirmed before its delivery is acked."""
        headers = {"x-sealedsum-reason": r.reason.value, "x-sealedsum-detail": r.detail,
                   "x-sealedsum-rejected-at": now_ms()}
        if index is not None:
            headers["x-sealedsum-batch-index"] = index  # which record of a batch this was
        amqp.publish_confirmed(self._publish, self.settings.topology.rejected_exchange, "", body,
                               amqp.properties("rejected-record", headers=headers), mandatory=False)
        log.info("record dead-lettered", extra={"fields": {"reason": r.reason.value, "detail": r.detail}})

    def release_closed(self, wait: bool = False) -> None:
        """Have closed windows drawn on the release thread; store the draws that are done (all
        of them with ``wait``) in closing order, checkpoint, then publish them."""
        for key, closing in self.enclave.closing.items():
            if key not in self._drawing:
                # With one core the enclave draws the windows it closes at once; what can be
                # left are windows a crash left closing in the sealed state: draw them here.
                self._drawing[key] = (self._releaser.submit(self.enclave.finish, closing) if self._releaser
                                      else _drawn_now(self.enclave.finish, closing))
        publications = []
        while self._drawing:
            key, future = next(iter(self._drawing.items()))
            if not (wait or future.done()):
                break
            del self._drawing[key]
            try:
                outcome = future.result()
            except Exception as err:  # noqa: BLE001 - complete() withholds the window and logs why
                outcome = err
            publications += self.enclave.complete(self.enclave.closing[key], outcome, now_ms())
        if publications:
            self.persist()  # a release and its ledger charge are sealed before they leave
            for publication in publications:
                self._publish_release(publication)

    def _on_attest(self, channel, _method, props, body: bytes) -> None:
        if not props.reply_to:
            log.warning("attestation request without reply_to ignored")
            return
        try:
            reply = self.enclave.answer(body, now_ms())
        except InvalidMessage as err:
            log.warning("malformed request ignored", extra={"fields": {"detail": str(err)}})
            return
        channel.basic_publish("", props.reply_to, reply, pika.BasicProperties(
            correlation_id=props.correlation_id, type="reply", app_id=amqp.APP_ID))

    def _tick(self) -> None:
        notices = ()
        if self._rotation_requested or self.enclave.rotation_due(now_ms()):
            self._rotation_requested = False
            self.flush()  # records folded so far are checkpointed under the epoch they came in
            self.enclave.rotate(now_ms())
            notices = self.enclave.announcements()  # sealed below with the new keys, then sent
        releases = self.enclave.on_tick(now_ms())
        self.release_closed()  # windows the clock closed go to the release thread now
        self.persist()
        for release in (*notices, *releases):
            self._publish_release(release)
        self.persist()  # confirmed publications leave the pending set
        if self._held and time.monotonic() - self._last_held_retry >= HELD_RETRY_S:
            self._last_held_retry = time.monotonic()
            self.republish_pending()
        if time.monotonic() - self._last_stats >= STATS_EVERY_S:
            self.log_stats()

    def republish_pending(self) -> None:
        """Publish what was signed before a broker failure or restart, byte for byte as stored."""
        for release in list(self.enclave.pending.values()):
            self._publish_release(release)

    def _publish_release(self, release) -> None:
        if release.announce:
            # Not mandatory: with no producer listening there is nobody to tell (producers
            # that attest later get the new epoch anyway). Pending until the broker confirms.
            amqp.publish_confirmed(self._publish, self.settings.topology.announce_exchange, "",
                                   release.body, amqp.properties("announce"), mandatory=False)
            self.enclave.confirm_published(release)
            log.info("key rotation announced", extra={"fields": {
                "key_epoch": release.message.key_epoch, "previous_epoch": release.message.previous_epoch}})
            return
        # mandatory: with no consumer queue bound the broker would drop the release and
        # still confirm it; its noise was drawn once, so it must wait here instead.
        try:
            amqp.publish_confirmed(self._publish, self.settings.topology.results_exchange, release.stream,
                                   release.body, amqp.properties("result"), mandatory=True)
        except Unroutable:
            if release.key not in self._held:
                self._held.add(release.key)
                log.warning("no consumer bound for this stream; holding the release", extra={"fields": {
                    "stream": release.stream, "publication": release.key, "retry_every_s": HELD_RETRY_S}})
            return
        self._held.discard(release.key)
        self.enclave.confirm_published(release)

    def log_stats(self) -> None:
        self._last_stats = time.monotonic()
        log.info("stats", extra={"fields": self.enclave.stats.to_json(self.enclave.decryptions)})
