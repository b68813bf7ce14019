"""Paillier encryption on the producer side, behind one small interface.

An :class:`~sealedsum.producers.encryption.encryptors.Encryptor` turns an integer plaintext
into a ciphertext under the enclave's key (``encrypt(int) -> int``, ``close()``).
:func:`encryptor_from_env` makes the one the producer uses: a ``FastEncryptor`` unless
``SEALEDSUM_ENCRYPTOR=phe`` asks for ``PheEncryptor``, phe's own path, kept for comparison
(the benchmarks measure both), with ``SEALEDSUM_ENCRYPT_WORKERS`` helper processes.

Both produce standard Paillier ciphertexts with ``g = n + 1``,
``c = (1 + m·n) · r^n mod n²`` for some ``r`` in Z_n*, which the enclave (phe's
``raw_decrypt``) decrypts alike. They differ in how ``r^n`` is drawn:

- **phe**: a fresh uniform ``r`` in Z_n* and one full exponentiation ``r^n mod n²`` per
  ciphertext (about 10 ms at 2048 bits with gmpy2, 30 ms at 3072).
- **fast** (Damgård, Jurik and Nielsen's encryption): ``hs^a`` for a fixed base ``hs`` per key
  and a fresh short exponent ``a`` per ciphertext, by table lookups; ``randomizers.py`` says
  how, and what that assumes beyond phe's DCR.

The modules, by job: ``encryptors.py`` (the interface and the two implementations),
``randomizers.py`` (the DJN base, exponent sizes and the fixed-base comb), ``pool.py`` (helper
processes precomputing randomizers), ``arithmetic.py`` (gmpy2 or Python ints).
"""

from __future__ import annotations

import os

from phe import PaillierPublicKey

from sealedsum.producers.encryption.encryptors import Encryptor, FastEncryptor, PheEncryptor

ENV_ENCRYPTOR = "SEALEDSUM_ENCRYPTOR"  # "fast" (default) or "phe"
ENV_WORKERS = "SEALEDSUM_ENCRYPT_WORKERS"  # helper processes of the fast encryptor (default 0)


def encryptor_from_env(public_key: PaillierPublicKey) -> Encryptor:
    """The producer's encryptor for ``public_key``, as ``$SEALEDSUM_ENCRYPTOR`` (``fast``, the
    default, or ``phe``) and, for the fast one, ``$SEALEDSUM_ENCRYPT_WORKERS`` (default 0) say.

    :raises ValueError: either variable holds something else.
    """
    choice = os.environ.get(ENV_ENCRYPTOR, "fast").strip().lower()
    if choice not in ("fast", "phe"):
        raise ValueError(f"{ENV_ENCRYPTOR} must be 'fast' or 'phe', not {choice!r}")
    if choice == "phe":
        return PheEncryptor(public_key)
    try:
        workers = int(os.environ.get(ENV_WORKERS, "0") or 0)
    except ValueError:
        raise ValueError(f"{ENV_WORKERS} must be an integer") from None
    return FastEncryptor(public_key, workers=workers)
