"""Paillier encryption on the producer side, behind one small interface.

:class:`Encryptor` turns an integer plaintext into a ciphertext under the enclave's
key. Faster implementations (precomputed randomness, packing several values into one
plaintext) plug in here without changing how records are built.
"""

from __future__ import annotations

from phe import PaillierPublicKey


class Encryptor:
    """phe's encryption: a fresh random r in Z_n* and a full r^n mod n² per ciphertext."""

    def __init__(self, public_key: PaillierPublicKey) -> None:
        self.public_key = public_key

    def encrypt(self, plaintext: int) -> int:
        """The ciphertext of ``plaintext`` (negative values are taken mod n)."""
        # encrypt() draws fresh randomness and obfuscates; be_secure=False avoids paying twice.
        return self.public_key.encrypt(plaintext).ciphertext(be_secure=False)

    def close(self) -> None:
        """Stop any background work (none here)."""
