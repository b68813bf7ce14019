"""``python -m benchmarks``: what sealedsum's layers cost, side by side with plain pika.

One run per ``--bits`` value, one broker. Each repeat measures, each figure next to its
baseline (order alternating between repeats):

* **release latency** (sidecar running): from publishing the record that closes a window
  to the signed release arriving on a queue bound to the results exchange, for a 1-value
  stream and for a 1,000-value ``vector`` stream.
* **producer, 1,000-value vector** (sidecar stopped): records/s of ``Producer.send_many``
  (packed when this tree's policy has packing) against plain pika publishing messages of
  the same size with the same pipelined confirms, and against an *unpacked phe* producer
  (phe's encryption of every coordinate, sealed box, a confirmed publish per record).
* **producer, 1 value**: ``Producer.send_many`` (pipelined confirms) and ``Producer.send``
  (a confirm per record) against plain pika waiting for a confirm per message and plain
  pika with pipelined confirms (same window).
* **enclave ingest**: the real sidecar consuming the 1-value records just published
  (open, validate, fold; a release per window), timed from its ``consuming`` log line to
  the last window's release, against plain pika consuming as many same-sized messages
  with a manual ack each.
* **per-value encryption** (no broker): phe's path and the fast path, with gmpy2 and
  without it (in a subprocess that blocks the import), at each ``--encrypt-bits`` size;
  plus the fast path fed by a helper process.

Each figure is the median over the repeats; ratios are medians of the per-repeat ratios.
Everything the run declares on the broker has a unique ``bench-…`` prefix and is deleted
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import encryption as enc_bench
from benchmarks import machine, plain
from benchmarks.harness import LOWER, STREAM, UPPER, VEC_STREAM, BenchError, BenchSidecar
from sealedsum.common.errors import SealedsumError
from sealedsum.common.policy import SECURE_PAILLIER_BITS
from sealedsum.common.topology import ALL_RESULTS_KEY, result_routing_key

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EXIT_OK, EXIT_FAILED, EXIT_BROKER = 0, 1, 3  # 2: bad options (argparse, ConfigError)

TARGETS = {
    "producer_ratio": 0.5,       # producer 1-value >= 0.5 x plain publish with a confirm per message
    "ingest_ratio": 0.5,         # ingest >= 0.5 x plain consume with manual acks
    "vec_vs_phe": 30.0,          # 1,000-value producer >= 30 x the unpacked phe baseline
    "latency_1_ms": 100.0,       # release latency < 100 ms for a 1-value stream
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers, e.g. 2048,3072") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure sealedsum's producer, enclave ingest and release latency next to plain pika "
                    "on the same RabbitMQ (AMQP_URL, default the local guest broker), with the same "
                    "message sizes, and print the ratios and the targets' status.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a short run (100 records, windows of 50, 2 repeats, small samples): under a minute")
    p.add_argument("--records", type=int, metavar="N",
                   help="1-value records per repeat for each figure (default 1000; a multiple of --window)")
    p.add_argument("--window", type=int, metavar="W",
                   help="window_records of the 1-value stream (default 100, 50 with --quick)")
    p.add_argument("--vec-dim", type=int, default=1000, metavar="D", help="values per vector record (default 1000)")
    p.add_argument("--vec-records", type=int, metavar="V",
                   help="vector records per repeat (default 30, 10 with --quick; a multiple of 10)")
    p.add_argument("--phe-values", type=int, metavar="P",
                   help="values phe encrypts per repeat for the unpacked-phe vector baseline (default all "
                        "D values of one record, 50 with --quick: then extrapolated to D)")
    p.add_argument("--repeats", type=int, metavar="K", help="repeats; figures are medians (default 3, 2 with --quick)")
    p.add_argument("--bits", type=_bits_list, default=[2048],
                   help="Paillier modulus bits, or a comma-separated list for one run each (default 2048; "
                        "below 2048 the policy sets insecure_test_keys)")
    p.add_argument("--encrypt-bits", type=_bits_list,
                   help="key sizes for the per-value encryption table (default 2048,3072; --quick: --bits)")
    p.add_argument("--pool-workers", type=int, default=1, metavar="H",
                   help="helper processes for the pooled fast-encryption figures (default 1; 0: skip them)")
    p.add_argument("--publish-window", type=int, metavar="M",
                   help="records awaiting confirms at once, ours and the pipelined baseline's "
                        "(default: the producer's, 256)")
    p.add_argument("--per-message", type=int, default=64, metavar="B",
                   help="records per message for the batched figures (default 64; 1 skips them)")
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum",
                   help="queue type for the records queue and the baseline queue alike (default quorum)")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = p.parse_args(argv)
    args.records = args.records or (100 if args.quick else 1000)
    args.window = args.window or min(50 if args.quick else 100, args.records)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.vec_records = args.vec_records or (10 if args.quick else 30)
    args.phe_values = args.phe_values or (min(50, args.vec_dim) if args.quick else args.vec_dim)
    args.encrypt_bits = args.encrypt_bits or (list(args.bits) if args.quick else [2048, 3072])
    if args.publish_window is None:
        from sealedsum.producers.transport import DEFAULT_MAX_UNCONFIRMED

        args.publish_window = DEFAULT_MAX_UNCONFIRMED
    if min(args.records, args.window, args.repeats, args.vec_dim, args.vec_records, args.phe_values,
           args.publish_window) < 1 or args.pool_workers < 0:
        p.error("counts must be positive")
    if args.records % args.window:
        p.error(f"--records ({args.records}) must be a multiple of --window ({args.window}): the enclave "
                "ingest is timed to the release of the last window")
    if args.vec_records % 10:
        p.error("--vec-records must be a multiple of 10 (the vector stream's window)")
    for bits in (*args.bits, *args.encrypt_bits):
        if bits not in SECURE_PAILLIER_BITS and not (512 <= bits <= 8192 and bits % 256 == 0):
            p.error(f"bits must be one of {SECURE_PAILLIER_BITS}, or for insecure test keys a multiple of 256 "
                    "from 512 to 8192")
    if args.window < 10:
        p.error("--window must be at least 10 (the stream's min_batch)")
    from sealedsum.common import wire

    if not 1 <= args.per_message <= wire.MAX_BATCH_RECORDS:
        p.error(f"--per-message must be 1..{wire.MAX_BATCH_RECORDS}")
    return args


# -- the measurements --------------------------------------------------------------------

def time_send(producer, values: list[float], size: int) -> float:
    """``Producer.send`` per record: a confirm each."""
    t0 = time.perf_counter()
    sizes = {len(producer.send(STREAM, [v]).body) for v in values}
    dt = time.perf_counter() - t0
    if sizes != {size}:
        raise BenchError(f"sealed records of unexpected sizes {sorted(sizes)} (expected {size})")
    return dt


def time_send_many(producer, stream: str, records: list[list[float]], size: int, per_message: int = 1) -> float:
    """``Producer.send_many``: seal each, pipelined confirms; until the last is confirmed."""
    t0 = time.perf_counter()
    sent = producer.send_many(stream, records, per_message=per_message)
    dt = time.perf_counter() - t0
    sizes = {len(r.body) for r in sent}
    if sizes != {size}:
        raise BenchError(f"sealed records of unexpected sizes {sorted(sizes)} (expected {size})")
    return dt


def time_ingest(sc: BenchSidecar, n: int, windows: int, timeout: float) -> float:
    """Start the sidecar on a queue holding ``n`` messages (records, or record batches);
    seconds from 'consuming' to the last release."""
    t = sc.config.broker.topology
    conn = plain.connect(sc.url)
    try:
        ch = conn.channel()
        waiting = ch.queue_declare(t.records_queue, passive=True).method.message_count
        if waiting != n:
            raise BenchError(f"the records queue holds {waiting} messages, expected {n}")
        capture = f"{sc.prefix}.bench-results"
        ch.queue_declare(capture, exclusive=True)  # deleted with this connection
        ch.queue_bind(capture, t.results_exchange, routing_key=ALL_RESULTS_KEY)
        arrivals: list[float] = []
        ch.basic_consume(capture, lambda *_: arrivals.append(time.time()), auto_ack=True)
        sc.start()
        deadline = time.monotonic() + timeout
        while len(arrivals) < windows:
            conn.process_data_events(time_limit=0.2)
            sc.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(arrivals)} of {windows} releases within {timeout:.0f} s; "
                                 "were records rejected?\n" + sc.log_tail())
        started = sc.wait_consuming()
        return arrivals[windows - 1] - started
    finally:
        conn.close()


def time_latency(sc: BenchSidecar, producer, stream: str, window: int, make_values, windows: int,
                 settle_s: float, timeout: float = 120.0) -> list[float]:
    """Milliseconds from publishing each window's closing record to its release's arrival.

    Per window: the first ``window - 1`` records are published (pipelined) and left to the
    running enclave until its queue is empty and ``settle_s`` passed; then the closing
    record is published (``Producer.send``) and the clock runs until the release arrives on
    a queue bound to the results exchange. An upper bound of close-to-arrival: it includes
    the closing record's own publish, delivery and processing.
    """
    t = sc.config.broker.topology
    conn = plain.connect(sc.url)
    out = []
    try:
        ch = conn.channel()
        capture = f"{sc.prefix}.bench-latency"
        ch.queue_declare(capture, exclusive=True)
        ch.queue_bind(capture, t.results_exchange, routing_key=result_routing_key(stream))
        arrivals: list[float] = []
        ch.basic_consume(capture, lambda *_: arrivals.append(time.perf_counter()), auto_ack=True)
        for _ in range(windows):
            producer.send_many(stream, [make_values() for _ in range(window - 1)])
            deadline = time.monotonic() + timeout
            while ch.queue_declare(t.records_queue, passive=True).method.message_count:
                conn.process_data_events(time_limit=0.05)
                sc.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError("the enclave did not drain its queue in time\n" + sc.log_tail())
            conn.process_data_events(time_limit=settle_s)
            if arrivals:
                raise BenchError(f"a release of {stream} arrived before its window closed")
            t0 = time.perf_counter()
            producer.send(stream, make_values())
            while not arrivals:
                conn.process_data_events(time_limit=0.01)
                if time.monotonic() > deadline:
                    raise BenchError(f"no release of {stream} within {timeout:.0f} s\n" + sc.log_tail())
            out.append((arrivals[0] - t0) * 1000)
            arrivals.clear()
    finally:
        conn.close()
    return out


def time_unpacked_record(sealer, dim: int, sample: int, rng: random.Random, encryptor=None) -> float:
    """Seconds for an unpacked producer to seal one ``dim``-value record: encode, encryption of
    every coordinate (phe's unless ``encryptor`` is given; timed on ``sample`` of them, scaled to
    ``dim``), and a sealed box of the unpacked record's size. Publishing is timed separately
    (plain pika)."""
    from phe import PaillierPublicKey

    from sealedsum.producers.encryption.encryptors import PheEncryptor

    policy = sealer.stream(VEC_STREAM)
    values = [rng.uniform(0.0, 1.0) for _ in range(dim)]
    phe = encryptor or PheEncryptor(PaillierPublicKey(sealer.enclave.keys.paillier_n))
    phe_values = sample
    t0 = time.perf_counter()
    encoded, _ = policy.encode(values)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    cts = [phe.encrypt(q) for q in encoded[:phe_values]]
    t_encrypt = (time.perf_counter() - t0) * dim / len(cts)
    width = sealer.enclave.keys.ciphertext_width
    blob = os.urandom(dim * width + 100)
    t0 = time.perf_counter()
    sealer._box.encrypt(blob)
    t_box = time.perf_counter() - t0
    return t_encode + t_encrypt + t_box


def unpacked_record_bytes(sealer, dim: int) -> int:
    """The sealed size of a ``dim``-value record with one ciphertext per value."""
    from nacl.bindings import crypto_box_SEALBYTES

    from sealedsum.common import wire

    width = sealer.enclave.keys.ciphertext_width
    env = wire.Envelope(stream=VEC_STREAM, record_id=os.urandom(wire.RECORD_ID_SIZE), key_epoch=1, sent_at_ms=0,
                        window=0, width=width, ciphertexts=tuple([1] * dim), producer_id=sealer.producer_id,
                        plaintexts=tuple([0] * dim))
    return len(env.to_bytes()) + crypto_box_SEALBYTES


def time_encrypt(public_key, encoded: list[int]) -> float:
    t0 = time.perf_counter()
    for q in encoded:
        public_key.encrypt(q).ciphertext(be_secure=False)  # phe's path, as the old RecordSealer.seal
    return time.perf_counter() - t0


def time_seal(sealer, values: list[float]) -> tuple[float, list[bytes]]:
    t0 = time.perf_counter()
    bodies = [sealer.seal(STREAM, [v]).body for v in values]
    return time.perf_counter() - t0, bodies


# Records per in-process batch: what the runtime gathers under load (at most ack_batch), so
# that the batch check costs what it costs there, one decryption per batch, not per record.
IN_PROCESS_BATCH = 64


def time_on_record(make_enclave, bodies: list[bytes]) -> float:
    enclave = make_enclave()
    t0 = time.perf_counter()
    for start in range(0, len(bodies), IN_PROCESS_BATCH):
        batch = bodies[start:start + IN_PROCESS_BATCH]
        for outcome in enclave.accept_batch([enclave.open(b) for b in batch], int(time.time() * 1000)):
            if outcome.rejection is not None:
                raise BenchError(f"the in-process enclave rejected a record: {outcome.rejection}")
    dt = time.perf_counter() - t0
    if enclave.stats.accepted != len(bodies):
        raise BenchError("the in-process enclave did not accept every record")
    return dt


def check_stats(stats: dict | None, expected: int) -> None:
    if stats is None:
        raise BenchError("the sidecar logged no stats at shutdown")
    if stats.get("accepted") != expected or stats.get("rejected"):
        raise BenchError(f"the sidecar accepted {stats.get('accepted')} records (expected {expected}), "
                         f"rejected {stats.get('rejected')}")


def purge(url: str, queue: str) -> None:
    conn = plain.connect(url)
    try:
        conn.channel().queue_purge(queue)
    finally:
        conn.close()


def alternate(i: int, *steps) -> None:
    for step in (steps if i % 2 == 0 else tuple(reversed(steps))):
        step()


# -- the run -------------------------------------------------------------------------------
#
# One function per measured section, each returning its part of the repeat's dict (or of the
# run's), in the order ``run_repeat`` calls them; ``Bench`` carries what they share.

@dataclass
class Bench:
    """What every section of one run (one ``--bits`` value) shares."""

    args: argparse.Namespace
    url: str
    bits: int
    sc: BenchSidecar
    rng: random.Random
    vec_window: int
    base_exchange: str
    base_queue: str
    make_enclave: Callable[[], Any] | None = None  # the enclave's code in-process (start_bench)
    prefetch: int = 0
    size: int = 0               # sealed bytes of a 1-value record (record_sizes)
    vec_size: int = 0           # ... of a vector record
    vec_unpacked_bytes: int = 0
    accepted: int = 0           # records the running sidecar accepted since it started

    @property
    def n(self) -> int:         # 1-value records per figure per repeat
        return self.args.records

    @property
    def w(self) -> int:         # the 1-value stream's window
        return self.args.window

    @property
    def dim(self) -> int:       # values per vector record
        return self.args.vec_dim

    @property
    def nvec(self) -> int:      # vector records per repeat
        return self.args.vec_records

    @property
    def records_queue(self) -> str:
        return self.sc.config.broker.topology.records_queue

    def stop_sidecar(self) -> None:
        """Stop the sidecar, checking that it accepted exactly the records sent since its start."""
        check_stats(self.sc.stop(), self.accepted)
        self.accepted = 0


def start_bench(b: Bench) -> dict:
    """Start the sidecar and the baseline queue, and load the enclave's code in-process.
    Returns the consumers' prefetch and the sidecar's ack batch."""
    from sealedsum.sidecar.enclave import noise
    from sealedsum.sidecar.enclave.keyring import EnclaveKeys
    from sealedsum.sidecar.enclave.service import Enclave
    from sealedsum.sidecar.enclave_process.runtime import ack_batch_for, enclave_prefetch

    sc = b.sc
    log(f"[{b.bits} bits] starting the sidecar (prefix {sc.prefix}; keys are generated on first start)")
    t0 = time.monotonic()
    sc.start()
    sc.wait_consuming()
    log(f"[{b.bits} bits] sidecar consuming after {time.monotonic() - t0:.1f} s")
    plain.declare(b.url, b.base_exchange, b.base_queue, b.args.queue_type)

    # The benchmark is the platform owner: it can open the enclave's sealed keys,
    # which lets it run the enclave's code in-process for the on_record figure.
    (sealed,) = list((sc.state / "enclave").rglob("keys.sealed"))
    keys = EnclaveKeys.unseal(sc.platform.sealing_key(sc.measurement), sc.measurement, sealed.read_bytes())
    plan = sc.policy.streams[STREAM].noise_plan()
    noise.sum_measurement(plan), noise.count_measurement(plan)  # warm OpenDP's cache, as a running enclave is

    def make_enclave() -> Enclave:
        return Enclave(keys, sc.policy, sc.policy_bytes, sc.code_digest, sc.measurement, lambda _rd: b"")

    b.make_enclave = make_enclave
    b.prefetch = enclave_prefetch(make_enclave())  # what the sidecar's runtime asks for
    return {"prefetch": b.prefetch, "ack_batch": ack_batch_for(b.prefetch)}


def record_sizes(b: Bench, producer) -> dict:
    """Sealed sizes of the records (once per run): the baselines publish messages of these sizes."""
    b.size = len(producer.sealer.seal(STREAM, [1.0]).body)
    b.vec_size = len(producer.sealer.seal(VEC_STREAM, [0.5] * b.dim).body)
    b.vec_unpacked_bytes = unpacked_record_bytes(producer.sealer, b.dim)
    vec_policy = b.sc.policy.streams[VEC_STREAM]
    return {"record_bytes": b.size, "vec_record_bytes": b.vec_size,
            "vec_ciphertexts": getattr(vec_policy, "ciphertexts_per_record", b.dim),
            "vec_unpacked_bytes": b.vec_unpacked_bytes}


def measure_latency(b: Bench, producer) -> dict:
    """1. Release latency, with the enclave running; then the enclave is stopped."""
    lat_windows, lat_vec_windows = (2, 1) if b.args.quick else (5, 2)
    rng = b.rng
    lat = time_latency(b.sc, producer, STREAM, b.w, lambda: [rng.uniform(LOWER, UPPER)], lat_windows, 0.3)
    lat_vec = time_latency(b.sc, producer, VEC_STREAM, b.vec_window,
                           lambda: [rng.uniform(0.0, 1.0) for _ in range(b.dim)], lat_vec_windows,
                           0.5 if b.sc.packed else 2.0)
    b.accepted += lat_windows * b.w + lat_vec_windows * b.vec_window
    # Stop the enclave: records pile up in its queue for the ingest figure, and
    # nothing else of ours competes for the CPU while we publish.
    b.stop_sidecar()
    return {"latency_1_ms": statistics.median(lat), "latency_vec_ms": statistics.median(lat_vec),
            "latency_1_all_ms": lat, "latency_vec_all_ms": lat_vec}


def measure_vectors(b: Bench, producer, i: int) -> dict:
    """2. Producer, D-value vectors: ``send_many`` (packed) against plain pipelined publishing,
    the unpacked phe producer, the same unpacked record on the fast path, and (with
    ``--pool-workers``) ``send_many`` fed by helper processes. Purged later with step 3's."""
    out: dict = {}
    vectors = [[b.rng.uniform(0.0, 1.0) for _ in range(b.dim)] for _ in range(b.nvec)]
    vec_bodies = [os.urandom(b.vec_size) for _ in range(b.nvec)]

    def ours_vec():
        out["vec_s"] = time_send_many(producer, VEC_STREAM, vectors, b.vec_size)

    def plain_vec():
        out["plain_vec_s"] = plain.publish_pipelined(b.url, b.base_exchange, vec_bodies, b.args.publish_window)

    alternate(i, ours_vec, plain_vec)
    # the unpacked phe producer: seal (phe) + one confirmed publish of its size
    out["phe_vec_seal_s"] = time_unpacked_record(producer.sealer, b.dim, b.args.phe_values, b.rng)
    out["phe_vec_publish_s"] = plain.publish(b.url, b.base_exchange, [os.urandom(b.vec_unpacked_bytes)])
    # the same unpacked record on the fast path (what packing adds on top of it)
    out["fast_vec_seal_s"] = time_unpacked_record(producer.sealer, b.dim, b.dim, b.rng, producer.sealer.encryptor)
    if b.args.pool_workers:
        out["vec_pool_s"] = time_send_many_pooled(b, producer, vectors)
    return out


def time_send_many_pooled(b: Bench, producer, vectors: list[list[float]]) -> float:
    """``send_many`` of the vectors with the encryptor fed by ``--pool-workers`` helper processes
    (their precomputed backlog drained first)."""
    from phe import PaillierPublicKey

    from sealedsum.producers.encryption.encryptors import FastEncryptor

    pooled = FastEncryptor(PaillierPublicKey(producer.enclave.keys.paillier_n),
                           workers=b.args.pool_workers, capacity=1024)
    default_encryptor = producer.sealer.encryptor
    try:
        producer.sealer.encryptor = pooled
        time.sleep(1.0)  # helpers start; then drain what they precomputed
        while pooled.pool.take() is not None:
            pass
        return time_send_many(producer, VEC_STREAM, vectors, b.vec_size)
    finally:
        producer.sealer.encryptor = default_encryptor
        pooled.close()


def measure_send(b: Bench, producer, i: int, values: list[float], bodies: list[bytes]) -> dict:
    """3. Producer, 1 value, a confirm per record (``Producer.send`` over N/2 records, scaled to N)
    against plain pika waiting for each confirm; then the records queue and the baseline's are purged."""
    out: dict = {}
    n_send = max(b.w, b.n // 2)

    def ours_send():
        out["send_s"] = time_send(producer, values[:n_send], b.size) * b.n / n_send

    def plain_each_for_send():
        out["plain_each_s_for_send"] = plain.publish(b.url, b.base_exchange, bodies[:n_send]) * b.n / n_send

    alternate(i, ours_send, plain_each_for_send)
    purge(b.url, b.records_queue)
    purge(b.url, b.base_queue)
    return out


def measure_send_many(b: Bench, producer, i: int, values: list[float], bodies: list[bytes]) -> dict:
    """4. Producer, 1 value, pipelined: ``send_many`` of N records against plain pika with a confirm
    per message and with pipelined confirms. These N records feed the ingest figure."""
    out: dict = {}

    def ours_many():
        out["producer_s"] = time_send_many(producer, STREAM, [[v] for v in values], b.size)

    def plain_each():
        out["plain_publish_s"] = plain.publish(b.url, b.base_exchange, bodies)

    def plain_pipelined():
        out["plain_pipelined_s"] = plain.publish_pipelined(b.url, b.base_exchange, bodies, b.args.publish_window)

    alternate(i, ours_many, plain_each, plain_pipelined)
    return out


def measure_in_process(b: Bench, producer) -> dict:
    """5. In-process costs, while the broker and the enclave are quiet: one value encrypted by phe
    and by the producer's encryptor, ``RecordSealer.seal``, and ``Enclave.on_record`` on W records."""
    from phe import PaillierPublicKey

    from sealedsum.common.fixedpoint import encode

    w = b.w
    micro_values = [b.rng.uniform(LOWER, UPPER) for _ in range(w)]
    pk = PaillierPublicKey(producer.enclave.keys.paillier_n)
    fraction_bits = b.sc.policy.streams[STREAM].fraction_bits
    out = {"encrypt_ms": time_encrypt(pk, encode(micro_values, fraction_bits)) / w * 1000}
    t0 = time.perf_counter()
    for q in encode(micro_values, fraction_bits):
        producer.sealer.encryptor.encrypt(q)
    out["fast_encrypt_ms"] = (time.perf_counter() - t0) / w * 1000
    seal_s, sealed_bodies = time_seal(producer.sealer, micro_values)
    out["seal_ms"] = seal_s / w * 1000
    out["on_record_ms"] = time_on_record(b.make_enclave, sealed_bodies) / w * 1000
    return out


def measure_ingest(b: Bench, i: int) -> dict:
    """6. Enclave ingest of the N records of step 4 (the sidecar started again) against plain
    pika consuming N same-sized messages with the runtime's prefetch and an ack each."""
    out: dict = {}

    def ours_consume():
        out["ingest_s"] = time_ingest(b.sc, b.n, b.n // b.w, timeout=max(120.0, b.n * 0.5))

    def plain_consume():
        out["plain_consume_s"] = plain.consume(b.url, b.base_queue, b.n, prefetch=b.prefetch)

    alternate(i, ours_consume, plain_consume)
    b.accepted += b.n
    return out


def measure_batched(b: Bench, values: list[float], base: dict) -> dict:
    """7. The same N records again, B per message (record batches): published with the sidecar
    stopped, then ingested like step 6. Compared with ``base``'s baselines of steps 4 and 6."""
    from sealedsum.producers.client import Producer

    n, per_message = b.n, b.args.per_message
    producer = Producer(b.sc.config, max_unconfirmed=b.args.publish_window)
    try:
        producer.check_stream(STREAM)  # its budget report, while the sidecar still answers
        b.stop_sidecar()
        out = {"producer_batched_s": time_send_many(producer, STREAM, [[v] for v in values], b.size,
                                                    per_message=per_message)}
    finally:
        producer.close()
    messages = -(-n // per_message)
    out["ingest_batched_s"] = time_ingest(b.sc, messages, n // b.w, timeout=max(120.0, n * 0.5))
    b.accepted += n
    out["producer_batched_rps"] = n / out["producer_batched_s"]
    out["producer_batched_ratio"] = out["producer_batched_rps"] / (n / base["plain_publish_s"])
    out["producer_batched_pipelined_ratio"] = out["producer_batched_rps"] / (n / base["plain_pipelined_s"])
    out["ingest_batched_rps"] = n / out["ingest_batched_s"]
    out["ingest_batched_ratio"] = out["ingest_batched_rps"] / (n / base["plain_consume_s"])
    return out


def derived_rates(r: dict, n: int, nvec: int) -> dict:
    """Records/s and ratios from a repeat's timings."""
    d: dict = {}
    d["producer_rps"] = n / r["producer_s"]
    d["plain_publish_rps"] = n / r["plain_publish_s"]
    d["plain_pipelined_rps"] = n / r["plain_pipelined_s"]
    d["producer_ratio"] = d["producer_rps"] / d["plain_publish_rps"]
    d["producer_pipelined_ratio"] = d["producer_rps"] / d["plain_pipelined_rps"]
    d["send_rps"] = n / r["send_s"]
    d["plain_each_rps_for_send"] = n / r["plain_each_s_for_send"]
    d["send_ratio"] = d["send_rps"] / d["plain_each_rps_for_send"]
    d["vec_rps"] = nvec / r["vec_s"]
    d["plain_vec_rps"] = nvec / r["plain_vec_s"]
    d["vec_ratio"] = d["vec_rps"] / d["plain_vec_rps"]
    d["phe_vec_rps"] = 1 / (r["phe_vec_seal_s"] + r["phe_vec_publish_s"])
    d["vec_vs_phe"] = d["vec_rps"] / d["phe_vec_rps"]
    d["fast_vec_rps"] = 1 / (r["fast_vec_seal_s"] + r["phe_vec_publish_s"])
    d["fast_vec_vs_phe"] = d["fast_vec_rps"] / d["phe_vec_rps"]
    if "vec_pool_s" in r:
        d["vec_pool_rps"] = nvec / r["vec_pool_s"]
        d["vec_pool_vs_phe"] = d["vec_pool_rps"] / d["phe_vec_rps"]
    d["ingest_rps"] = n / r["ingest_s"]
    d["plain_consume_rps"] = n / r["plain_consume_s"]
    d["ingest_ratio"] = d["ingest_rps"] / d["plain_consume_rps"]
    d["encrypt_share"] = r["fast_encrypt_ms"] / (1000 / d["producer_rps"])
    return d


def run_repeat(b: Bench, i: int, result: dict) -> dict:
    """One repeat: steps 1-7 in order (the sidecar running at the start and at the end)."""
    from sealedsum.producers.client import Producer

    r: dict = {}
    t0 = time.perf_counter()
    producer = Producer(b.sc.config, max_unconfirmed=b.args.publish_window)
    r["attest_ms"] = (time.perf_counter() - t0) * 1000
    try:
        if not b.size:
            result.update(record_sizes(b, producer))
        r.update(measure_latency(b, producer))
        r.update(measure_vectors(b, producer, i))
        values = [b.rng.uniform(LOWER, UPPER) for _ in range(b.n)]
        bodies = [os.urandom(b.size) for _ in range(b.n)]
        r.update(measure_send(b, producer, i, values, bodies))
        r.update(measure_send_many(b, producer, i, values, bodies))
        r.update(measure_in_process(b, producer))
    finally:
        producer.close()
    r.update(measure_ingest(b, i))
    if b.args.per_message > 1:
        r.update(measure_batched(b, values, r))
    r.update(derived_rates(r, b.n, b.nvec))
    log(f"[{b.bits} bits] repeat {i + 1}/{b.args.repeats}: producer {r['producer_rps']:.0f} rec/s vs plain "
        f"{r['plain_publish_rps']:.0f} (confirm each) / {r['plain_pipelined_rps']:.0f} (pipelined); "
        f"vector {r['vec_rps']:.1f} rec/s vs plain {r['plain_vec_rps']:.0f}, phe unpacked "
        f"{r['phe_vec_rps']:.3f}; ingest {r['ingest_rps']:.0f} vs {r['plain_consume_rps']:.0f}; "
        f"latency {r['latency_1_ms']:.1f} / {r['latency_vec_ms']:.1f} ms")
    return r


def run(args: argparse.Namespace, url: str, workdir: Path, bits: int) -> dict:
    vec_window = 10
    sc = BenchSidecar(workdir, url, bits=bits, window_records=args.window, queue_type=args.queue_type,
                      vec_dim=args.vec_dim, vec_window=vec_window)
    b = Bench(args=args, url=url, bits=bits, sc=sc, rng=random.Random(20240501), vec_window=vec_window,
              base_exchange=f"{sc.prefix}.plain", base_queue=f"{sc.prefix}.plain")
    runs: list[dict] = []
    result = {"records": args.records, "window": args.window, "repeats": args.repeats, "bits": bits,
              "insecure_test_keys": sc.insecure, "queue_type": args.queue_type, "prefix": sc.prefix,
              "runs": runs, "vec_dim": args.vec_dim, "vec_records": args.vec_records, "vec_window": vec_window,
              "packed": sc.packed, "publish_window": args.publish_window, "phe_values": args.phe_values,
              "per_message": args.per_message}
    try:
        result.update(start_bench(b))
        for i in range(args.repeats):
            runs.append(run_repeat(b, i, result))
        sc.wait_consuming()
        time.sleep(0.5)
        b.stop_sidecar()
    finally:
        if sc.proc is not None:
            sc.stop()
        sc.cleanup(extra_queues=(b.base_queue,), extra_exchanges=(b.base_exchange,))
    return result


def encryption_table(args: argparse.Namespace, keys: dict[int, int]) -> list[dict]:
    """Per-value encryption costs at each ``--encrypt-bits`` (median of the repeats)."""
    samples = 100 if args.quick else 500
    phe_samples = 10 if args.quick else 50
    rows = []
    for bits in args.encrypt_bits:
        n = keys.get(bits) or enc_bench.key_of_bits(bits)
        reps = [enc_bench.measure(n, samples, phe_samples, args.pool_workers) for _ in range(args.repeats)]
        nogmp = [enc_bench.measure_without_gmpy2(n, max(10, samples // 10), max(2, phe_samples // 10))
                 for _ in range(1 if args.quick else args.repeats)]
        row = {"bits": bits, "runs": reps, "runs_without_gmpy2": nogmp}
        for key in ("phe_ms", "fast_ms", "fast_setup_ms", "fast_pool_ms"):
            if key in reps[0]:
                row[key] = statistics.median(r[key] for r in reps)
        for key in ("phe_ms", "fast_ms", "fast_setup_ms"):
            row["nogmp_" + key] = statistics.median(r[key] for r in nogmp)
        rows.append(row)
        log(f"encryption at {bits} bits: phe {row['phe_ms']:.2f} ms, fast {row['fast_ms']:.3f} ms per value "
            f"(without gmpy2: {row['nogmp_phe_ms']:.1f} / {row['nogmp_fast_ms']:.2f} ms)")
    return rows


# -- the report ----------------------------------------------------------------------------

def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str, fmt: str) -> str:
    vals = [r[key] for r in runs]
    return f"{fmt.format(min(vals))}-{fmt.format(max(vals))}" if len(vals) > 1 else "-"


def fmt_rate(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"


def spread_rate(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs]
    return f"{fmt_rate(min(vals))}-{fmt_rate(max(vals))}" if len(vals) > 1 else "-"


def report_setup(result: dict, info: dict) -> list[str]:
    """The header: the machine, the software and the run's settings."""
    bits = result["bits"]
    lines = ["", f"sealedsum benchmarks ({bits}-bit Paillier)", ""]
    lines.append(f"  machine   {info['cpu']}, {info['cores']} cores, {info['os']}")
    lines.append(f"  python    {info['python']}; phe with gmpy2: {'yes' if info['gmpy2'] else 'NO (pure Python)'} "
                 f"(phe.util.HAVE_GMP={info['gmpy2']})")
    lines.append(f"  rabbitmq  {info['rabbitmq']}")
    lines.append(f"  load avg  {info['loadavg_start']} at start, {info['loadavg_end']} at end (1/5/15 min)")
    lines.append(f"  setup     {result['queue_type']} queues; 1-value records of {result['record_bytes']} bytes, "
                 f"{result['records']} per figure per repeat, windows of {result['window']};")
    packed = (f"packed, {result['vec_ciphertexts']} ciphertexts" if result["packed"]
              else f"unpacked, {result['vec_ciphertexts']} ciphertexts")
    lines.append(f"            {result['vec_dim']}-value vector records of {result['vec_record_bytes']} bytes "
                 f"({packed}), {result['vec_records']} per repeat, windows of {result['vec_window']};")
    lines.append(f"            up to {result['publish_window']} records awaiting confirms (ours and the pipelined "
                 f"baseline); consumers' prefetch {result['prefetch']} (acks in batches of {result['ack_batch']} "
                 "for the sidecar, one per message for plain pika);")
    lines.append(f"            median of {result['repeats']} repeat(s), baselines interleaved")
    if result["insecure_test_keys"]:
        lines.append(f"  WARNING   {bits}-bit keys are INSECURE (policy sets insecure_test_keys = true): "
                     "not a real deployment's figures")
    lines.append("")
    return lines


def report_rates(result: dict, info: dict) -> list[str]:
    """The records/s table, ours next to each baseline, and its footnotes."""
    runs = result["runs"]
    head = f"  {'records/s (median, min-max)':<58}{'sealedsum':>26}{'baseline':>26}{'ours/base':>11}"
    lines = [head, "  " + "-" * (len(head) - 2)]
    rows = [
        ("producer: send_many vs plain publish+confirm each", "producer_rps", "plain_publish_rps", "producer_ratio"),
        ("producer: send_many vs plain pipelined confirms", "producer_rps", "plain_pipelined_rps",
         "producer_pipelined_ratio"),
        ("producer: Producer.send vs publish+confirm", "send_rps", "plain_each_rps_for_send", "send_ratio"),
        (f"producer {result['vec_dim']}-value: send_many vs plain pipelined", "vec_rps", "plain_vec_rps", "vec_ratio"),
        (f"producer {result['vec_dim']}-value: send_many vs unpacked phe", "vec_rps", "phe_vec_rps", "vec_vs_phe"),
    ]
    rows.append(("  unpacked, fast path (seal + 1 plain publish) vs unpacked phe", "fast_vec_rps", "phe_vec_rps",
                 "fast_vec_vs_phe"))
    if "vec_pool_rps" in runs[0]:
        rows.append((f"  same, fast path + pool ({info.get('pool_workers', 1)} helper) vs unpacked phe",
                     "vec_pool_rps", "phe_vec_rps", "vec_pool_vs_phe"))
    rows.append(("enclave ingest: sidecar vs consume+ack", "ingest_rps", "plain_consume_rps", "ingest_ratio"))
    if "ingest_batched_rps" in runs[0]:
        b = result["per_message"]
        rows += [
            (f"batched, {b} records/message: send_many vs plain confirm each", "producer_batched_rps",
             "plain_publish_rps", "producer_batched_ratio"),
            (f"batched, {b} records/message: send_many vs plain pipelined", "producer_batched_rps",
             "plain_pipelined_rps", "producer_batched_pipelined_ratio"),
            (f"batched, {b} records/message: ingest vs consume+ack", "ingest_batched_rps", "plain_consume_rps",
             "ingest_batched_ratio"),
        ]
    for label, ours, base, ratio in rows:
        o = f"{fmt_rate(med(runs, ours))} ({spread_rate(runs, ours)})"
        b = f"{fmt_rate(med(runs, base))} ({spread_rate(runs, base)})"
        lines.append(f"  {label:<58}{o:>26}{b:>26}{med(runs, ratio):>11.3f}")
    if result["phe_values"] < result["vec_dim"]:
        lines.append(f"  (unpacked phe: encryption timed on {result['phe_values']} values and scaled to "
                     f"{result['vec_dim']}; plus one confirmed plain publish of {result['vec_unpacked_bytes']} bytes)")
    else:
        lines.append(f"  (unpacked phe: encode + phe encryption of all {result['vec_dim']} values + sealed box, "
                     f"plus one confirmed plain publish of {result['vec_unpacked_bytes']} bytes)")
    if "ingest_batched_rps" in runs[0]:
        lines.append(f"  (batched: the same 1-value records, {result['per_message']} sealed records per message "
                     "(a record batch); baselines are plain pika with one record-sized message per record)")
    if not result["packed"]:
        lines.append("  (this tree's policy has no packing: the vector records above are unpacked)")
    lines.append("")
    return lines


def report_latency(result: dict) -> list[str]:
    """Release latency of the 1-value and the vector stream."""
    runs = result["runs"]
    lines = ["  release latency, publishing the window's closing record -> signed release arrives (median ms)"]
    lines.append(f"    {'1-value stream (window ' + str(result['window']) + ')':<58}"
                 f"{med(runs, 'latency_1_ms'):>10.1f}   ({spread(runs, 'latency_1_ms', '{:.1f}')})")
    lines.append(f"    {str(result['vec_dim']) + '-value stream (window ' + str(result['vec_window']) + ')':<58}"
                 f"{med(runs, 'latency_vec_ms'):>10.1f}   ({spread(runs, 'latency_vec_ms', '{:.1f}')})")
    lines.append("")
    return lines


def report_per_record(result: dict) -> list[str]:
    """Milliseconds per record: the in-process costs next to the broker-bound figures."""
    runs, bits = result["runs"], result["bits"]
    lines = ["  per record (median ms)"]
    per = [
        (f"Paillier encrypt, one value, phe ({bits}-bit n)", med(runs, "encrypt_ms")),
        (f"Paillier encrypt, one value, fast path ({bits}-bit n)", med(runs, "fast_encrypt_ms")),
        ("RecordSealer.seal: clip, encode, encrypt, sealed box", med(runs, "seal_ms")),
        ("Producer.send_many, per record", 1000 / med(runs, "producer_rps")),
        ("Producer.send: seal + publish + confirm", 1000 / med(runs, "send_rps")),
        ("plain publish + confirm each", 1000 / med(runs, "plain_publish_rps")),
        ("plain publish, pipelined confirms", 1000 / med(runs, "plain_pipelined_rps")),
        (f"Enclave open + accept_batch in-process, batches of {IN_PROCESS_BATCH} (1 release per {result['window']})",
         med(runs, "on_record_ms")),
        ("sidecar ingest (broker + enclave)", 1000 / med(runs, "ingest_rps")),
        ("plain consume + ack", 1000 / med(runs, "plain_consume_rps")),
    ]
    for label, v in per:
        lines.append(f"    {label:<58}{v:>10.3f}")
    lines.append(f"    {'(once per producer) connect + attest':<58}{med(runs, 'attest_ms'):>10.1f}")
    lines.append(f"    fast Paillier encryption is ~{med(runs, 'encrypt_share'):.0%} of the producer's time per "
                 "1-value record")
    lines.append("")
    return lines


def report_ratios(result: dict, info: dict) -> list[str]:
    """The headline ratios, one per line (``ratio ...:``), for scripts and the integration test."""
    runs, bits = result["runs"], result["bits"]
    pr, ir = med(runs, "producer_ratio"), med(runs, "ingest_ratio")
    lines = [f"ratio producer/plain-publish: {pr:.4f} (send_many vs plain pika with a confirm per message)"]
    lines.append(f"ratio producer/plain-pipelined: {med(runs, 'producer_pipelined_ratio'):.4f}")
    lines.append(f"ratio ingest/plain-consume: {ir:.4f} (plain pika is {1 / ir:.1f}x faster)")
    lines.append(f"ratio vector/unpacked-phe: {med(runs, 'vec_vs_phe'):.1f}")
    lines.append(f"release latency ms: {med(runs, 'latency_1_ms'):.1f} (1 value), "
                 f"{med(runs, 'latency_vec_ms'):.1f} ({result['vec_dim']} values)")
    lines.append(f"paillier encrypt ms/value: {med(runs, 'fast_encrypt_ms'):.3f} fast, {med(runs, 'encrypt_ms'):.3f} "
                 f"phe ({bits}-bit, gmpy2 {info['gmpy2']})")
    lines.append("")
    return lines


def report_targets(result: dict) -> list[str]:
    """Each target's value and whether it is met."""
    runs = result["runs"]
    lines = ["targets"]
    checks = [
        ("producer 1-value >= 0.5 x plain publish+confirm each", med(runs, "producer_ratio"),
         TARGETS["producer_ratio"], ">="),
        ("ingest >= 0.5 x plain consume+ack", med(runs, "ingest_ratio"), TARGETS["ingest_ratio"], ">="),
        (f"{result['vec_dim']}-value producer >= 30 x unpacked phe", med(runs, "vec_vs_phe"), TARGETS["vec_vs_phe"], ">="),
        ("release latency, 1-value stream < 100 ms", med(runs, "latency_1_ms"), TARGETS["latency_1_ms"], "<"),
    ]
    for label, value, target, op in checks:
        ok = value >= target if op == ">=" else value < target
        lines.append(f"  {label:<58}{value:>10.3f}  {'met' if ok else 'NOT MET'}")
    return lines


def report(result: dict, info: dict) -> str:
    lines = (report_setup(result, info) + report_rates(result, info) + report_latency(result)
             + report_per_record(result) + report_ratios(result, info) + report_targets(result))
    return "\n".join(lines)


def encryption_report(rows: list[dict], pool_workers: int) -> str:
    lines = ["", "per-value Paillier encryption (median ms; no broker)", ""]
    head = (f"  {'bits':>6}{'phe':>10}{'fast':>10}{'phe/fast':>10}{'fast+pool':>11}"
            f"{'phe no-gmpy2':>14}{'fast no-gmpy2':>15}{'fast setup':>12}")
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        pool = f"{r['fast_pool_ms']:.3f}" if "fast_pool_ms" in r else "-"
        lines.append(f"  {r['bits']:>6}{r['phe_ms']:>10.3f}{r['fast_ms']:>10.3f}{r['phe_ms'] / r['fast_ms']:>10.1f}"
                     f"{pool:>11}{r['nogmp_phe_ms']:>14.2f}{r['nogmp_fast_ms']:>15.3f}{r['fast_setup_ms']:>12.1f}")
    lines.append(f"  fast+pool: the fast path with {pool_workers} helper process(es) precomputing randomizers, "
                 "steady state; fast setup: once per key (h^n mod n^2 and the comb tables)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("AMQP_URL") or DEFAULT_URL
    try:
        plain.connect(url).close()
    except Exception as err:  # noqa: BLE001
        log(f"benchmarks: cannot reach the broker at AMQP_URL ({type(err).__name__}); start RabbitMQ "
            "(`rabbitmq-server -detached`) or set AMQP_URL")
        return EXIT_BROKER
    info = machine.describe(url)
    info["pool_workers"] = args.pool_workers
    for bits in args.bits:
        if bits not in SECURE_PAILLIER_BITS:
            log(f"benchmarks: WARNING: {bits}-bit Paillier keys are insecure; the benchmark policy sets "
                "insecure_test_keys = true, and the figures do not describe a real deployment")
    results = []
    keys: dict[int, int] = {}
    for bits in args.bits:
        workdir = Path(tempfile.mkdtemp(prefix="sealedsum-bench-"))
        ok = False
        try:
            result = run(args, url, workdir, bits)
            ok = True
        except BenchError as err:
            log(f"benchmarks: {err}")
            return EXIT_FAILED
        except SealedsumError as err:
            # ConfigError (e.g. --bits), AttestationError (the code changed under the run), TransportError.
            log(f"benchmarks: {type(err).__name__}: {err}" + (f" ({err.hint})" if getattr(err, "hint", None) else ""))
            return err.exit_code
        finally:
            if ok:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                log(f"benchmarks: logs and state kept in {workdir}")
        results.append(result)
    log("per-value encryption costs (phe, fast; with and without gmpy2)")
    enc_rows = encryption_table(args, keys)
    info["loadavg_end"] = machine.loadavg()
    for result in results:
        print(report(result, info))
    print(encryption_report(enc_rows, args.pool_workers))
    if args.json:
        doc = {"machine": info, "encryption": enc_rows, "results": results}
        if len(results) == 1:
            doc.update(results[0])  # one run: its figures at the top level, as before
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return EXIT_OK
