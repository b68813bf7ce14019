"""The enclave's keys: X25519 (sealed-box records), Paillier (aggregation), Ed25519 (results).

Private keys live in this object only. At rest they exist solely as a sealed blob:
AES-256-GCM under the measurement-bound sealing key, with the measurement as
associated data, so other code or another policy cannot open it.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import gmpy2

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.public import PrivateKey, SealedBox
from phe import paillier

from sealedsum.common import signing, wire
from sealedsum.sidecar.enclave import sealing

SEALED_AAD = b"sealedsum/v1/sealed-keys\x00"
CLUSTER_KEY_INFO = b"sealedsum/v1/cluster-key"

_crt_pool: ThreadPoolExecutor | None = None


def _crt_worker() -> ThreadPoolExecutor:
    """One helper thread for the second half of every decryption (made on first use)."""
    global _crt_pool
    if _crt_pool is None:
        _crt_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crt",
                                       initializer=lambda: setattr(gmpy2.get_context(), "allow_release_gil", True))
    return _crt_pool


def _decrypt_half(c, x, xsquare, h):
    """m mod x, for a prime factor x of n: L_x(c^(x-1) mod x²) · h_x mod x (phe's raw_decrypt)."""
    return (gmpy2.powmod(c, x - 1, xsquare) - 1) // x * h % x


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
        # n's prime factors, for the per-record unit check: two small remainders cost a
        # third of gcd(c, n) (this is on every record's path).
        self._factors = (gmpy2.mpz(paillier_private.p), gmpy2.mpz(paillier_private.q))
        # Decryption by CRT, one half modulo p², the other modulo q² (as phe does), the two
        # halves on two threads: each half is one long gmpy2 powmod that releases the GIL.
        self._halves = tuple(
            (x, x * x, gmpy2.mpz(h)) for x, h in zip(self._factors, (paillier_private.hp, paillier_private.hq)))
        self._p_inverse = gmpy2.mpz(paillier_private.p_inverse)
        self.ciphertext_width = self.bundle.ciphertext_width
        self.decryptions = 0
        self.checks = 0

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

    def is_ciphertext(self, c: int) -> bool:
        """Whether ``c`` is a Paillier ciphertext of this key: a unit modulo n².

        c is a unit modulo n² exactly when neither prime factor of n divides it.
        """
        p, q = self._factors
        return 0 < c < self.nsquare and bool(c % p) and bool(c % q)

    def sign(self, label: str, message: bytes) -> bytes:
        return signing.sign(self._ed25519, label, message)

    def decrypt_total(self, ciphertext: int) -> int:
        """Decrypt one folded total to a signed integer in (-n/2, n/2].

        Only ever called on window totals (see ``release``), never on a single record.
        """
        self.decryptions += 1
        plain = self._decrypt(ciphertext)
        n = self.paillier_public.n
        return plain - n if plain > n // 2 else plain

    def decrypt_product(self, ciphertext: int) -> int:
        """Decrypt the product of a batch's ciphertexts, in [0, n), to check it against the
        plaintexts the records state (``validity.mismatched``). Counted in ``checks``, apart
        from window totals: no single record is decrypted this way unless it lied."""
        self.checks += 1
        return self._decrypt(ciphertext)

    def _decrypt(self, ciphertext: int) -> int:
        c = gmpy2.mpz(ciphertext)
        (p, _, _), (q, _, _) = self._halves
        later = _crt_worker().submit(_decrypt_half, c, *self._halves[1])
        with gmpy2.context(gmpy2.get_context(), allow_release_gil=True):
            mp = _decrypt_half(c, *self._halves[0])
        mq = later.result()
        return int(mp + ((mq - mp) * self._p_inverse % q) * p)

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
        """The current epoch's keys from a sealed key file (see :class:`Keyring`)."""
        return cls.from_doc(json.loads(sealing.unseal(sealing_key, measurement, blob, SEALED_AAD)))

    @classmethod
    def from_doc(cls, doc: dict) -> "EnclaveKeys":
        p, q = int(doc["paillier_p"]), int(doc["paillier_q"])
        public = paillier.PaillierPublicKey(p * q)
        return cls(
            int(doc["epoch"]),
            PrivateKey(base64.b64decode(doc["x25519"])),
            Ed25519PrivateKey.from_private_bytes(base64.b64decode(doc["ed25519"])),
            paillier.PaillierPrivateKey(public, p, q),
        )


class Keyring:
    """The enclave's key epochs.

    Rotation replaces the encryption keys (X25519 for sealed boxes, Paillier for
    aggregation); the Ed25519 result-signing key stays for the life of the measurement,
    so consumers keep verifying across rotations. After a rotation the previous epoch
    *drains*: its records are still accepted for ``grace`` milliseconds, folded under
    its own Paillier key, then it is *retired*: its records are refused with a reason
    that tells the producer to attest again. Retired epochs keep only what recognising
    them needs, and only the newest few.
    """

    KEEP_RETIRED = 3

    def __init__(self, epochs: dict[int, EnclaveKeys], current: int,
                 retire_at: dict[int, int] | None = None, retired: set[int] | None = None,
                 rotated_at_ms: int = 0) -> None:
        self.epochs = epochs
        self.current_epoch = current
        self.retire_at = dict(retire_at or {})
        self.retired = set(retired or ())
        self.rotated_at_ms = rotated_at_ms  # when the current epoch began (0: unknown)

    @classmethod
    def single(cls, keys: EnclaveKeys) -> "Keyring":
        return cls({keys.epoch: keys}, keys.epoch)

    @property
    def current(self) -> EnclaveKeys:
        return self.epochs[self.current_epoch]

    def newest_first(self) -> list[EnclaveKeys]:
        return [self.epochs[e] for e in sorted(self.epochs, reverse=True)]

    def status(self, epoch: int) -> str:
        if epoch == self.current_epoch:
            return "current"
        if epoch in self.retired:
            return "retired"
        return "draining" if epoch in self.epochs else "unknown"

    @property
    def decryptions(self) -> int:
        return sum(k.decryptions for k in self.epochs.values())

    @property
    def checks(self) -> int:
        """Decryptions of batch products checking records against their stated plaintexts."""
        return sum(k.checks for k in self.epochs.values())

    def rotate(self, paillier_bits: int, now_ms: int, grace_ms: int) -> EnclaveKeys:
        """Make a new current epoch; the old one drains until ``now + grace``."""
        old = self.current
        _, priv = paillier.generate_paillier_keypair(n_length=paillier_bits)
        new = EnclaveKeys(old.epoch + 1, PrivateKey.generate(), old._ed25519, priv)
        self.epochs[new.epoch] = new
        self.retire_at[old.epoch] = now_ms + grace_ms
        self.current_epoch = new.epoch
        self.rotated_at_ms = now_ms
        return new

    def retire_due(self, now_ms: int, in_use: set[int]) -> bool:
        """Retire draining epochs past their grace; forget the oldest retired ones that no
        open window still holds totals under. Returns whether anything changed."""
        changed = False
        for epoch, at in list(self.retire_at.items()):
            if now_ms >= at:
                del self.retire_at[epoch]
                self.retired.add(epoch)
                changed = True
        for epoch in sorted(self.retired)[:-self.KEEP_RETIRED]:
            if epoch not in in_use:
                self.retired.discard(epoch)
                self.epochs.pop(epoch, None)
                changed = True
        return changed

    # -- sealing -----------------------------------------------------------------------
    def seal(self, sealing_key: bytes, measurement: bytes) -> bytes:
        """The current epoch at the top level (as :meth:`EnclaveKeys.seal` writes it), the
        others under ``older``."""
        return sealing.seal(sealing_key, measurement, self.export(), SEALED_AAD)

    def export(self) -> bytes:
        """The keyring in the clear (what :meth:`seal` seals): only ever sealed, or handed to
        an attested replica inside a sealed box (``sealedsum.sidecar.cluster.join``)."""
        current = json.loads(self._doc(self.current))
        current["older"] = [json.loads(self._doc(k)) for e, k in sorted(self.epochs.items()) if e != self.current_epoch]
        current["retire_at"] = {str(e): t for e, t in self.retire_at.items()}
        current["retired"] = sorted(self.retired)
        current["rotated_at_ms"] = self.rotated_at_ms
        return json.dumps(current).encode()

    def cluster_key(self) -> bytes:
        """The key replicas of one deployment authenticate and encrypt what they send one another
        with: derived from the result-signing key, which every epoch shares and only holders of
        the keyring know."""
        seed = self.current._ed25519.private_bytes_raw()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CLUSTER_KEY_INFO).derive(seed)

    @staticmethod
    def _doc(keys: EnclaveKeys) -> str:
        return json.dumps({
            "epoch": keys.epoch,
            "x25519": base64.b64encode(bytes(keys._x25519)).decode(),
            "ed25519": base64.b64encode(keys._ed25519.private_bytes_raw()).decode(),
            "paillier_p": str(keys._paillier.p),
            "paillier_q": str(keys._paillier.q),
        })

    @classmethod
    def unseal(cls, sealing_key: bytes, measurement: bytes, blob: bytes) -> "Keyring":
        return cls.imported(sealing.unseal(sealing_key, measurement, blob, SEALED_AAD))

    @classmethod
    def imported(cls, data: bytes) -> "Keyring":
        """The keyring :meth:`export` wrote."""
        doc = json.loads(data)
        epochs = {}
        for raw in [doc, *doc.get("older", [])]:
            keys = EnclaveKeys.from_doc(raw)
            epochs[keys.epoch] = keys
        return cls(epochs, int(doc["epoch"]), {int(e): int(t) for e, t in doc.get("retire_at", {}).items()},
                   set(doc.get("retired", [])), int(doc.get("rotated_at_ms", 0)))
