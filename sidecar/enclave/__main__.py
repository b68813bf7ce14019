"""Entry point of the enclave process. Started by the platform (``sealedsum.sidecar.supervisor``),
never by hand: its keys come from and go to the platform over a private pipe."""

from __future__ import annotations

import base64
import logging
import os
import signal
import sys
import time
from pathlib import Path

from sealedsum.common import logs
from sealedsum.common.config import BrokerSettings
from sealedsum.common.topology import Topology
from sealedsum.common.errors import SealingError
from sealedsum.common.policy import EnclavePolicy
from sealedsum.sidecar.channel import PipeChannel
from sealedsum.sidecar.enclave.hardening import harden
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave.state import RollbackDetected, SealedStateStore
from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.platform import measure

log = logging.getLogger("sealedsum.enclave")

EXIT_CONFIG = 2


def enclave_dir(state: Path, measurement: bytes) -> Path:
    directory = state / "enclave" / measurement.hex()[:32]
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


class PlatformCounter:
    """The platform's monotonic counter, over the private channel."""

    def __init__(self, channel: PipeChannel) -> None:
        self._channel = channel

    def read(self) -> int:
        return int(self._channel.request({"op": "counter_read"})["value"])

    def advance(self, value: int) -> int:
        return int(self._channel.request({"op": "counter_advance", "value": value})["value"])


def load_or_create_keys(directory: Path, sealing_key: bytes, measurement: bytes, paillier_bits: int) -> Keyring:
    """Unseal this measurement's key epochs, or create and seal the first on first start."""
    path = directory / "keys.sealed"
    if path.exists():
        keyring = Keyring.unseal(sealing_key, measurement, path.read_bytes())
        log.info("keys unsealed", extra={"fields": {"path": str(path), "key_epoch": keyring.current_epoch,
                                                    "epochs": sorted(keyring.epochs)}})
        return keyring
    keyring = Keyring.single(EnclaveKeys.generate(paillier_bits))
    keyring.rotated_at_ms = int(time.time() * 1000)
    write_atomic(path, keyring.seal(sealing_key, measurement))
    log.info("keys created and sealed", extra={"fields": {"path": str(path), "paillier_bits": paillier_bits}})
    return keyring


def main(argv: list[str]) -> int:
    report = harden()
    channel = PipeChannel(int(argv[0]), int(argv[1]))
    init = channel.recv()
    logs.setup("enclave", init.get("log_level", "INFO"))
    log.info("hardening", extra={"fields": report})
    import phe.util

    # gmpy2 makes phe's modular arithmetic several times faster; say which one runs.
    log.info("paillier backend", extra={"fields": {"gmpy2": bool(phe.util.HAVE_GMP)}})

    code_digest = bytes.fromhex(init["code_digest"])
    if measure.code_digest() != code_digest:
        log.error("the code on disk changed since the platform measured it; refusing to start")
        return EXIT_CONFIG
    policy_bytes = base64.b64decode(init["policy"])
    policy = EnclavePolicy.from_bytes(policy_bytes)
    measurement = bytes.fromhex(init["measurement"])
    sealing_key = base64.b64decode(init["sealing_key"])
    directory = enclave_dir(Path(init["state_dir"]), measurement)
    store = SealedStateStore(directory, sealing_key, measurement, PlatformCounter(channel))
    try:
        keys = load_or_create_keys(directory, sealing_key, measurement, policy.paillier_bits)
        state = store.load()
    except RollbackDetected as err:
        log.error("sealed state rolled back; refusing to start", extra={"fields": {"detail": str(err)}})
        return EXIT_CONFIG
    except SealingError as err:
        log.error("cannot unseal keys or state", extra={"fields": {"detail": str(err)}})
        return EXIT_CONFIG
    if state is not None:
        log.info("state unsealed", extra={"fields": {"version": store.version, "journal_entries": len(state) - 1}})

    def quote(report_data: bytes) -> bytes:
        return base64.b64decode(channel.request({"op": "quote", "report_data": report_data.hex()})["quote"])

    try:
        enclave = Enclave(keys, policy, policy_bytes, code_digest, measurement, quote, state, int(time.time() * 1000))
    except (ValueError, KeyError) as err:
        # A sealed state this code cannot read (an unknown version): restarting cannot help.
        log.error("sealed state does not fit this code; refusing to start", extra={"fields": {
            "detail": f"{type(err).__name__}: {err}"}})
        return EXIT_CONFIG
    b = init["broker"]
    from sealedsum.sidecar.runtime import EnclaveRuntime  # pika only once the core is set up

    store.save(enclave.snapshot())  # every start begins a fresh base (and compacts the journal)
    enclave.dirty = False
    settings = BrokerSettings(b["url"], Topology(b["prefix"]), b["queue_type"],
                              max_queued_records=b["max_queued_records"])
    keys_path = directory / "keys.sealed"
    runtime = EnclaveRuntime(enclave, settings, store,
                             seal_keys=lambda: write_atomic(keys_path, enclave.keyring.seal(sealing_key, measurement)))
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    signal.signal(signal.SIGINT, lambda *_: runtime.stop())
    signal.signal(signal.SIGUSR1, lambda *_: runtime.request_rotation())  # `sealedsum sidecar rotate`
    channel.send({"op": "ready", "pid": os.getpid(), "hardening": report, "key_epoch": enclave.keys.epoch})
    runtime.run()
    log.info("enclave stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
