"""The consumer's chain-state file (docs/protocol.md section 15.5): the I/O edge of
:mod:`sealedsum.consumers.chain_state`.

One JSON file may hold the chains of many streams and deployments, each entry keyed by
:class:`~sealedsum.consumers.chain_state.ChainKey`. Every write replaces the whole file the
crash-safe way (a temporary file in the same directory, fsynced, renamed over the old one,
the directory fsynced), so a reader finds the old memory or the new one, never half of one.
Consumers sharing a file take a lock around read-change-write and change only their own
entries; for a stream two of them follow, the last writer's memory wins, which is a prefix of
the same signed chain as the other's, so it can lose memory but never raise a false alarm.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from sealedsum.common.errors import ChainStateError
from sealedsum.common.wire import strict_json
from sealedsum.consumers.chain_state import ChainKey, StreamChain

__all__ = ["FORMAT", "VERSION", "ChainStore"]

FORMAT = "sealedsum/consumer-chains"
VERSION = 2  # 2 added each entry's offset in the release stream; version 1 files are read too
RESET_HINT = "if it is damaged, restore it from a backup, or delete it to start over (forgetting every chain it vouched for)"


class ChainStore:
    """The chain-state file at ``path`` (created, with its directory, on the first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, keys: Iterable[ChainKey]) -> dict[ChainKey, StreamChain]:
        """The remembered chains among ``keys`` (none when the file does not exist yet).

        :raises ChainStateError: the file cannot be read or is not a chain-state file.
        """
        entries = self._read()
        return {key: entries[key] for key in keys if key in entries}

    def save(self, chains: Mapping[ChainKey, StreamChain]) -> None:
        """Write ``chains`` into the file, keeping every other entry as it is on disk.

        :raises ChainStateError: the file cannot be read or written.
        """
        with self._locked():
            entries = self._read()
            entries.update(chains)
            self._write(entries)

    # -- the file -------------------------------------------------------------------------
    def _read(self) -> dict[ChainKey, StreamChain]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise ChainStateError(f"cannot read the chain-state file {self.path}: {err.strerror}") from err
        try:
            doc = strict_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ChainStateError(f"the chain-state file {self.path} is not JSON", hint=RESET_HINT) from err
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ChainStateError(f"{self.path} is not a chain-state file (no \"format\": \"{FORMAT}\")",
                                  hint=RESET_HINT)
        version = doc.get("version")
        if version not in (1, VERSION) or isinstance(version, bool):
            raise ChainStateError(f"the chain-state file {self.path} has version {doc.get('version')!r}; this "
                                  f"consumer reads versions 1 and {VERSION}", hint="use the sealedsum version that wrote it")
        if set(doc) != {"format", "version", "chains"} or not isinstance(doc["chains"], list):
            raise ChainStateError(f"the chain-state file {self.path} does not have exactly the fields format, "
                                  "version and chains (a list)", hint=RESET_HINT)
        entries: dict[ChainKey, StreamChain] = {}
        for item in doc["chains"]:
            if not isinstance(item, dict):
                raise ChainStateError(f"the chain-state file {self.path} has an entry that is not an object",
                                      hint=RESET_HINT)
            state = dict(item)
            ident = {k: state.pop(k, None) for k in ("platform_key", "vhost", "prefix", "stream")}
            if not all(isinstance(v, str) and v for v in ident.values()):
                raise ChainStateError(f"the chain-state file {self.path} has an entry without platform_key, "
                                      "vhost, prefix and stream", hint=RESET_HINT)
            key = ChainKey(**ident)
            if key in entries:
                raise ChainStateError(f"the chain-state file {self.path} has two entries for stream "
                                      f"{key.stream!r} of one deployment", hint=RESET_HINT)
            try:
                entries[key] = StreamChain.from_json(key.stream, state, version=version)
            except ChainStateError as err:
                raise ChainStateError(f"the chain-state file {self.path}: {err}", hint=RESET_HINT) from err
        return entries

    def _write(self, entries: Mapping[ChainKey, StreamChain]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "chains": [
            {"platform_key": k.platform_key, "vhost": k.vhost, "prefix": k.prefix, "stream": k.stream,
             **entries[k].to_json()}
            for k in sorted(entries, key=lambda k: (k.platform_key, k.vhost, k.prefix, k.stream))]}
        data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("ascii")
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself is durable only once the directory is
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise ChainStateError(f"cannot write the chain-state file {self.path}: {err.strerror}",
                                  hint="make its directory writable, or point [consumer] chain_state "
                                       "(--chain-state) elsewhere") from err

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on ``PATH.lock`` (not on the file itself, which each write replaces)."""
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise ChainStateError(f"cannot lock the chain-state file {self.path}: {err.strerror}",
                                  hint="make its directory writable, or point [consumer] chain_state "
                                       "(--chain-state) elsewhere") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
