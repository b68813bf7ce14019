"""Where the two properties exactly-once rests on hold: keys are sealed before any state
that refers to them, and a record is acknowledged (and a release published) only once a
durable checkpoint holds it. Both are the order of one small function, :func:`commit`.
"""

from __future__ import annotations

import errno
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from sealedsum.common.backoff import Backoff
from sealedsum.common.errors import StorageError
from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.enclave.release import Publication
from sealedsum.sidecar.enclave.service import Effects, Enclave
from sealedsum.sidecar.enclave_process.store import SealedLedgerStore, SealedStateStore

log = logging.getLogger("sealedsum.checkpoint")

# A journal this large, or a base this old, is folded into a fresh base.
JOURNAL_MAX_BYTES = 8 << 20
BASE_EVERY_S = 60.0
# While the disk refuses checkpoints they are tried again after these waits, doubling: space
# that comes back is used within STORAGE_RETRY_MAX_S.
STORAGE_RETRY_FIRST_S = 0.2
STORAGE_RETRY_MAX_S = 5.0


def commit(effects: Effects, deliveries: Sequence[int], *, seal_keys: Callable[[], None],
           checkpoint: Callable[[], None], ack: Callable[[int], None],
           publish: Callable[[Publication], None]) -> None:
    """Carry out what the core asked for, for a batch of deliveries, in the only safe order:

    1. seal the keys, if the keyring changed (state may name a new key epoch);
    2. take the checkpoint, if the state changed, and return only once it is durable (the
       sealed state, then the sealed ledger if it changed: a charge outlives a policy change);
    3. acknowledge the deliveries (one ack for all, up to the last delivery tag);
    4. publish the releases and notices (their noise and ledger charge are in the checkpoint).

    If a step raises, nothing after it happens: the broker redelivers what was not
    acknowledged, and a release not yet published is still pending in the core. Steps 1
    and 2 raise :class:`StorageError` when the disk is full or failing; they change nothing
    then, so the caller may run the same commit again later.
    Dead letters are not here: the runtime commits a batch's dead letters in one broker
    transaction before it calls this, so before their deliveries can be acknowledged by step 3.
    """
    if effects.seal_keys:
        seal_keys()
    if effects.checkpoint:
        checkpoint()
    if deliveries:
        ack(deliveries[-1])
    for publication in effects.publish:
        publish(publication)


class StateWriter:
    """Writes the core's checkpoints to the sealed store (a journal append, or now and then
    a fresh base), its sealed keys next to them, and the sealed ledger whenever it changed.

    :param store: ``None`` keeps the state in memory only (tests of the broker edge).
    :param keys_path: where the sealed keyring lives (``None``: not written, tests).
    :param ledger_store: where the sealed ledger lives (``None``: not written, tests).
    """

    def __init__(self, enclave: Enclave, store: SealedStateStore | None = None, keys_path: Path | None = None,
                 sealing_key: bytes = b"", ledger_store: SealedLedgerStore | None = None) -> None:
        self._enclave = enclave
        self._store = store
        self._keys_path = keys_path
        self._sealing_key = sealing_key
        self._ledger_store = ledger_store
        self._last_ledger: dict | None = None  # every start writes it once (it names this measurement)
        self._last_base: float | None = None  # every start begins a fresh base

    def seal_keys(self) -> None:
        """:raises StorageError: not written (the old sealed keys stay); try again later."""
        if self._keys_path is not None:
            with storage("sealing the keys"):
                write_atomic(self._keys_path, self._enclave.sealed_keys(self._sealing_key))

    def checkpoint(self) -> None:
        """:raises StorageError: not durable; nothing is marked checkpointed, so the next
        try writes all of it again."""
        with storage("writing the sealed state"):
            self._checkpoint()

    def _checkpoint(self) -> None:
        store = self._store
        base = store is not None and (self._last_base is None or store.version == 0
                                      or store.journal_bytes > JOURNAL_MAX_BYTES
                                      or time.monotonic() - self._last_base > BASE_EVERY_S)
        cp = self._enclave.checkpoint(base)
        if store is not None:
            if base:
                store.save(cp.state)
                self._last_base = time.monotonic()
            else:
                store.append(cp.state)
        self._write_ledger()
        self._enclave.checkpointed(cp)

    def _write_ledger(self) -> None:
        """After the state, before anything is acknowledged or published: a release goes out
        only once the ledger that carries its charge to a later measurement is durable, and a
        crash between the two writes leaves the state ahead (which wins for this measurement,
        lineage.py) with nothing of the difference published."""
        if self._ledger_store is None:
            return
        ledger = self._enclave.sealed_ledger()
        if ledger != self._last_ledger:  # most checkpoints only acknowledge records: no change
            self._ledger_store.save(ledger)
            self._last_ledger = ledger


@contextmanager
def storage(what: str) -> Iterator[None]:
    """OSErrors of the state directory as :class:`StorageError` (a pika socket error, say,
    is no concern of this)."""
    try:
        yield
    except OSError as err:
        name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
        raise StorageError(f"{what}: {name or type(err).__name__}: {err.strerror or err}") from err


class StorageStall:
    """While commits fail for the disk: when to try again (capped backoff), and a log line
    when it begins and one when it ends, not one per try."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._backoff = Backoff(first=STORAGE_RETRY_FIRST_S, cap=STORAGE_RETRY_MAX_S)
        self.since: float | None = None
        self.failures = 0
        self._next_try = 0.0

    @property
    def stalled(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        return self.since is None or self._clock() >= self._next_try

    def failed(self, err: StorageError, waiting: int) -> None:
        now = self._clock()
        self.failures += 1
        delay = self._backoff.next_delay()
        self._next_try = now + delay
        fields = {"error": type(err.__cause__ or err).__name__, "detail": str(err), "waiting_deliveries": waiting}
        if self.since is None:
            self.since = now
            log.warning("cannot write the sealed state; holding acknowledgements and releases until it can",
                        extra={"fields": fields | {"retry_max_s": STORAGE_RETRY_MAX_S, "hint": err.hint}})
        else:
            log.debug("sealed state still not written", extra={"fields": fields | {"retry_in_s": delay}})

    def succeeded(self) -> None:
        if self.since is None:
            return
        log.info("sealed state written again; resuming", extra={"fields": {
            "stalled_s": round(self._clock() - self.since, 3), "failed_tries": self.failures}})
        self.since, self.failures = None, 0
        self._backoff.reset()
