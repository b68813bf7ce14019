"""``python -m benchmarks``: what sealedsum's layers cost, side by side with plain pika.

One run, one broker, one message size. Each repeat measures, interleaved:

* **producer**: records/s of the real :class:`producers.client.Producer` (clip, encode,
  Paillier-encrypt, seal, publish persistent with a confirm per record) for 1-value
  records, against plain pika publishing persistent messages of the same byte size with
  a confirm per message. The sidecar is stopped while both publish, so neither competes
  with the enclave for the CPU; the records pile up in its queue.
* **enclave ingest**: records/s of the real ``sealedsum sidecar`` process consuming,
  opening, validating and folding the records just published (and releasing one window
  per ``--window`` records: decrypt, noise, sign, publish with confirm), timed from the
  moment its log says it consumes to the arrival of the last window's release; against
  plain pika consuming the same number of same-sized messages with a manual ack each.
* in-process costs that explain the ratios: Paillier encryption of one value, sealing one
  record, and ``Enclave.on_record`` without a broker.

Each figure is the median over the repeats; ratios are medians of the per-repeat ratios
(each repeat's baseline runs next to it, order alternating), so slow drift on a shared
machine cancels. Everything the run declares on the broker has a unique ``bench-…``
prefix and is deleted at the end.
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
from pathlib import Path

from benchmarks import machine, plain
from benchmarks.harness import LOWER, STREAM, UPPER, BenchError, BenchSidecar
from common.errors import SealedsumError
from common.policy import SECURE_PAILLIER_BITS

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EXIT_OK, EXIT_FAILED, EXIT_BROKER = 0, 1, 3  # 2: bad options (argparse, ConfigError)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure sealedsum's producer and enclave ingest throughput next to plain pika "
                    "on the same RabbitMQ (AMQP_URL, default the local guest broker), with the same "
                    "message sizes, and print the ratios.",
    )
    p.add_argument("--quick", action="store_true",
                   help="a short run (100 records, windows of 50, 2 repeats): well under a minute")
    p.add_argument("--records", type=int, metavar="N",
                   help="records per repeat for each figure (default 1000; a multiple of --window)")
    p.add_argument("--window", type=int, metavar="W",
                   help="window_records of the benchmark stream (default 100, 50 with --quick)")
    p.add_argument("--repeats", type=int, metavar="K", help="repeats; figures are medians (default 3, 2 with --quick)")
    p.add_argument("--bits", type=int, default=2048,
                   help="Paillier modulus bits (default 2048; below 2048 the policy sets insecure_test_keys)")
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum",
                   help="queue type for the records queue and the baseline queue alike (default quorum)")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = p.parse_args(argv)
    args.records = args.records or (100 if args.quick else 1000)
    args.window = args.window or min(50 if args.quick else 100, args.records)
    args.repeats = args.repeats or (2 if args.quick else 3)
    if args.records < 1 or args.window < 1 or args.repeats < 1:
        p.error("--records, --window and --repeats must be positive")
    if args.records % args.window:
        p.error(f"--records ({args.records}) must be a multiple of --window ({args.window}): the enclave "
                "ingest is timed to the release of the last window")
    if args.bits not in SECURE_PAILLIER_BITS and not (512 <= args.bits <= 8192 and args.bits % 256 == 0):
        p.error(f"--bits must be one of {SECURE_PAILLIER_BITS}, or for insecure test keys a multiple of 256 "
                "from 512 to 8192")
    if args.window < 10:
        p.error("--window must be at least 10 (the stream's min_batch)")
    return args


# -- the measurements --------------------------------------------------------------------

def time_producer(producer, values: list[float], size: int) -> float:
    t0 = time.perf_counter()
    sizes = {len(producer.send(STREAM, [v]).body) for v in values}
    dt = time.perf_counter() - t0
    if sizes != {size}:
        raise BenchError(f"sealed records of unexpected sizes {sorted(sizes)} (expected {size})")
    return dt


def time_ingest(sc: BenchSidecar, n: int, windows: int, timeout: float) -> float:
    """Start the sidecar on a queue holding ``n`` records; seconds from 'consuming' to the last release."""
    t = sc.config.broker.topology
    conn = plain.connect(sc.url)
    try:
        ch = conn.channel()
        waiting = ch.queue_declare(t.records_queue, passive=True).method.message_count
        if waiting != n:
            raise BenchError(f"the records queue holds {waiting} messages, expected {n}")
        capture = f"{sc.prefix}.bench-results"
        ch.queue_declare(capture, exclusive=True)  # deleted with this connection
        ch.queue_bind(capture, t.results_exchange, routing_key="#")
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


def time_encrypt(public_key, encoded: list[int]) -> float:
    t0 = time.perf_counter()
    for q in encoded:
        public_key.encrypt(q).ciphertext(be_secure=False)  # exactly as RecordSealer.seal
    return time.perf_counter() - t0


def time_seal(sealer, values: list[float]) -> tuple[float, list[bytes]]:
    t0 = time.perf_counter()
    bodies = [sealer.seal(STREAM, [v]).body for v in values]
    return time.perf_counter() - t0, bodies


def time_on_record(make_enclave, bodies: list[bytes]) -> float:
    enclave = make_enclave()
    t0 = time.perf_counter()
    for body in bodies:
        outcome = enclave.on_record(body, int(time.time() * 1000))
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


# -- the run -------------------------------------------------------------------------------

def run(args: argparse.Namespace, url: str, workdir: Path) -> dict:
    from phe import PaillierPublicKey

    from common.fixedpoint import encode
    from producers.client import Producer
    from sidecar.enclave import noise
    from sidecar.enclave.keyring import EnclaveKeys
    from sidecar.enclave.service import Enclave

    n, w, k = args.records, args.window, args.repeats
    rng = random.Random(20240501)
    sc = BenchSidecar(workdir, url, bits=args.bits, window_records=w, queue_type=args.queue_type)
    base_exchange = base_queue = f"{sc.prefix}.plain"
    runs: list[dict] = []
    result = {"records": n, "window": w, "repeats": k, "bits": args.bits, "insecure_test_keys": sc.insecure,
              "queue_type": args.queue_type, "prefix": sc.prefix, "runs": runs}
    try:
        log(f"starting the sidecar (prefix {sc.prefix}, {args.bits}-bit Paillier keys are generated on first start)")
        t0 = time.monotonic()
        sc.start()
        sc.wait_consuming()
        log(f"sidecar consuming after {time.monotonic() - t0:.1f} s")
        plain.declare(url, base_exchange, base_queue, args.queue_type)

        # The benchmark is the platform owner: it can open the enclave's sealed keys,
        # which lets it run the enclave's code in-process for the on_record figure.
        (sealed,) = list((sc.state / "enclave").rglob("keys.sealed"))
        keys = EnclaveKeys.unseal(sc.platform.sealing_key(sc.measurement), sc.measurement, sealed.read_bytes())
        plan = sc.policy.streams[STREAM].noise_plan()
        noise.sum_measurement(plan), noise.count_measurement(plan)  # warm OpenDP's cache, as a running enclave is

        def make_enclave() -> Enclave:
            return Enclave(keys, sc.policy, sc.policy_bytes, sc.code_digest, sc.measurement, lambda _rd: b"")

        size = None
        for i in range(k):
            r: dict = {}
            t0 = time.perf_counter()
            producer = Producer(sc.config)
            r["attest_ms"] = (time.perf_counter() - t0) * 1000
            try:
                if size is None:
                    size = len(producer.sealer.seal(STREAM, [1.0]).body)
                    result["record_bytes"] = size
                # Stop the enclave: the records pile up in its queue for the ingest figure,
                # and nothing else of ours competes for the CPU while we publish.
                check_stats(sc.stop(), 0 if i == 0 else n)
                values = [rng.uniform(LOWER, UPPER) for _ in range(n)]
                bodies = [os.urandom(size) for _ in range(n)]

                def ours_publish():
                    r["producer_s"] = time_producer(producer, values, size)

                def plain_publish():
                    r["plain_publish_s"] = plain.publish(url, base_exchange, bodies)

                for step in ((ours_publish, plain_publish) if i % 2 == 0 else (plain_publish, ours_publish)):
                    step()

                # In-process costs, while the broker and the enclave are quiet.
                micro_values = [rng.uniform(LOWER, UPPER) for _ in range(w)]
                pk = PaillierPublicKey(producer.enclave.keys.paillier_n)
                fraction_bits = sc.policy.streams[STREAM].fraction_bits
                r["encrypt_ms"] = time_encrypt(pk, encode(micro_values, fraction_bits)) / w * 1000
                seal_s, sealed_bodies = time_seal(producer.sealer, micro_values)
                r["seal_ms"] = seal_s / w * 1000
                r["on_record_ms"] = time_on_record(make_enclave, sealed_bodies) / w * 1000
            finally:
                producer.close()

            def ours_consume():
                r["ingest_s"] = time_ingest(sc, n, n // w, timeout=max(120.0, n * 0.5))

            def plain_consume():
                r["plain_consume_s"] = plain.consume(url, base_queue, n)

            for step in ((ours_consume, plain_consume) if i % 2 == 0 else (plain_consume, ours_consume)):
                step()

            r["producer_rps"] = n / r["producer_s"]
            r["plain_publish_rps"] = n / r["plain_publish_s"]
            r["producer_ratio"] = r["producer_rps"] / r["plain_publish_rps"]
            r["ingest_rps"] = n / r["ingest_s"]
            r["plain_consume_rps"] = n / r["plain_consume_s"]
            r["ingest_ratio"] = r["ingest_rps"] / r["plain_consume_rps"]
            r["encrypt_share"] = r["encrypt_ms"] / (1000 / r["producer_rps"])
            runs.append(r)
            log(f"repeat {i + 1}/{k}: producer {r['producer_rps']:.1f} rec/s vs plain {r['plain_publish_rps']:.1f}; "
                f"ingest {r['ingest_rps']:.1f} rec/s vs plain {r['plain_consume_rps']:.1f}; "
                f"encrypt {r['encrypt_ms']:.2f} ms/value")
        check_stats(sc.stop(), n)
    finally:
        if sc.proc is not None:
            sc.stop()
        sc.cleanup(extra_queues=(base_queue,), extra_exchanges=(base_exchange,))
    return result


# -- the report ----------------------------------------------------------------------------

def med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str, fmt: str) -> str:
    vals = [r[key] for r in runs]
    return f"{fmt.format(min(vals))}-{fmt.format(max(vals))}" if len(vals) > 1 else "-"


def report(result: dict, info: dict) -> str:
    runs = result["runs"]
    bits = result["bits"]
    lines = ["", "sealedsum benchmarks", ""]
    lines.append(f"  machine   {info['cpu']}, {info['cores']} cores, {info['os']}")
    lines.append(f"  python    {info['python']}; phe with gmpy2: {'yes' if info['gmpy2'] else 'NO (pure Python)'} "
                 f"(phe.util.HAVE_GMP={info['gmpy2']})")
    lines.append(f"  rabbitmq  {info['rabbitmq']}")
    lines.append(f"  load avg  {info['loadavg_start']} at start, {info['loadavg_end']} at end (1/5/15 min)")
    lines.append(f"  setup     {bits}-bit Paillier, {result['queue_type']} queues, 1-value records of {result['record_bytes']} bytes,")
    lines.append(f"            {result['records']} records per figure per repeat, windows of {result['window']} records,")
    lines.append(f"            median of {result['repeats']} repeat(s), each baseline interleaved with its figure")
    if result["insecure_test_keys"]:
        lines.append(f"  WARNING   {bits}-bit keys are INSECURE (policy sets insecure_test_keys = true): "
                     "not a real deployment's figures")
    lines.append("")
    head = f"  {'records/s (median, min-max)':<44}{'sealedsum':>24}{'plain pika':>24}{'ours/plain':>12}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for label, ours, base, ratio in (
        ("producer: Producer.send vs publish+confirm", "producer_rps", "plain_publish_rps", "producer_ratio"),
        ("enclave ingest: sidecar vs consume+ack", "ingest_rps", "plain_consume_rps", "ingest_ratio"),
    ):
        o = f"{med(runs, ours):.1f} ({spread(runs, ours, '{:.0f}')})"
        b = f"{med(runs, base):.1f} ({spread(runs, base, '{:.0f}')})"
        lines.append(f"  {label:<44}{o:>24}{b:>24}{med(runs, ratio):>12.3f}")
    lines.append("")
    lines.append("  per record (median ms)")
    per = [
        (f"Paillier encrypt, one value ({bits}-bit n)", med(runs, "encrypt_ms")),
        ("RecordSealer.seal: clip, encode, encrypt, sealed box", med(runs, "seal_ms")),
        ("Producer.send: seal + publish + confirm", 1000 / med(runs, "producer_rps")),
        ("plain publish + confirm", 1000 / med(runs, "plain_publish_rps")),
        (f"Enclave.on_record in-process (1 release per {result['window']})", med(runs, "on_record_ms")),
        ("sidecar ingest (broker + enclave)", 1000 / med(runs, "ingest_rps")),
        ("plain consume + ack", 1000 / med(runs, "plain_consume_rps")),
    ]
    for label, v in per:
        lines.append(f"    {label:<58}{v:>10.3f}")
    lines.append(f"    {'(once per producer) connect + attest':<58}{med(runs, 'attest_ms'):>10.1f}")
    lines.append(f"    Paillier encryption is ~{med(runs, 'encrypt_share'):.0%} of the producer's time per record "
                 "(separate timings: can exceed 100% on a noisy machine)")
    lines.append("")
    pr, ir = med(runs, "producer_ratio"), med(runs, "ingest_ratio")
    lines.append(f"ratio producer/plain-publish: {pr:.4f} (plain pika is {1 / pr:.1f}x faster)")
    lines.append(f"ratio ingest/plain-consume: {ir:.4f} (plain pika is {1 / ir:.1f}x faster)")
    lines.append(f"paillier encrypt ms/value: {med(runs, 'encrypt_ms'):.3f} ({bits}-bit, gmpy2 {info['gmpy2']})")
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
    if args.bits not in SECURE_PAILLIER_BITS:
        log(f"benchmarks: WARNING: {args.bits}-bit Paillier keys are insecure; the benchmark policy sets "
            "insecure_test_keys = true, and the figures do not describe a real deployment")
    workdir = Path(tempfile.mkdtemp(prefix="sealedsum-bench-"))
    ok = False
    try:
        result = run(args, url, workdir)
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
    info["loadavg_end"] = machine.loadavg()
    print(report(result, info))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, **result}, indent=2))
    return EXIT_OK
