from __future__ import annotations

from typing import Protocol


class Platform(Protocol):
    """What the enclave needs from the hardware it runs on. Implementations: the emulated
    platform (``emulated.py``) and AWS Nitro Enclaves (``nitro.py``)."""

    # The quote format it answers with: "emulated" (docs/protocol.md section 7) or "nitro" (7.2).
    kind: str

    def quote(self, measurement: bytes, report_data: bytes) -> bytes:
        """A quote over the measurement and report data, in this platform's format: what the
        attestation reply carries (docs/protocol.md section 8.2)."""

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
