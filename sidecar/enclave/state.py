"""The enclave's sealed state on disk, protected against rollback.

The state (ledgers, window numbers, unconfirmed publications) is sealed and written
with write-then-rename and fsync. Sealing stops tampering but not replaying an older
file; for that the platform keeps a monotonic counter per measurement, and every
sealed state carries a version:

- save: write version v+1, then advance the platform counter to v+1;
- load: the file's version must equal the counter, or be one ahead (a crash between
  the two steps, after which the counter catches up). Anything older, or a missing
  file when the counter says one was written, is a rollback: the enclave refuses to
  start rather than trust it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from common.errors import SealingError
from sidecar.durable import write_atomic
from sidecar.enclave import sealing

STATE_AAD = b"sealedsum/v1/sealed-state\x00"


class RollbackDetected(SealingError):
    """The sealed state on disk is older than the platform's counter says it must be."""


class MonotonicCounter(Protocol):
    def read(self) -> int: ...

    def advance(self, value: int) -> int: ...


class SealedStateStore:
    def __init__(self, path: Path, sealing_key: bytes, measurement: bytes, counter: MonotonicCounter) -> None:
        self.path = path
        self._key = sealing_key
        self._measurement = measurement
        self._counter = counter
        self.version = 0

    def load(self) -> dict | None:
        """The last saved state, or ``None`` on first start.

        :raises RollbackDetected: the file is older than the counter, or gone.
        :raises SealingError: the file does not open (tampered, or other code).
        """
        expected = self._counter.read()
        if not self.path.exists():
            if expected:
                raise RollbackDetected(f"sealed state {self.path} is missing but version {expected} was written")
            return None
        doc = json.loads(sealing.unseal(self._key, self._measurement, self.path.read_bytes(), STATE_AAD))
        version = int(doc["version"])
        if version < expected:
            raise RollbackDetected(f"sealed state is version {version}; the platform counter says {expected}: "
                                   "an older copy was put back")
        if version > expected + 1:
            raise RollbackDetected(f"sealed state version {version} is ahead of the platform counter {expected}")
        if version == expected + 1:
            self._counter.advance(version)  # the last save crashed before its counter step
        self.version = version
        return doc["state"]

    def save(self, state: dict) -> None:
        version = self.version + 1
        doc = json.dumps({"version": version, "state": state}).encode()
        write_atomic(self.path, sealing.seal(self._key, self._measurement, doc, STATE_AAD))
        self._counter.advance(version)
        self.version = version
