"""Ack after fsync, with a real sealed store on disk: the runtime acknowledges a record only
once a checkpoint that holds it is on disk, publishes a release only once the checkpoint
holds it, and a checkpoint that fails leaves everything unacknowledged, so that the records
come again and are counted exactly once by the enclave that restarts from what is on disk.

The broker side is a recording stand-in for pika's channels; everything else is real: the
runtime, the enclave core, the ``SealedStateStore`` in a temporary directory and the
emulated platform's monotonic counter."""

from __future__ import annotations

import errno
import json
import logging
import types
from types import SimpleNamespace

import pytest

import sealedsum.sidecar.durable
from sealedsum.common import wire
from sealedsum.common.config import BrokerSettings
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave_process.store import SealedStateStore
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from sealedsum.sidecar.enclave_process.checkpoint import StateWriter
from sealedsum.sidecar.enclave_process.runtime import EnclaveRuntime, draws_on_a_thread
from tests.conftest import PlatformCounter, make_policy, make_world, now_ms, stream_table

WINDOW = 5


class Channel:
    """A pika channel stand-in. ``on_publish`` and ``on_ack`` run when the runtime publishes
    or acknowledges, before the call returns: what they see on disk is what was there then."""

    def __init__(self, on_publish=None, on_ack=None) -> None:
        self.on_publish, self.on_ack = on_publish, on_ack
        self.published: list[tuple[str, str, bytes]] = []
        self.acked: list[int] = []

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if self.on_publish is not None:
            self.on_publish(exchange, routing_key, body)
        self.published.append((exchange, routing_key, body))

    def tx_commit(self):
        pass

    def basic_ack(self, tag, multiple=False):
        if self.on_ack is not None:
            self.on_ack(tag, multiple)
        self.acked.extend([t for t in range(1, tag + 1) if t not in self.acked] if multiple else [tag])


def deliver(runtime, channel, body, tag, redelivered=False):
    runtime._on_record(channel, SimpleNamespace(delivery_tag=tag, redelivered=redelivered), None, body)
    runtime.ingest()
    runtime.release_closed(wait=True)  # as the runtime's loop does: draws, stores, publishes


class ReadOnlyCounter(PlatformCounter):
    """The platform counter for a look at the state from outside: never moves it."""

    def advance(self, value):
        raise AssertionError("looking at the sealed state must not advance the platform counter")


class Disk:
    """The enclave's sealed state directory, and enclaves started from it as after a restart."""

    def __init__(self, keys, tmp_path) -> None:
        # epsilon this large makes the noise round to zero: released counts are exact.
        self.policy = make_policy({"s": stream_table(window_records=WINDOW, min_batch=1, epsilon=1e7)})
        self.keys = keys
        self.world = make_world(keys, self.policy)
        self.platform = EmulatedPlatform.init(tmp_path / "platform")
        self.dir = tmp_path / "enclave"
        self.dir.mkdir()

    def store(self, counter=PlatformCounter) -> SealedStateStore:
        m = self.world.measurement
        return SealedStateStore(self.dir, self.platform.sealing_key(m), m, counter(self.platform, m))

    def enclave(self, checkpoints) -> Enclave:
        """As the enclave process builds it: closed windows are drawn on the runtime's thread
        where there are two cores."""
        e = self.world.enclave
        return Enclave(self.keys, self.policy, e.policy_bytes, e.code_digest, e.measurement, e._quote,
                       checkpoints, now_ms(), draw_inline=not draws_on_a_thread())

    def on_disk(self) -> Enclave:
        """An enclave restored from what is on disk right now (nothing is written)."""
        return self.enclave(self.store(ReadOnlyCounter).load())

    def start(self, enclave: Enclave) -> EnclaveRuntime:
        """As the enclave process starts: the runtime on a real store, which carries out the
        start's effects as it connects (its first checkpoint is a fresh base)."""
        runtime = EnclaveRuntime(enclave, BrokerSettings(), StateWriter(enclave, self.store()), start=enclave.start())
        runtime._publish = Channel()
        runtime._dead = runtime._publish  # dead letters on the same timeline
        runtime.republish_unconfirmed()
        return runtime

    def restart(self) -> EnclaveRuntime:
        return self.start(self.enclave(self.store().load()))


@pytest.fixture
def disk(small_keys, tmp_path) -> Disk:
    return Disk(small_keys, tmp_path)


def test_every_ack_and_release_leaves_only_after_the_checkpoint_on_disk_holds_it(disk):
    runtime = disk.start(disk.world.enclave)
    runtime.ack_batch = 3  # several batches per window, besides the acks after each release
    records = [disk.world.sealer.seal("s", [1.0]) for _ in range(3 * WINDOW + 2)]
    ids = {tag: r.record_id for tag, r in enumerate(records, start=1)}
    acks, releases = [], []

    def on_ack(tag, multiple):
        seen = disk.on_disk().streams["s"].seen
        covered = range(1, tag + 1) if multiple else [tag]
        missing = [t for t in covered if ids[t] not in seen]
        assert not missing, f"ack of {tag} sent before the checkpoint held records {missing}"
        acks.append(tag)

    def on_publish(_exchange, _key, body):
        stored = {p.body for p in disk.on_disk().pending.values()}
        assert body in stored, "a release was published before the checkpoint held it"
        releases.append(body)

    consume, runtime._publish = Channel(on_ack=on_ack), Channel(on_publish=on_publish)
    runtime._dead = runtime._publish  # dead letters on the same timeline
    for tag, r in enumerate(records, start=1):
        deliver(runtime, consume, r.body, tag)
    runtime.flush()
    assert sorted(consume.acked) == list(ids)
    assert len(acks) >= 6 and len(releases) == 3  # batches of 3, and one ack after each release
    after = disk.on_disk()
    assert after.streams["s"].current.count == 2 and after.pending == {}  # confirmed releases left it
    assert set(ids.values()) <= set(after.streams["s"].seen)


def failing_fsync(monkeypatch):
    """fsync fails as on a dying disk (EIO), for sidecar.durable only: every checkpoint
    write (journal append, base write-then-rename) goes through it."""
    def fsync(_fd):
        raise OSError(errno.EIO, "Input/output error")
    fake_os = types.SimpleNamespace(**{k: getattr(sealedsum.sidecar.durable.os, k) for k in dir(sealedsum.sidecar.durable.os)
                                       if not k.startswith("__")})
    fake_os.fsync = fsync
    monkeypatch.setattr(sealedsum.sidecar.durable, "os", fake_os)


def start_with_records(disk, checkpoint):
    if checkpoint == "base":  # a first checkpoint is a base; later ones are journal appends
        runtime = EnclaveRuntime(disk.world.enclave, BrokerSettings(), StateWriter(disk.world.enclave, disk.store()))
    else:
        runtime = disk.start(disk.world.enclave)
    consume, runtime._publish = Channel(), Channel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    bodies = [disk.world.sealer.seal("s", [2.0]).body for _ in range(WINDOW)]
    for tag, body in enumerate(bodies[:-1], start=1):
        deliver(runtime, consume, body, tag)  # counted, waiting for the next flush
    assert consume.acked == []
    return runtime, consume, bodies


def fail_flush(runtime, consume, bodies, trigger, monkeypatch):
    with monkeypatch.context() as m:
        failing_fsync(m)
        if trigger == "release":
            deliver(runtime, consume, bodies[-1], WINDOW)  # closes the window: its release waits
        runtime.flush()  # fails, and holds on
    assert consume.acked == []
    assert runtime._publish.published == []  # no release left before its checkpoint
    assert runtime._storage.stalled


@pytest.mark.parametrize("checkpoint", ["base", "journal"])
@pytest.mark.parametrize("trigger", ["batch", "release"])
def test_a_failed_checkpoint_leaves_the_records_unacknowledged_and_they_count_once(disk, monkeypatch,
                                                                                     checkpoint, trigger):
    """Nothing is acknowledged or published. If the enclave then dies, the broker redelivers
    what was not acknowledged and the restarted enclave counts each once."""
    runtime, consume, bodies = start_with_records(disk, checkpoint)
    fail_flush(runtime, consume, bodies, trigger, monkeypatch)

    restarted = disk.restart()
    consume, restarted._publish = Channel(), Channel()
    restarted._dead = restarted._publish  # dead letters on the same timeline
    for tag, body in enumerate(bodies, start=1):  # the broker redelivers every one of them
        deliver(restarted, consume, body, tag, redelivered=True)
    restarted.flush()
    assert sorted(consume.acked) == list(range(1, WINDOW + 1))
    (release,) = [b for ex, _, b in restarted._publish.published if ex == "sealedsum.results"]
    assert json.loads(wire.SignedMessage.from_bytes(release).payload)["count"] == WINDOW
    stats = restarted.enclave.stats
    assert stats.accepted + stats.rejected["duplicate"] == WINDOW and stats.windows_released == 1
    assert restarted.enclave.ledgers["s"].releases == 1  # charged once, for the one release
    restarted.flush()  # the next checkpoint records that the broker took the release
    on_disk = disk.on_disk()
    assert on_disk.streams["s"].current.index == 2 and on_disk.pending == {}


def retry_now(runtime):
    runtime._storage._next_try = 0.0  # the backoff's wait is over


@pytest.mark.parametrize("checkpoint", ["base", "journal"])
@pytest.mark.parametrize("trigger", ["batch", "release"])
def test_a_failed_checkpoint_is_retried_and_then_acknowledges_and_publishes_once(disk, monkeypatch, caplog,
                                                                                checkpoint, trigger):
    """The same enclave goes on once the disk takes writes again: the deliveries that waited
    are acknowledged, the release published once, and a restart from disk finds each record
    counted once."""
    caplog.set_level("DEBUG", logger="sealedsum.checkpoint")
    runtime, consume, bodies = start_with_records(disk, checkpoint)
    fail_flush(runtime, consume, bodies, trigger, monkeypatch)
    with monkeypatch.context() as m:
        failing_fsync(m)
        runtime.flush()  # within the backoff's wait: not even tried
        retry_now(runtime)
        runtime.flush()  # tried again, fails again
        assert consume.acked == [] and runtime._publish.published == []
    assert runtime._storage.failures == 2
    if trigger == "batch":
        deliver(runtime, consume, bodies[-1], WINDOW)  # deliveries keep coming while it waits
    runtime.flush()  # still within the wait
    assert consume.acked == []
    retry_now(runtime)
    runtime.flush()
    assert sorted(consume.acked) == list(range(1, WINDOW + 1))
    (release,) = [b for ex, _, b in runtime._publish.published if ex == "sealedsum.results"]
    assert json.loads(wire.SignedMessage.from_bytes(release).payload)["count"] == WINDOW
    assert not runtime._storage.stalled
    events = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert events.count("cannot write the sealed state; holding acknowledgements and releases until it can") == 1
    assert events.count("sealed state written again; resuming") == 1
    runtime.flush()
    on_disk = disk.on_disk()
    assert on_disk.streams["s"].current.index == 2 and on_disk.pending == {}
    assert on_disk.ledgers["s"].releases == 1 and len(on_disk.streams["s"].seen) == WINDOW


def test_a_window_closed_but_not_yet_drawn_survives_a_crash_and_is_released_once(disk):
    """The runtime draws releases on another thread: a closed window waits in the sealed state
    as ciphertexts, charged, so its records can be acknowledged before its noise is drawn. A
    crash then loses nothing: the restarted enclave draws it once, from the same totals."""
    assert draws_on_a_thread()  # two cores here, as on every machine we run on
    runtime = disk.start(disk.enclave(None))
    consume, runtime._publish = Channel(), Channel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    bodies = [disk.world.sealer.seal("s", [3.0]).body for _ in range(WINDOW)]
    for tag, body in enumerate(bodies, start=1):
        runtime._on_record(consume, SimpleNamespace(delivery_tag=tag, redelivered=False), None, body)
    runtime.ingest()
    runtime.flush()  # no draw yet: the process dies here
    assert sorted(consume.acked) == list(range(1, WINDOW + 1)) and runtime._publish.published == []
    before = disk.on_disk()
    (closing,) = before.start().draw
    assert closing.window.count == WINDOW and before.ledgers["s"].releases == 1 and before.pending == {}

    restarted = disk.restart()
    consume, restarted._publish = Channel(), Channel()
    restarted._dead = restarted._publish  # dead letters on the same timeline
    restarted.release_closed(wait=True)
    restarted.flush()  # the draw is checkpointed, then published
    (release,) = [b for ex, _, b in restarted._publish.published if ex == "sealedsum.results"]
    payload = json.loads(wire.SignedMessage.from_bytes(release).payload)
    assert payload["count"] == WINDOW and payload["window"] == 1
    assert payload["sum"] == [pytest.approx(3.0 * WINDOW, abs=1e-3)]
    assert payload["budget"]["releases"] == 1  # charged at close, once, not again at the draw
    restarted.flush()  # the confirmed release leaves the pending set
    after = disk.on_disk()
    assert after.start().draw == () and after.ledgers["s"].releases == 1 and after.pending == {}


def test_records_after_the_window_that_spends_the_budget_are_refused_before_it_is_drawn(small_keys, tmp_path):
    d = Disk(small_keys, tmp_path)
    d.policy = make_policy({"s": stream_table(window_records=WINDOW, min_batch=1, epsilon=1.0, budget_epsilon=1.0)})
    d.world = make_world(small_keys, d.policy)
    runtime = d.start(d.enclave(None))
    consume, runtime._publish = Channel(), Channel()
    runtime._dead = runtime._publish  # dead letters on the same timeline
    bodies = [d.world.sealer.seal("s", [1.0]).body for _ in range(WINDOW + 2)]
    for tag, body in enumerate(bodies[:WINDOW], start=1):
        runtime._on_record(consume, SimpleNamespace(delivery_tag=tag, redelivered=False), None, body)
    runtime.ingest()  # closes the only window the budget allows; not drawn yet
    for tag, body in enumerate(bodies[WINDOW:], start=WINDOW + 1):
        runtime._on_record(consume, SimpleNamespace(delivery_tag=tag, redelivered=False), None, body)
    runtime.ingest()  # the window is still being drawn: these are refused already
    runtime.release_closed(wait=True)
    runtime.flush()
    published = [(ex, json.loads(wire.SignedMessage.from_bytes(b).payload)["kind"]) if ex == "sealedsum.results"
                 else (ex, None) for ex, _, b in runtime._publish.published]
    # The two late records were dead-lettered; then the release, then the notice, in that order.
    assert published == [("sealedsum.rejected", None), ("sealedsum.rejected", None),
                         ("sealedsum.results", "result"), ("sealedsum.results", "budget_exhausted")]
    assert dict(runtime.enclave.stats.rejected) == {"budget_exhausted": 2}
