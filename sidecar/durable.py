"""Durable file writes for the platform and the enclave.

A write that fails (a full disk, an I/O error) leaves the file as it was: a failed
:func:`write_atomic` removes its temporary file (freeing its space), and an append that
failed is cut back with :func:`truncate`, which needs no free space."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written, then fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync of the file and of its directory: after a crash the
    path holds either the old bytes or the new ones, never a mix."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def truncate(fd: int, length: int) -> None:
    """Cut the file back to ``length`` bytes, durably."""
    os.ftruncate(fd, length)
    os.fsync(fd)
