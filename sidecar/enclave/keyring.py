"""The enclave's keys: X25519 (sealed-box records), Paillier (aggregation), Ed25519 (results).

Private keys live in this object only. At rest they exist solely as a sealed blob:
AES-256-GCM under the measurement-bound sealing key, with the measurement as
associated data, so other code or another policy cannot open it.
"""

from __future__ import annotations

import base64
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.public import PrivateKey, SealedBox
from phe import paillier

from common import signing, wire
from sidecar.enclave import sealing

SEALED_AAD = b"sealedsum/v1/sealed-keys\x00"


class EnclaveKeys:
    """One key epoch's key set. ``repr`` shows public parts only."""

    def __init__(self, epoch: int, x25519: PrivateKey, ed25519: Ed25519PrivateKey,
                 paillier_private: paillier.PaillierPrivateKey) -> None:
        self.epoch = epoch
        self._x25519 = x25519
        self._box = SealedBox(x25519)
        self._ed25519 = ed25519
        self._paillier = paillier_private
        self.paillier_public = paillier_private.public_key
        self.bundle = wire.KeyBundle(
            epoch, bytes(x25519.public_key), ed25519.public_key().public_bytes_raw(), self.paillier_public.n
        )
        self.bundle_bytes = self.bundle.to_bytes()
        self.nsquare = self.paillier_public.nsquare
        self.ciphertext_width = self.bundle.ciphertext_width
        self.decryptions = 0

    def __repr__(self) -> str:
        return f"EnclaveKeys(epoch={self.epoch}, paillier_bits={self.paillier_public.n.bit_length()})"

    @classmethod
    def generate(cls, paillier_bits: int, epoch: int = 1) -> "EnclaveKeys":
        pub, priv = paillier.generate_paillier_keypair(n_length=paillier_bits)
        return cls(epoch, PrivateKey.generate(), Ed25519PrivateKey.generate(), priv)

    # -- operations ---------------------------------------------------------------
    def open_sealed_box(self, body: bytes) -> bytes:
        """Open a sealed box addressed to this epoch's X25519 key (raises nacl's CryptoError)."""
        return self._box.decrypt(body)

    def sign(self, label: str, message: bytes) -> bytes:
        return signing.sign(self._ed25519, label, message)

    def decrypt_total(self, ciphertext: int) -> int:
        """Decrypt one folded total to a signed integer in (-n/2, n/2].

        Only ever called on window totals (see ``release``), never on a single record.
        """
        self.decryptions += 1
        plain = self._paillier.raw_decrypt(ciphertext)
        n = self.paillier_public.n
        return plain - n if plain > n // 2 else plain

    # -- sealing --------------------------------------------------------------------
    def seal(self, sealing_key: bytes, measurement: bytes) -> bytes:
        doc = {
            "epoch": self.epoch,
            "x25519": base64.b64encode(bytes(self._x25519)).decode(),
            "ed25519": base64.b64encode(self._ed25519.private_bytes_raw()).decode(),
            "paillier_p": str(self._paillier.p),
            "paillier_q": str(self._paillier.q),
        }
        return sealing.seal(sealing_key, measurement, json.dumps(doc).encode(), SEALED_AAD)

    @classmethod
    def unseal(cls, sealing_key: bytes, measurement: bytes, blob: bytes) -> "EnclaveKeys":
        doc = json.loads(sealing.unseal(sealing_key, measurement, blob, SEALED_AAD))
        p, q = int(doc["paillier_p"]), int(doc["paillier_q"])
        public = paillier.PaillierPublicKey(p * q)
        return cls(
            int(doc["epoch"]),
            PrivateKey(base64.b64decode(doc["x25519"])),
            Ed25519PrivateKey.from_private_bytes(base64.b64decode(doc["ed25519"])),
            paillier.PaillierPrivateKey(public, p, q),
        )
