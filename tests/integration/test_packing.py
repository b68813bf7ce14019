"""Packing over the broker (issue 5): a 1,000-value model-update stream, packed, through
the real sidecar. Each record carries ceil(1000 / k) ciphertexts instead of 1,000, and
the release is the true sum within its noise."""

from __future__ import annotations

import math
import random

from sealedsum.common import wire
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer

DIM = 1000
RECORDS = 8
STREAM = {"kind": "vector", "dimension": DIM, "l2_bound": 1.0, "window_records": RECORDS, "min_batch": RECORDS,
          "mechanism": "laplace", "epsilon": 1e6, "budget_epsilon": 1e9, "packing": True}


def test_a_1000_value_vector_stream_is_packed_end_to_end(sidecar_factory):
    # 1024-bit test keys: slots of bit_length(2·65536·8) = 21 bits, 1021 // 21 = 48 per plaintext.
    sc = sidecar_factory({"v": STREAM})
    rng = random.Random(7)
    records = [[rng.gauss(0, 1) for _ in range(DIM)] for _ in range(RECORDS)]  # norms ~31: scaled to 1
    with Consumer(sc.config, "v") as consumer:
        with Producer(sc.config) as producer:
            policy = producer.enclave.policy.streams["v"]  # the attested layout
            layout = policy.packing
            assert layout is not None and (layout.slot_bits, layout.slots_per_ciphertext) == (21, 48)
            per_record = math.ceil(DIM / layout.slots_per_ciphertext)
            assert layout.ciphertexts_per_record == per_record == 21  # instead of 1000
            width = producer.enclave.keys.ciphertext_width
            sealed = [producer.send("v", v) for v in records]
        releases = []
        for release in consumer.releases(idle_timeout=60):
            releases.append(release)
            break
    # Every record carried exactly ceil(1000 / k) ciphertexts (sealed box + envelope header + them).
    envelope_bytes = 61 + len("v") + per_record * (width + wire.plaintext_width(width))  # and plaintexts
    assert all(len(s.body) == wire.SEALED_BOX_OVERHEAD + envelope_bytes for s in sealed)
    assert all(s.clipped == 1 for s in sealed)
    (r,) = releases
    assert r.stream == "v" and r.window == 1 and r.dimension == DIM and len(r.sum_fixed) == DIM
    truth = [sum(col) for col in zip(*(policy.encode(v)[0] for v in records))]
    plan = policy.noise_plan()
    # Laplace noise of scale b per coordinate: |noise| > 30·b has probability e^-30 each.
    assert plan.sum_scale < 10
    worst = max(abs(got - want) for got, want in zip(r.sum_fixed, truth))
    assert worst <= 30 * plan.sum_scale, (worst, plan.sum_scale)
    assert abs(r.count - RECORDS) <= 1
    assert max(abs(s - t / 65536) for s, t in zip(r.sum, truth)) < 0.01
