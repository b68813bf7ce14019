"""Per-record validity on the real broker (issue 10): a dishonest producer's records are
dead-lettered ``out_of_range`` by the running sidecar, and the release is exactly what the
honest records alone give (epsilon so large that the discrete noise is zero)."""

from __future__ import annotations

import os
import time

import pytest
from nacl.public import PublicKey, SealedBox
from phe import PaillierPublicKey

from sealedsum.common import wire
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.test_end_to_end import _take, capture_queue, drain

pytestmark = pytest.mark.integration

# Noise scale 2^16·200 / 1e12: far below one fixed-point unit, so the discrete samplers draw 0.
EXACT = {"window_records": 10, "min_batch": 1, "mechanism": "laplace", "epsilon": 1e12, "budget_epsilon": 1e15}
SUM = dict(EXACT, dimension=1, lower=-100.0, upper=100.0)
HIST = dict(EXACT, kind="histogram", edges=[0, 1, 2, 3, 4, 5, 6])
PACKED = dict(EXACT, kind="vector", dimension=8, l2_bound=1.0, packing=True)


def forged(producer: Producer, stream: str, stated: list[int], encrypted: list[int] | None = None,
           record_id: bytes | None = None) -> bytes:
    """A record stating Paillier plaintexts ``stated`` whose ciphertexts encrypt ``encrypted``."""
    keys = producer.enclave.keys
    pub = PaillierPublicKey(keys.paillier_n)
    encrypted = stated if encrypted is None else encrypted
    env = wire.Envelope(stream, record_id or os.urandom(16), keys.epoch, int(time.time() * 1000), 0, keys.ciphertext_width,
                        tuple(pub.raw_encrypt(m % pub.n) for m in encrypted), producer.sealer.producer_id,
                        tuple(m % pub.n for m in stated))
    return SealedBox(PublicKey(keys.x25519)).encrypt(env.to_bytes())


def test_dishonest_records_are_dead_lettered_and_the_release_is_the_honest_one(sidecar_factory):
    sc = sidecar_factory({"s": SUM, "h": HIST, "p": PACKED})
    t = sc.config.broker.topology
    rejected_conn, rejected_q = capture_queue(sc, t.rejected_exchange, "")
    honest = {"s": [[-99.5], [12.25], [100.0], [3.0], [-40.0], [7.5], [0.0], [55.0], [-1.0], [20.0]],
              "h": [[0.5], [1.5], [2.5], [5.5], [5.9], [0.1], [3.3], [4.4], [2.2], [1.1]],
              "p": [[0.1 * i - 0.3 * j for i in range(8)] for j in range(10)]}
    with Consumer(sc.config, ["s", "h", "p"]) as consumer, Producer(sc.config) as producer:
        n = PaillierPublicKey(producer.enclave.keys.paillier_n).n
        policy = producer.enclave.policy.streams
        lo, hi = policy["s"].coordinate_ranges(1)[0]
        layout = policy["p"].packing
        used = layout.slot_bits * min(layout.slots_per_ciphertext, layout.dimension)
        zero = policy["p"].plaintexts([0] * 8)
        bad = [
            forged(producer, "s", [hi + 1]),                      # a coordinate over its bound
            forged(producer, "s", [lo - 1]),                      # under it (n - 6553601)
            forged(producer, "s", [n // 2]),                      # where a signed reading wraps
            forged(producer, "s", [5 << 16], [n // 2]),           # states 5, encrypts n/2: a lie
            forged(producer, "h", [1, 1, 0, 0, 0, 0]),            # not one-hot
            forged(producer, "h", [1, 0, 0, 0, 0, 0], [n - 10**6, 0, 0, 0, 0, 10**6]),  # the clamp-edge attack
            forged(producer, "p", [(1 << used) - 1] + zero[1:]),  # every slot at the brim: carries
            forged(producer, "p", [zero[0] | (1 << used)] + zero[1:]),  # a bit above the last slot
            forged(producer, "p", zero, [(1 << used) - 1] + zero[1:]),  # states zeros, encrypts the brim
        ]
        for stream, records in honest.items():
            for i, values in enumerate(records):
                producer.send(stream, values)
                if stream == "s" and i == 4:  # in the middle of a window, before the others
                    for body in bad:
                        producer._transport.publish(body)
        releases = {r.stream: r for r in _take(consumer, 3)}
    dead = drain(rejected_conn, rejected_q, expect=len(bad))
    assert sorted(props.headers["x-sealedsum-reason"] for props, _ in dead) == ["out_of_range"] * len(bad)
    assert {body for _, body in dead} == set(bad)
    for stream, records in honest.items():
        s = policy[stream]
        expected = [sum(col) for col in zip(*(s.encode(v)[0] for v in records))]
        release = releases[stream]
        assert release.window == 1 and release.sum_fixed == expected, stream
        if stream != "h":
            assert release.count == len(records)
    sc.stop()
    stats = sc.events("stats")[-1]
    assert stats["accepted"] == 30 and stats["rejected"] == {"out_of_range": len(bad)}
    assert sc.process.returncode == 0
