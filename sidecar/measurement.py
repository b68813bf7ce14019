"""The measurement: what the platform vouches for.

The code measured is exactly what the enclave process runs: the import closure of its
entry point (:data:`ENCLAVE_ENTRY`) within the ``sealedsum`` package, found statically
(every ``import`` in a measured module, inside functions too, and every parent package of
a measured module). Command-line code, the demos and the platform's own code are outside
it, so editing a ``--help`` text does not change the measurement; the enclave process
checks at start that it has loaded nothing outside it.

code digest = SHA-256 over ``sealedsum/v1/code\\0``, then for every measured module in
sorted order of its dotted name: u32 name length, name (ASCII), u64 content length, the
source file's bytes; then the runtime line (Python version and the versions of the
third-party packages the enclave loads). The measurement binds the code digest to the
policy bytes (:func:`sealedsum.common.wire.measurement`).

Only module names and file contents count (no paths, timestamps or bytecode), so an
editable install and a wheel of the same code measure alike, and ``sealedsum measure`` is
reproducible from a checkout.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import struct
import sys
from pathlib import Path
from typing import Callable, Mapping

from sealedsum.common import wire

CODE_LABEL = b"sealedsum/v1/code\x00"
ENCLAVE_ENTRY = "sealedsum.sidecar.enclave_process.__main__"
ROOT_PACKAGE = "sealedsum"
RUNTIME_DISTRIBUTIONS = ("cryptography", "gmpy2", "numpy", "opendp", "phe", "pika", "PyNaCl")


def _source(name: str) -> Path | None:
    """The source file of module ``name``, or None if there is no such module. Only packages
    are imported to find out (``find_spec`` imports the parent), never a measured module."""
    parent = name.rpartition(".")[0]
    if parent:
        above = _source(parent)
        if above is None or above.name != "__init__.py":
            return None  # ``m.attribute``: m is a module, not a package
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, AttributeError, ValueError):  # ``a.b`` where ``a`` is a module, not a package
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _imported(tree: ast.Module, package: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``tree`` may name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_closure(entry: str = ENCLAVE_ENTRY, root: str = ROOT_PACKAGE) -> dict[str, Path]:
    """The modules of package ``root`` that running ``entry`` can import, by name."""
    found: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _source(name)
        if path is None:
            raise ValueError(f"measured module {name} has no source file")
        found[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if "." in name:
            todo.append(name.rpartition(".")[0])  # importing a module runs its packages first
        for imported in _imported(ast.parse(path.read_bytes(), str(path)), package):
            if imported == root or imported.startswith(root + "."):
                candidate = imported
                while candidate not in found and _source(candidate) is None:
                    candidate = candidate.rpartition(".")[0]  # ``from m import attribute``
                todo.append(candidate)
    return found


def digest_of(modules: Mapping[str, bytes], runtime: str) -> bytes:
    """The code digest of these module sources (name -> bytes) and runtime line."""
    h = hashlib.sha256(CODE_LABEL)
    for name in sorted(modules):
        raw, content = name.encode("ascii"), modules[name]
        h.update(struct.pack(">I", len(raw)) + raw + struct.pack(">Q", len(content)) + content)
    h.update(runtime.encode("ascii"))
    return h.digest()


def runtime_line() -> str:
    parts = [f"python={sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"]
    for dist in RUNTIME_DISTRIBUTIONS:
        try:
            parts.append(f"{dist.lower()}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist.lower()}=absent")
    return ";".join(parts)


def code_digest(read: Callable[[Path], bytes] = Path.read_bytes) -> bytes:
    """The code digest of the installed enclave code, as the platform measures it."""
    return digest_of({name: read(path) for name, path in import_closure().items()}, runtime_line())


def unmeasured_modules(loaded: list[str]) -> list[str]:
    """Which of these loaded module names are in the ``sealedsum`` package but not measured."""
    measured = import_closure()
    return sorted(m for m in loaded if (m == ROOT_PACKAGE or m.startswith(ROOT_PACKAGE + ".")) and m not in measured)


def measure(policy_bytes: bytes) -> tuple[bytes, bytes]:
    """Return ``(code_digest, measurement)`` for this code and the given policy."""
    digest = code_digest()
    return digest, wire.measurement(digest, policy_bytes)
