"""The producer library.

``RecordSealer.seal`` is pure (values in, sealed bytes out); :class:`Producer` adds
the broker: attestation first, then confirmed publishing. Nothing is sent before the
enclave passed every attestation check.

.. warning::
   A sealed box hides the record from everyone but the attested enclave, but it does
   not prove who sent it. The privacy guarantee assumes producers clip to the
   declared bounds, which this library always does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from nacl.public import PublicKey, SealedBox
import phe.util
from phe import PaillierPublicKey

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import signing, wire
from common.attestation import AttestedEnclave
from common.config import Config
from common.errors import PolicyMismatch
from common.policy import Requirements, StreamPolicy
from producers.encryption import Encryptor

log = logging.getLogger("sealedsum.producer")


@dataclass(frozen=True, slots=True)
class SealedRecord:
    body: bytes
    record_id: bytes
    clipped: int


class RecordSealer:
    """Clip, encode, Paillier-encrypt and seal records for one attested enclave.

    :param requirements: the weakest policy accepted, per stream (default: any).
    :param producer_id: 16 bytes naming this producer in its envelopes, for streams that
        bound contributions per producer (default: random, one per sealer).
    :param identity: an Ed25519 identity key enrolled in the enclave's policy; each
        envelope is then signed with it inside the sealed box, and the producer id is
        the one the key stands for. A key the attested policy does not enroll is refused
        here, before anything is sent (``check_enrollment=False`` lets tests send such
        records to see the enclave refuse them).
    """

    def __init__(self, enclave: AttestedEnclave, requirements: Callable[[str], Requirements] | None = None,
                 producer_id: bytes | None = None, identity: Ed25519PrivateKey | None = None,
                 *, check_enrollment: bool = True) -> None:
        self.enclave = enclave
        self._requirements = requirements
        self._identity = identity
        if identity is not None:
            self._identity_public = identity.public_key().public_bytes_raw()
            status, _ = enclave.policy.identities.name_of(self._identity_public)
            if status != "enrolled" and check_enrollment:
                raise PolicyMismatch(f"this producer's identity key is {status} in the attested policy; "
                                     "the enclave would dead-letter every record",
                                     hint="enroll its public key under [identities.enrolled] (or use another key)")
            if producer_id is not None and producer_id != wire.producer_id_of(self._identity_public):
                raise ValueError("with an identity key the producer id is the key's; do not pass another")
            producer_id = wire.producer_id_of(self._identity_public)
        self.producer_id = producer_id if producer_id is not None else os.urandom(wire.PRODUCER_ID_SIZE)
        self._paillier = PaillierPublicKey(enclave.keys.paillier_n)
        self.encryptor = Encryptor(self._paillier)
        if not phe.util.HAVE_GMP:
            log.warning("gmpy2 is not in use: Paillier encryption runs several times slower",
                        extra={"fields": {"fix": "pip install gmpy2"}})
        self._box = SealedBox(PublicKey(enclave.keys.x25519))
        self._width = enclave.keys.ciphertext_width
        self._accepted: set[str] = set()

    def stream(self, name: str) -> StreamPolicy:
        """The attested policy of ``name``, once it met this producer's requirements.

        :raises PolicyMismatch: no such stream. :raises PolicyTooWeak: it promises too little.
        """
        policy = self.enclave.policy.streams.get(name)
        if policy is None:
            raise PolicyMismatch(f"the attested enclave has no stream {name!r}",
                                 hint=f"its streams: {', '.join(sorted(self.enclave.policy.streams))}")
        if name not in self._accepted and self._requirements is not None:
            self._requirements(name).check(policy)
            self._accepted.add(name)
        return policy

    def seal(self, stream: str, values: Iterable[float], *, now_ms: int | None = None,
             window: int = 0, record_id: bytes | None = None) -> SealedRecord:
        policy = self.stream(stream)
        encoded, n_clipped = policy.encode(list(values))
        # One encryption per plaintext: per value, or per ciphertexts_per_record packed ones.
        cts = tuple(self.encryptor.encrypt(q) for q in policy.plaintexts(encoded))
        rid = record_id if record_id is not None else os.urandom(wire.RECORD_ID_SIZE)
        envelope = wire.Envelope(
            stream=stream, record_id=rid, key_epoch=self.enclave.keys.epoch,
            sent_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
            window=window, width=self._width, ciphertexts=cts, producer_id=self.producer_id,
        )
        plaintext = envelope.to_bytes()
        if self._identity is not None:
            plaintext = wire.SignedEnvelope(self._identity_public, signing.sign(self._identity, signing.ENVELOPE, plaintext),
                                            plaintext).to_bytes()
        return SealedRecord(self._box.encrypt(plaintext), rid, n_clipped)


class Producer:
    """Attest, then publish sealed records with publisher confirms.

    Use as a context manager::

        with Producer(config) as p:
            p.send("purchases", [12.5])
    """

    def __init__(self, config: Config, *, producer_id: bytes | None = None) -> None:
        from producers import transport

        self.config = config
        self._transport = transport.RecordPublisher(config.broker)
        try:
            self.enclave = self._transport.attest(config.require_trust())
        except BaseException:
            self._transport.close()
            raise
        self._attested_at = time.monotonic()
        identity = None
        if config.identity_file is not None:
            from producers import identity as identity_mod

            identity = identity_mod.load(config.identity_file)
        self.sealer = RecordSealer(self.enclave, config.requirements, producer_id, identity)

    def reattest(self) -> AttestedEnclave:
        """Attest again (fresh nonce, every check); after a key rotation this picks up the
        enclave's new key epoch. The producer id and identity stay the same."""
        enclave = self._transport.attest(self.config.require_trust())
        if enclave.keys != self.enclave.keys:
            log.info("enclave key epoch changed", extra={"fields": {
                "from_epoch": self.enclave.keys.epoch, "to_epoch": enclave.keys.epoch}})
            self.sealer = RecordSealer(enclave, self.config.requirements, self.sealer.producer_id,
                                       self.sealer._identity)
        self.enclave, self._attested_at = enclave, time.monotonic()
        return enclave

    def seal(self, stream: str, values: Iterable[float], *, window: int = 0) -> SealedRecord:
        """Seal one record for the enclave, re-attesting first when the last attestation is
        older than ``producer.reattest_seconds`` (so key rotations reach long-running producers)."""
        if time.monotonic() - self._attested_at > self.config.reattest_seconds:
            self.reattest()
        return self.sealer.seal(stream, values, window=window)

    def send(self, stream: str, values: Iterable[float], *, window: int = 0) -> SealedRecord:
        """Seal and publish one record; return once the broker confirmed it."""
        record = self.seal(stream, values, window=window)
        self.publish(record)
        return record

    def publish(self, record: SealedRecord) -> None:
        """Publish an already sealed record; return once the broker confirmed it."""
        self._transport.publish(record.body)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
