"""On the real broker: records from unknown and revoked producers are dead-lettered with
their reasons while enrolled ones count, and a producer refuses a stream whose attested
policy promises less privacy than it requires, sending nothing."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common.errors import PolicyTooWeak
from sealedsum.common.requirements import Requirements
from sealedsum.common.topology import RECORD_ROUTING_KEY
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer, RecordSealer
from tests.integration.test_cli import run
from tests.integration.test_end_to_end import STREAM, _take, capture_queue, drain

pytestmark = pytest.mark.integration


def b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


def test_unknown_and_revoked_producers_are_dead_lettered_enrolled_ones_count(sidecar_factory, tmp_path):
    alice, bob, mallory = (Ed25519PrivateKey.generate() for _ in range(3))
    identities = (f'[identities]\nrequired = true\n[identities.enrolled]\nalice = "{b64(alice)}"\n'
                  f'[identities.revoked]\nbob = "{b64(bob)}"\n')
    exact = dict(STREAM, window_records=5, max_records_per_producer=5, epsilon=1e7, budget_epsilon=1e12)
    sc = sidecar_factory({"s": exact}, extra_toml=identities)
    dead_conn, dead_q = capture_queue(sc, sc.config.broker.topology.rejected_exchange, "")
    key_file = tmp_path / "alice.json"  # the format `sealedsum producer keygen` writes
    key_file.write_text(json.dumps({"version": 1, "ed25519_seed": base64.b64encode(alice.private_bytes_raw()).decode(),
                                    "public_key": b64(alice)}))
    with Consumer(sc.config, "s") as consumer:
        with Producer(dataclasses.replace(sc.config, identity_file=key_file)) as p_alice:
            for _ in range(5):
                p_alice.send("s", [1.0])
            for who in (bob, mallory, None):
                sealer = RecordSealer(p_alice.enclave, identity=who, check_enrollment=False)
                p_alice.publish(sealer.seal("s", [1.0]))
        (release,) = _take(consumer, 1)
    assert release.count == 5 and release.sum[0] == pytest.approx(5.0, abs=1e-3)  # alice's records only
    dead = drain(dead_conn, dead_q, expect=3)
    assert sorted(p.headers["x-sealedsum-reason"] for p, _ in dead) == [
        "revoked_producer", "unknown_producer", "unknown_producer"]


def test_a_producer_refuses_a_weaker_attested_policy_and_sends_nothing(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})  # epsilon 1.0 per release, budget 1e6, min_batch 5
    conn, q = capture_queue(sc, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY)
    demanding = dataclasses.replace(sc.config, require=Requirements(max_epsilon=0.5, max_budget_epsilon=100.0))
    with Producer(demanding) as producer:
        with pytest.raises(PolicyTooWeak, match="epsilon per release 1 > 0.5; budget_epsilon 1e\\+06 > 100"):
            producer.send("s", [1.0])
    assert drain(conn, q, expect=0, timeout=1.0) == []
    # The command line says the same, exit 1, one line.
    text = sc.config_path.read_text() + "\n[require]\nmin_min_batch = 50\n"
    path = sc.config_path.with_name("demanding.toml")
    path.write_text(text)
    out = run("produce", "--config", str(path), "--stream", "s", input="1\n2\n")
    assert out.returncode == 1
    assert "min_batch 5 < 50" in out.stderr and "nothing was sent" in out.stderr
    assert drain(conn, q, expect=0, timeout=1.0) == []
