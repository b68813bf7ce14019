"""Paillier encryption on the producer side, behind one small interface.

An :class:`Encryptor` turns an integer plaintext into a ciphertext under the enclave's
key (``encrypt(int) -> int``, ``close()``). ``Encryptor(public_key)`` picks the
implementation: :class:`FastEncryptor` unless ``SEALEDSUM_ENCRYPTOR=phe`` asks for
:class:`PheEncryptor`, phe's own path, kept for comparison (the benchmarks measure both).

Both produce standard Paillier ciphertexts with ``g = n + 1``,
``c = (1 + m·n) · r^n mod n²`` for some ``r`` in Z_n*, which the enclave (phe's
``raw_decrypt``) decrypts alike. They differ in how ``r^n`` is drawn:

- **phe**: a fresh uniform ``r`` in Z_n* and one full exponentiation ``r^n mod n²`` per
  ciphertext (about 10 ms at 2048 bits with gmpy2, 30 ms at 3072).
- **fast** (Damgård, Jurik and Nielsen's encryption): once per key, a random ``x`` in Z_n*,
  ``h = -x² mod n`` and ``hs = h^n mod n²``; per ciphertext the randomizer is
  ``hs^a = (h^a)^n mod n²`` for a fresh uniformly random exponent ``a`` of
  ``exponent_bits`` bits, so ``r = h^a mod n``. ``hs^a`` is computed by a fixed-base comb
  over precomputed tables ``hs^(d·2^(w·i))`` (digits ``d < 2^w``): ``exponent_bits / w``
  modular multiplications instead of a ~2,000-bit exponentiation. Every ciphertext gets its
  own exponent; no factor is ever reused or derived from another one.

**What the fast path assumes.** phe's randomizer ``r^n`` has ``r`` uniform in Z_n*, so its
semantic security is exactly DCR (Paillier 1999). Ours has ``r = h^a``, so it is as secure as
phe's if (1) DCR holds and (2) ``h^a``, for ``a`` of ``exponent_bits`` bits, cannot be told
from a uniform element of Z_n* by anyone who knows ``n`` and ``h`` (a subgroup plus
*short-exponent* assumption; the generic attacks on a ``b``-bit exponent, Pollard's lambda or
baby-step giant-step, take about ``2^(b/2)`` steps). This is the encryption of Damgård,
Jurik and Nielsen, "A generalization of Paillier's public-key system with applications to
electronic voting", Int. J. Inf. Secur. 9(6):371-385 (2010): ``h = -x² mod n``,
``hs = h^(n^s) mod n^(s+1)``, randomness ``hs^a``, here with ``s = 1``. The public
implementations we checked draw ``a`` with ``ceil(k/2)`` bits for a ``k``-bit ``n`` (ABY's
``djn.cpp``: ``rbits = ceil(bits/2)``; SecretFlow HEU's DJ scheme: ``r <- {0,1}^ceil(k/2)``),
which we take to be the paper's choice; we could not consult the paper's text while writing
this, so no section of it is cited. The default here, ``exponent_bits = 2·κ = 256`` for a
κ = 128-bit security target (2048- and 3072-bit ``n``), is shorter: it relies on (2) at
``2κ`` bits, the usual sizing of short exponents (twice the security parameter, so the
generic attacks cost ``2^κ``), for which we know of no reduction to a standard assumption in
this group of unknown order. Pass ``exponent_bits=(n.bit_length() + 1) // 2`` to stay with
``ceil(k/2)``: measured here, 4-7 times the cost per randomizer (0.69 ms at 2048 bits, 2.0 ms
at 3072), still 13-16 times faster than phe.

**gmpy2.** Both paths need gmpy2 to be fast (phe uses it when it imports; the comb uses
``gmpy2.mpz`` directly, else falls back to Python ints). :func:`arithmetic_backend` says
which is in use; the first encryptor of a process logs it once (a warning without gmpy2).

**Background pool.** ``FastEncryptor(pk, workers=N)`` (or ``SEALEDSUM_ENCRYPT_WORKERS=N``)
starts ``N`` helper processes that precompute randomizers into a bounded pipe each
(``capacity`` randomizers in all); ``encrypt`` takes one from a pipe when one is ready and
computes its own otherwise, so the pool only ever adds throughput. Threads do not help
(gmpy2 holds the GIL for these multiplications: two threads measured no faster than one),
hence processes. Each randomizer read from a pipe is used once and dropped; each process
draws its exponents from the OS CSPRNG (``secrets``), so no state is shared that could
repeat. ``close()`` (also at exit and on garbage collection) stops the helpers.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import secrets
import subprocess
import sys
import threading
import weakref
from collections import deque
from pathlib import Path

import phe.util
from phe import PaillierPublicKey

try:  # the fast path's big-number type; phe makes the same choice for its own arithmetic
    import gmpy2

    _mpz = gmpy2.mpz
    HAVE_GMPY2 = True
except ImportError:  # pragma: no cover - exercised by the benchmarks' "without gmpy2" run
    gmpy2 = None
    _mpz = int
    HAVE_GMPY2 = False

log = logging.getLogger("sealedsum.producer")

KAPPA = 128
DEFAULT_EXPONENT_BITS = 2 * KAPPA


def default_exponent_bits(n_bits: int) -> int:
    """2κ for the security level of an ``n_bits`` modulus: κ = 128 up to 3072 bits (NIST SP
    800-57 puts 3072-bit RSA at 128 bits); past that, κ = 192 (7680-bit RSA's level), an
    overestimate for 4096 bits that costs 1.5 times as much per randomizer."""
    return 2 * KAPPA if n_bits <= 3072 else 2 * 192
DEFAULT_WINDOW = 8
DEFAULT_CAPACITY = 4096  # randomizers waiting in the pool's pipes, in all (512-768 bytes each)
ENV_ENCRYPTOR = "SEALEDSUM_ENCRYPTOR"  # "fast" (default) or "phe"
ENV_WORKERS = "SEALEDSUM_ENCRYPT_WORKERS"  # helper processes of the default encryptor (default 0)

_REPO = Path(__file__).resolve().parents[1]


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


class Encryptor:
    """Encrypts integer plaintexts under one Paillier public key.

    ``Encryptor(public_key)`` returns the default implementation (:class:`FastEncryptor`,
    or :class:`PheEncryptor` when ``SEALEDSUM_ENCRYPTOR=phe``); the subclasses can be built
    directly too. Use ``close()`` (or ``with``) to stop any background work.
    """

    def __new__(cls, public_key: PaillierPublicKey, *args, **kwargs):
        if cls is Encryptor:
            choice = os.environ.get(ENV_ENCRYPTOR, "fast").strip().lower()
            if choice not in ("fast", "phe"):
                raise ValueError(f"{ENV_ENCRYPTOR} must be 'fast' or 'phe', not {choice!r}")
            cls = PheEncryptor if choice == "phe" else FastEncryptor
        return super().__new__(cls)

    def __init__(self, public_key: PaillierPublicKey) -> None:
        self.public_key = public_key
        log_backend_once()

    def encrypt(self, plaintext: int) -> int:
        """The ciphertext of ``plaintext`` (negative values are taken mod n)."""
        raise NotImplementedError

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


# -- the fixed-base comb -----------------------------------------------------------------

class FixedBase:
    """``hs^a mod n²`` for exponents ``a`` below ``2^exponent_bits``, by table lookups.

    ``table[i][d] = hs^(d·2^(w·i))``; ``hs^a`` is the product over the ``w``-bit digits
    ``d_i`` of ``a`` of ``table[i][d_i]``: ``ceil(exponent_bits / w) - 1`` multiplications
    modulo n². The tables take ``ceil(exponent_bits / w) · (2^w - 1)`` multiplications to
    build (about 40 ms and 4 MB at 2048 bits with the defaults, 75 ms and 6 MB at 3072).
    """

    def __init__(self, n: int, hs: int, exponent_bits: int = DEFAULT_EXPONENT_BITS,
                 window: int = DEFAULT_WINDOW) -> None:
        if exponent_bits < 1 or not 1 <= window <= 12:
            raise ValueError("exponent_bits must be positive and window within 1..12")
        self.n, self.hs, self.exponent_bits, self.window = n, int(hs), exponent_bits, window
        nsq = _mpz(n) * _mpz(n)
        self._nsq = nsq
        self._mask = (1 << window) - 1
        digits = -(-exponent_bits // window)
        table = []
        base = _mpz(hs) % nsq
        one = _mpz(1)
        for _ in range(digits):
            row = [one, base]
            for _d in range(2, 1 << window):
                row.append(row[-1] * base % nsq)
            table.append(row)
            base = row[-1] * base % nsq  # hs^(2^(w·(i+1)))
        self._table = table

    def power(self, a: int):
        """``hs^a mod n²`` (0 <= a < 2^exponent_bits)."""
        w, mask, nsq = self.window, self._mask, self._nsq
        rows = iter(self._table)
        r = next(rows)[a & mask]
        a >>= w
        for row in rows:
            r = r * row[a & mask] % nsq
            a >>= w
        return r

    def random_factor(self):
        """A fresh randomizer ``hs^a mod n²``, ``a`` uniform of ``exponent_bits`` bits (OS CSPRNG)."""
        return self.power(secrets.randbits(self.exponent_bits))


def djn_base(n: int) -> int:
    """``hs = h^n mod n²`` for ``h = -x² mod n``, ``x`` uniform in Z_n* (one full exponentiation)."""
    while True:
        x = secrets.randbelow(n - 2) + 2
        if math.gcd(x, n) == 1:
            break
    h = (-x * x) % n
    nsq = n * n
    if HAVE_GMPY2:
        return int(gmpy2.powmod(h, n, nsq))
    return pow(h, n, nsq)


# One comb per (key, exponent size, window): building it costs a full exponentiation and a
# few thousand multiplications, and the base hs is no secret (DJN publish it with the key);
# the secret per ciphertext is the exponent, which is never shared.
_BASES: dict[tuple[int, int, int], FixedBase] = {}
_BASES_LOCK = threading.Lock()
_BASES_MAX = 4


def fixed_base(n: int, exponent_bits: int = DEFAULT_EXPONENT_BITS, window: int = DEFAULT_WINDOW) -> FixedBase:
    key = (n, exponent_bits, window)
    with _BASES_LOCK:
        base = _BASES.get(key)
    if base is None:
        base = FixedBase(n, djn_base(n), exponent_bits, window)
        with _BASES_LOCK:
            base = _BASES.setdefault(key, base)
            while len(_BASES) > _BASES_MAX:
                _BASES.pop(next(iter(_BASES)))
    return base


# -- the fast encryptor --------------------------------------------------------------------

class FastEncryptor(Encryptor):
    """DJN encryption with fixed-base precomputation, optionally fed by helper processes.

    :param exponent_bits: bits of each randomizer's exponent (default 2κ: 256 up to 3072-bit
        keys, 384 above; see the module docstring for what that assumes).
    :param window: comb window in bits (memory ``ceil(bits/w) · 2^w`` numbers mod n²).
    :param workers: helper processes precomputing randomizers (default
        ``$SEALEDSUM_ENCRYPT_WORKERS`` or 0: none).
    :param capacity: randomizers the helpers may have waiting, in all.
    """

    def __init__(self, public_key: PaillierPublicKey, *, exponent_bits: int | None = None,
                 window: int = DEFAULT_WINDOW, workers: int | None = None,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__(public_key)
        self.n = public_key.n
        if exponent_bits is None:
            exponent_bits = default_exponent_bits(self.n.bit_length())
        self._n = _mpz(self.n)
        self._nsq = self._n * self._n
        self.exponent_bits, self.window = exponent_bits, window
        self._base: FixedBase | None = None  # built on first use
        self._lock = threading.Lock()
        if workers is None:
            try:
                workers = int(os.environ.get(ENV_WORKERS, "0") or 0)
            except ValueError:
                raise ValueError(f"{ENV_WORKERS} must be an integer") from None
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


# -- the background pool ---------------------------------------------------------------------

class RandomizerPool:
    """Helper processes that precompute randomizers ``hs^a mod n²`` into bounded pipes.

    Each helper (``python -c ... producers.encryption._worker_main``) rebuilds the comb
    from ``(n, hs)``, then writes fixed-width randomizers to its stdout until the pipe is
    full (the bound: ``capacity / workers`` randomizers each) or it is closed. :meth:`take`
    reads what is ready without blocking and returns ``None`` when nothing is.
    """

    def __init__(self, n: int, hs: int, exponent_bits: int, window: int, *, workers: int,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.width = (2 * n.bit_length() + 7) // 8  # bytes of a number mod n²
        self._ready: deque = deque()
        self._buffers: list[bytearray] = []
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        per_worker = max(1, capacity // workers)
        params = json.dumps({"n": hex(n), "hs": hex(hs), "exponent_bits": exponent_bits, "window": window,
                             "width": self.width, "gmpy2": HAVE_GMPY2}) + "\n"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
        code = "from sealedsum.producers.encryption import _worker_main; _worker_main()"
        try:
            for _ in range(workers):
                proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                        cwd=str(_REPO), start_new_session=True)
                proc.stdin.write(params.encode())
                proc.stdin.close()
                fd = proc.stdout.fileno()
                os.set_blocking(fd, False)
                _set_pipe_size(fd, per_worker * self.width)
                self._procs.append(proc)
                self._buffers.append(bytearray())
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, _stop_procs, list(self._procs))  # also runs at exit
        self.taken = 0

    @property
    def workers(self) -> int:
        return len(self._procs)

    def take(self):
        """One randomizer no one else got, or ``None`` if none is ready."""
        with self._lock:
            if not self._ready:
                self._fill()
            if not self._ready:
                return None
            self.taken += 1
            return self._ready.popleft()

    def _fill(self) -> None:
        width = self.width
        for i, proc in enumerate(self._procs):
            if proc.stdout is None or proc.stdout.closed:
                continue
            try:
                chunk = os.read(proc.stdout.fileno(), 64 * width)
            except BlockingIOError:
                continue
            except OSError:
                continue
            if not chunk:
                continue  # the helper exited; encrypt computes its own
            buf = self._buffers[i]
            buf += chunk
            whole = len(buf) - len(buf) % width
            for off in range(0, whole, width):
                self._ready.append(_mpz(int.from_bytes(buf[off:off + width], "big")))
            del buf[:whole]

    def close(self) -> None:
        """Stop the helpers and drop whatever they had precomputed."""
        with self._lock:
            self._ready.clear()
            procs, self._procs = self._procs, []
        _stop_procs(procs)
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin.detach()


def _set_pipe_size(fd: int, size: int) -> None:
    import fcntl

    setsz = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    try:
        fcntl.fcntl(fd, setsz, max(4096, min(size, 1 << 20)))
    except OSError:
        pass  # the default pipe size (64 KiB on Linux) bounds the pool instead


def _stop_procs(procs: list) -> None:
    for proc in procs:
        if proc.stdout is not None:
            try:
                proc.stdout.close()  # the helper's next write fails with EPIPE and it exits
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker_main() -> None:
    """A pool helper: read the key's parameters on stdin, write randomizers to stdout forever."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us by closing the pipe
    params = json.loads(sys.stdin.readline())
    base = FixedBase(int(params["n"], 16), int(params["hs"], 16), params["exponent_bits"], params["window"])
    width = params["width"]
    out = sys.stdout.buffer
    try:
        while True:
            batch = b"".join(int(base.random_factor()).to_bytes(width, "big") for _ in range(8))
            out.write(batch)
            out.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass
    finally:
        try:
            sys.stdout = None  # nothing left to flush into a closed pipe at exit
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)
