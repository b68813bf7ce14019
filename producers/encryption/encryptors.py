"""The two ways to encrypt a plaintext under the enclave's Paillier key, behind one interface
(:class:`Encryptor`): phe's own (:class:`PheEncryptor`) and the fast DJN path
(:class:`FastEncryptor`). The package docstring (``producers/encryption/__init__.py``) compares
them; ``encryptor_from_env`` there picks one.
"""

from __future__ import annotations

import abc
import operator
import threading

from phe import PaillierPublicKey

from sealedsum.producers.encryption.arithmetic import log_backend_once, mpz
from sealedsum.producers.encryption.pool import DEFAULT_CAPACITY, RandomizerPool
from sealedsum.producers.encryption.randomizers import (DEFAULT_COMB_WINDOW, FixedBase, default_exponent_bits,
                                                        fixed_base)


class Encryptor(abc.ABC):
    """Encrypts integer plaintexts under one Paillier public key.

    Use ``close()`` (or ``with``) to stop any background work.
    """

    def __init__(self, public_key: PaillierPublicKey) -> None:
        self.public_key = public_key
        log_backend_once()

    @abc.abstractmethod
    def encrypt(self, plaintext: int) -> int:
        """The ciphertext of ``plaintext`` (negative values are taken mod n)."""

    def close(self) -> None:
        """Stop any background work."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PheEncryptor(Encryptor):
    """phe's encryption: a fresh random r in Z_n* and a full r^n mod n² per ciphertext."""

    def encrypt(self, plaintext: int) -> int:
        # encrypt() draws fresh randomness and obfuscates; be_secure=False avoids paying twice.
        return self.public_key.encrypt(plaintext).ciphertext(be_secure=False)


class FastEncryptor(Encryptor):
    """DJN encryption with fixed-base precomputation, optionally fed by helper processes.

    :param exponent_bits: bits of each randomizer's exponent (default 2κ: 256 up to 3072-bit
        keys, 384 above; see ``producers/encryption/randomizers.py`` for what that assumes).
    :param window: comb window in bits (memory ``ceil(bits/w) · 2^w`` numbers mod n²).
    :param workers: helper processes precomputing randomizers (default 0: none; see
        ``producers/encryption/pool.py``).
    :param capacity: randomizers the helpers may have waiting, in all.
    """

    def __init__(self, public_key: PaillierPublicKey, *, exponent_bits: int | None = None,
                 window: int = DEFAULT_COMB_WINDOW, workers: int = 0,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(public_key)
        self.n = public_key.n
        if exponent_bits is None:
            exponent_bits = default_exponent_bits(self.n.bit_length())
        self._n = mpz(self.n)
        self._nsq = self._n * self._n
        self.exponent_bits, self.window = exponent_bits, window
        self._base: FixedBase | None = None  # built on first use
        self._lock = threading.Lock()
        self.pool: RandomizerPool | None = None
        if workers > 0:
            self.pool = RandomizerPool(self.n, self._comb().hs, exponent_bits, window,
                                       workers=workers, capacity=capacity)
        self.stats = {"pooled": 0, "local": 0}

    def _comb(self) -> FixedBase:
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._base = fixed_base(self.n, self.exponent_bits, self.window)
        return self._base

    def randomizer(self):
        """A fresh randomizer ``hs^a mod n²``: from the pool when one is ready, else computed here."""
        if self.pool is not None:
            r = self.pool.take()
            if r is not None:
                self.stats["pooled"] += 1
                return r
        self.stats["local"] += 1
        return self._comb().random_factor()

    def encrypt(self, plaintext: int) -> int:
        """``(1 + m·n) · hs^a mod n²`` with ``m = plaintext mod n``.

        :raises ValueError: ``|plaintext| >= n`` (it would wrap silently).
        """
        m = operator.index(plaintext)
        n = self.n
        if not -n < m < n:
            raise ValueError("plaintext out of range: |m| must be below the Paillier modulus n")
        m %= n
        return int((m * self._n + 1) * self.randomizer() % self._nsq)

    def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
