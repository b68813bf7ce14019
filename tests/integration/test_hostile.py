"""Hostile clients and operators against a running sidecar on the real broker (issue 11):
reply_to values that would cut the enclave's connection or make it a confused deputy, request
floods, junk record batches, oversized messages with forced reconnects, and a second enclave on
the same prefix. Each test states the bound it holds the sidecar to and prints what it measured.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import threading
import time

import pika
import pika.exceptions as pe
import pytest

from sealedsum.common import amqp, topology, wire
from sealedsum.common.errors import TransportError
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum import testbed
from tests.integration.conftest import launch, streams_toml
from tests.integration.test_acl import accounts, ctl, take  # noqa: F401 - accounts and ctl are fixtures

pytestmark = pytest.mark.integration

WINDOW = 10
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": WINDOW, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}
MALFORMED_REPLY_TO = "amq.rabbitmq.reply-to.g2dkAA==.AAAA"  # what the red team sent: 541 on publish


def unknown_node_reply_to() -> str:
    """Well-formed, but naming a node the broker does not know: it closes the publisher's
    connection too, so only a connection of the enclave's own may ever publish it."""
    pid = b"\x83Xv\x00\x0dother@nowhere" + os.urandom(12)
    return f"amq.rabbitmq.reply-to.{base64.b64encode(pid).decode()}.{base64.b64encode(os.urandom(16)).decode()}"


def reconnects(sc) -> int:
    """How often the enclave lost the connection that consumes records."""
    return len(sc.events("broker connection lost; reconnecting"))


def memory_mib(sc) -> tuple[float, float]:
    """The enclave's resident memory now and its peak (VmRSS, VmHWM), in MiB."""
    fields = {}
    for line in open(f"/proc/{sc.enclave_pid()}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def timed_windows(sc, consumer: Consumer, windows: int, producer: Producer | None = None) -> float:
    """Seconds from the first record sent to the last of ``windows`` windows released (by
    ``producer``, attested already, or a new one that attests first)."""
    with (Producer(sc.config) if producer is None else contextlib.nullcontext(producer)) as producer:
        started = time.monotonic()
        for _ in range(windows * WINDOW):
            producer.send("s", [1.0])
    got = take(consumer, windows)
    assert [r.count for r in got] == [WINDOW] * windows
    return time.monotonic() - started


def queue_messages(sc, queue: str) -> list[tuple]:
    conn = amqp.connect(sc.config.broker)
    try:
        ch, out = conn.channel(), []
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))
    finally:
        conn.close()


class Flood(threading.Thread):
    """Publishes ``make()`` bodies to ``exchange`` as fast as the broker takes them, until stopped."""

    def __init__(self, url: str, exchange: str, key: str, make, props=None, per_second: float | None = None):
        super().__init__(daemon=True)
        self.url, self.exchange, self.key, self.make, self.props = url, exchange, key, make, props
        self.per_second = per_second
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(self.url))
        ch = conn.channel()
        props = self.props(ch) if callable(self.props) else self.props
        started = time.monotonic()
        try:
            while not self.halt.is_set():
                try:
                    ch.basic_publish(self.exchange, self.key, self.make(), props)
                except pe.ChannelClosedByBroker:  # the broker refused this one: go on with a new channel
                    ch = conn.channel()
                    continue
                self.sent += 1
                if self.per_second:  # paced: on schedule, however long a publish took
                    ahead = started + self.sent / self.per_second - time.monotonic()
                    if ahead > 0:
                        self.halt.wait(ahead)
                if self.sent % 200 == 0:
                    conn.process_data_events(time_limit=0)  # take in the replies, if any
        finally:
            conn.close()

    def __enter__(self) -> "Flood":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.halt.set()
        self.join(timeout=30)


# --- 1. one releasing enclave per prefix ------------------------------------------------------

def test_a_second_enclave_on_the_prefix_stands_by_and_releases_nothing(sidecar_factory, tmp_path, amqp_url):
    """Two sidecars with separate state on one prefix: the second finds the release lock held,
    consumes and answers nothing, and every window is released once, by the first. When the
    first stops, the second takes the lock."""
    first = sidecar_factory({"s": STREAM})
    second = testbed.Testbed(tmp_path / "second", amqp_url, streams_toml({"s": STREAM}), prefix=first.prefix, bits=1024,
                     enclave_extra="max_record_age_seconds = 600\n")
    try:
        launch(second)
        deadline = time.monotonic() + 30
        while not second.events("another enclave holds this prefix's release lock; standing by"):
            assert time.monotonic() < deadline and second.alive(), second.log_tail()
            time.sleep(0.2)
        with Consumer(first.config, "s") as consumer:
            assert consumer.enclave.measurement == first.measurement
            with Producer(first.config) as producer:
                for _ in range(3 * WINDOW):
                    producer.send("s", [1.0])
            assert [(r.window, r.count) for r in take(consumer, 3)] == [(1, WINDOW), (2, WINDOW), (3, WINDOW)]
        assert len(first.events("window released")) == 3
        assert second.events("window released") == [] and second.events("consuming") == []
        assert first.stop() == 0
        deadline = time.monotonic() + 30
        while not second.events("release lock taken"):
            assert time.monotonic() < deadline, second.log_tail()
            time.sleep(0.2)
        assert second.wait_attestable(30).keys.epoch == 1  # its own keys: the second deployment now
    finally:
        second.stop()


def test_no_client_account_can_take_the_release_lock(accounts):  # noqa: F811
    """Were a producer or consumer able to declare PREFIX.lock first, the enclave would stand by
    for as long as that connection lived: neither account may."""
    lock = topology.Topology(accounts.prefix).release_lock
    for role in ("producer", "consumer"):
        conn = pika.BlockingConnection(pika.URLParameters(accounts.urls[role]))
        try:
            with pytest.raises(pe.ChannelClosedByBroker) as refused:
                conn.channel().queue_declare(lock, exclusive=True)
            assert refused.value.reply_code == 403, role
        finally:
            conn.close()


# --- 2. reply_to hygiene ------------------------------------------------------------------

def test_hostile_reply_to_values_cost_no_reconnect_and_reach_no_named_queue(accounts, sidecar_factory):  # noqa: F811
    """From a producer's and a consumer's account: malformed and unknown-node direct reply-to
    names, a victim consumer's named queue and the dead-letter queue as reply_to. The enclave
    never loses its records connection, publishes nothing into a named queue, and honest ingest
    with the attack going on takes at most 2x as long as without (measured here)."""
    sc = sidecar_factory({"s": STREAM}, prefix=accounts.prefix, process_url=accounts.urls["sidecar"])
    t = sc.config.broker.topology
    victim = f"{t.consumer_queue_prefix}victim"
    as_consumer = pika.BlockingConnection(pika.URLParameters(accounts.urls["consumer"]))
    as_consumer.channel().queue_declare(victim, durable=True)
    as_consumer.close()
    # (A bare amq.rabbitmq.reply-to without consuming from it is refused by the broker itself.)
    hostile = [MALFORMED_REPLY_TO, victim, t.rejected_queue, t.records_queue, "amq.rabbitmq.reply-to.",
               unknown_node_reply_to()]
    props = lambda reply_to: pika.BasicProperties(reply_to=reply_to, correlation_id="x", type="attest-request")  # noqa: E731

    with Consumer(sc.config, "s") as consumer:
        quiet = timed_windows(sc, consumer, 3)
        floods = [Flood(accounts.urls[role], t.attest_exchange, topology.ATTEST_ROUTING_KEY,
                        lambda: wire.AttestRequest(os.urandom(wire.NONCE_SIZE)).to_bytes(), props(reply_to),
                        per_second=20)
                  for role in ("producer", "consumer") for reply_to in hostile]
        for f in floods:
            f.start()
        try:
            time.sleep(1.0)
            attacked = timed_windows(sc, consumer, 3)
            time.sleep(1.0)
        finally:
            for f in floods:
                f.halt.set()
            for f in floods:
                f.join(timeout=10)
    sent = sum(f.sent for f in floods)
    print(f"\nhostile reply_to: {sent} requests; 3 windows in {quiet:.2f} s quiet, {attacked:.2f} s attacked "
          f"(x{attacked / quiet:.2f}); request connection reopened {sc.events('stats')[-1:] and ''}"
          f"{len(sc.events('request connection lost; reopening it'))} times")
    assert sent > 100
    assert reconnects(sc) == 0, sc.log_tail()
    assert queue_messages(sc, victim) == []
    assert [p.type for p, _ in queue_messages(sc, t.rejected_queue)] == []
    assert {e["reason"] for e in sc.events("request ignored")} >= {"reply_to is not a direct reply-to name"}
    assert attacked <= 2.0 * quiet + 1.0
    # Honest clients are still answered.
    assert sc.wait_attestable(10).measurement == sc.measurement


# --- 3. a request flood ---------------------------------------------------------------------

def test_an_attest_flood_does_not_starve_ingest_and_memory_stays_bounded(accounts, sidecar_factory):  # noqa: F811
    """Valid attestation requests from a consumer's account at 4,000 a second (the pace the
    red team's broker took them: 430,000 in 105 s), answered through the flooder's own direct
    reply-to: windows are still released at no less than half the quiet rate, and the enclave's
    memory stays under 400 MiB. Printed beside it: the same flood into a queue the enclave never
    reads (what the flood costs the machine and the broker alone), and whether another account
    still attests during it."""
    sc = sidecar_factory({"s": STREAM}, prefix=accounts.prefix, process_url=accounts.urls["sidecar"])
    t = sc.config.broker.topology
    windows, pace = 40, 4000
    request = lambda: wire.AttestRequest(os.urandom(wire.NONCE_SIZE)).to_bytes()  # noqa: E731

    def reply_props(ch):
        ch.basic_consume(amqp.DIRECT_REPLY_TO, lambda *a: None, auto_ack=True)
        return pika.BasicProperties(reply_to=amqp.DIRECT_REPLY_TO, correlation_id="flood", type="attest-request")

    elsewhere = f"{t.consumer_queue_prefix}flood"
    as_consumer = pika.BlockingConnection(pika.URLParameters(accounts.urls["consumer"]))
    as_consumer.channel().queue_declare(elsewhere, arguments={"x-max-length": 1000, "x-overflow": "drop-head"})
    as_consumer.close()
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as producer:
        quiet = timed_windows(sc, consumer, windows, producer)
        with Flood(accounts.urls["consumer"], "", elsewhere, request, reply_props, per_second=pace):
            time.sleep(1.0)
            beside = timed_windows(sc, consumer, windows, producer)
        with Flood(accounts.urls["consumer"], t.attest_exchange, topology.ATTEST_ROUTING_KEY, request, reply_props,
                   per_second=pace) as flood:
            time.sleep(2.0)  # the request queue is full before the records come
            flooded = timed_windows(sc, consumer, windows, producer)
            try:
                with Producer(sc.config):
                    other = "yes"
            except TransportError as err:
                other = f"no ({err})"
            sent = flood.sent
            rss, peak = memory_mib(sc)
    ratio = quiet / flooded
    print(f"\nattest flood: {sent} requests at {pace}/s; {windows} windows in {quiet:.2f} s quiet, {flooded:.2f} s "
          f"flooded: release rate x{ratio:.2f} of quiet (x{quiet / beside:.2f} with the same flood into a queue "
          f"the enclave never reads); another account attested during it: {other}; enclave memory {rss:.0f} MiB "
          f"now, {peak:.0f} MiB peak")
    assert sent > 5000
    # On two shared cores the flooder and the broker take CPU from everything else: when that
    # alone costs more than half (the flood the enclave never reads), the enclave may add at most
    # a quarter to it.
    assert ratio >= 0.5 or ratio >= 0.75 * (quiet / beside)
    assert peak < 400
    assert reconnects(sc) == 0


# --- 4. junk record batches -----------------------------------------------------------------

def test_a_flood_of_junk_batches_slows_honest_ingest_at_most_threefold(sidecar_factory, amqp_url):
    """Record batches of 100 junk records each (every one dead-lettered: undecryptable), 10
    batches a second, while honest records are counted: honest ingest takes at most 3x as long
    as without, and every honest record is counted once."""
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    windows = 20

    def junk_batch() -> bytes:
        return wire.RecordBatch(tuple(os.urandom(300) for _ in range(100))).to_bytes()

    with Consumer(sc.config, "s") as consumer:
        quiet = timed_windows(sc, consumer, windows)
        props = pika.BasicProperties(type=wire.RECORD_BATCH_TYPE, delivery_mode=2)
        with Flood(amqp_url, t.records_exchange, topology.RECORD_ROUTING_KEY, junk_batch, props,
                   per_second=10) as flood:
            time.sleep(1.0)
            junked = timed_windows(sc, consumer, windows)
            sent = flood.sent
    factor = junked / quiet
    print(f"\njunk batches: {sent} batches of 100; {windows} windows in {quiet:.2f} s quiet, "
          f"{junked:.2f} s with junk (x{factor:.2f})")
    assert sent >= 10
    assert factor <= 3.0 or junked - quiet < 2.0


# --- 5 and 7. oversized messages and forced reconnects ----------------------------------------

def close_enclave_connections(prefix: str) -> int:
    """Close the enclave's broker connections (by their connection_name), as a broker-side
    fault would. Returns how many were closed."""
    out = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties", "--no-table-headers",
                          "-q"], capture_output=True, text=True, timeout=60, check=True).stdout
    closed = 0
    for line in out.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","sealedsum-enclave {prefix}' in properties:
            done = subprocess.run(["rabbitmqctl", "close_connection", pid, "test: forced reconnect"],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            closed += 1
    return closed


def test_oversized_messages_and_forced_reconnects_lose_no_honest_record(sidecar_factory, amqp_url):
    """64 MiB and 100 MiB records between honest ones, and the enclave's connections closed by the
    broker three times: every honest record is counted exactly once, the dead-letter queue holds
    only the oversized ones, each as a 4 KiB prefix with its size, none a counted record (no
    ``delivery_limit``), and the enclave's memory peak stays under 1.5 GiB."""
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    sizes = [64 << 20, 64 << 20, 100 << 20, 64 << 20]
    honest = 6 * WINDOW
    with Consumer(sc.config, "s") as consumer:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
        raw = conn.channel()
        raw.confirm_delivery()
        closed = 0
        with Producer(sc.config) as producer:
            for i in range(honest):
                producer.send("s", [1.0])
                if i % 15 == 7 and sizes:
                    raw.basic_publish(t.records_exchange, topology.RECORD_ROUTING_KEY, os.urandom(sizes.pop()),
                                      pika.BasicProperties(delivery_mode=2))
                if i % 20 == 10:
                    closed += close_enclave_connections(sc.prefix)
        conn.close()
        got = take(consumer, honest // WINDOW, timeout=90)
    _, peak = memory_mib(sc)
    assert closed >= 3 and reconnects(sc) >= 3
    assert sorted(r.window for r in got) == list(range(1, honest // WINDOW + 1))
    assert sum(r.count for r in got) == honest and round(sum(r.sum[0] for r in got)) == honest
    dead = queue_messages(sc, t.rejected_queue)
    print(f"\noversized: {len(dead)} dead letters, {closed} connections closed, "
          f"{reconnects(sc)} reconnects; enclave memory peak {peak:.0f} MiB")
    assert [p.headers["x-sealedsum-reason"] for p, _ in dead] == ["too_large"] * 4
    assert sorted(p.headers["x-sealedsum-original-bytes"] for p, _ in dead) == [64 << 20] * 3 + [100 << 20]
    assert all(len(body) == 4096 and "x-death" not in p.headers for p, body in dead)
    assert peak < 1536
