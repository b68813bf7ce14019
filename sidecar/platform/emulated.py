"""The emulated platform: a parent process holding a key file that stands in for
keys fused into hardware.

.. warning::
   This is an emulation. Whoever can read ``platform.key`` can sign quotes and derive
   sealing keys, which real hardware would never allow. The isolation of the enclave
   is an OS process boundary with hardening, not memory encryption.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sealedsum.common import signing, wire
from sealedsum.common.errors import ConfigError, StorageError
from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.platform.statelock import StateLock

log = logging.getLogger("sealedsum.platform")

KEY_FILE = "platform.key"
COUNTER_FILE = "platform.counters"
SEALING_INFO = b"sealedsum/v1/sealing-key\x00"
LEDGER_KEY_INFO = b"sealedsum/v1/ledger-key\x00"
# Ledger counters share the counter file with the measurements' counters; the prefix keeps
# a code digest from ever naming the same counter as a measurement.
LEDGER_COUNTER_PREFIX = "ledger:"


def _now_ms() -> int:
    return int(time.time() * 1000)


class EmulatedPlatform:
    kind = "emulated"  # the quote format it answers with (docs/protocol.md section 7)

    def __init__(self, signing_key: Ed25519PrivateKey, root_secret: bytes,
                 clock_ms: Callable[[], int] = _now_ms, state_dir: Path | None = None) -> None:
        if len(root_secret) != 32:
            raise ValueError("the platform root secret is 32 bytes")
        self._signing_key = signing_key
        self._root_secret = root_secret
        self._clock_ms = clock_ms
        self._state_dir = state_dir
        self._counters: dict[str, int] = {}
        self._persist_failing = False
        if state_dir is not None and (state_dir / COUNTER_FILE).exists():
            self._counters = json.loads((state_dir / COUNTER_FILE).read_text())

    def __repr__(self) -> str:
        return f"EmulatedPlatform(public_key={base64.b64encode(self.public_key()).decode()})"

    @classmethod
    def generate(cls) -> "EmulatedPlatform":
        return cls(Ed25519PrivateKey.generate(), os.urandom(32))

    @classmethod
    def init(cls, state_dir: Path) -> "EmulatedPlatform":
        """Create the platform key in ``state_dir`` (refuses to overwrite one)."""
        with StateLock(state_dir).acquire():  # not under a running sidecar's feet
            return cls._init(state_dir)

    @classmethod
    def _init(cls, state_dir: Path) -> "EmulatedPlatform":
        path = state_dir / KEY_FILE
        if path.exists():
            raise ConfigError(f"{path} exists already; the platform key is created once",
                              hint="use `sealedsum platform show --state DIR` to print its public key")
        platform = cls.generate()
        platform._state_dir = state_dir
        doc = {
            "version": 1,
            "signing_key": base64.b64encode(platform._signing_key.private_bytes_raw()).decode(),
            "root_secret": base64.b64encode(platform._root_secret).decode(),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            path.unlink(missing_ok=True)  # a torn key would make every later init refuse
            raise StorageError(f"cannot write {path}: {err.strerror or err}") from err
        return platform

    @classmethod
    def load(cls, state_dir: Path) -> "EmulatedPlatform":
        path = state_dir / KEY_FILE
        try:
            doc = json.loads(path.read_text())
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(doc["signing_key"]))
            return cls(key, base64.b64decode(doc["root_secret"]), state_dir=state_dir)
        except FileNotFoundError:
            raise ConfigError(f"no platform key in {state_dir}",
                              hint=f"run `sealedsum platform init --state {state_dir}` first") from None
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not a platform key file") from err

    def public_key(self) -> bytes:
        return self._signing_key.public_key().public_bytes_raw()

    def quote(self, measurement: bytes, report_data: bytes) -> bytes:
        if len(measurement) != wire.DIGEST_SIZE or len(report_data) != wire.DIGEST_SIZE:
            raise ValueError("measurement and report data are 32 bytes each")
        unsigned = wire.Quote(measurement, report_data, self._clock_ms(), b"")
        sig = signing.sign(self._signing_key, signing.QUOTE, unsigned.signed_part())
        return wire.Quote(measurement, report_data, unsigned.issued_at_ms, sig).to_bytes()

    def counter_read(self, measurement: bytes) -> int:
        """The monotonic counter of this measurement's sealed state (0 if never advanced)."""
        return self._counters.get(measurement.hex(), 0)

    def counter_advance(self, measurement: bytes, value: int) -> int:
        """Raise the counter to ``value`` (never lower it); persisted before returning."""
        return self._advance(measurement.hex(), value)

    def ledger_counter_read(self, code_digest: bytes) -> int:
        """The monotonic counter of this code's sealed ledger (0 if never advanced)."""
        return self._counters.get(LEDGER_COUNTER_PREFIX + code_digest.hex(), 0)

    def ledger_counter_advance(self, code_digest: bytes, value: int) -> int:
        return self._advance(LEDGER_COUNTER_PREFIX + code_digest.hex(), value)

    def _advance(self, key: str, value: int) -> int:
        """The counter's value afterwards: ``value``, or the old value when the step could not
        be persisted (a full disk), which the enclave takes as a failed checkpoint to retry."""
        old = self._counters.get(key, 0)
        if value > old:
            counters = self._counters | {key: value}
            if self._state_dir is not None:
                try:
                    write_atomic(self._state_dir / COUNTER_FILE, json.dumps(counters).encode())
                except OSError as err:
                    if not self._persist_failing:
                        self._persist_failing = True
                        log.warning("cannot persist the platform counters; answering not advanced", extra={
                            "fields": {"error": type(err).__name__, "detail": str(err)}})
                    return old
                if self._persist_failing:
                    self._persist_failing = False
                    log.info("platform counters persisted again")
            self._counters = counters
        return self._counters.get(key, 0)

    def sealing_key(self, measurement: bytes) -> bytes:
        return sealing_key(self._root_secret, measurement)

    def ledger_key(self, code_digest: bytes) -> bytes:
        return ledger_key(self._root_secret, code_digest)


def sealing_key(root_secret: bytes, measurement: bytes) -> bytes:
    """The sealing key of ``measurement`` under a platform's root secret (every platform
    derives its keys so, whatever gives it the root secret)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SEALING_INFO + measurement).derive(root_secret)


def ledger_key(root_secret: bytes, code_digest: bytes) -> bytes:
    """Derived from the code digest alone, so every policy of the same code gets it and
    no other code does. Its own label: it can never equal a sealing key, even if a code
    digest happened to equal some measurement."""
    if len(code_digest) != wire.DIGEST_SIZE:
        raise ValueError("a code digest is 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LEDGER_KEY_INFO + code_digest).derive(root_secret)
