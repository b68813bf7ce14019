"""Record batches on a real broker: many sealed records per message, each counted once or
dead-lettered on its own, from the library and from ``sealedsum produce --per-message``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sealedsum.common import wire
from sealedsum.common.topology import RECORD_ROUTING_KEY
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer, SealedRecord
from tests.integration.test_end_to_end import capture_queue, drain
from tests.integration.test_publisher import releases_of as releases

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 100, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}
REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_batched_records_are_each_counted_once_and_a_bad_one_is_dead_lettered_alone(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    records_conn, records_q = capture_queue(sc, t.records_exchange, RECORD_ROUTING_KEY)  # what the broker carries
    rejected_conn, rejected_q = capture_queue(sc, t.rejected_exchange, "")
    values = [float(i % 10) for i in range(300)]
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            sent = producer.send_many("s", [[v] for v in values[:250]], per_message=64)
            # A batch with one record the enclave cannot open among good ones.
            good = [producer.seal_current("s", [v]) for v in values[250:]]
            garbage = SealedRecord(b"\x00" * 200, bytes(16), 0)
            pending = producer.submit_batch(good[:20] + [garbage] + good[20:])
            producer.flush()
        assert len(sent) == 250 and all(p.confirmed for p in pending)
        got = releases(consumer, 3)
    assert sum(r.count for r in got.values()) == 300  # 300 good records, each once
    assert sum(r.sum[0] for r in got.values()) == pytest.approx(sum(values), abs=1e-3)
    (dead,) = drain(rejected_conn, rejected_q, expect=1)
    props, body = dead
    assert body == garbage.body and props.headers["x-sealedsum-reason"] == "undecryptable"
    assert props.headers["x-sealedsum-batch-index"] == 20
    carried = drain(records_conn, records_q, expect=5)
    # 250 records in batches of at most 64 (4 messages) and one batch of 51.
    assert [p.type for p, _ in carried] == ["records"] * 5
    assert [len(wire.RecordBatch.from_bytes(b).records) for _, b in carried] == [64, 64, 64, 58, 51]
    sc.stop()
    (stats,) = sc.events("stats")[-1:]
    assert stats["accepted"] == 300 and stats["rejected"] == {"undecryptable": 1}


def test_produce_per_message_publishes_batches(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    records_conn, records_q = capture_queue(sc, t.records_exchange, RECORD_ROUTING_KEY)
    with Consumer(sc.config, "s") as consumer:
        lines = "\n".join(str(i % 10) for i in range(200)) + "\n"
        out = subprocess.run([sys.executable, "-m", "sealedsum", "produce", "--config", str(sc.config_path),
                              "--stream", "s", "--per-message", "30", "--json"],
                             input=lines, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["sent"] == summary["confirmed"] == 200
        got = releases(consumer, 2)
    assert [got[w].count for w in (1, 2)] == [100, 100]
    carried = drain(records_conn, records_q, expect=7)
    assert [len(wire.RecordBatch.from_bytes(b).records) for _, b in carried] == [30] * 6 + [20]
    bad = subprocess.run([sys.executable, "-m", "sealedsum", "produce", "--config", str(sc.config_path),
                          "--stream", "s", "--per-message", "0"], input="1\n", capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "--per-message must be 1..1024" in bad.stderr
