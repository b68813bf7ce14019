"""``python -m benchmarks --quick`` runs end to end on the test broker and prints its ratios;
``python -m benchmarks.replicas --quick`` does on the test cluster (SEALEDSUM_CLUSTER_URLS).

Checks that the benchmark works and reports numbers, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text, re.MULTILINE)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_quick_benchmark_prints_ratios(amqp_url, tmp_path):
    out_json = tmp_path / "bench.json"
    env = dict(os.environ, AMQP_URL=amqp_url)
    env.pop("SEALEDSUM_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out_json)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout

    assert _number(r"^ratio producer/plain-publish: ([0-9.]+)", out) > 0
    assert _number(r"^ratio ingest/plain-consume: ([0-9.]+)", out) > 0
    assert _number(r"^paillier encrypt ms/value: ([0-9.]+)", out) > 0
    assert _number(r"^ratio vector/unpacked-phe: ([0-9.]+)", out) > 0
    assert _number(r"^release latency ms: ([0-9.]+) \(1 value\)", out) > 0
    for label in ("producer: send_many vs plain publish+confirm each", "producer: send_many vs plain pipelined confirms",
                  "producer: Producer.send vs publish+confirm", "-value: send_many vs plain pipelined",
                  "-value: send_many vs unpacked phe", "enclave ingest: sidecar vs consume+ack"):
        ours, plain = re.search(rf"{re.escape(label)}\s+([0-9.]+) \(.*?\)\s+([0-9.]+) \(", out).groups()
        assert float(ours) > 0 and float(plain) > 0
    assert re.search(r"^\s+machine\s+\S", out, re.MULTILINE) and "rabbitmq" in out
    # every target has a status line, and the encryption table has phe and the fast path,
    # with and without gmpy2
    assert len(re.findall(r"^  .*\s(met|NOT MET)$", out, re.MULTILINE)) == 4
    row = re.search(r"^\s+2048((?:\s+[0-9.]+){7})$", out, re.MULTILINE)
    assert row, out
    phe, fast, _, pool, phe_nogmp, fast_nogmp, _ = map(float, row.group(1).split())
    assert phe > fast > 0 and phe_nogmp > fast_nogmp > 0 and pool > 0

    result = json.loads(out_json.read_text())
    assert result["repeats"] == len(result["runs"]) == 2
    assert [row["bits"] for row in result["encryption"]] == [2048]
    for run in result["runs"]:
        for key in ("producer_rps", "plain_publish_rps", "ingest_rps", "plain_consume_rps", "encrypt_ms",
                    "fast_encrypt_ms", "send_rps", "plain_pipelined_rps", "vec_rps", "plain_vec_rps", "phe_vec_rps",
                    "latency_1_ms", "latency_vec_ms"):
            assert run[key] > 0
    # The run deleted what it declared.
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for queue in (f"{result['prefix']}.records", f"{result['prefix']}.plain"):
            ch = conn.channel()
            try:
                ch.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as err:
                assert err.reply_code == 404
            else:
                raise AssertionError(f"queue {queue} was left behind")
    finally:
        conn.close()


def test_quick_replica_benchmark_prints_the_three_ratios(cluster_urls, tmp_path):
    out_json = tmp_path / "replicas.json"
    env = dict(os.environ, SEALEDSUM_CLUSTER_URLS=",".join(cluster_urls))
    env.pop("SEALEDSUM_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.replicas", "--quick", "--json", str(out_json)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    for n in (1, 2, 3):
        assert _number(rf"^ratio replicas={n}/plain-consume: ([0-9.]+)", out) > 0
    assert re.search(r"^\s+machine\s+\S", out, re.MULTILINE) and "rabbitmq" in out

    result = json.loads(out_json.read_text())
    assert sorted(r["replicas"] for r in result["runs"]) == [1, 2, 3]
    for run in result["runs"]:
        assert run["ingest_rps"] > 0 and run["plain_rps"] > 0 and run["counted_rps"] > 0
        assert sum(run["counted"]) == result["records"]  # every record counted once, by the replicas run
    assert result["costs"]["replica_ms_per_record"] > 0 and result["costs"]["merge_ms_per_increment"] > 0
    # The run deleted what it declared.
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(cluster_urls[0]))
    try:
        for queue in [f"{prefix}.{name}" for prefix in result["prefixes"]
                      for name in ("records.0", "cluster.state", "releases", "plain.0", "stream-probe")]:
            ch = conn.channel()
            try:
                ch.queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as err:
                assert err.reply_code == 404
            else:
                raise AssertionError(f"queue {queue} was left behind")
    finally:
        conn.close()


def test_replica_benchmark_without_a_cluster_exits_3(tmp_path):
    env = dict(os.environ, SEALEDSUM_CLUSTER_URLS="amqp://guest:guest@127.0.0.1:1/%2F")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.replicas", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "deploy/cluster.sh start" in proc.stderr
