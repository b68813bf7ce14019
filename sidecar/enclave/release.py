"""Turning a closed window into a signed, noised release (or withholding it)."""

from __future__ import annotations

from dataclasses import dataclass

from common import signing, wire
from common.fixedpoint import decode
from common.policy import StreamPolicy
from common.results import Release
from sidecar.enclave import noise
from sidecar.enclave.aggregate import Window
from sidecar.enclave.keyring import EnclaveKeys


@dataclass(frozen=True, slots=True)
class SignedRelease:
    """A release ready for the results exchange. Stored before it is published, so a
    retry sends these same bytes and never draws new noise."""

    stream: str
    window: int
    body: bytes
    release: Release


def noised_release(
    window: Window,
    policy: StreamPolicy,
    keys: EnclaveKeys,
    measurement: bytes,
    now_ms: int,
) -> SignedRelease:
    """Decrypt the window's totals once, add noise, sign. Call only when ``count >= min_batch``."""
    plan = policy.noise_plan()
    lo = round(policy.lower * (1 << policy.fraction_bits))
    hi = round(policy.upper * (1 << policy.fraction_bits))
    totals = []
    for ct in window.totals:
        total = keys.decrypt_total(ct.ciphertext(be_secure=False))
        # Honest producers cannot leave this range; a dishonest one cannot push the
        # total outside it either, nor overflow the 64-bit noise domain.
        totals.append(min(max(total, window.count * lo), window.count * hi))
    noised = noise.noisy_sum(plan, totals)
    count = noise.noisy_count(plan, window.count)
    sums = [decode(v, policy.fraction_bits) for v in noised]
    release = Release(
        stream=policy.name,
        window=window.index,
        count=count,
        sum=sums,
        sum_fixed=noised,
        mean=[s / count for s in sums] if count > 0 else None,
        dimension=policy.dimension,
        fraction_bits=policy.fraction_bits,
        mechanism=policy.mechanism,
        epsilon=policy.epsilon,
        delta=policy.delta,
        rho=plan.rho,
        sum_noise_scale=plan.sum_scale,
        count_noise_scale=plan.count_scale,
        key_epoch=keys.epoch,
        measurement=measurement.hex(),
        closed_at_ms=now_ms,
    )
    payload = release.to_payload()
    body = wire.SignedMessage(payload, keys.sign(signing.RESULT, payload)).to_bytes()
    return SignedRelease(policy.name, window.index, body, release)
