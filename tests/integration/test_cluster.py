"""Enclave replicas on a real three-node RabbitMQ cluster (docs/scaling.md): three replicas
share one stream's records, one releases; every record is folded exactly once, a duplicate
published to two shards is caught, and a replica that cannot attest gets no key and folds
nothing."""

from __future__ import annotations

import threading
import time

import pika
import pytest

from sealedsum import cluster_nodes
from sealedsum.common import wire
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer, RecordSealer
from sealedsum.testbed import ClusterTestbed

from tests.integration.conftest import streams_toml

pytestmark = pytest.mark.integration

# Near-zero noise (epsilon 10^6 per release) so that released totals can be compared with the
# true ones; two-second windows closed by time, released from one record on.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 100.0, "window_seconds": 2.0, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e6, "budget_epsilon": 1e12}


@pytest.fixture
def cluster_factory(tmp_path, cluster_urls):
    made: list[ClusterTestbed] = []

    def factory(streams=None, **kw) -> ClusterTestbed:
        cl = ClusterTestbed(tmp_path / f"cl{len(made)}", cluster_urls, streams_toml(streams or {"s": STREAM}),
                            enclave_extra="max_record_age_seconds = 600\n", **kw)
        made.append(cl)
        cl.start(log_level="debug")
        cl.wait_attestable()
        return cl

    yield factory
    for cl in made:
        cl.stop()
        cl.delete_topology()


def released(consumer, want: int, timeout: float = 60.0) -> list:
    """Releases until their counts add up to ``want`` (or ``timeout`` passes)."""
    out, deadline = [], time.monotonic() + timeout
    for release in consumer.releases(idle_timeout=5.0):
        out.append(release)
        if sum(r.count for r in out) >= want or time.monotonic() > deadline:
            break
    return out


def send_and_release(cl: ClusterTestbed, n: int, start: str = "first") -> list:
    """``n`` records of 1.0 through node 1, and the releases that count them."""
    with Consumer(cl.client_config(0), "s", chain_state=None, start=start) as consumer:
        with Producer(cl.client_config(0)) as producer:
            for _ in range(n):
                producer.send("s", [1.0])
        return released(consumer, n)


def dead_letters(settings, timeout: float = 2.0) -> list[tuple[dict, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.url))
    try:
        ch = conn.channel()
        out = []
        while True:
            method, props, body = ch.basic_get(settings.topology.rejected_queue, auto_ack=True)
            if method is None:
                break
            out.append((props.headers or {}, body))
        return out
    finally:
        conn.close()


def worker_stats(replica) -> dict:
    (stopped,) = replica.events("enclave stopped")[-1:]
    return stopped["worker_stats"]


def test_three_replicas_fold_each_record_once_and_release_the_true_totals(cluster_factory):
    cl = cluster_factory()
    attested = cl.wait_attestable()
    values = [float(i % 50) for i in range(600)]
    # The consumer and producer on other broker nodes than each other.
    with Consumer(cl.client_config(2), "s", chain_state=None, start="first") as consumer:
        with Producer(cl.client_config(1)) as producer:
            for v in values:
                producer.send("s", [v])
        # A dishonest duplicate: one sealed record published to two shard queues directly.
        body = RecordSealer(attested).seal("s", [7.0]).body
        conn = pika.BlockingConnection(pika.URLParameters(cl.urls[0]))
        ch = conn.channel()
        ch.confirm_delivery()
        t = cl.config.broker.topology
        for shard in (0, 1):
            ch.basic_publish("", t.shard_queue(shard), body, pika.BasicProperties(
                delivery_mode=2, type=wire.RECORD_TYPE, message_id=wire.shard_key(body)), mandatory=True)
        conn.close()
        got = released(consumer, len(values) + 1)
    assert sum(r.count for r in got) == len(values) + 1
    assert sum(r.sum[0] for r in got) == pytest.approx(sum(values) + 7.0, abs=0.05)
    assert len({r.window for r in got}) == len(got)  # no window twice
    letters = dead_letters(cl.config.broker)
    assert [h.get("x-sealedsum-reason") for h, _ in letters] == ["duplicate"]
    assert letters[0][1] == body
    cl.stop()
    # The work was shared: every replica counted records (competing consumers on every shard).
    counted = [worker_stats(r).get("counted", 0) for r in cl.replicas]
    assert sum(counted) == len(values) + 1 and all(c > 0 for c in counted), counted


def test_a_replica_that_cannot_attest_gets_no_key_and_folds_nothing(cluster_factory):
    cl = cluster_factory(replicas=2)
    other = dict(STREAM, min_batch=2)  # another policy: another measurement, not allow-listed
    stranger = cl.add_replica(streams_toml({"s": other}))
    assert stranger.measurement != cl.replicas[0].measurement
    stranger.start(log_level="debug")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            r.events("a replica that does not attest asked for the keys; refused") for r in cl.replicas[:2]):
        time.sleep(0.5)
    got = send_and_release(cl, 200)
    assert sum(r.count for r in got) == 200
    refusals = [e for r in cl.replicas[:2] for e in r.events("a replica that does not attest asked for the keys; refused")]
    assert refusals and all(e["error"] == "UnknownMeasurement" for e in refusals)
    assert stranger.alive()
    assert not stranger.events("keys received from an attested replica")
    assert not stranger.events("replica consuming")
    assert not list(stranger.state.glob("enclave/*/keys.sealed"))
    stranger.stop()


class SteadyProducer(threading.Thread):
    """Sends one record every few milliseconds until stopped; counts what the broker confirmed."""

    def __init__(self, config, every_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.config, self.every_s = config, every_s
        self.sent = 0
        self.failed = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with Producer(self.config) as producer:
            while not self.halt.is_set():
                try:
                    producer.send("s", [1.0])
                    self.sent += 1
                except Exception:  # noqa: BLE001 - counted: a record that was not confirmed is not owed
                    self.failed += 1
                time.sleep(self.every_s)


def wait_until(what: str, check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_replica_holder_and_broker_node_failures_under_load_count_every_record_once(cluster_factory):
    cl = cluster_factory()
    got: list = []
    with Consumer(cl.client_config(0), "s", chain_state=None, start="first") as consumer:
        def releases_after(ms: int) -> bool:
            got.extend(consumer.releases(idle_timeout=0.5))
            return any(r.closed_at_ms > ms for r in got)

        load = SteadyProducer(cl.client_config(0))
        load.start()
        wait_until("a first release", lambda: releases_after(0))
        holder = cl.holder()
        # 1. A replica that does not hold the release role dies; its deliveries go to the others.
        victim = next(i for i in range(3) if i != holder)
        cl.replicas[victim].kill()
        at = int(time.time() * 1000)
        wait_until("releases after a replica's death", lambda: releases_after(at + 2000))
        cl.replicas[victim].start(log_level="debug")  # as a supervisor would
        # 2. The release holder dies: another replica takes the role, with the ledger and state.
        cl.replicas[holder].kill()
        at = int(time.time() * 1000)
        wait_until("another release holder", lambda: cl.holder() not in (None, holder))
        wait_until("releases after the holder's death", lambda: releases_after(at + 2000))
        cl.replicas[holder].start(log_level="debug")
        # 3. A broker node stops (not the one the producer and consumer use) and comes back; then
        # the other one (the release holder is on one of the two, two times in three).
        for node in (3, 2):
            cluster_nodes.stop_node(node)
            at = int(time.time() * 1000)
            try:
                wait_until(f"releases with broker node {node} down", lambda: releases_after(at + 2000), timeout=90)
            finally:
                cluster_nodes.start_node(node)
        time.sleep(2.0)
        load.halt.set()
        load.join(timeout=60)
        wait_until("every confirmed record in a release", lambda: (releases_after(0), sum(r.count for r in got))[1]
                   >= load.sent, timeout=90)
        time.sleep(3.0)
        got.extend(consumer.releases(idle_timeout=1.0))
    windows = [r.window for r in got]
    assert len(windows) == len(set(windows)), "a window was released twice"
    assert sum(r.count for r in got) == load.sent
    assert sum(r.sum[0] for r in got) == pytest.approx(load.sent, abs=0.05)


def stream_entries(url: str, name: str, idle_s: float = 1.5) -> list[bytes]:
    """Every message of a stream, raw, as an operator can read it."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    got: list[bytes] = []
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=500)
        last = [time.monotonic()]

        def take(c, m, _p, body):
            got.append(body)
            last[0] = time.monotonic()
            c.basic_ack(m.delivery_tag)

        ch.basic_consume(name, take, arguments={"x-stream-offset": "first"})
        while time.monotonic() - last[0] < idle_s:
            conn.process_data_events(time_limit=0.1)
    finally:
        conn.close()
    return got


def rewrite_stream(url: str, name: str, bodies: list[bytes]) -> None:
    """Delete a stream and declare it again holding ``bodies``: the operator's rollback."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_delete(name)
        ch.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish("", name, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        conn.close()


def test_an_operator_who_rolls_the_state_stream_back_gets_no_release(cluster_factory):
    """The holder's state lives in the broker, where the operator can put an earlier copy back:
    with it, the budget spent since would be spent again. Whoever takes the release role checks
    the state against the signed releases already published and refuses an earlier one."""
    cl = cluster_factory(replicas=2)
    before = send_and_release(cl, 50)
    assert sum(r.count for r in before) == 50
    cl.stop()
    t = cl.config.broker.topology
    entries = stream_entries(cl.urls[0], t.cluster_state)
    published = stream_entries(cl.urls[0], t.releases_stream)
    assert len(entries) > 2 and len(published) == len(before)
    taken = sum(len(r.events("release role taken")) for r in cl.replicas)  # stopping one by one hands it on
    rewrite_stream(cl.urls[0], t.cluster_state, entries[:2])  # the copy taken at the start: no charge in it
    cl.start(log_level="debug")
    wait_until("a replica refusing the rolled-back state", lambda: any(
        r.events("the holder's state was rolled back; refusing the release role") for r in cl.replicas))
    time.sleep(5.0)  # windows would have closed (and been charged again) by now
    assert len(stream_entries(cl.urls[0], t.releases_stream)) == len(published)  # nothing released, nothing charged
    assert sum(len(r.events("release role taken")) for r in cl.replicas) == taken  # nobody took it since
    # The latest entries put back, releases resume from where they were.
    cl.stop()
    rewrite_stream(cl.urls[0], t.cluster_state, entries)
    cl.start(log_level="debug")
    cl.wait_attestable()
    after = send_and_release(cl, 10, start="next")
    assert sum(r.count for r in after) == 10
    assert min(r.budget["releases"] for r in after) > max(r.budget["releases"] for r in before)


def test_producers_hear_what_became_of_their_records_from_replicas(cluster_factory):
    """Receipts and refusals (protocol section 11.6) come from the replica that handled the
    record, as they would from one enclave: counted once the holder's state holds it, refused
    with the holder's reason."""
    cl = cluster_factory(replicas=2)
    with Producer(cl.client_config(1)) as producer:
        for _ in range(30):
            producer.send("s", [2.0])
        producer.send("s", [2.0], window=1)  # a window long closed: refused late_window
        outcomes = producer.wait_outcomes(30)
    assert (outcomes.counted, outcomes.rejected, outcomes.unknown) == (30, 1, 0)
    assert outcomes.by_reason == {"late_window": 1}
