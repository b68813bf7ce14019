"""Entry point of the enclave process: the composition root that wires the measured core
(``sealedsum.sidecar.enclave``) to its store, its hardening and its broker runtime.
Started by the platform, never by hand: its keys come from and go to the platform over a
private pipe."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import phe.util

from sealedsum.common import logs
from sealedsum.common.config import BrokerSettings, split_urls
from sealedsum.common.errors import ExitCode, InheritedSpendMismatch, RollbackDetected, SealedsumError, \
    StateIncompatible, StorageError
from sealedsum.common.topology import Topology
from sealedsum.common.policy_parse import policy_from_bytes
from sealedsum.sidecar.channel import CounterAdvance, CounterRead, CounterValue, Launch, LedgerCounterAdvance, \
    LedgerCounterRead, PipeChannel, QuoteReply, QuoteRequest, Ready
from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave_process.checkpoint import StateWriter, storage
from sealedsum.sidecar.enclave_process.hardening import harden
from sealedsum.sidecar.enclave_process.runtime import EnclaveRuntime, draws_on_a_thread
from sealedsum.sidecar.enclave_process.store import SealedLedgerStore, SealedStateStore
from sealedsum.sidecar import measurement as measure

log = logging.getLogger("sealedsum.enclave")

# What the log says when the enclave refuses to start (operators search for these).
REFUSALS = {
    RollbackDetected: "sealed state rolled back; refusing to start",
    StateIncompatible: "sealed state does not fit this code; refusing to start",
    InheritedSpendMismatch: "a stream's spend was charged under other privacy parameters; refusing to start",
}


def enclave_dir(state: Path, measurement: bytes) -> Path:
    directory = state / "enclave" / measurement.hex()[:32]
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def ledger_path(state: Path, code_digest: bytes) -> Path:
    return state / "ledger" / f"{code_digest.hex()[:32]}.sealed"


class PlatformCounter:
    """The platform's monotonic counter of this measurement's state, over the private channel."""

    def __init__(self, channel: PipeChannel) -> None:
        self._channel = channel

    def read(self) -> int:
        return self._channel.request(CounterRead(), CounterValue).value

    def advance(self, value: int) -> int:
        return self._channel.request(CounterAdvance(value), CounterValue).value


class PlatformLedgerCounter(PlatformCounter):
    """The platform's monotonic counter of this code's sealed ledger."""

    def read(self) -> int:
        return self._channel.request(LedgerCounterRead(), CounterValue).value

    def advance(self, value: int) -> int:
        return self._channel.request(LedgerCounterAdvance(value), CounterValue).value


def broker_settings(b) -> BrokerSettings:
    """The broker the platform named: one URL, or every node of a cluster, comma-separated."""
    urls = split_urls(b.url)
    return BrokerSettings(urls[0], Topology(b.prefix), b.queue_type, max_queued_records=b.max_queued_records,
                          urls=urls)


def warn_of_other_code(path: Path) -> None:
    """A sealed ledger of other code cannot be opened by this code (its key is that code's):
    the spend it holds is not carried over. Said once at start, so an operator who upgraded
    the code learns that the streams' chains start again (docs/protocol.md, 15.7)."""
    others = sorted(p.name for p in path.parent.glob("*.sealed") if p != path)
    if others:
        log.warning("sealed ledgers of other enclave code exist; this code cannot read them, so their "
                    "streams' spend is not inherited", extra={"fields": {"ledgers": others}})


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
    launch = channel.recv()
    if not isinstance(launch, Launch):
        return ExitCode.USAGE  # not the platform this code talks to
    logs.setup("enclave", launch.log_level)
    log.info("hardening", extra={"fields": report})
    # gmpy2 makes phe's modular arithmetic several times faster; say which one runs.
    log.info("paillier backend", extra={"fields": {"gmpy2": bool(phe.util.HAVE_GMP)}})

    code_digest = launch.code_digest
    if measure.code_digest() != code_digest:
        log.error("the code on disk changed since the platform measured it; refusing to start")
        return ExitCode.USAGE
    unmeasured = measure.unmeasured_modules(list(sys.modules))
    if unmeasured:
        log.error("the enclave loaded code the measurement does not cover; refusing to start",
                  extra={"fields": {"modules": unmeasured}})
        return ExitCode.USAGE
    policy_bytes = launch.policy
    policy = policy_from_bytes(policy_bytes)
    measurement, sealing_key = launch.measurement, launch.sealing_key

    def quote(report_data: bytes) -> bytes:
        return channel.request(QuoteRequest(report_data), QuoteReply).quote

    if policy.cluster is not None:
        return run_replica(channel, launch, policy, quote, report)

    try:
        with storage("opening the state directory"):
            directory = enclave_dir(Path(launch.state_dir), measurement)
            store = SealedStateStore(directory, sealing_key, measurement, PlatformCounter(channel))
            ledger_store = SealedLedgerStore(ledger_path(Path(launch.state_dir), code_digest), launch.ledger_key,
                                             code_digest, PlatformLedgerCounter(channel))
            warn_of_other_code(ledger_store.path)
            keys = load_or_create_keys(directory, sealing_key, measurement, policy.paillier_bits)
            state = store.load()
        if state is not None:
            log.info("state unsealed", extra={"fields": {"version": store.version,
                                                         "journal_entries": len(state) - 1}})
        with storage("opening the sealed ledger"):
            ledger = ledger_store.load()
        enclave = Enclave(keys, policy, policy_bytes, code_digest, measurement, quote, state,
                          int(time.time() * 1000), draw_inline=not draws_on_a_thread(), ledger=ledger)
    except StorageError as err:
        # A full or failing disk is no refusal: the platform starts the enclave again (with
        # backoff) and it comes back once there is space.
        log.error("cannot write the state directory; exiting for the platform to restart the enclave",
                  extra={"fields": {"error": type(err.__cause__ or err).__name__, "detail": str(err),
                                    "hint": err.hint}})
        return err.exit_code
    except SealedsumError as err:
        # Rolled back, tampered, other code, or a state this code cannot read: restarting
        # cannot help, and the exit code tells the platform so.
        log.error(REFUSALS.get(type(err), "cannot unseal keys or state"), extra={"fields": {
            "error": type(err).__name__, "detail": str(err), "hint": err.hint}})
        return err.exit_code
    b = launch.broker
    settings = broker_settings(b)
    writer = StateWriter(enclave, store, directory / "keys.sealed", sealing_key, ledger_store)
    runtime = EnclaveRuntime(enclave, settings, writer, start=enclave.start(),
                             start_timeout_s=b.start_timeout_ms / 1000)
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    signal.signal(signal.SIGINT, lambda *_: runtime.stop())
    signal.signal(signal.SIGUSR1, lambda *_: runtime.request_rotation())  # `sealedsum sidecar rotate`
    channel.send(Ready(os.getpid(), report, keys.current_epoch))
    runtime.run()
    log.info("enclave stopped")
    return runtime.exit_code


def run_replica(channel: PipeChannel, launch: Launch, policy, quote, report: dict) -> int:
    """An enclave replica ([cluster]): its keys are sealed here, the state it releases from is
    the release holder's, in the broker (``sealedsum.sidecar.cluster.runtime``)."""
    from sealedsum.sidecar.cluster.runtime import Holder, StreamStateStore, Worker, obtain_keys, state_key

    b = launch.broker
    settings = broker_settings(b)
    if settings.queue_type != "quorum":
        log.error("replicas need quorum queues: a classic queue lives on one broker node and goes with it",
                  extra={"fields": {"queue_type": settings.queue_type, "hint": "set broker.queue_type = \"quorum\""}})
        return ExitCode.USAGE
    measurement, digest, policy_bytes = launch.measurement, launch.code_digest, launch.policy
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    try:
        with storage("opening the state directory"):
            directory = enclave_dir(Path(launch.state_dir), measurement)
            path = directory / "keys.sealed"
            keyring = Keyring.unseal(launch.sealing_key, measurement, path.read_bytes()) if path.exists() else None
        if keyring is None:
            keyring = obtain_keys(settings, policy.cluster, measurement, digest, policy_bytes, policy.paillier_bits,
                                  quote, lambda: bool(stopping))
            if keyring is None:
                return 0
            with storage("sealing the keys"):
                write_atomic(path, keyring.seal(launch.sealing_key, measurement))
    except StorageError as err:
        log.error("cannot write the state directory; exiting for the platform to restart the enclave",
                  extra={"fields": {"detail": str(err), "hint": err.hint}})
        return err.exit_code
    except SealedsumError as err:
        log.error(REFUSALS.get(type(err), "cannot unseal keys"), extra={"fields": {
            "error": type(err).__name__, "detail": str(err), "hint": err.hint}})
        return err.exit_code

    def build(state):
        return Enclave(keyring, policy, policy_bytes, digest, measurement, quote, state, int(time.time() * 1000),
                       draw_inline=not draws_on_a_thread())

    worker = Worker(build(None), settings, policy.cluster, measurement)
    holder = Holder(build, settings, policy.cluster, StreamStateStore(settings, state_key(keyring), worker.id),
                    start_timeout_s=b.start_timeout_ms / 1000)

    def stop(*_):
        holder.stop()
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if stopping:
        return 0
    worker.start()
    channel.send(Ready(os.getpid(), report, keyring.current_epoch))
    log.info("replica running", extra={"fields": {"worker": worker.id.hex(), "shards": policy.cluster.shards}})
    holder.run()
    worker.stop()
    if worker.thread is not None:
        worker.thread.join(timeout=10)
    log.info("enclave stopped", extra={"fields": {"worker_stats": dict(worker.stats)}})
    return holder.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
