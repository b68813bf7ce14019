"""The AWS Nitro Enclaves platform: the sidecar (this platform process and the enclave process
it launches) runs inside a Nitro Enclave, and the Nitro Secure Module (NSM) is the root of
trust. See docs/nitro.md for the image, the PCRs and the vsock path to the broker.

What maps onto what:

- **quote**: an NSM attestation document whose ``user_data`` is the sealedsum binding
  (measurement and report data, docs/protocol.md section 7.2), signed by AWS's PKI;
- **sealing and ledger keys**: derived as on the emulated platform, from a 32-byte root secret
  that only an enclave with the pinned PCRs can obtain: a KMS data key whose key policy allows
  ``kms:Decrypt`` only with an attestation document of those PCRs
  (``kms:RecipientAttestation:ImageSha384``), so KMS releases it to this image alone. That
  stands in for SGX's EGETKEY, which Nitro has no equivalent of (:class:`RootSecretSource`);
- **monotonic counters**: Nitro has none that persists (PCRs reset with the enclave), so they
  come from outside through :class:`CounterStore`, which must itself resist rollback.

The parts that need real hardware are isolated and named: :class:`DevNsm` (the ioctl on
``/dev/nsm``) and the two sources above, none of which has an implementation that runs here
(:func:`from_config` refuses with what is missing). :class:`NitroPlatform` itself is plain code,
tested with a fake NSM that signs with a test-only chain.

No Python binding is used for the NSM: the only one on the package index
(``aws-nsm-interface`` 1.0.0) is a third-party single release, not AWS's, and it decodes every
response without limits; AWS maintains only the Rust library (aws-nitro-enclaves-nsm-api). The
wrapper below is one ioctl with one request type.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Protocol

from sealedsum.common import wire
from sealedsum.common.errors import ConfigError
from sealedsum.sidecar.platform.emulated import ledger_key, sealing_key

NSM_DEVICE = "/dev/nsm"
# From the Nitro Enclaves kernel driver (drivers/misc/nsm.c): _IOWR(0x0A, 0, struct nsm_message),
# a message being two struct iovec (request, response), 32 bytes on 64-bit Linux.
NSM_IOCTL = (3 << 30) | (32 << 16) | (0x0A << 8) | 0
NSM_RESPONSE_MAX = 0x3000
ROOT_SECRET_SIZE = 32


class Nsm(Protocol):
    """The Nitro Secure Module, as far as sealedsum uses it."""

    def attestation(self, user_data: bytes, nonce: bytes | None = None, public_key: bytes | None = None) -> bytes:
        """A COSE_Sign1 attestation document (docs/protocol.md section 7.2)."""


class RootSecretSource(Protocol):
    """Gives the enclave its 32-byte root secret after attesting it (a KMS attested key release)."""

    def root_secret(self, nsm: Nsm) -> bytes: ...


class CounterStore(Protocol):
    """Monotonic counters kept outside the enclave, rollback-resistant on their own."""

    def read(self, name: str) -> int: ...

    def advance(self, name: str, value: int) -> int: ...


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _NsmMessage(ctypes.Structure):
    _fields_ = [("request", _Iovec), ("response", _Iovec)]


class DevNsm:
    """UNTESTABLE HERE (needs /dev/nsm inside a Nitro Enclave): the NSM through its ioctl.
    The request and response are CBOR (the NSM API's ``Request::Attestation``)."""

    def __init__(self, path: str = NSM_DEVICE) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def attestation(self, user_data: bytes, nonce: bytes | None = None, public_key: bytes | None = None) -> bytes:
        import fcntl

        import cbor2

        request = cbor2.dumps({"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}})
        req = ctypes.create_string_buffer(request, len(request))
        resp = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
        msg = _NsmMessage(_Iovec(ctypes.addressof(req), len(request)), _Iovec(ctypes.addressof(resp), NSM_RESPONSE_MAX))
        fcntl.ioctl(self._fd, NSM_IOCTL, msg)  # the driver sets response.len to what it wrote
        answer = cbor2.loads(resp.raw[: min(msg.response.len, NSM_RESPONSE_MAX)], max_depth=4)
        if not isinstance(answer, dict) or not isinstance(answer.get("Attestation"), dict) \
                or not isinstance(answer["Attestation"].get("document"), bytes):
            raise OSError(f"the NSM refused the attestation request: {str(answer)[:200]}")
        return answer["Attestation"]["document"]

    def close(self) -> None:
        os.close(self._fd)


class NitroPlatform:
    """The :class:`~sealedsum.sidecar.platform.base.Platform` of a Nitro Enclave."""

    kind = wire.NITRO

    def __init__(self, nsm: Nsm, root_secret: bytes, counters: CounterStore) -> None:
        if len(root_secret) != ROOT_SECRET_SIZE:
            raise ValueError("the root secret is 32 bytes")
        self._nsm = nsm
        self._root_secret = root_secret
        self._counters = counters

    def __repr__(self) -> str:
        return "NitroPlatform()"

    def quote(self, measurement: bytes, report_data: bytes) -> bytes:
        # The client's nonce is inside report_data; the NSM's nonce field is left out.
        return self._nsm.attestation(wire.NitroBinding(measurement, report_data).to_bytes())

    def sealing_key(self, measurement: bytes) -> bytes:
        return sealing_key(self._root_secret, measurement)

    def ledger_key(self, code_digest: bytes) -> bytes:
        return ledger_key(self._root_secret, code_digest)

    def counter_read(self, measurement: bytes) -> int:
        return self._counters.read(measurement.hex())

    def counter_advance(self, measurement: bytes, value: int) -> int:
        return self._counters.advance(measurement.hex(), value)

    def ledger_counter_read(self, code_digest: bytes) -> int:
        return self._counters.read("ledger:" + code_digest.hex())

    def ledger_counter_advance(self, code_digest: bytes, value: int) -> int:
        return self._counters.advance("ledger:" + code_digest.hex(), value)


def from_config(_state_dir: Path) -> NitroPlatform:
    """The platform ``[platform] kind = "nitro"`` asks for.

    :raises ConfigError: always, for now: the KMS attested key release and a rollback-resistant
        counter store are not implemented (docs/nitro.md, "What is not built yet"); running
        without them would seal under a key the operator holds and let them roll state back.
    """
    raise ConfigError(
        "platform.kind = \"nitro\": the enclave cannot get its root secret yet (the KMS attested key "
        "release is not implemented) nor rollback-resistant counters; see docs/nitro.md",
        hint="use platform.kind = \"emulated\" until then")

