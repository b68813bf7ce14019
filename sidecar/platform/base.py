from __future__ import annotations

from typing import Protocol


class Platform(Protocol):
    """What the enclave needs from the hardware it runs on."""

    def public_key(self) -> bytes:
        """The 32-byte Ed25519 key clients pin (``trust.platform_key``)."""

    def quote(self, measurement: bytes, report_data: bytes) -> bytes:
        """A signed :class:`sealedsum.common.wire.Quote` over the measurement and report data."""

    def sealing_key(self, measurement: bytes) -> bytes:
        """A 32-byte key only an enclave with this measurement receives (like SGX EGETKEY)."""

    def counter_read(self, measurement: bytes) -> int:
        """A monotonic counter per measurement, for rollback protection of sealed state."""

    def counter_advance(self, measurement: bytes, value: int) -> int:
        """Raise the counter to ``value`` (never lower); durable before it returns."""

    # The ledger that outlives a policy change (docs/protocol.md, section 17): bound to the
    # code digest, which a policy change leaves as it is (SGX's MRSIGNER policy is the model:
    # a key for "this code, whatever its policy" rather than for one measurement).
    def ledger_key(self, code_digest: bytes) -> bytes:
        """A 32-byte key only an enclave running this code receives, under any policy."""

    def ledger_counter_read(self, code_digest: bytes) -> int:
        """A monotonic counter per code digest, for rollback protection of the sealed ledger."""

    def ledger_counter_advance(self, code_digest: bytes, value: int) -> int:
        """Raise the ledger counter to ``value`` (never lower); durable before it returns."""
