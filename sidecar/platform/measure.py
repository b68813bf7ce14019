"""The measurement: what the platform vouches for.

code digest = SHA-256 over ``sealedsum/v1/code\\0``, then for every ``.py`` file of the
``common`` and ``sidecar`` packages in sorted path order: u32 path length, path
(POSIX, relative to the package root's parent), u64 content length, content; then
the runtime line (Python version and the versions of the third-party packages the
enclave loads). The measurement binds the code digest to the policy bytes
(:func:`sealedsum.common.wire.measurement`).

Only file contents count (no timestamps, no bytecode), so ``sealedsum measure`` is
reproducible from a checkout.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import struct
import sys
from pathlib import Path

import sealedsum.common
import sealedsum.sidecar
from sealedsum.common import wire

CODE_LABEL = b"sealedsum/v1/code\x00"
MEASURED_PACKAGES = (sealedsum.common, sealedsum.sidecar)
RUNTIME_DISTRIBUTIONS = ("cryptography", "gmpy2", "numpy", "opendp", "phe", "pika", "PyNaCl")


def measured_files() -> list[tuple[str, Path]]:
    files = []
    for package in MEASURED_PACKAGES:
        root = Path(package.__file__).resolve().parent
        for path in root.rglob("*.py"):
            files.append((path.relative_to(root.parent).as_posix(), path))
    return sorted(files)


def runtime_line() -> str:
    parts = [f"python={sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"]
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            parts.append(f"{dist.lower()}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist.lower()}=absent")
    return ";".join(parts)


def code_digest() -> bytes:
    h = hashlib.sha256(CODE_LABEL)
    for rel, path in measured_files():
        name, content = rel.encode("utf-8"), path.read_bytes()
        h.update(struct.pack(">I", len(name)) + name + struct.pack(">Q", len(content)) + content)
    h.update(runtime_line().encode("ascii"))
    return h.digest()


def measure(policy_bytes: bytes) -> tuple[bytes, bytes]:
    """Return ``(code_digest, measurement)`` for this code and the given policy."""
    digest = code_digest()
    return digest, wire.measurement(digest, policy_bytes)
