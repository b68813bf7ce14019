"""Opening and validating one record. Every failure is a ``RecordRejected`` with a reason."""

from __future__ import annotations

from nacl.exceptions import CryptoError

from sealedsum.common import signing, wire
from sealedsum.common.errors import InvalidMessage, RecordRejected, RejectReason
from sealedsum.common.identities import Identities
from sealedsum.common.policy import EnclavePolicy, StreamPolicy
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring

# Envelope bytes besides the ciphertexts: magic, ids, epoch, time, window, name, counts,
# and the identity wrapper (magic, key, signature) of a signed envelope.
ENVELOPE_OVERHEAD = 4 + 16 + 16 + 4 + 8 + 8 + 1 + wire.MAX_STREAM_NAME + 2 + 2 + (4 + 32 + 64)


def max_record_bytes(policy: EnclavePolicy, keys: EnclaveKeys) -> int:
    # Every epoch uses the policy's key size, so one width serves all of them.
    """The largest sealed record any stream of this policy can produce."""
    return _record_bytes(policy, keys.ciphertext_width)


def ciphertext_width_bound(paillier_bits: int) -> int:
    """The most bytes a Paillier ciphertext takes under a ``paillier_bits``-bit modulus, known
    without the key: n < 2**bits, so a ciphertext, below n², is below 2**(2 * bits)."""
    return (2 * paillier_bits + 7) // 8


def record_bytes_bound(policy: EnclavePolicy) -> int:
    """:func:`max_record_bytes` for any key of the policy's ``paillier_bits``, never below it:
    what a broker must carry before the enclave has generated its keys."""
    return _record_bytes(policy, ciphertext_width_bound(policy.paillier_bits))


def _record_bytes(policy: EnclavePolicy, ciphertext_width: int) -> int:
    widest = max(s.ciphertexts_per_record for s in policy.streams.values())
    per_ciphertext = ciphertext_width + wire.plaintext_width(ciphertext_width)  # and its plaintext
    return wire.SEALED_BOX_OVERHEAD + ENVELOPE_OVERHEAD + widest * per_ciphertext


def open_record(
    body: bytes,
    keyring: Keyring,
    policy: EnclavePolicy,
    size_limit: int,
) -> tuple[wire.Envelope, StreamPolicy, EnclaveKeys]:
    """Open the sealed box and check the record against the keys and the policy.

    :returns: the envelope, its stream's policy, and the key epoch it was sealed to.
    :raises RecordRejected: with the first reason found.
    """
    if len(body) > size_limit:
        raise RecordRejected(RejectReason.TOO_LARGE, f"{len(body)} bytes > {size_limit}")
    plaintext = keys = None
    for candidate in keyring.newest_first():
        try:
            plaintext, keys = candidate.open_sealed_box(body), candidate
            break
        except CryptoError:
            continue
    if keys is None:
        # Tampered, truncated, garbage or sealed to another key: indistinguishable by design.
        raise RecordRejected(RejectReason.UNDECRYPTABLE, "sealed box does not open with this enclave's keys")
    try:
        signed = wire.SignedEnvelope.from_bytes(plaintext) if plaintext[:4] == wire.SIGNED_ENVELOPE_MAGIC else None
        envelope = wire.Envelope.from_bytes(signed.envelope if signed else plaintext)
    except InvalidMessage as err:
        raise RecordRejected(RejectReason.MALFORMED, str(err)) from None
    try:
        check_identity(signed, envelope, policy.identities)
        stream = policy.streams.get(envelope.stream)
        if stream is None:
            raise RecordRejected(RejectReason.UNKNOWN_STREAM, envelope.stream)
        if envelope.key_epoch != keys.epoch:
            raise RecordRejected(RejectReason.WRONG_EPOCH,
                                 f"names epoch {envelope.key_epoch} but is sealed to epoch {keys.epoch}")
        if keyring.status(keys.epoch) == "retired":
            raise RecordRejected(RejectReason.WRONG_EPOCH, f"key epoch {keys.epoch} is retired (current "
                                 f"{keyring.current_epoch}): the producer must attest again")
        if len(envelope.ciphertexts) != stream.ciphertexts_per_record:
            raise RecordRejected(RejectReason.WRONG_DIMENSION, (
                f"{len(envelope.ciphertexts)} ciphertexts, packed stream takes {stream.ciphertexts_per_record}"
                if stream.packing is not None else f"{len(envelope.ciphertexts)} values, stream takes {stream.dimension}"))
        if envelope.width != keys.ciphertext_width:
            raise RecordRejected(RejectReason.BAD_CIPHERTEXT, f"width {envelope.width}, expected {keys.ciphertext_width}")
        for c in envelope.ciphertexts:
            if not keys.is_ciphertext(c):
                raise RecordRejected(RejectReason.BAD_CIPHERTEXT, "ciphertext out of range")
    except RecordRejected as rejection:
        rejection.record = (envelope.stream, envelope.record_id)  # what a notice to its producer names
        raise
    return envelope, stream, keys


def check_identity(signed: wire.SignedEnvelope | None, envelope: wire.Envelope, identities: Identities) -> None:
    """A signed envelope must verify, name the producer id of its key, and come from an
    enrolled key; where identities are required, an unsigned one is refused.

    :raises RecordRejected: ``bad_signature``, ``revoked_producer`` or ``unknown_producer``.
    """
    if signed is None:
        if identities.required:
            raise RecordRejected(RejectReason.UNKNOWN_PRODUCER, "unsigned record; this enclave requires enrolled producers")
        if identities.enrolled and envelope.producer_id in identities.producer_ids:
            # Only the key's signature may claim an enrolled producer's id.
            raise RecordRejected(RejectReason.BAD_SIGNATURE, "unsigned record claims an enrolled producer's id")
        return
    try:
        signing.verify(signed.public_key, signing.ENVELOPE, signed.envelope, signed.signature,
                       error=InvalidMessage, what="envelope")
    except InvalidMessage:
        raise RecordRejected(RejectReason.BAD_SIGNATURE, "the envelope's signature does not verify") from None
    if envelope.producer_id != wire.producer_id_of(signed.public_key):
        raise RecordRejected(RejectReason.BAD_SIGNATURE, "producer_id is not the one the signing key stands for")
    status, name = identities.name_of(signed.public_key)
    if status == "revoked":
        # The detail goes to the broker with the dead letter: it names no producer.
        raise RecordRejected(RejectReason.REVOKED_PRODUCER, "signed by a revoked key")
    if status == "unknown":
        raise RecordRejected(RejectReason.UNKNOWN_PRODUCER, "signed by a key that is not enrolled")


def check_age(envelope: wire.Envelope, policy: EnclavePolicy, now_ms: int) -> None:
    """Records older than the replay horizon, or dated too far ahead, are refused.

    :raises RecordRejected: ``expired`` or ``from_future``.
    """
    age_s = (now_ms - envelope.sent_at_ms) / 1000.0
    if age_s > policy.max_record_age_seconds:
        raise RecordRejected(RejectReason.EXPIRED, f"sent {age_s:.0f} s ago (limit {policy.max_record_age_seconds:.0f} s)")
    if -age_s > policy.max_clock_skew_seconds:
        raise RecordRejected(RejectReason.FROM_FUTURE, f"sent {-age_s:.0f} s in the future")
