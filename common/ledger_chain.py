"""The privacy budget ledger's hash chain (docs/protocol.md section 15.4), defined once.

The enclave extends it with every release (``sealedsum.sidecar.enclave.ledger``); consumers recompute
it from the releases they hold (``sealedsum.consumers.chain_audit``) to see that none is missing.

    head_0 = SHA-256(LABEL || stream)
    head_n = SHA-256(LABEL || head_(n-1) || charge_n)

where ``charge_n`` is the canonical JSON of the n-th release's charge (:func:`charge_bytes`).
"""

from __future__ import annotations

import hashlib
import json

LEDGER_LABEL = b"sealedsum/v1/ledger\x00"


def genesis(stream: str) -> bytes:
    """``head_0`` of a stream's chain."""
    return hashlib.sha256(LEDGER_LABEL + stream.encode("ascii")).digest()


def charge_bytes(stream: str, window: int, seq: int, mechanism: str, epsilon: float, delta: float,
                 rho: float | None) -> bytes:
    """The canonical description of one release's charge, as hashed into the chain: the
    release's stream, window, sequence number (``budget.releases``), mechanism, ε, δ and ρ."""
    return json.dumps({
        "stream": stream, "window": window, "seq": seq, "mechanism": mechanism,
        "epsilon": epsilon, "delta": delta, "rho": rho,
    }, sort_keys=True, separators=(",", ":")).encode("ascii")


def next_head(head: bytes, charge: bytes) -> bytes:
    """``head_n`` from ``head_(n-1)`` and ``charge_n``."""
    return hashlib.sha256(LEDGER_LABEL + head + charge).digest()
