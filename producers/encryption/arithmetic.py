"""The big-number arithmetic under the producer's Paillier encryption: gmpy2 when it imports.

Both encryption paths need gmpy2 to be fast (phe uses it when it imports; the fast path's comb
uses ``gmpy2.mpz`` directly, else falls back to Python ints). :func:`arithmetic_backend` says
which is in use; the first encryptor of a process logs it once (a warning without gmpy2).
"""

from __future__ import annotations

import logging

import phe.util

try:  # the fast path's big-number type; phe makes the same choice for its own arithmetic
    import gmpy2

    mpz = gmpy2.mpz
    HAVE_GMPY2 = True
except ImportError:  # pragma: no cover - exercised by the benchmarks' "without gmpy2" run
    gmpy2 = None
    mpz = int
    HAVE_GMPY2 = False

log = logging.getLogger("sealedsum.producer")


def powmod(base: int, exponent: int, modulus: int) -> int:
    """``base^exponent mod modulus``, on gmpy2 when it is there."""
    if HAVE_GMPY2:
        return int(gmpy2.powmod(base, exponent, modulus))
    return pow(base, exponent, modulus)


def arithmetic_backend() -> dict:
    """Which big-number arithmetic is in use: ``{"gmpy2": bool, "phe_gmpy2": bool, "version": str}``."""
    return {"gmpy2": HAVE_GMPY2, "phe_gmpy2": bool(phe.util.HAVE_GMP),
            "version": gmpy2.version() if HAVE_GMPY2 else None}


_logged_backend = False


def log_backend_once() -> None:
    """Log, once per process, whether Paillier arithmetic runs on gmpy2."""
    global _logged_backend
    if _logged_backend:
        return
    _logged_backend = True
    backend = arithmetic_backend()
    if backend["gmpy2"] and backend["phe_gmpy2"]:
        log.info("paillier arithmetic on gmpy2", extra={"fields": {"gmpy2": backend["version"]}})
    else:
        log.warning("gmpy2 is not in use: Paillier encryption runs several times slower",
                    extra={"fields": {"fix": "pip install gmpy2", **backend}})
