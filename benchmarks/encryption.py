"""Per-value Paillier encryption cost: phe's path against the fast (DJN fixed-base) one,
with and without gmpy2, at several key sizes, and the helper-process pool's steady rate.

"Without gmpy2" runs in a subprocess that blocks the import (``sys.modules["gmpy2"] = None``
before phe is imported), so phe falls back to pure Python (``phe.util.HAVE_GMP`` False)
and so does the fast path (Python ints).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(n: int, samples: int, phe_samples: int, pool_workers: int = 0) -> dict:
    """Milliseconds per value for phe and the fast path on the key ``n`` (this process's gmpy2 setting)."""
    import phe.util
    from phe import PaillierPublicKey

    from sealedsum.producers.encryption import arithmetic, encryptors, randomizers

    pk = PaillierPublicKey(n)
    out: dict = {"gmpy2": bool(phe.util.HAVE_GMP) and arithmetic.HAVE_GMPY2, "bits": n.bit_length()}
    phe_enc = encryptors.PheEncryptor(pk)
    t0 = time.perf_counter()
    for i in range(phe_samples):
        phe_enc.encrypt(i * 7919)
    out["phe_ms"] = (time.perf_counter() - t0) / phe_samples * 1000
    randomizers._BASES.clear()  # time the per-key setup too
    t0 = time.perf_counter()
    fast = encryptors.FastEncryptor(pk, workers=0)
    fast.encrypt(0)
    out["fast_setup_ms"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    for i in range(samples):
        fast.encrypt(i * 7919)
    out["fast_ms"] = (time.perf_counter() - t0) / samples * 1000
    fast.close()
    if pool_workers:
        pooled = encryptors.FastEncryptor(pk, workers=pool_workers, capacity=256)
        try:
            time.sleep(1.0)  # the helpers start and fill their pipes
            while pooled.pool.take() is not None:  # drain: measure the steady rate, not the backlog
                pass
            t0 = time.perf_counter()
            m = max(samples, 500)
            for i in range(m):
                pooled.encrypt(i * 7919)
            out["fast_pool_ms"] = (time.perf_counter() - t0) / m * 1000
            out["fast_pool_share"] = pooled.stats["pooled"] / max(1, pooled.stats["pooled"] + pooled.stats["local"])
            out["pool_workers"] = pool_workers
        finally:
            pooled.close()
    return out


def measure_without_gmpy2(n: int, samples: int, phe_samples: int, timeout: float = 600.0) -> dict:
    code = textwrap.dedent("""
        import json, sys
        sys.modules["gmpy2"] = None          # phe and producers.encryption fall back to pure Python
        import phe.util
        assert not phe.util.HAVE_GMP
        from benchmarks.encryption import measure
        args = json.loads(sys.stdin.read())
        print(json.dumps(measure(int(args["n"]), args["samples"], args["phe_samples"])))
    """)
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(
        {"n": str(n), "samples": samples, "phe_samples": phe_samples}), capture_output=True, text=True,
        cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the no-gmpy2 measurement failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["gmpy2"]:
        raise RuntimeError("the no-gmpy2 measurement still used gmpy2")
    return result


def key_of_bits(bits: int) -> int:
    from phe import paillier

    pk, _ = paillier.generate_paillier_keypair(n_length=bits)
    return pk.n
