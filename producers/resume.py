"""``sealedsum produce --resume FILE``: where an interrupted run got to, so that its rerun
sends every input line exactly once.

The state file records ``lines_done``: every input line up to it was confirmed by the broker
or rejected by validation (a line unconfirmed in between stops it, even if later ones were
confirmed: confirms may resolve out of submit order after a reconnect). It also records what
the run was (input path, stream, reading options) and a SHA-256 of those lines, which
a rerun checks before it sends anything. And a random salt: with it each line's record id is
derived from the line number, so a line sent again (after a ``kill -9`` between two writes of
the file) is dead-lettered by the enclave as a ``duplicate`` within its replay horizon rather
than counted twice.

An input that grew since (lines appended) resumes: the lines the file covers are checked by
their hash, and the new ones are sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from sealedsum.common import wire
from sealedsum.common.errors import ResumeError

VERSION = 1


@dataclass
class ResumeState:
    path: Path
    run: dict  # what the run reads and where it sends it: a rerun must match
    lines_done: int = 0
    prefix_sha256: str = hashlib.sha256().hexdigest()
    confirmed: int = 0  # over every run on this file
    salt: str = field(default_factory=lambda: os.urandom(16).hex())

    @classmethod
    def open(cls, path: str | os.PathLike, run: dict) -> "ResumeState":
        """The state at ``path`` if it fits ``run``, else a fresh one (no file yet).

        :raises ResumeError: the file is not a state file, or one of another run.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path, run)
        except OSError as err:
            raise ResumeError(f"cannot read the resume file {path}: {err.strerror}") from None
        try:
            doc = json.loads(text)
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}")
            doc["run"].pop("size", None)  # files before grown inputs could resume named the size
            state = cls(path, doc["run"], int(doc["lines_done"]), str(doc["prefix_sha256"]),
                        int(doc["confirmed"]), str(doc["salt"]))
            bytes.fromhex(state.salt)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ResumeError(f"{path} is not a sealedsum produce resume file ({err})") from None
        differ = [k for k in sorted(set(run) | set(state.run)) if run.get(k) != state.run.get(k)]
        if differ:
            was = ", ".join(f"{k} {state.run.get(k)!r} (now {run.get(k)!r})" for k in differ)
            raise ResumeError(f"{path} is the state of another run: {was}")
        return state

    def record_id(self, line: int) -> bytes:
        return hashlib.sha256(bytes.fromhex(self.salt) + line.to_bytes(8, "big")).digest()[:wire.RECORD_ID_SIZE]

    def save(self) -> None:
        """Write the state atomically (a crash leaves the old file or the new one, never half)."""
        doc = {"version": VERSION, "run": self.run, "lines_done": self.lines_done,
               "prefix_sha256": self.prefix_sha256, "confirmed": self.confirmed, "salt": self.salt}
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            # The rename itself survives a power cut only once its directory is on disk.
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            raise ResumeError(f"cannot write the resume file {self.path}: {err.strerror}") from None


class TrackedInput:
    """The input's lines as read, hashed up to where the run got (:meth:`advance`), with the
    bytes read so far for progress. With ``skip_through`` > 0 (a rerun) the hash of those
    first lines is checked against ``expected`` as soon as they are read. With ``hashing``
    off it only counts (a run without a state file keeps no lines).

    :raises ResumeError: (while iterating) those lines are not the ones the state covers.
    """

    def __init__(self, lines: Iterable[str], skip_through: int = 0, expected: str | None = None,
                 *, hashing: bool = True) -> None:
        self._lines = lines
        self.hashing = hashing
        self.skip_through, self._expected = skip_through, expected
        self._hash = hashlib.sha256()
        self.hashed_through = 0
        self._unhashed: deque[tuple[int, bytes]] = deque()
        self.lines_read = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for number, line in enumerate(self._lines, start=1):
            raw = line.encode("utf-8", "surrogateescape")
            self.lines_read, self.bytes_read = number, self.bytes_read + len(raw)
            if number <= self.skip_through:
                self._hash.update(raw)
                self.hashed_through = number
                if number == self.skip_through:
                    self._check()
            elif self.hashing:
                self._unhashed.append((number, raw))
            yield line
        if self.lines_read < self.skip_through:
            raise ResumeError(f"the input has {self.lines_read} lines, and the resume file says "
                              f"{self.skip_through} of them were sent: not the input of the interrupted run")

    def _check(self) -> None:
        if self._expected is not None and self._hash.hexdigest() != self._expected:
            raise ResumeError(f"the first {self.skip_through} lines of the input are not those the resume "
                              "file says were sent: the input changed since the interrupted run")

    def advance(self, through: int) -> str:
        """Hash the lines up to ``through``; return the hash of lines 1..``through``."""
        while self._unhashed and self._unhashed[0][0] <= through:
            number, raw = self._unhashed.popleft()
            self._hash.update(raw)
            self.hashed_through = number
        return self._hash.hexdigest()
