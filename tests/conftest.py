"""Shared fixtures: small Paillier keys, policies, and an attested in-memory enclave.

Unit tests drive the real enclave core (real keys, real OpenDP samplers, real
attestation checks) without a broker; integration tests add RabbitMQ.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import pytest

# tests.fuzzing asserts too (the decoders, FuzzWorld's oracle) and is imported by unit and
# integration tests alike: registered here, before any of them, its failures get pytest's
# detailed messages wherever it is imported first.
pytest.register_assert_rewrite("tests.fuzzing")

from sealedsum.common import wire
from sealedsum.common.attestation import AttestedEnclave, TrustAnchors, verify_attestation
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.policy_parse import enclave_policy
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave.keyring import EnclaveKeys
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform

TEST_BITS = 1024  # insecure on purpose: unit tests only, and the policy says so


def stream_table(**overrides) -> dict:
    table = {
        "dimension": 1, "lower": 0.0, "upper": 100.0, "window_records": 5, "min_batch": 3,
        "mechanism": "laplace", "epsilon": 1.0,
    }
    table.update(overrides)
    eps = table["epsilon"]
    table.setdefault("budget_epsilon", 1e6 * eps if isinstance(eps, (int, float)) and eps > 0 else 1e6)
    if table["mechanism"] == "gaussian":
        table.setdefault("budget_delta", 1e-5)
    return {k: v for k, v in table.items() if v is not None}


def make_policy(streams: dict | None = None, **enclave) -> EnclavePolicy:
    enclave_table = {"paillier_bits": TEST_BITS, "insecure_test_keys": True}
    enclave_table.update(enclave)
    return enclave_policy(enclave_table, streams or {"s": stream_table()})


@pytest.fixture(scope="session")
def small_keys() -> EnclaveKeys:
    return EnclaveKeys.generate(TEST_BITS)


@pytest.fixture(scope="session")
def other_keys() -> EnclaveKeys:
    return EnclaveKeys.generate(TEST_BITS)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class World:
    """A platform, an enclave core built on it, and a client that attested it."""

    platform: EmulatedPlatform
    enclave: Enclave
    trust: TrustAnchors
    attested: AttestedEnclave
    sealer: RecordSealer
    measurement: bytes


def make_world(keys: EnclaveKeys, policy: EnclavePolicy | None = None) -> World:
    policy = policy or make_policy()
    platform = EmulatedPlatform.generate()
    policy_bytes = policy.to_bytes()
    digest, measurement = measure.measure(policy_bytes)
    enclave = Enclave(keys, policy, policy_bytes, digest, measurement,
                      lambda rd: platform.quote(measurement, rd))
    trust = TrustAnchors(platform.public_key(), frozenset({measurement}))
    nonce = os.urandom(wire.NONCE_SIZE)
    attested = verify_attestation(enclave.attest(wire.AttestRequest(nonce).to_bytes()), nonce, trust, now_ms())
    return World(platform, enclave, trust, attested, RecordSealer(attested), measurement)


@pytest.fixture
def world(small_keys) -> World:
    small_keys.decryptions = 0
    return make_world(small_keys)


def checkpoint(enclave: Enclave, *, base: bool) -> dict:
    """The enclave's checkpoint, marked durable at once (as if a store had written it)."""
    cp = enclave.checkpoint(base)
    enclave.checkpointed(cp)
    return cp.state


class PlatformCounter:
    """The platform's monotonic counter for one measurement, as the enclave sees it."""

    def __init__(self, platform: EmulatedPlatform, measurement: bytes) -> None:
        self.platform, self.measurement = platform, measurement

    def read(self) -> int:
        return self.platform.counter_read(self.measurement)

    def advance(self, value: int) -> int:
        return self.platform.counter_advance(self.measurement, value)
