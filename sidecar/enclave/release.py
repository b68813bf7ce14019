"""Turning a closed window into a signed, noised release, and signing notices (to consumers,
and to one producer about its own records).

The noise of a window is drawn once, here; what comes out is stored (in memory and
in the sealed state) before it is published, so a retry sends these same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from sealedsum.common import signing, wire
from sealedsum.common.fixedpoint import decode
from sealedsum.common.policy import StreamKind, StreamPolicy
from sealedsum.common.errors import RecordRejected
from sealedsum.common.results import BudgetExhausted, BudgetReport, KeyRotated, RecordRefused, RecordsCounted, Release
from sealedsum.sidecar.enclave import noise
from sealedsum.sidecar.enclave.aggregate import Window
from sealedsum.sidecar.enclave.keyring import EnclaveKeys, Keyring
from sealedsum.sidecar.enclave.validity import fits_noise_domain


@dataclass(frozen=True, slots=True)
class Publication:
    """A signed message to publish. Releases and budget notices go to the results exchange,
    routed by stream; a key-rotation notice (``stream`` empty) goes to the announce exchange.
    ``key`` names it in the enclave's pending set: ``stream/window``,
    ``stream/budget_exhausted`` or ``key_rotated/EPOCH``."""

    key: str
    stream: str
    body: bytes
    message: Release | BudgetExhausted | KeyRotated

    @property
    def window(self) -> int | None:
        return self.message.window if isinstance(self.message, Release) else None

    @property
    def announce(self) -> bool:
        """Whether it goes to producers on ``PREFIX.announce`` rather than to consumers."""
        return isinstance(self.message, KeyRotated)


@dataclass(frozen=True, slots=True)
class Notice:
    """A signed notice for one producer: published to the notices exchange with routing key
    ``token``, best effort (never stored, never republished)."""

    token: str
    body: bytes
    message: RecordRefused | RecordsCounted


def sign(keys: EnclaveKeys, payload: bytes) -> bytes:
    return wire.SignedMessage(payload, keys.sign(signing.RESULT, payload)).to_bytes()


def decrypted_totals(window: Window, policy: StreamPolicy, keyring: Keyring) -> list[int]:
    """The window's fixed-point total per coordinate, before the noise.

    One decryption per ciphertext slot and key epoch (two epochs only around a rotation):
    ``dimension`` of them, or ``ciphertexts_per_record`` for a packed stream, whose slots
    are read back and the offsets added (``count · lo_i``: linear, so the window's count
    serves the totals of every epoch together).
    """
    layout = policy.packing
    plain = [0] * policy.dimension
    for epoch, cts in window.totals.items():
        epoch_keys = keyring.epochs[epoch]
        totals = [epoch_keys.decrypt_total(int(ct)) for ct in cts]
        if layout is not None:
            n = epoch_keys.paillier_public.n
            totals = layout.unpack([t % n for t in totals])  # slots are read from [0, n)
        for i, t in enumerate(totals):
            plain[i] += t
    return plain if layout is None else layout.totals(plain, window.count)


def noised_release(
    window: Window,
    policy: StreamPolicy,
    keyring: Keyring,
    measurement: bytes,
    now_ms: int,
    budget: dict,
) -> Publication:
    """Decrypt the window's totals once, add noise, sign. Call only when ``count >= min_batch``
    and after the ledger has been charged (``budget`` is its state after this release)."""
    plan = policy.noise_plan()
    totals = decrypted_totals(window, policy, keyring)
    # Every counted record was checked (validity), so the totals lie where checked records
    # can put them; this carries no privacy argument, it only refuses to noise a total
    # outside the 64-bit noise domain should the enclave itself be wrong.
    if not fits_noise_domain(totals, policy.coordinate_ranges(window.count)):
        raise ArithmeticError(f"window {window.index} of {policy.name!r} decrypted outside the checked range")
    keys = keyring.current
    noised = noise.noisy_sum(plan, totals)
    if plan.count_scale is None:
        count = sum(noised)  # a histogram's buckets add up to its count: post-processing
    else:
        count = noise.noisy_count(plan, window.count)
    sums = [decode(v, policy.fraction_bits) for v in noised]
    mean = [s / count for s in sums] if count > 0 and policy.kind != StreamKind.HISTOGRAM else None
    release = Release(
        stream=policy.name, window=window.index, aggregate=policy.kind, count=count, sum=sums,
        sum_fixed=noised, mean=mean, dimension=policy.dimension, fraction_bits=policy.fraction_bits,
        mechanism=policy.mechanism, epsilon=policy.epsilon, delta=policy.delta, rho=plan.rho,
        sum_noise_scale=plan.sum_scale, count_noise_scale=plan.count_scale, key_epoch=keys.epoch,
        measurement=measurement.hex(), closed_at_ms=now_ms, budget=budget,
    )
    return Publication(f"{policy.name}/{window.index}", policy.name, sign(keys, release.to_payload()), release)


def exhausted_notice(policy: StreamPolicy, keys: EnclaveKeys, measurement: bytes, now_ms: int,
                     budget: dict) -> Publication:
    notice = BudgetExhausted(policy.name, budget, keys.epoch, measurement.hex(), now_ms)
    return Publication(f"{policy.name}/budget_exhausted", policy.name, sign(keys, notice.to_payload()), notice)


def rotation_notice(keys: EnclaveKeys, previous_epoch: int, retires_at_ms: int, measurement: bytes,
                    now_ms: int) -> Publication:
    """Signed with the Ed25519 key, which the rotation kept, so producers verify it with the key
    they attested (under the previous epoch)."""
    notice = KeyRotated(keys.epoch, previous_epoch, retires_at_ms, measurement.hex(), now_ms)
    return Publication(f"key_rotated/{keys.epoch}", "", sign(keys, notice.to_payload()), notice)


def budget_report(policy: StreamPolicy, keys: EnclaveKeys, measurement: bytes, now_ms: int,
                  nonce: bytes, exhausted: bool, budget: dict) -> bytes:
    report = BudgetReport(policy.name, nonce.hex(), exhausted, budget, keys.epoch, measurement.hex(), now_ms)
    return sign(keys, report.to_payload())


def refusal_notice(keys: EnclaveKeys, measurement: bytes, now_ms: int, token: str, rejection: RecordRejected,
                   record: tuple[str, bytes] | None, batch_index: int | None) -> Notice:
    """What the producer whose token a dead-lettered record carried hears about it: the dead
    letter's reason and detail, and the record's stream and id when its envelope opened."""
    stream, record_id = record if record is not None else (None, None)
    notice = RecordRefused(token, stream, record_id.hex() if record_id is not None else None, batch_index,
                           rejection.reason.value, rejection.detail, keys.epoch, measurement.hex(), now_ms)
    return Notice(token, sign(keys, notice.to_payload()), notice)


# Record ids per receipt: about 35 bytes each in the payload (a 4096-id receipt is ~145 KB). A
# checkpoint rarely covers more records of one producer; past it the receipt is split.
RECEIPT_MAX_RECORDS = 4096


def receipts(keys: EnclaveKeys, measurement: bytes, now_ms: int,
             counted: dict[str, list[tuple[str, bytes]]]) -> list[Notice]:
    """One signed receipt per token (per RECEIPT_MAX_RECORDS records) for the records carrying
    it that a checkpoint holds: ``counted`` maps a token to (stream, record id) in counting
    order. The ids cost about 1 µs a record to write and sign, next to the signature's 50 µs."""
    out = []
    for token, records in counted.items():
        for start in range(0, len(records), RECEIPT_MAX_RECORDS):
            part = records[start:start + RECEIPT_MAX_RECORDS]
            by_stream: dict[str, list[str]] = {}
            for stream, record_id in part:
                by_stream.setdefault(stream, []).append(record_id.hex())
            notice = RecordsCounted(token, len(part), by_stream, keys.epoch, measurement.hex(), now_ms)
            out.append(Notice(token, sign(keys, notice.to_payload()), notice))
    return out
