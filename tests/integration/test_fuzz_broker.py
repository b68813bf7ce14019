"""Hostile input on the real broker (issue 4): thousands of mutated records published to a
running sidecar. Every one is dead-lettered to ``PREFIX.rejected`` with the reason the
documented order of checks gives (docs/protocol.md, section 11.1), nothing bad is counted,
the enclave never restarts, the valid records that follow are counted and released, and the
enclave still attests.

The unit fuzz tests (``tests/unit/fuzz/``) explore the enclave core far more widely;
this one checks the same promises through the real process, queues and dead-lettering.
"""

from __future__ import annotations

import collections
import math
import random
import time

import pytest
from nacl.public import PrivateKey, PublicKey, SealedBox
from phe import PaillierPublicKey

from sealedsum.common import amqp, wire
from sealedsum.common.errors import InvalidMessage, RejectReason
from sealedsum.common.topology import RECORD_ROUTING_KEY
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.enclave.records import ENVELOPE_OVERHEAD
from sealedsum.sidecar.enclave_process.runtime import DEAD_LETTER_PREFIX_BYTES
from tests.fuzzing import raw_envelope as envelope_bytes
from tests.integration.test_end_to_end import STREAM, _take

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# "s" takes the valid records; "v" is wider, so that records with two or three values fit
# the size limit and fail on their dimension. Huge epsilon: the released count is exact.
WINDOW = 25
STREAMS = {"s": dict(STREAM, window_records=WINDOW, min_batch=5, epsilon=1e4, budget_epsilon=1e9),
           "v": dict(STREAM, dimension=3)}
GARBAGE, FLIPPED, RESEALED, OVERSIZE = 600, 900, 1200, 300
SEED = 20_240_404


def test_thousands_of_hostile_records_are_dead_lettered_and_the_enclave_carries_on(sidecar_factory):
    sc = sidecar_factory(STREAMS)
    t = sc.config.broker.topology
    rng = random.Random(SEED)
    started = time.monotonic()
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as producer:
        enclave = producer.enclave
        policy = enclave.policy
        # The size limit of section 11.1, from the enclave's own constant.
        width = enclave.keys.ciphertext_width  # each ciphertext travels with its plaintext
        limit = (wire.SEALED_BOX_OVERHEAD + ENVELOPE_OVERHEAD
                 + max(s.dimension for s in policy.streams.values()) * (width + wire.plaintext_width(width)))
        fuzz = HostileRecords(rng, producer, limit)
        bad: dict[bytes, RejectReason] = {}
        for maker, n in ((fuzz.garbage, GARBAGE), (fuzz.flipped, FLIPPED), (fuzz.resealed, RESEALED),
                         (fuzz.oversize, OVERSIZE)):
            made = 0
            while made < n:
                body, reason = maker()
                if reason is not None and body not in bad:
                    bad[body] = reason
                    made += 1
        assert len(bad) == GARBAGE + FLIPPED + RESEALED + OVERSIZE

        # As fast as publisher confirms allow, on a channel of our own.
        conn = amqp.connect(sc.config.broker)
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bad:
            amqp.publish_confirmed(ch, t.records_exchange, RECORD_ROUTING_KEY, body, amqp.properties("record"))
        published_at = time.monotonic()
        # Then valid records: they close window 1, which is released with its exact count.
        for i in range(WINDOW):
            producer.send("s", [float(i)])
        (release,) = _take(consumer, 1, timeout=90)
        assert release.window == 1 and release.count == WINDOW, release

        dead = drain_all(conn, t.rejected_queue, expect=len(bad), timeout=90)
        conn.close()
        assert len(dead) == len(bad), (len(dead), len(bad))
        reasons = {r.value for r in RejectReason}
        # A delivery larger than any the policy allows comes back as its prefix, with its size.
        largest = max(limit, wire.MAX_BATCH_BYTES)
        whole = {b[:DEAD_LETTER_PREFIX_BYTES] if len(b) > largest else b: b for b in bad}
        assert len(whole) == len(bad)
        restored = []
        for props, body in dead:
            original = whole.get(body, body)
            if original is not body and len(original) > largest:
                assert (props.headers or {}).get("x-sealedsum-original-bytes") == len(original), props.headers
            restored.append((props, original))
        dead = restored
        wrong = []
        for props, body in dead:
            headers = props.headers or {}
            assert headers.get("x-sealedsum-reason") in reasons, headers
            assert headers.get("x-sealedsum-detail") and "internal error" not in headers["x-sealedsum-detail"]
            if bad.get(body) is None or headers["x-sealedsum-reason"] != bad[body].value:
                wrong.append((bad.get(body), headers))
        assert not wrong, wrong[:5]
        assert {b for _, b in dead} == set(bad)  # each published bad record, once

        # The sidecar is alive, its enclave never restarted, and it still attests.
        assert sc.process.poll() is None
        assert not sc.events("enclave exited; restarting")
        assert len(sc.events("enclave running")) == 1
        check = amqp.connect(sc.config.broker)
        try:
            assert amqp.attest(check, sc.config.broker, sc.config.require_trust()).measurement == sc.measurement
        finally:
            check.close()
    by_reason = collections.Counter(r.value for r in bad.values())
    print(f"\n{len(bad)} hostile records published in {published_at - started:.1f} s and dead-lettered "
          f"({time.monotonic() - started:.1f} s in all): {dict(by_reason.most_common())}")
    assert len(by_reason) >= 8  # the mix reached far past the sealed box
    assert sc.stop() == 0
    stats = sc.events("stats")[-1]
    assert stats["accepted"] == WINDOW  # the valid records, each once; nothing hostile was counted
    assert sum(stats["rejected"].values()) == len(bad)
    assert not sc.events("enclave exited; restarting")


class HostileRecords:
    """Makes hostile record bodies and the reason each must be dead-lettered with, from the
    attested keys and policy alone (what any producer knows)."""

    def __init__(self, rng: random.Random, producer: Producer, limit: int) -> None:
        self.rng, self.limit = rng, limit
        self.enclave = producer.enclave
        self.policy = producer.enclave.policy
        self.box = SealedBox(PublicKey(self.enclave.keys.x25519))
        self.n = self.enclave.keys.paillier_n
        self.width = self.enclave.keys.ciphertext_width
        # A few valid records of "s" to mutate, and valid ciphertexts to build envelopes with.
        self.valid = [producer.sealer.seal("s", [float(i)]) for i in range(8)]
        paillier = PaillierPublicKey(self.n)
        # Ciphertexts and the plaintexts they encrypt (1 and n² - 1 are encryptions of 0 too).
        self.pairs = {paillier.raw_encrypt(m): m for m in (0, 1, 65536, 6553600)}
        self.pairs.update({1: 0, self.n * self.n - 1: 0})
        self.valid_cts = list(self.pairs)
        self.foreign = SealedBox(PrivateKey.generate().public_key)

    # -- the four kinds -----------------------------------------------------------------------------
    def garbage(self) -> tuple[bytes, RejectReason]:
        rng = self.rng
        kind = rng.randrange(4)
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, self.limit + 1))
        elif kind == 1:
            body = self.foreign.encrypt(rng.randbytes(rng.randrange(0, 300)))  # sealed to another key
        elif kind == 2:
            body = bytes([rng.randrange(256)]) * rng.randrange(0, self.limit + 1)
        else:
            body = wire.ENVELOPE_MAGIC + rng.randbytes(rng.randrange(0, 400))  # an unsealed envelope
        return body, self._size_or(body, RejectReason.UNDECRYPTABLE)

    def flipped(self) -> tuple[bytes, RejectReason | None]:
        rng = self.rng
        body = bytearray(rng.choice(self.valid).body)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(5)
            if op == 0 and body:
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del body[rng.randrange(len(body) + 1):]
            elif op == 2:
                i = rng.randrange(len(body) + 1)
                body[i:i] = rng.randbytes(rng.randint(1, 16))
            elif op == 3:
                body += rng.randbytes(rng.randint(1, 700))
            else:
                other = rng.choice(self.valid).body
                body = body[: rng.randrange(len(body) + 1)] + other[rng.randrange(len(other) + 1):]
        body = bytes(body)
        if any(body == r.body for r in self.valid):
            return body, None  # a valid record after all: not for this test
        return body, self._size_or(body, RejectReason.UNDECRYPTABLE)

    def oversize(self) -> tuple[bytes, RejectReason]:
        size = self.rng.choice([self.limit + 1, self.limit + 48, 2 * self.limit, self.rng.randrange(self.limit, 300_000)])
        return self.rng.randbytes(max(size, self.limit + 1)), RejectReason.TOO_LARGE

    def resealed(self) -> tuple[bytes, RejectReason | None]:
        """A valid envelope with edge values in some fields, or damaged bytes, sealed to the
        enclave: the reason must be the one the order of checks gives."""
        rng = self.rng
        now = int(time.time() * 1000)
        f = dict(name=b"s", rid=rng.randbytes(16), pid=rng.randbytes(16), epoch=self.enclave.keys.epoch, sent=now,
                 window=0, width=self.width, cts=[rng.choice(self.valid_cts)], count=None)
        for field in rng.sample(["name", "epoch", "sent", "window", "cts", "count", "width"], rng.randint(1, 3)):
            if field == "name":
                f["name"] = rng.choice([b"", b"S", b"nope", b"v", b"s ", b"s.t", b"x" * 64, b"y" * 65, "é".encode(),
                                        rng.randbytes(rng.randrange(1, 70))])
            elif field == "epoch":
                f["epoch"] = rng.choice([0, 2, 2**32 - 1, rng.randrange(2**32)])
            elif field == "sent":
                f["sent"] = rng.choice([0, 1, 2**64 - 1, now - 10**9, now + 10**9, now - 3_600_000, now + 600_000,
                                        rng.randrange(2**64)])
            elif field == "window":
                f["window"] = rng.choice([1, 2, 3, 2**64 - 1, rng.randrange(2**64)])
            elif field == "cts":
                n = self.n
                f["cts"] = [rng.choice([0, 1, n, 2 * n, n * n, n * n - 1, n * n + 1, (1 << (8 * self.width)) - 1,
                                        rng.getrandbits(8 * self.width), rng.choice(self.valid_cts)])
                            for _ in range(rng.choice([1, 1, 2, 3, 4]))]
            elif field == "count":
                f["count"] = rng.choice([0, 2, 3, 65535])
            else:
                f["width"] = rng.choice([0, 1, self.width - 1, self.width + 1, 2048, 2049])
        # Each ciphertext states what it encrypts where that is known, else a plaintext of
        # the stream's range (0 or 1,000,000), which it then most likely does not encrypt.
        f["ms"] = [self.pairs.get(c, rng.choice([0, 1_000_000])) for c in f["cts"]]
        plaintext = envelope_bytes(**f)
        if rng.randrange(4) == 0:  # and sometimes damage the bytes too
            plaintext = bytearray(plaintext)
            i = rng.randrange(len(plaintext))
            plaintext[i] ^= 1 << rng.randrange(8)
            plaintext = bytes(plaintext[: rng.choice([len(plaintext), rng.randrange(len(plaintext) + 1)])])
        body = self.box.encrypt(plaintext)
        # The enclave sees it up to a minute or so later: keep only records whose reason
        # does not depend on when exactly.
        early, late = self.expected(body, plaintext, now), self.expected(body, plaintext, now + 120_000)
        return body, early if early == late else None

    def _size_or(self, body: bytes, reason: RejectReason) -> RejectReason:
        return RejectReason.TOO_LARGE if len(body) > self.limit else reason

    def expected(self, body: bytes, plaintext: bytes, now: int) -> RejectReason | None:
        """Section 11.1 for a fresh enclave whose windows are all at 1 and that has accepted
        nothing yet (the valid records are only sent after every hostile one)."""
        if len(body) > self.limit:
            return RejectReason.TOO_LARGE
        if plaintext[:4] != wire.ENVELOPE_MAGIC:
            # (a signed envelope would be refused for its identity: not made here)
            return RejectReason.MALFORMED if plaintext[:4] != wire.SIGNED_ENVELOPE_MAGIC else None
        try:
            env = wire.Envelope.from_bytes(plaintext)
        except InvalidMessage:
            return RejectReason.MALFORMED
        stream = self.policy.streams.get(env.stream)
        if stream is None:
            return RejectReason.UNKNOWN_STREAM
        if env.key_epoch != self.enclave.keys.epoch:
            return RejectReason.WRONG_EPOCH
        if len(env.ciphertexts) != stream.dimension:
            return RejectReason.WRONG_DIMENSION
        nsquare = self.n * self.n
        if env.width != self.width or any(not 0 < c < nsquare or math.gcd(c, self.n) != 1 for c in env.ciphertexts):
            return RejectReason.BAD_CIPHERTEXT
        lo, hi = stream.coordinate_ranges(1)[0]
        if any(not (0 <= m < self.n and lo <= (m - self.n if m > self.n // 2 else m) <= hi) for m in env.plaintexts):
            return RejectReason.OUT_OF_RANGE
        if (now - env.sent_at_ms) / 1000 > self.policy.max_record_age_seconds:
            return RejectReason.EXPIRED
        if (env.sent_at_ms - now) / 1000 > self.policy.max_clock_skew_seconds:
            return RejectReason.FROM_FUTURE
        if env.window > 1:
            return RejectReason.FUTURE_WINDOW
        if any(self.pairs.get(c) != m for c, m in zip(env.ciphertexts, env.plaintexts)):
            # Not known to encrypt what it states: refused by the batch check (a random
            # ciphertext that happens to encrypt it is out of reach).
            return RejectReason.OUT_OF_RANGE
        return None  # it would be accepted: not for this test


def drain_all(conn, queue: str, expect: int, timeout: float) -> list[tuple]:
    """Consume ``queue`` until ``expect`` messages came, or nothing more came for a few
    seconds after ``timeout``."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=500)
    out, deadline = [], time.monotonic() + timeout
    for method, props, body in ch.consume(queue, auto_ack=True, inactivity_timeout=2.0):
        if method is not None:
            out.append((props, body))
        if len(out) > expect or (len(out) == expect and method is None):
            break
        if method is None and time.monotonic() > deadline:
            break
    ch.cancel()
    return out
