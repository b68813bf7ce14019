"""``python -m benchmarks.replicas``: the ingest of 1, 2 and 3 enclave replicas ([cluster]) on
a RabbitMQ cluster, side by side with plain pika consuming as many same-sized messages.

The cluster is ``--cluster-urls`` or ``$SEALEDSUM_CLUSTER_URLS`` (one AMQP URL per node;
``deploy/cluster.sh start`` prints them). Each repeat sets up a deployment of its own, a
:class:`~sealedsum.testbed.ClusterTestbed`: max(``--replicas``) real ``sealedsum sidecar``
processes, replica ``i`` on node ``i mod nodes``, ``--shards`` shard queues (quorum) behind
the consistent-hash records exchange, one 1-value time-closed stream (near-zero noise,
``min_batch`` 1, a budget that never runs out). All replicas start once (the first creates
the keys, the others get them by mutual attestation), then stop. (One deployment per repeat,
not per run: each figure's holder reads the deployment's whole state stream back when it
takes the role, so figures on an older deployment start slower.) The repeat then measures,
for each N (order alternating between repeats), each figure next to its baseline (order
alternating too):

* **replica ingest**: R records sealed for the attested deployment (``RecordSealer``) are
  published, with every replica stopped, to the records exchange with ``message_id`` =
  ``wire.shard_key(body)`` as ``Producer`` does (so the exchange spreads them over the
  shards); then the first N replicas start, and the clock runs from the first one's
  ``replica consuming`` log line to the arrival of the release that makes the released
  counts add up to R (read by a ``Consumer`` on the release stream): ``ingest``. A
  time-closed window is released at its end (once every replica reported past it), not
  at its last record, so this includes up to a window and the holder's wait. ``counted``
  is also recorded: the moment the holder's state-stream entry that makes the last of the
  R records durably counted arrived (the benchmark reads ``PREFIX.cluster.state`` live,
  opened with the deployment's state key).
* **plain consume**: N plain pika consumer *processes* (one per replica, on the same
  nodes), each consuming every one of S quorum queues behind an x-consistent-hash exchange
  (``hash-property`` message_id) as competing consumers, with the replicas' prefetch and a
  manual ack per message, from a start signal to the R-th ack; the R messages (the records'
  size, random message ids) are published before.

Once per run, in-process (the benchmark is the platform owner and can open the replicas'
sealed keys): what a replica spends per record (open, validate, fold into an increment, in
batches of its ack batch) and what the release holder spends merging an increment; and on
the cluster, a confirmed publish of a state-stream entry of the size the holder wrote
(read back from ``PREFIX.cluster.state``), the holder's checkpoint per flush.

Everything the run declares has a unique ``bench-…`` prefix and is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika

from benchmarks import machine, plain
from benchmarks.harness import BenchError, parse_log_ts
from benchmarks.plain import connect
from sealedsum.common import wire
from sealedsum.common.errors import SealedsumError
from sealedsum.common.policy import SECURE_PAILLIER_BITS
from sealedsum.common.topology import SHARD_HASH_PROPERTY, SHARD_WEIGHT

EXIT_OK, EXIT_FAILED, EXIT_CLUSTER = 0, 1, 3  # 2: bad options (argparse)
STREAM = "bench"
LOWER, UPPER = 0.0, 100.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def streams_toml(window_seconds: float) -> str:
    # Near-zero noise (epsilon 10^6 per release) so that released counts add up to what was
    # sent; min_batch 1 so that every window holding records is released.
    return (f"[streams.{STREAM}]\ndimension = 1\nlower = {LOWER}\nupper = {UPPER}\n"
            f"window_seconds = {window_seconds}\nmin_batch = 1\nmechanism = \"laplace\"\n"
            "epsilon = 1e6\nbudget_epsilon = 1e15   # benchmarks measure speed; the budget must not stop them\n")


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers, e.g. 1,2,3") from None
    if not out:
        raise argparse.ArgumentTypeError("at least one number")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.replicas",
        description="Measure the ingest of 1, 2 and 3 enclave replicas on a RabbitMQ cluster next to N plain "
                    "pika consumer processes on the same cluster, same message sizes, and print the ratios.")
    p.add_argument("--cluster-urls", metavar="URLS",
                   help="comma-separated AMQP URLs, one per cluster node (default $SEALEDSUM_CLUSTER_URLS)")
    p.add_argument("--replicas", type=_int_list, metavar="LIST",
                   help="replica counts to measure (default 1,2,3)")
    p.add_argument("--records", type=int, metavar="R",
                   help="1-value records per figure per repeat (default 10000, 300 with --quick)")
    p.add_argument("--repeats", type=int, metavar="K", help="repeats; figures are medians (default 3, 1 with --quick)")
    p.add_argument("--bits", type=int, metavar="B",
                   help="Paillier modulus bits (default 2048, 1024 with --quick; below 2048 the policy sets "
                        "insecure_test_keys)")
    p.add_argument("--shards", type=int, default=3, metavar="S", help="shard queues (default 3)")
    p.add_argument("--window-seconds", type=float, default=1.0, metavar="W",
                   help="the stream's time-closed window (default 1.0)")
    p.add_argument("--grace", type=float, default=1.0, metavar="G",
                   help="cluster.window_grace_seconds (default 1.0)")
    p.add_argument("--quick", action="store_true",
                   help="a short run (300 records, 1 repeat, 1024-bit insecure test keys): well under a minute")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the replicas' logs and state (the path is printed)")
    args = p.parse_args(argv)
    args.replicas = args.replicas or [1, 2, 3]
    args.records = args.records or (300 if args.quick else 10000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.bits = args.bits or (1024 if args.quick else 2048)
    if min(args.records, args.repeats, args.shards, *args.replicas) < 1 or args.window_seconds <= 0:
        p.error("counts must be positive")
    if args.bits not in SECURE_PAILLIER_BITS and not (512 <= args.bits <= 8192 and args.bits % 256 == 0):
        p.error(f"bits must be one of {SECURE_PAILLIER_BITS}, or for insecure test keys a multiple of 256 "
                "from 512 to 8192")
    raw = args.cluster_urls or os.environ.get("SEALEDSUM_CLUSTER_URLS") or ""
    args.urls = [u.strip() for u in raw.split(",") if u.strip()]
    return args


def check_cluster(urls: list[str]) -> str | None:
    """``None`` when every node answers, else what is wrong."""
    if not urls:
        return "no cluster URLs (--cluster-urls or SEALEDSUM_CLUSTER_URLS)"
    dead = []
    for url in urls:
        try:
            connect(url).close()
        except Exception as err:  # noqa: BLE001
            dead.append(f"{pika.URLParameters(url).host}:{pika.URLParameters(url).port} ({type(err).__name__})")
    if dead:
        return f"{len(dead)} of {len(urls)} cluster node(s) do not answer: {', '.join(dead)}"
    return None


# -- CPU ---------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (of its thread ``tid``) so far (Linux
    /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def broker_pids(urls: list[str]) -> dict[int, int]:
    """port -> pid of the local process listening on each URL's port (``ss -ltnp``), where known."""
    import re
    import subprocess

    ports = {pika.URLParameters(u).port for u in urls}
    try:
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.splitlines():
        m = re.search(r":(\d+)\s.*pid=(\d+)", line)
        if m and int(m.group(1)) in ports:
            found[int(m.group(1))] = int(m.group(2))
    return found


class BrokerCpu:
    """CPU seconds the cluster's broker processes spent between :meth:`start` and :meth:`stop`
    (None if a node's process changed meanwhile: someone restarted it). The brokers are shared:
    whatever else uses them is in it too."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls

    def start(self) -> None:
        self.pids = broker_pids(self.urls)
        self.t0 = {p: cpu_seconds(p) for p in self.pids.values()}

    def stop(self) -> float | None:
        if not self.pids or broker_pids(self.urls) != self.pids:
            return None
        total = 0.0
        for pid, before in self.t0.items():
            after = cpu_seconds(pid)
            if before is None or after is None:
                return None
            total += after - before
        return total


# -- the broker, plain -----------------------------------------------------------------------

def declare_sharded(url: str, exchange: str, queues: list[str]) -> None:
    """An x-consistent-hash exchange on ``message_id`` over quorum ``queues``, as the sharded
    topology declares (sealedsum.common.topology)."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, exchange_type="x-consistent-hash", durable=True,
                            arguments={"hash-property": SHARD_HASH_PROPERTY})
        for q in queues:
            ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(q, exchange, routing_key=SHARD_WEIGHT)
    finally:
        conn.close()


def delete_names(url: str, queues: list[str], exchanges: list[str]) -> None:
    conn = connect(url)
    try:
        for q in queues:
            conn.channel().queue_delete(q)
        for x in exchanges:
            conn.channel().exchange_delete(x)
    finally:
        if conn.is_open:
            conn.close()


def queue_depths(url: str, queues: list[str]) -> list[int]:
    """Ready messages per queue (unacknowledged deliveries are not counted)."""
    conn = connect(url)
    try:
        ch = conn.channel()
        return [ch.queue_declare(q, passive=True).method.message_count for q in queues]
    finally:
        conn.close()


def publish_keyed(url: str, exchange: str, bodies: list[bytes], kind: str, window: int = 256,
                  timeout: float = 300.0) -> float:
    """Publish each body persistent and ``mandatory`` with ``message_id`` = its shard key (what
    ``Producer`` sets for a sharded deployment), up to ``window`` awaiting confirms; seconds
    from the first publish to the last confirm."""
    def props(body: bytes) -> pika.BasicProperties:
        return pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                    content_type="application/octet-stream", type=kind, app_id="sealedsum",
                                    message_id=wire.shard_key(body))

    try:
        return plain.publish_pipelined(url, exchange, bodies, window, timeout, routing_key="", properties=props)
    except RuntimeError as err:
        raise BenchError(f"publishing to {exchange} failed: {err}") from err


def _plain_consumer(url: str, queues: list[str], prefetch: int, total: int, counter, ready, go, out) -> None:
    """A plain consumer process: every queue, competing, a manual ack per message, until the
    processes together acknowledged ``total``."""
    try:
        conn = connect(url)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        state = {"mine": 0, "last": None}

        def on_message(channel, method, _props, _body):
            channel.basic_ack(method.delivery_tag)
            state["mine"] += 1
            with counter.get_lock():
                counter.value += 1
            state["last"] = time.time()

        ready.wait(timeout=60)
        go.wait(timeout=60)
        cpu0 = sum(os.times()[:2])
        for q in queues:
            ch.basic_consume(q, on_message, auto_ack=False)
        deadline = time.monotonic() + 600
        while counter.value < total and time.monotonic() < deadline:
            conn.process_data_events(time_limit=0.02)
        cpu = sum(os.times()[:2]) - cpu0
        conn.close()
        out.put((state["mine"], state["last"], None, cpu))
    except Exception as err:  # noqa: BLE001 - reported to the parent
        out.put((0, None, f"{type(err).__name__}: {err}", 0.0))


def plain_consume(urls: list[str], queues: list[str], n_consumers: int, prefetch: int, total: int) -> dict:
    """``n_consumers`` processes (consumer ``j`` on node ``j mod nodes``) consume ``total``
    messages from ``queues``; seconds from the start signal to the last ack."""
    ctx = mp.get_context("fork")
    counter, ready, go, out = ctx.Value("l", 0), ctx.Barrier(n_consumers + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_plain_consumer, args=(urls[j % len(urls)], queues, prefetch, total, counter,
                                                       ready, go, out), daemon=True) for j in range(n_consumers)]
    for proc in procs:
        proc.start()
    brokers = BrokerCpu(urls)
    try:
        ready.wait(timeout=60)  # every process connected
        brokers.start()
        t0 = time.time()
        go.set()
        results = [out.get(timeout=660) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    broker_cpu = brokers.stop()
    errors = [e for _, _, e, _ in results if e]
    if errors:
        raise BenchError(f"a plain consumer failed: {errors[0]}")
    if counter.value < total:
        raise BenchError(f"the plain consumers acknowledged {counter.value} of {total} messages")
    return {"plain_s": max(last for _, last, _, _ in results if last) - t0,
            "plain_per_consumer": [m for m, _, _, _ in results],
            "plain_consumer_cpu_ms": sum(c for *_, c in results) / total * 1000,
            "plain_broker_cpu_ms": broker_cpu / total * 1000 if broker_cpu is not None else None}


# -- the replicas ----------------------------------------------------------------------------

class Releases:
    """The release stream, read by one verifying ``Consumer`` for the whole run: the released
    counts so far, and when each release arrived."""

    def __init__(self, config) -> None:
        from sealedsum.consumers.client import Consumer

        self.consumer = Consumer(config, STREAM, chain_state=None, start="first")
        self.count = 0
        self.windows: list[tuple[int, int, float]] = []  # (window, count, arrival)

    def pump(self, idle: float = 0.05) -> None:
        for release in self.consumer.releases(idle_timeout=idle):
            count = getattr(release, "count", None)
            if count is None:
                raise BenchError(f"the stream sent {type(release).__name__}, not a release")
            self.count += count
            self.windows.append((release.window, count, time.time()))

    def close(self) -> None:
        self.consumer.close()


class StateReader:
    """The holder's state stream (``PREFIX.cluster.state``) read live from ``offset``: each
    entry opened with the deployment's state key (the benchmark is the platform owner), when it
    arrived, its size, and the record ids of ``watch`` it counts. A journal entry holds the ids
    counted since the last one, a base all of them; an entry is there once the broker
    confirmed it to the holder, i.e. once what it counts is durable."""

    def __init__(self, url: str, stream: str, key: bytes, offset: int, watch: set[str]) -> None:
        import nacl.secret

        self._box = nacl.secret.SecretBox(key)
        self.watch = watch
        self.counted: set[str] = set()
        self.entries: list[dict] = []
        self.next_offset = offset
        self.conn = connect(url)
        ch = self.conn.channel()
        ch.basic_qos(prefetch_count=500)
        ch.basic_consume(stream, self._on_entry, auto_ack=False, arguments={"x-stream-offset": offset})
        # Its own thread (and connection), so that each entry is stamped when it arrives.
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="state-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._halt.is_set():
                self.conn.process_data_events(time_limit=0.01)
        except BaseException as err:  # noqa: BLE001 - reported by close()
            self.error = err

    def _on_entry(self, ch, method, props, body: bytes) -> None:
        at = time.time()
        ch.basic_ack(method.delivery_tag)
        offset = int((props.headers or {}).get("x-stream-offset", self.next_offset))
        self.next_offset = max(self.next_offset, offset + 1)
        try:
            doc = json.loads(self._box.decrypt(body))
        except Exception:  # noqa: BLE001 - not this deployment's entry
            return
        if "state" not in doc:
            return  # a new holder's marker
        ids = {rid for pairs in (doc["state"].get("seen") or {}).values() for rid, _t in pairs} & self.watch
        new = ids - self.counted
        self.counted |= new
        self.entries.append({"at": at, "bytes": len(body), "base": bool(doc.get("base")), "new": len(new),
                             "counted": len(self.counted)})

    def drain(self, idle: float = 0.5) -> None:
        last, seen = time.monotonic(), len(self.entries)
        while time.monotonic() - last < idle and self._thread.is_alive():
            time.sleep(0.05)
            if len(self.entries) != seen:
                last, seen = time.monotonic(), len(self.entries)

    def close(self) -> None:
        self._halt.set()
        self._thread.join(timeout=10)
        if self.conn.is_open:
            self.conn.close()
        if self.error is not None:
            raise BenchError(f"reading the state stream failed: {type(self.error).__name__}: {self.error}")


def first_event(replica, name: str) -> dict | None:
    for e in replica.events(name):
        return e
    return None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from sealedsum.testbed import ClusterTestbed

        self.args = args
        self.urls = args.urls
        self.workdir = workdir
        self.cl = ClusterTestbed(workdir, args.urls, streams_toml(args.window_seconds), replicas=max(args.replicas),
                                 shards=args.shards, bits=args.bits, grace=args.grace,
                                 prefix=f"bench-{uuid.uuid4().hex[:12]}",
                                 enclave_extra="max_record_age_seconds = 600\n")
        self.prefix = self.cl.prefix
        t = self.cl.config.broker.topology
        self.topology = t
        self.shard_queues = list(t.shard_queues(args.shards))
        self.plain_exchange = f"{self.prefix}.plain"
        self.plain_queues = [f"{self.prefix}.plain.{i}" for i in range(args.shards)]
        self.probe_stream = f"{self.prefix}.stream-probe"
        self.starts = 0
        self.released_target = 0
        self.state_offset = 0
        self.rng = random.Random(20261208)
        self.releases: Releases | None = None
        self.sealer = None
        self.prefetch = 0
        self.ack_batch = 0

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> dict:
        from sealedsum.producers.client import RecordSealer
        from sealedsum.sidecar.enclave_process.runtime import ack_batch_for

        cl = self.cl
        log(f"a new deployment: starting {len(cl.replicas)} replica(s) (prefix {self.prefix}; the first creates "
            "the keys, the others get them by attestation)")
        t0 = time.monotonic()
        self._start(range(len(cl.replicas)))
        attested = cl.wait_attestable(timeout=240)
        deadline = time.monotonic() + 240
        while not all(r.events("replica consuming") for r in cl.replicas):
            self._check_alive(range(len(cl.replicas)))
            if time.monotonic() > deadline:
                raise BenchError("not every replica got the keys and consumed within 240 s:\n"
                                 + "\n".join(r.log_tail(10) for r in cl.replicas))
            time.sleep(0.2)
        log(f"all replicas consuming after {time.monotonic() - t0:.1f} s")
        self.prefetch = int(first_event(cl.replicas[0], "replica consuming")["prefetch"])
        self.ack_batch = ack_batch_for(self.prefetch)
        self.sealer = RecordSealer(attested)
        self.releases = Releases(cl.client_config(0))
        self.size = len(self.sealer.seal(STREAM, [1.0]).body)
        self.keyring = self._keyring()
        from sealedsum.sidecar.cluster.runtime import state_key

        self.state_key = state_key(self.keyring)
        declare_sharded(self.urls[0], self.plain_exchange, self.plain_queues)
        self._stop(range(len(cl.replicas)))
        self.releases.pump()
        self.released_target = self.releases.count
        reader = StateReader(self.urls[0], self.topology.cluster_state, self.state_key, 0, set())
        try:
            reader.drain()  # what the setup wrote
        finally:
            reader.close()
        self.state_offset = reader.next_offset
        return {"prefetch": self.prefetch, "ack_batch": self.ack_batch, "record_bytes": self.size,
                "prefix": self.prefix}

    def _keyring(self):
        from sealedsum.sidecar.enclave.keyring import Keyring

        r0 = self.cl.replicas[0]
        (sealed,) = list((r0.state / "enclave").rglob("keys.sealed"))
        return Keyring.unseal(r0.platform.sealing_key(r0.measurement), r0.measurement, sealed.read_bytes())

    def _start(self, which) -> None:
        self.starts += 1
        for j in which:
            r = self.cl.replicas[j]
            r.start(log_level="info", log_path=r.workdir / f"sidecar-{self.starts}.log")

    def _stop(self, which) -> None:
        """Replicas that do not hold the release role first: the holder stopping first would
        hand the role (and a state read-back) to another one."""
        which = list(which)
        holders = [j for j in which if self.cl.replicas[j].events("release role taken")]
        for j in [j for j in which if j not in holders] + holders:
            self.cl.replicas[j].stop(timeout=30)

    def _check_alive(self, which) -> None:
        for j in which:
            r = self.cl.replicas[j]
            if not r.alive():
                raise BenchError(f"replica {j} exited (code {r.process.returncode}):\n{r.log_tail()}")

    # -- one figure --------------------------------------------------------------------------
    def queue_records(self, n: int) -> None:
        """Seal ``n`` records now and publish them with every replica stopped."""
        values = [self.rng.uniform(LOWER, UPPER) for _ in range(n)]
        sealed = [self.sealer.seal(STREAM, [v]) for v in values]
        self.watch = {r.record_id.hex() for r in sealed}
        bodies = [r.body for r in sealed]
        publish_keyed(self.urls[0], self.topology.records_exchange, bodies, wire.RECORD_TYPE)
        depths = queue_depths(self.urls[0], self.shard_queues)
        if sum(depths) != n:
            raise BenchError(f"the shard queues hold {sum(depths)} records ({depths}), expected {n}")
        self.last_depths = depths

    def queue_plain(self, n: int) -> None:
        bodies = [os.urandom(self.size) for _ in range(n)]
        publish_keyed(self.urls[0], self.plain_exchange, bodies, "record")
        depths = queue_depths(self.urls[0], self.plain_queues)
        if sum(depths) != n:
            raise BenchError(f"the plain queues hold {sum(depths)} messages ({depths}), expected {n}")

    def ingest(self, n_replicas: int, n: int) -> dict:
        """Start the first ``n_replicas`` replicas on ``n`` queued records. Seconds from the first
        'replica consuming' to the release that completes the count (``ingest_s``), and to the
        state-stream entry that made the last of the records durably counted (``counted_s``)."""
        which = range(n_replicas)
        target = self.released_target + n
        timeout = max(120.0, n * 0.2)
        state = StateReader(self.urls[0], self.topology.cluster_state, self.state_key, self.state_offset, self.watch)
        brokers = BrokerCpu(self.urls)
        cpu_at_start: dict[int, tuple[float, float]] = {}  # replica -> its enclave's CPU once it consumed
        cpu_at_end: dict[int, tuple[float, float]] = {}
        cpu_from = None
        try:
            self._start(which)
            deadline = time.monotonic() + timeout
            try:
                while self.releases.count < target:
                    self.releases.pump(idle=0.03)
                    for j in which:
                        if j not in cpu_at_start and self.cl.replicas[j].events("replica consuming"):
                            if cpu_from is None:  # the brokers from the first replica consuming on
                                brokers.start()
                                cpu_from = time.time()
                            c = self._enclave_cpu(j)
                            if c is not None:
                                cpu_at_start[j] = c
                    self._check_alive(which)
                    if time.monotonic() > deadline:
                        raise BenchError(f"released {self.releases.count - self.released_target} of {n} records "
                                         f"within {timeout:.0f} s; were records rejected?\n"
                                         + "\n".join(self.cl.replicas[j].log_tail(8) for j in which))
                done_at = next(at for total, _w, at in self._cumulative() if total >= target)
            finally:
                starts = [first_event(self.cl.replicas[j], "replica consuming") for j in which]
                roles = [e for j in which for e in self.cl.replicas[j].events("release role taken")]
                broker_cpu = brokers.stop() if cpu_from is not None else None
                cpu_over = time.time() - cpu_from if cpu_from is not None else None
                for j in cpu_at_start:
                    c = self._enclave_cpu(j)
                    if c is not None:
                        cpu_at_end[j] = c
                self._stop(which)
            state.drain()
        finally:
            state.close()
        self.state_offset = state.next_offset
        missing = [j for j, s in zip(which, starts) if s is None]
        if missing:
            raise BenchError(f"replica(s) {missing} never logged 'replica consuming' (a broker node down? the test "
                             "cluster is shared: someone's fault test may have stopped one):\n"
                             + "\n".join(self.cl.replicas[j].log_tail(8) for j in missing))
        if self.releases.count != target:
            raise BenchError(f"released counts add up to {self.releases.count - self.released_target}, not {n}")
        self.released_target = target
        if len(state.counted) != n:
            raise BenchError(f"the state stream counts {len(state.counted)} of the {n} records")
        ts = sorted(parse_log_ts(s["ts"]) for s in starts)
        counted_at = next(e["at"] for e in state.entries if e["counted"] >= n)
        # The holder's flushes while it merged: entries that counted records, and the time
        # between consecutive ones (what one merge + checkpoint + reply cycle took).
        merging = [e for e in state.entries if e["new"]]
        gaps = [b["at"] - a["at"] for a, b in zip(merging, merging[1:])]
        out = {"ingest_s": done_at - ts[0], "counted_s": counted_at - ts[0], "start_spread_s": ts[-1] - ts[0],
               "state_entries": len(state.entries), "merge_entries": len(merging),
               "journal_entry_bytes": statistics.median([e["bytes"] for e in merging if not e["base"]] or [0]),
               "state_bytes": sum(e["bytes"] for e in state.entries),
               "base_entries": [e["bytes"] for e in state.entries if e["base"]],
               "records_per_merge_entry": n / len(merging) if merging else None,
               "merge_entry_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
               "first_count_s": merging[0]["at"] - ts[0] if merging else None,
               "holder_ready_s": min(parse_log_ts(e["ts"]) for e in roles) - ts[0] if roles else None,
               "broker_cpu_ms": broker_cpu / n * 1000 if broker_cpu is not None else None,
               "ingest_window_s": cpu_over,
               "replica_cpu_ms": {j: (cpu_at_end[j][0] - cpu_at_start[j][0]) / n * 1000 for j in cpu_at_end},
               "main_thread_cpu_ms": {j: (cpu_at_end[j][1] - cpu_at_start[j][1]) / n * 1000 for j in cpu_at_end}}
        who = [j for j in which if self.cl.replicas[j].events("release role taken")]
        if len(who) == 1 and who[0] in cpu_at_end and merging:
            # The holder's loop, per increment it merged (one flush each, as measured).
            out["holder_cpu_ms_per_flush"] = out["main_thread_cpu_ms"][who[0]] * n / len(merging)
        steady = [e for e in merging[1:]]
        if steady:
            out["steady_rps"] = sum(e["new"] for e in steady) / (steady[-1]["at"] - merging[0]["at"])
        out.update(self.replica_stats(which, n))
        return out

    def _enclave_cpu(self, j: int) -> tuple[float, float] | None:
        """CPU seconds of replica ``j``'s enclave process: all of it, and its main thread (the
        one that runs the release holder's loop; the worker has a thread of its own)."""
        try:
            pid = self.cl.replicas[j].enclave_pid()
        except RuntimeError:  # it has not logged its pid yet
            return None
        total, main = cpu_seconds(pid), cpu_seconds(pid, pid)
        return None if total is None or main is None else (total, main)

    def _cumulative(self):
        total = 0
        for window, count, at in self.releases.windows:
            total += count
            yield total, window, at

    def replica_stats(self, which, n: int) -> dict:
        """Per replica: the records its worker counted (its stats at shutdown), and which
        replicas took the release role."""
        counted, holders, resent = [], [], 0
        for j in which:
            r = self.cl.replicas[j]
            stopped = r.events("enclave stopped")
            ws = stopped[-1].get("worker_stats", {}) if stopped else {}
            counted.append(int(ws.get("counted", 0)))
            resent += int(ws.get("resent", 0))
            if r.events("release role taken"):
                holders.append(j)
            rejected = {k: v for k, v in ws.items() if k.startswith("rejected:")}
            if rejected:
                raise BenchError(f"replica {j} dead-lettered records: {rejected}")
        if sum(counted) != n:
            raise BenchError(f"the replicas counted {sum(counted)} records ({counted}), expected {n}")
        return {"counted": counted, "holder": holders, "resent": resent}

    # -- per-record costs, once per run --------------------------------------------------------
    def costs(self) -> dict:
        """In-process: a replica's open + check + fold per record (batches of its ack batch) and
        the holder's merge per increment; on the cluster, a confirmed state-stream entry."""
        from sealedsum.sidecar.cluster import worker as work
        from sealedsum.sidecar.enclave.service import Enclave

        r0 = self.cl.replicas[0]
        policy = r0.config.require_policy()
        policy_bytes = policy.to_bytes()
        keyring = self.keyring

        def build() -> Enclave:
            return Enclave(keyring, policy, policy_bytes, r0.code_digest, r0.measurement, lambda _rd: b"", None,
                           int(time.time() * 1000), draw_inline=True)

        batch = self.ack_batch
        n = max(batch * 4, 256 if self.args.quick else 1024)
        bodies = [self.sealer.seal(STREAM, [self.rng.uniform(LOWER, UPPER)]).body for _ in range(n)]
        worker_enclave = build()
        increments = []
        t_open = t_check = t_fold = 0.0
        for seq, start in enumerate(range(0, n, batch), 1):
            part = bodies[start:start + batch]
            t0 = time.perf_counter()
            opened = [worker_enclave.open(b) for b in part]
            t1 = time.perf_counter()
            checked = work.checked(opened)
            t2 = time.perf_counter()
            bad = [c for c in checked if not hasattr(c, "envelope")]
            if bad:
                raise BenchError(f"the in-process replica refused a record: {bad[0]}")
            increment, _ = work.increment(b"w" * 16, seq, checked, int(time.time() * 1000), int(time.time() * 1000))
            t3 = time.perf_counter()
            t_open, t_check, t_fold = t_open + t1 - t0, t_check + t2 - t1, t_fold + t3 - t2
            increments.append(increment)
        holder = build()
        now = int(time.time() * 1000)
        t0 = time.perf_counter()
        for increment in increments:
            _, refused = holder.merge(increment, now, now - 10_000)  # no window closes meanwhile
            if refused:
                raise BenchError(f"the in-process holder refused {len(refused)} records")
        t_merge = time.perf_counter() - t0
        out = {"cost_records": n, "cost_batch": batch,
               "open_ms": t_open / n * 1000, "check_ms": t_check / n * 1000, "fold_ms": t_fold / n * 1000,
               "merge_ms_per_increment": t_merge / len(increments) * 1000}
        out["replica_ms_per_record"] = out["open_ms"] + out["check_ms"] + out["fold_ms"]
        return out

    def stream_entry_cost(self, size: int, entries: int) -> dict:
        """Milliseconds per confirmed publish of a ``size``-byte entry to a stream on the cluster
        (one at a time, as the holder checkpoints), on node 1 and through node 2."""
        conn = connect(self.urls[0])
        try:
            ch = conn.channel()
            ch.queue_declare(self.probe_stream, durable=True, arguments={"x-queue-type": "stream"})
            ch.confirm_delivery()
            body = os.urandom(max(1, int(size)))
            props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
            for _ in range(5):
                ch.basic_publish("", self.probe_stream, body, props, mandatory=True)
            t0 = time.perf_counter()
            for _ in range(entries):
                ch.basic_publish("", self.probe_stream, body, props, mandatory=True)
            return {"stream_entry_ms": (time.perf_counter() - t0) / entries * 1000, "stream_entry_bytes": int(size)}
        finally:
            conn.close()

    # -- cleanup ---------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.releases is not None:
            try:
                self.releases.close()
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.cl.stop()
        try:
            self.cl.delete_topology()
        finally:
            delete_names(self.urls[0], [*self.plain_queues, self.probe_stream], [self.plain_exchange])


def alternate(i: int, *steps) -> None:
    for step in (steps if i % 2 == 0 else tuple(reversed(steps))):
        step()


def measure(b: Bench, i: int, n_replicas: int) -> dict:
    """One figure and its baseline: N replicas' ingest and N plain consumer processes."""
    n = b.args.records
    b.queue_records(n)
    b.queue_plain(n)
    out: dict = {"replicas": n_replicas, "shard_depths": b.last_depths}
    # What the brokers spend with nothing of ours running (they are shared): subtracted below.
    idle = BrokerCpu(b.urls)
    idle.start()
    time.sleep(2.0)
    spent = idle.stop()
    out["broker_idle_cores"] = spent / 2.0 if spent is not None else None

    def ours():
        out.update(b.ingest(n_replicas, n))

    def base():
        out.update(plain_consume(b.urls, b.plain_queues, n_replicas, b.prefetch, n))

    alternate(i, ours, base)
    b.releases.pump()
    out["ingest_rps"] = n / out["ingest_s"]
    out["counted_rps"] = n / out["counted_s"]
    if out["broker_idle_cores"] is not None:
        if out.get("broker_cpu_ms") is not None:
            out["broker_net_cpu_ms"] = out["broker_cpu_ms"] - out["broker_idle_cores"] * out["ingest_window_s"] / n * 1000
        if out.get("plain_broker_cpu_ms") is not None:
            out["plain_broker_net_cpu_ms"] = out["plain_broker_cpu_ms"] - out["broker_idle_cores"] * out["plain_s"] / n * 1000
    out["plain_rps"] = n / out["plain_s"]
    out["ratio"] = out["ingest_rps"] / out["plain_rps"]
    log(f"  repeat {i + 1}, {n_replicas} replica(s): ingest {out['ingest_rps']:.0f} rec/s "
        f"(counted {out['counted_rps']:.0f}), plain {out['plain_rps']:.0f} msg/s, ratio {out['ratio']:.3f}; "
        f"per replica {out['counted']}, holder {out['holder']}, {out['merge_entries']} merging state entries "
        f"({out['merge_entry_gap_ms'] or 0:.0f} ms apart), "
        f"start spread {out['start_spread_s']:.2f} s")
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict:
    """A deployment of its own per repeat: the release holder reads its state stream back from
    the start whenever it takes the role (at each figure's start), and that stream grows with
    every record counted, so one deployment for the whole run would make each figure start
    slower than the one before (measured: from 0.05 s to 1.8 s over nine figures)."""
    result: dict = {"records": args.records, "repeats": args.repeats, "bits": args.bits, "shards": args.shards,
                    "replica_counts": args.replicas, "window_seconds": args.window_seconds, "grace": args.grace,
                    "insecure_test_keys": args.bits not in SECURE_PAILLIER_BITS, "nodes": len(args.urls),
                    "prefixes": [], "runs": []}
    for i in range(args.repeats):
        b = Bench(args, workdir / f"repeat-{i + 1}")
        result["prefix"] = b.prefix
        result["prefixes"].append(b.prefix)
        try:
            result.update(b.setup())
            order = args.replicas if i % 2 == 0 else list(reversed(args.replicas))
            for n_replicas in order:
                result["runs"].append(dict(measure(b, i, n_replicas), repeat=i))
            if i == args.repeats - 1:
                log("per-record costs in-process; a state-stream entry on the cluster")
                result["costs"] = b.costs()
                sizes = [r["journal_entry_bytes"] for r in result["runs"] if r["journal_entry_bytes"]]
                result["costs"].update(b.stream_entry_cost(statistics.median(sizes) if sizes else 1000,
                                                           50 if args.quick else 300))
        finally:
            b.cleanup()
    summarize(result)
    return result


def summarize(result: dict) -> None:
    by_n: dict[int, list[dict]] = {}
    for r in result["runs"]:
        by_n.setdefault(r["replicas"], []).append(r)
    rows = {}
    base = None
    for n in sorted(by_n):
        runs = by_n[n]
        row = {k: statistics.median(r[k] for r in runs) for k in (
            "ingest_rps", "counted_rps", "plain_rps", "ratio", "ingest_s", "counted_s", "plain_s", "start_spread_s",
            "state_entries", "merge_entries")}
        row["counted_ratio"] = statistics.median(r["counted_rps"] / r["plain_rps"] for r in runs)
        steady = [r["steady_rps"] / r["plain_rps"] for r in runs if r.get("steady_rps")]
        row["steady_ratio"] = statistics.median(steady) if steady else None
        gaps = [r["merge_entry_gap_ms"] for r in runs if r.get("merge_entry_gap_ms")]
        row["merge_entry_gap_ms"] = statistics.median(gaps) if gaps else None
        for r in runs:
            r["replicas_cpu_ms"] = sum(r["replica_cpu_ms"].values()) if len(r["replica_cpu_ms"]) == n else None
        for key in ("first_count_s", "holder_ready_s", "broker_cpu_ms", "replicas_cpu_ms", "plain_broker_cpu_ms",
                    "plain_consumer_cpu_ms", "holder_cpu_ms_per_flush", "steady_rps", "broker_net_cpu_ms",
                    "plain_broker_net_cpu_ms", "broker_idle_cores"):
            vals = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        row["ingest_rps_min"], row["ingest_rps_max"] = min(r["ingest_rps"] for r in runs), max(r["ingest_rps"] for r in runs)
        row["plain_rps_min"], row["plain_rps_max"] = min(r["plain_rps"] for r in runs), max(r["plain_rps"] for r in runs)
        row["records_per_merge_entry"] = result["records"] / row["merge_entries"] if row["merge_entries"] else None
        rows[n] = row
    if 1 in rows:
        base = rows[1]
        for n, row in rows.items():
            row["scaling"] = row["ingest_rps"] / base["ingest_rps"]
            row["counted_scaling"] = row["counted_rps"] / base["counted_rps"]
            if row.get("steady_rps") and base.get("steady_rps"):
                row["steady_scaling"] = row["steady_rps"] / base["steady_rps"]
            row["plain_scaling"] = row["plain_rps"] / base["plain_rps"]
    result["summary"] = {str(n): row for n, row in rows.items()}


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def report(result: dict, info: dict) -> str:
    lines = ["", f"sealedsum replicas: ingest on a RabbitMQ cluster ({result['bits']}-bit Paillier)", ""]
    lines.append(f"  machine   {info['cpu']}, {info['cores']} cores, {info['os']}")
    lines.append(f"  python    {info['python']}; gmpy2 {info['gmpy2']}")
    lines.append(f"  rabbitmq  {info['rabbitmq']}, {result['nodes']} nodes on this machine")
    lines.append(f"  load avg  {info['loadavg_start']} at start, {info['loadavg_end']} at end (1/5/15 min)")
    lines.append(f"  setup     {result['records']} 1-value records of {result['record_bytes']} bytes per figure, "
                 f"{result['shards']} quorum shard queues; windows of {result['window_seconds']} s "
                 f"(grace {result['grace']} s); prefetch {result['prefetch']}, increments of up to "
                 f"{result['ack_batch']} records;")
    lines.append(f"            plain: N consumer processes, every shard queue each, prefetch {result['prefetch']}, "
                 f"an ack per message; median of {result['repeats']} repeat(s), order alternating")
    if result["insecure_test_keys"]:
        lines.append(f"  WARNING   {result['bits']}-bit keys are INSECURE (insecure_test_keys): not a real "
                     "deployment's figures")
    lines.append("")
    head = (f"  {'replicas':>8}{'ingest rec/s':>20}{'counted rec/s':>15}{'plain msg/s':>20}{'ours/plain':>12}"
            f"{'counted/plain':>15}{'scaling':>9}{'plain scaling':>15}{'recs/flush':>12}{'flush ms':>10}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for n, row in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        ours = f"{fmt(row['ingest_rps'])} ({fmt(row['ingest_rps_min'])}-{fmt(row['ingest_rps_max'])})"
        plain = f"{fmt(row['plain_rps'])} ({fmt(row['plain_rps_min'])}-{fmt(row['plain_rps_max'])})"
        scaling = f"{row['scaling']:.2f}" if "scaling" in row else "-"
        pscaling = f"{row['plain_scaling']:.2f}" if "plain_scaling" in row else "-"
        lines.append(f"  {n:>8}{ours:>20}{fmt(row['counted_rps']):>15}{plain:>20}{row['ratio']:>12.3f}"
                     f"{row['counted_ratio']:>15.3f}{scaling:>9}{pscaling:>15}{fmt(row['records_per_merge_entry']):>12}"
                     f"{fmt(row['merge_entry_gap_ms']):>10}")
    lines.append("  ingest: from the first replica's 'replica consuming' to the release that completes the count (the")
    lines.append("    last window's wait for its end and the replicas' reports included); counted: to the state-stream")
    lines.append("    entry that made the last record durably counted; scaling: ingest(N)/ingest(1); recs/flush: records")
    lines.append("    per holder checkpoint that counted records; flush ms: median time between two such checkpoints")
    lines.append("")
    lines.append("  steady state and the release holder (medians)")
    head = (f"    {'replicas':>8}{'steady rec/s':>14}{'steady/plain':>14}{'scaling':>9}{'holder ready s':>16}"
            f"{'first count s':>15}{'flush ms':>10}{'holder CPU ms/flush':>21}")
    lines += [head, "    " + "-" * (len(head) - 4)]
    for n, row in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        sc = f"{row['steady_scaling']:.2f}" if row.get("steady_scaling") else "-"
        lines.append(f"    {n:>8}{fmt(row.get('steady_rps')):>14}{fmt3(row.get('steady_ratio')):>14}{sc:>9}"
                     f"{fmt3(row.get('holder_ready_s')):>16}{fmt3(row.get('first_count_s')):>15}"
                     f"{fmt(row.get('merge_entry_gap_ms')):>10}{fmt(row.get('holder_cpu_ms_per_flush')):>21}")
    lines.append("    (steady: records counted after the holder's first flush, over the time from it to the last;")
    lines.append("    holder ready / first count: from the first 'replica consuming' to 'release role taken' (the")
    lines.append("    holder reads the state stream back first) and to the first flush that counted records;")
    lines.append("    holder CPU: the holder's main thread over the figure, per flush that counted records)")
    lines.append("")
    lines.append("  CPU per record (median ms; /proc of this machine's processes)")
    head = (f"    {'replicas':>8}{'replicas (all)':>16}{'brokers':>10}{'net':>8}{'plain consumers':>17}"
            f"{'brokers (plain)':>17}{'net':>8}{'idle cores':>12}")
    lines += [head, "    " + "-" * (len(head) - 4)]
    for n, row in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"    {n:>8}{fmt3(row['replicas_cpu_ms']):>16}{fmt3(row['broker_cpu_ms']):>10}"
                     f"{fmt3(row.get('broker_net_cpu_ms')):>8}{fmt3(row['plain_consumer_cpu_ms']):>17}"
                     f"{fmt3(row['plain_broker_cpu_ms']):>17}{fmt3(row.get('plain_broker_net_cpu_ms')):>8}"
                     f"{fmt3(row.get('broker_idle_cores')):>12}")
    lines.append("    (replicas: their enclave processes from 'replica consuming' to the end, the holder's work")
    lines.append("    included; brokers: the cluster's nodes over the figure; net: less what they spent with")
    lines.append("    nothing of ours running, measured for 2 s before the figure (idle cores: the brokers are")
    lines.append("    shared); '-' where a node's process changed during the figure)")
    lines.append("")
    c = result.get("costs")
    if c:
        lines.append("  per record / per increment (median ms)")
        lines.append(f"    {'replica: open (sealed box, envelope)':<58}{c['open_ms']:>10.3f}")
        lines.append(f"    {'replica: check (ciphertexts encrypt the plaintexts), batch ' + str(c['cost_batch']):<58}"
                     f"{c['check_ms']:>10.3f}")
        lines.append(f"    {'replica: fold into an increment':<58}{c['fold_ms']:>10.3f}")
        lines.append(f"    {'replica: all, per record':<58}{c['replica_ms_per_record']:>10.3f}")
        lines.append(f"    {'holder: merge, per increment of ' + str(c['cost_batch']) + ' records':<58}"
                     f"{c['merge_ms_per_increment']:>10.3f}")
        lines.append(f"    {'holder: state-stream entry of ' + str(c['stream_entry_bytes']) + ' B, confirmed':<58}"
                     f"{c['stream_entry_ms']:>10.3f}")
        lines.append("")
    for n, row in sorted(result["summary"].items(), key=lambda kv: int(kv[0])):
        scaling = f", scaling {row['scaling']:.3f}" if "scaling" in row else ""
        lines.append(f"ratio replicas={n}/plain-consume: {row['ratio']:.4f} (ingest {row['ingest_rps']:.1f} rec/s, "
                     f"plain {row['plain_rps']:.1f} msg/s{scaling}; counted/plain {row['counted_ratio']:.4f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = check_cluster(args.urls)
    if problem:
        log(f"benchmarks.replicas: {problem}; start the test cluster with `deploy/cluster.sh start` and set "
            "SEALEDSUM_CLUSTER_URLS to the URLs it prints (or pass --cluster-urls)")
        return EXIT_CLUSTER
    if args.bits not in SECURE_PAILLIER_BITS:
        log(f"benchmarks.replicas: WARNING: {args.bits}-bit Paillier keys are insecure; the policy sets "
            "insecure_test_keys = true")
    info = machine.describe(args.urls[0])
    workdir = Path(tempfile.mkdtemp(prefix="sealedsum-bench-replicas-"))
    ok = False
    try:
        result = run(args, workdir)
        ok = True
    except BenchError as err:
        log(f"benchmarks.replicas: {err}")
        return EXIT_FAILED
    except SealedsumError as err:
        log(f"benchmarks.replicas: {type(err).__name__}: {err}" + (f" ({err.hint})" if getattr(err, "hint", None) else ""))
        return err.exit_code
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"benchmarks.replicas: logs and state kept in {workdir}")
    info["loadavg_end"] = machine.loadavg()
    print(report(result, info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **result}, indent=2, default=str))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
