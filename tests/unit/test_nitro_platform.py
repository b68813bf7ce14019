"""The enclave side of Nitro (sidecar/platform/nitro.py): NitroPlatform behind the Platform
interface answers with documents that verify through the clients' one attestation path, and
the supervisor picks the platform by config."""

from __future__ import annotations

import pytest

from sealedsum.common import config as config_mod
from sealedsum.common import wire
from sealedsum.common.attestation import TrustAnchors, verify_attestation
from sealedsum.common.errors import ConfigError
from tests.conftest import now_ms
from tests.nitro_chain import TestChain, chain  # noqa: F401  (chain: a fixture)
from tests.unit.test_attestation import ask


class FakeNsm:
    """The NSM of a test: documents of the test-only chain, as /dev/nsm would return them."""

    def __init__(self, chain: TestChain) -> None:
        self.chain = chain
        self.requests: list[tuple] = []

    def attestation(self, user_data, nonce=None, public_key=None):
        self.requests.append((user_data, nonce, public_key))
        return self.chain.sign(self.chain.document(now_ms(), user_data=user_data, nonce=nonce, public_key=public_key))


class MemoryCounters:
    def __init__(self) -> None:
        self.values: dict[str, int] = {}

    def read(self, name: str) -> int:
        return self.values.get(name, 0)

    def advance(self, name: str, value: int) -> int:
        self.values[name] = max(value, self.read(name))
        return self.values[name]


def test_nitro_platform_quotes_verify_on_the_client(world, chain):
    from sealedsum.sidecar.platform.base import Platform
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform
    from sealedsum.sidecar.platform.nitro import NitroPlatform

    nsm = FakeNsm(chain)
    platform: Platform = NitroPlatform(nsm, bytes(range(32)), MemoryCounters())
    world.enclave._quote = lambda rd: platform.quote(world.measurement, rd)
    reply, nonce = ask(world)
    trust = TrustAnchors(None, world.trust.measurements, nitro=chain.trust())
    assert verify_attestation(reply, nonce, trust, now_ms()).platform == "nitro"
    assert nsm.requests[-1][1:] == (None, None) and len(nsm.requests[-1][0]) == wire.NitroBinding.SIZE
    # Keys derive as on the emulated platform from the same root secret: one sealing scheme.
    emulated = EmulatedPlatform(EmulatedPlatform.generate()._signing_key, bytes(range(32)))
    assert platform.sealing_key(world.measurement) == emulated.sealing_key(world.measurement)
    assert platform.ledger_key(world.enclave.code_digest) == emulated.ledger_key(world.enclave.code_digest)
    assert platform.counter_advance(world.measurement, 3) == 3 and platform.counter_advance(world.measurement, 1) == 3
    assert platform.ledger_counter_read(world.enclave.code_digest) == 0


def test_the_supervisor_chooses_the_platform_by_config(tmp_path):
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform
    from sealedsum.sidecar.platform.process import platform_for

    EmulatedPlatform.init(tmp_path)
    assert isinstance(platform_for(config_mod.from_mapping({}, {}), tmp_path), EmulatedPlatform)
    nitro_cfg = config_mod.from_mapping({"platform": {"kind": "nitro"}}, {})
    with pytest.raises(ConfigError, match="KMS attested key release is not implemented"):
        platform_for(nitro_cfg, tmp_path)
    with pytest.raises(ConfigError):
        config_mod.from_mapping({"platform": {"kind": "sgx"}}, {})
