"""The broker's max_message_size (sealedsum.message_limits, `sealedsum broker setup`;
docs/broker-accounts.md): computed from the policy alone, it is never below a real message the
deployment publishes (the largest record the producer's own code seals for a vector and a
histogram stream at the policy's key size, the enclave's attestation reply, release and budget
reply under keys of that size), has a 1 MiB floor and RabbitMQ's default as its ceiling, and the
compose broker is given what setup computes for the compose policy."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sealedsum.commands import main
from sealedsum.common import wire
from sealedsum.common.config import load
from sealedsum.message_limits import FLOOR, RABBITMQ_DEFAULT, conf_line, largest_messages, message_limit
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave.keyring import EnclaveKeys
from sealedsum.sidecar.enclave.records import ciphertext_width_bound, max_record_bytes, record_bytes_bound

from tests.conftest import make_policy, make_world, now_ms, stream_table

REPO = Path(__file__).resolve().parents[2]
BITS = 3072  # the default paillier_bits, and deploy/sealedsum.toml's
VECTOR = "v" * wire.MAX_STREAM_NAME  # the longest stream name: every byte of the envelope counts
HISTOGRAM = "h" * wire.MAX_STREAM_NAME
STREAMS = {
    VECTOR: stream_table(kind="vector", dimension=24, lower=[-1.0] * 24, upper=[1.0] * 24,
                         window_records=1, min_batch=1, mechanism="gaussian", delta=1e-6, budget_delta=1e-5),
    HISTOGRAM: stream_table(kind="histogram", dimension=None, edges=list(range(0, 40, 2)), lower=None, upper=None,
                            window_records=1, min_batch=1),
}


@pytest.fixture(scope="module")
def deployment():
    policy = make_policy(STREAMS, paillier_bits=BITS, insecure_test_keys=False)
    keys = EnclaveKeys.generate(BITS)
    return policy, keys, make_world(keys, policy)


def test_the_bound_holds_a_real_maximal_record_of_each_kind(deployment):
    policy, keys, world = deployment
    bound = largest_messages(policy)["record"]
    assert bound == record_bytes_bound(policy) >= max_record_bytes(policy, keys)
    assert keys.ciphertext_width <= ciphertext_width_bound(BITS)
    # Signed with an identity key: the wrapper is part of the largest record.
    sealer = RecordSealer(world.attested, identity=Ed25519PrivateKey.generate(), check_enrollment=False)
    for stream, values in ((VECTOR, [1.0] * 24), (HISTOGRAM, [39.0])):
        record = sealer.seal(stream, values, window=(1 << 64) - 1)
        assert len(record.body) <= bound, stream
    assert len(sealer.seal(VECTOR, [1.0] * 24).body) > bound - 2 * wire.MAX_STREAM_NAME - 100  # and not far off


def test_the_bound_holds_the_enclaves_attestation_reply_release_and_budget_reply(deployment):
    policy, _, world = deployment
    sizes = largest_messages(policy)
    reply = world.enclave.attest(wire.AttestRequest(os.urandom(wire.NONCE_SIZE)).to_bytes())
    assert len(reply) <= sizes["attestation reply"]
    assert sizes["attestation reply"] > len(policy.to_bytes())  # it carries the policy
    sealer = RecordSealer(world.attested)
    for stream, values in ((VECTOR, [-1.0] * 24), (HISTOGRAM, [0.0])):
        (release,) = world.enclave.on_record(sealer.seal(stream, values).body, now_ms()).publish
        assert len(release.body) <= sizes["release"], stream
        budget = world.enclave.budget(wire.BudgetRequest(os.urandom(wire.NONCE_SIZE), stream).to_bytes(), now_ms())
        assert len(budget) <= sizes["budget reply"], stream


def test_the_limit_is_the_largest_message_with_headroom_between_the_floor_and_rabbitmqs_default(deployment):
    policy, _, _ = deployment
    limit = message_limit(policy)
    assert limit.largest == max(largest_messages(policy).values())
    assert limit.value == FLOOR  # 24 values, a batch is the largest: the floor
    assert limit.largest_kind == "record batch" and limit.largest == wire.MAX_BATCH_BYTES

    wide = make_policy({"w": stream_table(dimension=3000)}, paillier_bits=4096, insecure_test_keys=False)
    limit = message_limit(wide)
    assert limit.largest_kind == "record" and limit.largest > 3000 * 1536
    assert limit.value % FLOOR == 0 and limit.largest * 1.25 <= limit.value < limit.largest * 1.25 + FLOOR

    # The widest stream the policy allows, at the largest key size, stays far below RabbitMQ's default.
    widest = make_policy({"w": stream_table(dimension=4096)}, paillier_bits=8192)
    limit = message_limit(widest)
    assert limit.largest * 1.25 <= limit.value <= RABBITMQ_DEFAULT // 4
    assert conf_line(limit.value) == f"max_message_size = {limit.value}"


def test_the_compose_broker_gets_what_setup_computes_for_the_compose_policy():
    conf = (REPO / "deploy" / "rabbitmq.conf").read_text()
    (value,) = re.findall(r"^max_message_size = (\d+)$", conf, re.M)
    policy = load(REPO / "deploy" / "sealedsum.toml", env={}).require_policy()
    assert int(value) == message_limit(policy).value


def test_setup_with_a_definitions_file_prints_the_line_and_touches_no_broker(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text((REPO / "deploy" / "sealedsum.toml").read_text())
    # A rabbitmqctl that cannot run: nothing may call it.
    monkeypatch.setenv("SEALEDSUM_RABBITMQCTL", "/nonexistent/rabbitmqctl")
    for role in ("SIDECAR", "PRODUCER", "CONSUMER"):
        monkeypatch.setenv(f"SEALEDSUM_{role}_PASSWORD", f"p-{role}")
    assert main(["broker", "setup", "--config", str(config), "--definitions", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("largest legitimate message: 262144 bytes (record batch); max_message_size for this "
                  "deployment: 1048576 bytes")
    assert out[i + 1].startswith("max_message_size: a definitions file cannot set it; put this line in rabbitmq.conf")
    assert out[i + 2] == "  max_message_size = 1048576"

    # A config without streams: nothing to compute, and it says so.
    config.write_text('[broker]\nprefix = "t"\n')
    assert main(["broker", "setup", "--config", str(config), "--definitions", str(tmp_path / "d.json")]) == 0
    assert "max_message_size: left alone (the config has no [streams]" in capsys.readouterr().out
