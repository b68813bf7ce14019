"""Where the two properties exactly-once rests on hold: keys are sealed before any state
that refers to them, and a record is acknowledged (and a release published) only once a
durable checkpoint holds it. Both are the order of one small function, :func:`commit`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from sealedsum.sidecar.durable import write_atomic
from sealedsum.sidecar.enclave.release import Publication
from sealedsum.sidecar.enclave.service import Effects, Enclave
from sealedsum.sidecar.enclave_process.store import SealedLedgerStore, SealedStateStore

# A journal this large, or a base this old, is folded into a fresh base.
JOURNAL_MAX_BYTES = 8 << 20
BASE_EVERY_S = 60.0


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
    acknowledged, and a release not yet published is still pending in the core.
    Dead letters are not here: each is published (and confirmed) as its record is refused,
    before that record's delivery can be acknowledged by step 3.
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
        if self._keys_path is not None:
            write_atomic(self._keys_path, self._enclave.sealed_keys(self._sealing_key))

    def checkpoint(self) -> None:
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
