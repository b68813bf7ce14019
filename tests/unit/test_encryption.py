"""The producer's Paillier encryptors: the fast (DJN, fixed-base) path makes standard
ciphertexts that phe's private key and the enclave decrypt exactly like phe's own, every
ciphertext gets its own randomizer (also from the helper-process pool), and the pool
starts, stays bounded and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import gmpy2
import pytest
from phe import paillier

from sealedsum.producers import encryption
from sealedsum.producers.encryption import arithmetic, encryptor_from_env, randomizers
from sealedsum.producers.encryption.encryptors import Encryptor, FastEncryptor, PheEncryptor
from sealedsum.producers.encryption.pool import RandomizerPool
from sealedsum.producers.encryption.randomizers import DEFAULT_EXPONENT_BITS, FixedBase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def phe_keys():
    return paillier.generate_paillier_keypair(n_length=1024)


def randomizer_of(ciphertext: int, plaintext: int, n: int) -> int:
    """``c / (1 + m·n) mod n²``: the factor a ciphertext was blinded with."""
    nsq = n * n
    return int(ciphertext * gmpy2.invert((1 + (plaintext % n) * n) % nsq, nsq) % nsq)


def test_the_default_encryptor_is_the_fast_one_and_phe_stays_selectable(phe_keys, monkeypatch):
    pk, _ = phe_keys
    monkeypatch.delenv(encryption.ENV_ENCRYPTOR, raising=False)
    monkeypatch.delenv(encryption.ENV_WORKERS, raising=False)
    with encryptor_from_env(pk) as e:
        assert type(e) is FastEncryptor and isinstance(e, Encryptor) and e.pool is None
    monkeypatch.setenv(encryption.ENV_ENCRYPTOR, "phe")
    assert type(encryptor_from_env(pk)) is PheEncryptor
    monkeypatch.setenv(encryption.ENV_ENCRYPTOR, "fastest")
    with pytest.raises(ValueError):
        encryptor_from_env(pk)


def test_the_environment_sets_the_default_encryptors_helpers(phe_keys, monkeypatch):
    pk, _ = phe_keys
    monkeypatch.delenv(encryption.ENV_ENCRYPTOR, raising=False)
    monkeypatch.setenv(encryption.ENV_WORKERS, "1")
    with encryptor_from_env(pk) as e:
        assert e.pool is not None and e.pool.workers == 1
    monkeypatch.setenv(encryption.ENV_WORKERS, "two")
    with pytest.raises(ValueError, match=encryption.ENV_WORKERS):
        encryptor_from_env(pk)
    monkeypatch.setenv(encryption.ENV_ENCRYPTOR, "phe")  # helpers are the fast path's only
    assert type(encryptor_from_env(pk)) is PheEncryptor
    with pytest.raises(TypeError):  # the interface alone encrypts nothing
        Encryptor(pk)


def test_gmpy2_is_in_use_and_said_once(caplog):
    import logging

    assert arithmetic.arithmetic_backend() == {"gmpy2": True, "phe_gmpy2": True, "version": gmpy2.version()}
    arithmetic._logged_backend = False
    with caplog.at_level(logging.INFO, logger="sealedsum.producer"):
        arithmetic.log_backend_once()
        arithmetic.log_backend_once()
    assert [r.getMessage() for r in caplog.records] == ["paillier arithmetic on gmpy2"]


@pytest.mark.parametrize("plaintext", [0, 1, 5, 123456789, -1, -987654, 2**200])
def test_fast_ciphertexts_decrypt_with_phes_private_key(phe_keys, plaintext):
    pk, sk = phe_keys
    with FastEncryptor(pk) as e:
        c = e.encrypt(plaintext)
    assert 0 < c < pk.nsquare
    assert sk.raw_decrypt(c) == plaintext % pk.n
    # phe's own EncryptedNumber decrypts it too (negatives as phe encodes them)
    assert sk.decrypt(paillier.EncryptedNumber(pk, c, 0)) == plaintext


def test_fast_and_phe_ciphertexts_mix_homomorphically(phe_keys):
    pk, sk = phe_keys
    fast, slow = FastEncryptor(pk), PheEncryptor(pk)
    values = [3, -7, 1000, 42, -1]
    total = 1
    for i, v in enumerate(values):
        total = total * (fast if i % 2 else slow).encrypt(v) % pk.nsquare
    assert sk.decrypt(paillier.EncryptedNumber(pk, total, 0)) == sum(values)


def test_plaintexts_beyond_the_modulus_are_refused(phe_keys):
    pk, _ = phe_keys
    e = FastEncryptor(pk)
    for bad in (pk.n, -pk.n, pk.n * 5):
        with pytest.raises(ValueError, match="out of range"):
            e.encrypt(bad)
    with pytest.raises(TypeError):
        e.encrypt(1.5)
    import numpy as np

    assert e.encrypt(np.int64(3))  # index-able ints are fine (phe refuses numpy ints)


def test_the_enclave_decrypts_fast_ciphertexts(small_keys):
    """Through the real sealer and enclave: a window of records encrypted on the fast path
    is released with the right count and sum (noise this small rounds to nothing)."""
    from sealedsum.common.results import verify_signed
    from tests.conftest import make_policy, make_world, stream_table

    w = make_world(small_keys, make_policy({"s": stream_table(epsilon=1e7)}))
    assert type(w.sealer.encryptor) is FastEncryptor
    values = [10.0, 20.0, 30.5, 0.0, 99.0]  # window_records = 5
    outcomes = [w.enclave.on_record(w.sealer.seal("s", [v]).body, int(time.time() * 1000)) for v in values]
    assert all(o.rejection is None for o in outcomes)
    (pub,) = outcomes[-1].publish
    release = verify_signed(pub.body, w.attested)
    assert release.count == 5 and release.sum[0] == pytest.approx(sum(values), abs=1e-3)


def test_decrypt_total_matches(small_keys):
    """The enclave key's own decryption of a fold of fast ciphertexts."""
    pk = small_keys.paillier_public
    with FastEncryptor(pk) as e:
        cts = [e.encrypt(v) for v in (5, 17, 1 << 40, 0)]
    total = 1
    for c in cts:
        total = total * c % pk.nsquare
    assert small_keys.decrypt_total(total) == 5 + 17 + (1 << 40)


def test_encryptions_of_the_same_value_differ_and_no_randomizer_repeats(phe_keys):
    pk, sk = phe_keys
    with FastEncryptor(pk) as e:
        cts = [e.encrypt(7) for _ in range(500)]
        others = [e.encrypt(i) for i in range(500)]
    assert len(set(cts)) == len(cts)
    factors = [randomizer_of(c, 7, pk.n) for c in cts] + [randomizer_of(c, i, pk.n) for i, c in enumerate(others)]
    assert len(set(factors)) == len(factors) == 1000
    assert all(sk.raw_decrypt(c) == 7 for c in cts[:20])


def test_randomizers_are_n_th_powers_of_the_djn_form(phe_keys):
    """Each factor is hs^a for a fresh exponent a: an n-th residue (so the ciphertext is a
    standard Paillier one) and the comb agrees with a plain exponentiation."""
    pk, _ = phe_keys
    n, nsq = pk.n, pk.nsquare
    hs = randomizers.djn_base(n)
    base = FixedBase(n, hs, DEFAULT_EXPONENT_BITS, 8)
    for a in (0, 1, 2, 255, 256, 2**DEFAULT_EXPONENT_BITS - 1, int.from_bytes(os.urandom(32), "big")):
        assert int(base.power(a)) == pow(hs, a, nsq)
    for window in (1, 3, 7):
        odd = FixedBase(n, hs, 100, window)  # exponent bits not a multiple of the window
        a = int.from_bytes(os.urandom(13), "big") >> 4
        assert int(odd.power(a)) == pow(hs, a, nsq)
    # hs^a is an n-th residue mod n²: raising it to lambda gives 1 (phe's decryption sees m = 0)
    _, sk = paillier.generate_paillier_keypair(n_length=512)
    hs2 = randomizers.djn_base(sk.public_key.n)
    r = int(FixedBase(sk.public_key.n, hs2).random_factor())
    assert sk.raw_decrypt(r) == 0


def test_exponents_are_fresh_full_length_draws(monkeypatch, phe_keys):
    pk, _ = phe_keys
    drawn = []
    real = randomizers.secrets.randbits

    def spy(k):
        v = real(k)
        drawn.append((k, v))
        return v

    monkeypatch.setattr(randomizers.secrets, "randbits", spy)
    with FastEncryptor(pk) as e:
        for _ in range(50):
            e.encrypt(1)
    assert len(drawn) == 50 and {k for k, _ in drawn} == {DEFAULT_EXPONENT_BITS}
    assert len({v for _, v in drawn}) == 50


def test_the_default_exponent_follows_the_key_size():
    assert randomizers.default_exponent_bits(2048) == randomizers.default_exponent_bits(3072) == 256
    assert randomizers.default_exponent_bits(4096) == 384
    pk, _ = paillier.generate_paillier_keypair(n_length=512)
    assert FastEncryptor(pk).exponent_bits == 256


def test_longer_exponents_as_djn_prescribe_work_too(phe_keys):
    pk, sk = phe_keys
    with FastEncryptor(pk, exponent_bits=(pk.n.bit_length() + 1) // 2, window=6) as e:
        assert sk.raw_decrypt(e.encrypt(99)) == 99


# -- the helper-process pool ----------------------------------------------------------------------

def test_pool_factors_are_valid_and_never_handed_out_twice(phe_keys):
    pk, sk = phe_keys
    e = FastEncryptor(pk, workers=2, capacity=512)
    try:
        deadline = time.monotonic() + 30
        while e.pool.taken == 0 and time.monotonic() < deadline:  # let the helpers start
            e.encrypt(0)
            time.sleep(0.01)
        cts = [(i % 17, e.encrypt(i % 17)) for i in range(1500)]
        assert e.stats["pooled"] > 0, e.stats  # the helpers did contribute
    finally:
        e.close()
    factors = [randomizer_of(c, m, pk.n) for m, c in cts]
    assert len(set(factors)) == len(factors)
    assert all(sk.raw_decrypt(c) == m for m, c in cts[::50])


def test_pool_is_bounded_and_stops_cleanly(phe_keys):
    pk, _ = phe_keys
    n = pk.n
    hs = randomizers.djn_base(n)
    pool = RandomizerPool(n, hs, DEFAULT_EXPONENT_BITS, 8, workers=2, capacity=64)
    procs = list(pool._procs)
    try:
        time.sleep(3.0)  # far longer than filling 64 randomizers takes
        # Count what is waiting with the helpers stopped: draining while they run would also
        # count what they compute meanwhile (on a busy machine the drain itself is slow).
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            got = 0
            while pool.take() is not None:
                got += 1
        finally:
            for p in procs:
                os.kill(p.pid, signal.SIGCONT)
        # each helper's pipe holds at most max(64/2, one page) randomizers, plus one batch in its
        # write buffer: the pool stays bounded instead of computing ahead forever
        page_items = 4096 // pool.width + 1
        assert 0 < got <= 2 * (max(32, page_items) + 8 + 8 + 1), got
    finally:
        pool.close()
    assert all(p.poll() is not None for p in procs)
    assert pool.take() is None  # closed: callers compute their own


def test_pool_helpers_die_with_their_parent(tmp_path):
    """A parent that exits without close() leaves no helper behind (finalizer at exit, or EPIPE)."""
    code = textwrap.dedent("""
        import sys
        from phe import paillier
        from sealedsum.producers.encryption.encryptors import FastEncryptor
        pk, _ = paillier.generate_paillier_keypair(n_length=512)
        e = FastEncryptor(pk, workers=2)
        print(" ".join(str(p.pid) for p in e.pool._procs), flush=True)
        e.encrypt(1)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        time.sleep(0.1)
    assert alive == []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_without_gmpy2_it_says_so_and_still_encrypts_correctly():
    code = textwrap.dedent("""
        import logging, sys
        sys.modules["gmpy2"] = None
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
        from phe import paillier
        from sealedsum.producers.encryption import encryptor_from_env
        from sealedsum.producers.encryption.arithmetic import HAVE_GMPY2
        pk, sk = paillier.generate_paillier_keypair(n_length=512)
        e = encryptor_from_env(pk)
        assert not HAVE_GMPY2 and sk.raw_decrypt(e.encrypt(-5)) == pk.n - 5
        encryptor_from_env(pk)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("WARNING gmpy2 is not in use") == 1
