"""What checking one record's plaintexts inside the enclave would cost (issue 10), per
ciphertext, for the two ways of learning them:

- **decrypt**: the enclave decrypts each record's ciphertexts with its private key, by CRT
  (the two halves one after the other, and on two threads, as ``EnclaveKeys.decrypt_total``);
- **open**: the producer puts each ciphertext's opening (the plaintext ``m`` and the DJN
  randomizer exponent ``a``) inside the sealed box, and the enclave recomputes
  ``(1 + m·n) · hs^a mod n²`` with fixed-base tables of a base ``hs`` it publishes per key
  epoch, and compares it with the ciphertext;
- **batch** (what was built, ``sealedsum.sidecar.enclave.validity.mismatched``): the producer
  states each ciphertext's plaintext inside the sealed box, and the enclave checks a whole
  batch at once: the product of its ciphertexts must decrypt to the sum of the stated
  plaintexts. One decryption per batch and ciphertext slot, one multiplication per record;
  timed per record for batches of 1, 16, 64 and 256 honest records.

Run from the repository root: ``.venv/bin/python -m benchmarks.validation [--bits 2048,3072]``.
Prints milliseconds per ciphertext and the records per second one core could check for
1-value records; benchmarks/README.md records a run.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import gmpy2
from phe import paillier

from sealedsum.producers.encryption.randomizers import DEFAULT_COMB_WINDOW, FixedBase, default_exponent_bits, djn_base


def _per_call(fn, items) -> float:
    started = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - started) / len(items)


def measure(bits: int, samples: int = 200) -> dict:
    pub, priv = paillier.generate_paillier_keypair(n_length=bits)
    n, nsq = gmpy2.mpz(pub.n), gmpy2.mpz(pub.nsquare)
    exponent_bits = default_exponent_bits(bits)
    base = FixedBase(pub.n, djn_base(pub.n), exponent_bits, DEFAULT_COMB_WINDOW)
    openings = [(secrets.randbelow(1 << 40), secrets.randbits(exponent_bits)) for _ in range(samples)]
    cts = [(m, a, (m * n + 1) * base.power(a) % nsq) for m, a in openings]

    p, q = gmpy2.mpz(priv.p), gmpy2.mpz(priv.q)
    halves = [(x, x * x, gmpy2.mpz(h)) for x, h in ((p, priv.hp), (q, priv.hq))]
    p_inv = gmpy2.mpz(priv.p_inverse)

    def half(c, x, xsq, h):
        return (gmpy2.powmod(c, x - 1, xsq) - 1) // x * h % x

    def decrypt(item) -> None:
        m, _, c = item
        mp, mq = half(c, *halves[0]), half(c, *halves[1])
        if mp + ((mq - mp) * p_inv % q) * p != m:
            raise AssertionError("decryption is wrong")

    pool = ThreadPoolExecutor(max_workers=1, initializer=lambda: setattr(gmpy2.get_context(), "allow_release_gil", True))

    def decrypt_two_threads(item) -> None:
        m, _, c = item
        later = pool.submit(half, c, *halves[1])
        with gmpy2.context(gmpy2.get_context(), allow_release_gil=True):
            mp = half(c, *halves[0])
        if mp + ((later.result() - mp) * p_inv % q) * p != m:
            raise AssertionError("decryption is wrong")

    def check_opening(item) -> None:
        m, a, c = item
        if (m * n + 1) * base.power(a) % nsq != c:
            raise AssertionError("the opening does not match")

    try:
        out = {
            "bits": bits,
            "exponent_bits": exponent_bits,
            "decrypt_ms": 1e3 * _per_call(decrypt, cts[: max(20, samples // 4)]),
            "decrypt_two_threads_ms": 1e3 * _per_call(decrypt_two_threads, cts[: max(20, samples // 4)]),
            "open_ms": 1e3 * _per_call(check_opening, cts),
        }
    finally:
        pool.shutdown()
    out.update(batch_check_ms(pub, priv, cts))
    out["open_speedup"] = out["decrypt_ms"] / out["open_ms"]
    out["records_per_s_one_core"] = {k[:-3]: round(1e3 / out[k]) for k in ("decrypt_ms", "open_ms")}
    return out


def batch_check_ms(pub, priv, cts) -> dict:
    """Milliseconds per record of the batch check, by batch size, with the enclave's own keys."""
    from nacl.public import PrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sealedsum.sidecar.enclave.keyring import EnclaveKeys
    from sealedsum.sidecar.enclave.validity import Member, mismatched

    keys = EnclaveKeys(1, PrivateKey.generate(), Ed25519PrivateKey.generate(), priv)
    members = [Member((c,), (m,), secrets.token_bytes(16)) for m, _, c in cts]
    out = {}
    for size in (1, 16, 64, 256):
        batches = [members[i:i + size] for i in range(0, len(members) - size + 1, size)] or [members[:size]]
        batches = (batches * (1 + 64 // len(batches)))[:max(4, 256 // size)]
        started = time.perf_counter()
        for batch in batches:
            if mismatched(batch, pub.n, pub.nsquare, keys.decrypt_product):
                raise AssertionError("an honest batch failed its check")
        out[f"batch{size}_ms"] = 1e3 * (time.perf_counter() - started) / sum(len(b) for b in batches)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.validation", description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="2048,3072", help="Paillier key sizes, comma-separated")
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args(argv)
    for bits in (int(b) for b in args.bits.split(",")):
        r = measure(bits, args.samples)
        print(f"{bits}-bit n: decrypt {r['decrypt_ms']:.3f} ms ({r['decrypt_two_threads_ms']:.3f} ms on two "
              f"threads), open {r['open_ms']:.3f} ms per ciphertext: opening is {r['open_speedup']:.1f}x cheaper; "
              "batch check per record: " + ", ".join(f"{r[f'batch{k}_ms']:.3f} ms in batches of {k}"
                                                     for k in (1, 16, 64, 256)))
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
