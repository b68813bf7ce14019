"""The enclave's sealed state on disk: a base snapshot and a journal, protected
against rollback.

Every checkpoint has a version. A *base* (``state.sealed``) holds the whole state; a
*journal* (``state.journal``) holds the changes since, one sealed chunk per checkpoint,
so acknowledging a batch of records costs one small append and one fsync instead of
rewriting every record id in the replay horizon. Sealing stops tampering but not
replaying an older file; for that the platform keeps a monotonic counter per
measurement:

- a checkpoint writes version v+1 (base: write-then-rename; journal: append), fsyncs,
  then advances the platform counter to v+1;
- loading replays the base and the consecutive journal chunks after it; the last
  version must equal the counter, or be one ahead (a crash between the two steps,
  after which the counter catches up). Anything older, or no state when the counter
  says some was written, is a rollback: the enclave refuses to start rather than
  trust it. A torn last chunk (a crash mid-append, before its counter step) is cut off.

A checkpoint that fails (a full disk; a counter step the platform could not persist) is
tried again by the caller, and the store keeps that safe: a torn chunk a failed append
left is cut off before the next one, and a version written durably whose counter step
failed has its counter step retried before anything else is written, so the files are
never two versions ahead of the counter.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Protocol

from sealedsum.common.errors import RollbackDetected, SealingError, StorageError
from sealedsum.sidecar.durable import truncate, write_all, write_atomic
from sealedsum.sidecar.enclave import sealing

STATE_AAD = b"sealedsum/v1/sealed-state\x00"
JOURNAL_AAD = b"sealedsum/v1/sealed-journal\x00"
LEDGER_AAD = b"sealedsum/v1/sealed-ledger\x00"
CHUNK_HEAD = struct.Struct(">QI")  # version, sealed length


class MonotonicCounter(Protocol):
    def read(self) -> int: ...

    def advance(self, value: int) -> int: ...


def advance(counter: MonotonicCounter, version: int, what: str) -> None:
    """Advance ``counter`` to ``version``; the platform answers with the value it holds, which
    stays lower when it could not persist the step.

    :raises StorageError: the counter did not reach ``version``.
    """
    value = counter.advance(version)
    if value < version:
        raise StorageError(f"the platform could not advance the {what} counter to {version} (it holds {value})")


class SealedStateStore:
    def __init__(self, directory: Path, sealing_key: bytes, measurement: bytes, counter: MonotonicCounter) -> None:
        self.base_path = directory / "state.sealed"
        self.journal_path = directory / "state.journal"
        self._key = sealing_key
        self._measurement = measurement
        self._counter = counter
        self.version = 0
        self.journal_bytes = 0
        # A version on disk whose counter step failed, and the journal bytes it added (None:
        # a base); its counter step is retried before anything else is written.
        self._unadvanced: tuple[int, int | None] | None = None
        self._torn_from: int | None = None  # where a failed append began (its bytes are cut off)

    # -- reading ---------------------------------------------------------------------------
    def load(self) -> list[dict] | None:
        """The base and the journal entries after it, in order; ``None`` on first start.

        :raises RollbackDetected: the state is older than the counter, or gone.
        :raises SealingError: a file does not open (tampered, or other code).
        """
        try:
            return self._load()
        except (ValueError, KeyError, TypeError) as err:  # it opened, so it is ours: an older format
            raise SealingError(f"the sealed state does not parse: {type(err).__name__}") from err

    def _load(self) -> list[dict] | None:
        expected = self._counter.read()
        if not self.base_path.exists():
            if expected:
                raise RollbackDetected(f"sealed state {self.base_path} is missing but version {expected} was written")
            return None
        doc = json.loads(sealing.unseal(self._key, self._measurement, self.base_path.read_bytes(), STATE_AAD))
        version = int(doc["version"])
        checkpoints = [doc["state"]]
        good_end = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            pos = 0
            while pos < len(data):
                entry, chunk_version, end = self._read_chunk(data, pos)
                if entry is None:  # torn tail: the crash came before this chunk's counter step
                    if end < len(data):
                        raise SealingError("the sealed journal is damaged before its end")
                    break
                if chunk_version <= version:
                    pos = good_end = end  # left over from before the base was rewritten
                    continue
                if chunk_version != version + 1:
                    raise SealingError("the sealed journal skips a version")
                checkpoints.append(entry)
                version, pos, good_end = chunk_version, end, end
            if good_end < len(data):
                os.truncate(self.journal_path, good_end)
        if version < expected:
            raise RollbackDetected(f"sealed state is version {version}; the platform counter says {expected}: "
                                   "an older copy was put back")
        if version > expected + 1:
            raise RollbackDetected(f"sealed state version {version} is ahead of the platform counter {expected}")
        if version == expected + 1:
            advance(self._counter, version, "state")  # the last checkpoint crashed before its counter step
        self.version, self.journal_bytes = version, good_end
        return checkpoints

    def _read_chunk(self, data: bytes, pos: int) -> tuple[dict | None, int, int]:
        if pos + CHUNK_HEAD.size > len(data):
            return None, 0, len(data)
        version, length = CHUNK_HEAD.unpack_from(data, pos)
        end = pos + CHUNK_HEAD.size + length
        if end > len(data):
            return None, version, len(data)
        try:
            plain = sealing.unseal(self._key, self._measurement, data[pos + CHUNK_HEAD.size:end],
                                   JOURNAL_AAD + struct.pack(">Q", version))
        except SealingError:
            return None, version, end
        return json.loads(plain), version, end

    # -- writing ---------------------------------------------------------------------------
    def save(self, snapshot: dict) -> None:
        """A new base with the whole state; the journal starts again empty."""
        self._catch_up()
        version = self.version + 1
        doc = json.dumps({"version": version, "state": snapshot}).encode()
        write_atomic(self.base_path, sealing.seal(self._key, self._measurement, doc, STATE_AAD))
        self._unadvanced = (version, None)
        self._catch_up()

    def append(self, entry: dict) -> None:
        """One journal chunk with the changes since the last checkpoint."""
        self._catch_up()
        version = self.version + 1
        blob = sealing.seal(self._key, self._measurement, json.dumps(entry).encode(),
                            JOURNAL_AAD + struct.pack(">Q", version))
        chunk = CHUNK_HEAD.pack(version, len(blob)) + blob
        if not self.journal_path.exists():
            write_atomic(self.journal_path, b"")  # a durable directory entry before the first append
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        try:
            if self._torn_from is not None:
                truncate(fd, self._torn_from)
                self._torn_from = None
            start = os.fstat(fd).st_size
            try:
                write_all(fd, chunk)
            except OSError:
                # Part of the chunk may be on disk: cut it off now, or the next chunk would
                # follow a damaged one (which the loader refuses).
                self._torn_from = start
                truncate(fd, start)
                self._torn_from = None
                raise
        finally:
            os.close(fd)
        self._unadvanced = (version, len(chunk))
        self._catch_up()

    def _catch_up(self) -> None:
        """The counter step of a version written durably, if it failed before."""
        if self._unadvanced is None:
            return
        version, added = self._unadvanced
        advance(self._counter, version, "state")
        self._unadvanced = None
        self.version = version
        if added is not None:
            self.journal_bytes += added
        elif self.journal_path.exists():
            # The journal's chunks are older than the new base now (the loader skips them
            # if this fails); cutting them off needs no free space.
            fd = os.open(self.journal_path, os.O_WRONLY)
            try:
                truncate(fd, 0)
            finally:
                os.close(fd)
            self.journal_bytes = 0
        else:
            self.journal_bytes = 0


class SealedLedgerStore:
    """The sealed ledger (``sealedsum.sidecar.enclave.lineage``): one file per code digest,
    sealed under the platform's ledger key with the code digest as associated data, so every
    policy of the same code opens it and nothing else does. Small (one entry per stream), so
    it is rewritten whole, write-then-rename, and versioned against the platform's ledger
    counter exactly like the state's base: a copy older than the counter, or none when the
    counter says one was written, is a rollback.

    :param path: ``STATE/ledger/<first 32 hex digits of the code digest>.sealed``.
    """

    def __init__(self, path: Path, ledger_key: bytes, code_digest: bytes, counter: MonotonicCounter) -> None:
        self.path = path
        self._key = ledger_key
        self._code_digest = code_digest
        self._counter = counter
        self.version = 0
        self._unadvanced: int | None = None  # a version on disk whose counter step failed

    def load(self) -> dict | None:
        """The ledger's contents, or ``None`` when this code never wrote one.

        :raises RollbackDetected: the file is older than the counter, or gone.
        :raises SealingError: it does not open (tampered, other platform), or does not parse.
        """
        expected = self._counter.read()
        if not self.path.exists():
            if expected:
                raise RollbackDetected(f"sealed ledger {self.path} is missing but version {expected} was written")
            return None
        try:
            doc = json.loads(sealing.unseal(self._key, self._code_digest, self.path.read_bytes(), LEDGER_AAD))
            version, ledger = int(doc["version"]), doc["ledger"]
        except (ValueError, KeyError, TypeError) as err:
            raise SealingError(f"the sealed ledger does not parse: {type(err).__name__}") from err
        if version < expected:
            raise RollbackDetected(f"sealed ledger is version {version}; the platform's ledger counter says "
                                   f"{expected}: an older copy was put back")
        if version > expected + 1:
            raise RollbackDetected(f"sealed ledger version {version} is ahead of the platform's ledger counter "
                                   f"{expected}")
        if version == expected + 1:
            advance(self._counter, version, "ledger")  # the last write crashed before its counter step
        self.version = version
        return ledger

    def save(self, ledger: dict) -> None:
        """Write the next version durably, then advance the counter (first the counter step
        of a version written before, if that failed)."""
        if self._unadvanced is not None:
            advance(self._counter, self._unadvanced, "ledger")
            self.version, self._unadvanced = self._unadvanced, None
        version = self.version + 1
        doc = json.dumps({"version": version, "ledger": ledger}).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path, sealing.seal(self._key, self._code_digest, doc, LEDGER_AAD))
        self._unadvanced = version
        advance(self._counter, version, "ledger")
        self.version, self._unadvanced = version, None
