"""The whole flow on a real broker with real processes: attest, produce, aggregate,
release, consume; and the process and key-handling promises around it."""

from __future__ import annotations

import base64
import os
import re
import struct
import time
from pathlib import Path

import pika
import pytest
from nacl.public import SealedBox

from sealedsum.common import amqp, topology, wire
from sealedsum.common.fixedpoint import encode
from sealedsum.common.topology import ALL_RESULTS_KEY, RECORD_ROUTING_KEY
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.enclave.keyring import EnclaveKeys
from tests.integration.conftest import RunningSidecar

STREAM = {"dimension": 1, "lower": 0.0, "upper": 100.0, "window_records": 20, "min_batch": 5,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 1e6}


def capture_queue(sc: RunningSidecar, exchange: str, key: str) -> tuple[pika.BlockingConnection, str]:
    conn = amqp.connect(sc.config.broker)
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, exchange, routing_key=key)
    return conn, q


def drain(conn: pika.BlockingConnection, queue: str, expect: int = 0, timeout: float = 15.0) -> list[tuple]:
    ch = conn.channel()
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            if len(out) >= expect:
                break
            conn.process_data_events(time_limit=0.1)
            continue
        out.append((props, body))
    return out


def unsealed_keys(sc: RunningSidecar) -> EnclaveKeys:
    """What only the platform could do: derive the sealing key and open the enclave's keys."""
    (path,) = list((sc.state / "enclave").rglob("keys.sealed"))
    return EnclaveKeys.unseal(sc.platform.sealing_key(sc.measurement), sc.measurement, path.read_bytes())


def secret_forms(keys: EnclaveKeys) -> list[bytes]:
    """Every private key, in the encodings a leak would most likely take.

    Paillier's secret is more than p and q: phe keeps CRT values (hp, hq, p_inverse) and
    p², q², each of which gives away the factors (p = isqrt(p²)), and a leak could take
    the textbook form of the key, lambda = lcm(p-1, q-1) or phi = (p-1)(q-1).
    """
    import math

    raw = [bytes(keys._x25519), keys._ed25519.private_bytes_raw()]
    sk = keys._paillier
    phi = (sk.p - 1) * (sk.q - 1)
    ints = [sk.p, sk.q, sk.hp, sk.hq, sk.p_inverse, sk.psquare, sk.qsquare, phi, math.lcm(sk.p - 1, sk.q - 1)]
    assert all(i.bit_length() >= 256 for i in ints)  # long enough that a chance match is impossible
    forms = []
    for r in raw:
        forms += [r, r.hex().encode(), base64.b64encode(r)]
    for i in ints:
        b = i.to_bytes((i.bit_length() + 7) // 8, "big")
        forms += [b, str(i).encode(), format(i, "x").encode(), base64.b64encode(b)]
    return forms


def test_records_are_aggregated_noised_and_released(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    values = [float(10 + (i * 7) % 80) for i in range(20)]
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for v in values:
                producer.send("s", [v])
        releases = list(_take(consumer, 1))
    (r,) = releases
    assert r.stream == "s" and r.window == 1 and r.mechanism == "laplace"
    # Count noise has scale 2, sum noise scale 200 (value units): these bounds fail with
    # probability below e^-15 each.
    assert abs(r.count - 20) <= 30
    assert abs(r.sum[0] - sum(values)) <= 200 * 15
    assert r.sum_noise_scale == pytest.approx(100 * 2**16 / 0.5)


def _take(consumer, n, timeout=30):
    out = []
    for release in consumer.releases(idle_timeout=timeout):
        out.append(release)
        if len(out) >= n:
            break
    return out


def test_enclave_is_a_separate_hardened_process(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    pid = sc.enclave_pid()
    assert pid != sc.process.pid
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"PPid:\t{sc.process.pid}" in status
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    (running,) = sc.events("enclave running")
    assert running["hardening"]["dumpable"] is False and running["hardening"]["hardened"] is True
    # The platform holds the quote key; the enclave's command line carries no secret.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"sealing" not in cmdline and b"platform.key" not in cmdline
    # It talks to the world only through RabbitMQ: no socket of its listens, and every TCP
    # socket it has is connected to the broker's port, or to itself (pika's ioloop wakes up
    # through a loopback TCP pair of its own).
    import urllib.parse

    broker_port = urllib.parse.urlparse(sc.config.broker.url).port or 5672
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    tcp, other = [], []
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                (tcp if table.startswith("tcp") else other).append(fields)
    assert tcp and other == [], other  # at least the broker connection; no UDP or raw sockets
    own_ends = {fields[1] for fields in tcp}
    to_broker = 0
    for fields in tcp:
        state, remote, remote_port = fields[3], fields[2], int(fields[2].rsplit(":", 1)[1], 16)
        assert state != "0A", "the enclave has a listening TCP socket"
        assert remote_port == broker_port or remote in own_ends, f"the enclave is connected to {remote}"
        to_broker += remote_port == broker_port
    assert to_broker >= 1


def test_no_private_key_in_state_or_on_the_broker(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    captures = [capture_queue(sc, t.records_exchange, RECORD_ROUTING_KEY), capture_queue(sc, t.results_exchange, ALL_RESULTS_KEY),
                capture_queue(sc, t.rejected_exchange, "")]
    with Producer(sc.config) as producer:
        for i in range(20):
            producer.send("s", [float(i)])
        producer._transport.publish(b"garbage" * 10)
        conn = amqp.connect(sc.config.broker)
        try:
            reply = amqp.request_attestation(conn, sc.config.broker, os.urandom(32))
        finally:
            conn.close()
    bodies = [reply]
    bodies += [b for _, b in drain(*captures[0], expect=21)]
    bodies += [b for _, b in drain(*captures[1], expect=1)]
    bodies += [b for _, b in drain(*captures[2], expect=1)]
    assert len(bodies) >= 1 + 21 + 1 + 1
    sc.stop()  # its log is complete (the final stats included)
    keys = unsealed_keys(sc)
    state_files = {str(p): p.read_bytes() for p in sc.state.rglob("*") if p.is_file()}
    # The sidecar's log (platform and enclave, at debug level, all of this run's events).
    log = sc.log_path.read_bytes()
    assert b'"enclave running"' in log and b'"stats"' in log
    blobs = {f"message {i}": b for i, b in enumerate(bodies)} | state_files | {"sidecar log": log}
    # The scan finds a number where one is: the public modulus n, as the reply carries it.
    n = keys.paillier_public.n
    assert n.to_bytes((n.bit_length() + 7) // 8, "big") in reply
    sealing = sc.platform.sealing_key(sc.measurement)  # what keeps the keys sealed is as secret
    for n, secret in enumerate(secret_forms(keys) + [sealing, sealing.hex().encode(), base64.b64encode(sealing)]):
        for where, blob in blobs.items():
            assert secret not in blob, f"secret form {n} found in {where}"


def test_records_queue_carries_only_sealed_boxes(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    conn, q = capture_queue(sc, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY)
    value = 73.25  # distinctive, so any encoding of it would be found
    with Producer(sc.config) as producer:
        for _ in range(5):
            producer.send("s", [value])
    captured = drain(conn, q, expect=5)
    assert len(captured) == 5
    keys = unsealed_keys(sc)
    fixed = encode([value], 16)[0]
    needles = [b"73.25", str(fixed).encode(), struct.pack(">q", fixed), struct.pack(">i", fixed), b"\"s\"", b"SSE\x01"]
    for props, body in captured:
        # The one header is the producer's notice token (protocol section 11.6): random, and
        # the same on each of this producer's records, so it tells nothing of their values.
        # The message id is a digest of the body (what a sharded exchange hashes): the broker
        # has the body anyway.
        assert props.delivery_mode == 2 and props.message_id == wire.shard_key(body)
        assert set(props.headers) == {topology.NOTIFY_HEADER}
        assert re.fullmatch("[0-9a-f]{32}", props.headers[topology.NOTIFY_HEADER])
    assert len({props.headers[topology.NOTIFY_HEADER] for props, _ in captured}) == 1
    for props, body in captured:
        for needle in needles:
            assert needle not in body
        envelope = wire.Envelope.from_bytes(SealedBox(keys._x25519).decrypt(body))
        assert len(body) == wire.SEALED_BOX_OVERHEAD + len(envelope.to_bytes())
        assert envelope.stream == "s"


def test_decrypts_once_per_released_window_never_per_record(sidecar_factory):
    sc = sidecar_factory({"s": STREAM, "v": dict(STREAM, dimension=3)})
    with Consumer(sc.config, ["s", "v"]) as consumer:
        with Producer(sc.config) as producer:
            for i in range(60):
                producer.send("s", [float(i % 50)])
            for i in range(20):
                producer.send("v", [1.0, 2.0, 3.0])
        assert len(_take(consumer, 4)) == 4
    sc.stop()
    stats = sc.events("stats")[-1]
    assert stats["accepted"] == 80 and stats["windows_released"] == 4
    # One decryption per coordinate of each released total: 3 scalar windows + one 3-vector.
    assert stats["decryptions"] == 3 * 1 + 1 * 3


def test_small_windows_are_withheld(sidecar_factory):
    sc = sidecar_factory({"s": dict(STREAM, window_seconds=1.0)})
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for i in range(4):  # below min_batch = 5
                producer.send("s", [50.0])
            time.sleep(2.5)  # the window closes by time, withheld
            for i in range(20):
                producer.send("s", [50.0])
        (release,) = _take(consumer, 1)
    assert release.window == 2  # window 1 was closed and never released
    withheld = sc.events("window withheld")
    assert [(e["stream"], e["window"]) for e in withheld] == [("s", 1)]
