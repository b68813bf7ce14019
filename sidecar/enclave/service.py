"""The enclave facade: bytes in, outcomes out. No broker, no clock of its own.

The runtime (``sidecar.runtime``) feeds it deliveries and ticks and carries out what
it returns: dead-letter a record with a reason, acknowledge it, publish a release.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Callable

from common import wire
from common.errors import InvalidMessage, RecordRejected, RejectReason
from common.policy import EnclavePolicy
from sidecar.enclave.aggregate import StreamState, Window
from sidecar.enclave.keyring import EnclaveKeys
from sidecar.enclave.records import check_age, max_record_bytes, open_record
from sidecar.enclave.release import SignedRelease, noised_release

log = logging.getLogger("sealedsum.enclave")


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """What to do with one delivery: dead-letter it (``rejection``) or acknowledge it,
    and publish ``releases`` (windows this record closed)."""

    rejection: RecordRejected | None = None
    releases: tuple[SignedRelease, ...] = ()


@dataclass(slots=True)
class Stats:
    accepted: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    windows_released: int = 0
    windows_withheld: int = 0
    attestations: int = 0

    def to_json(self, decryptions: int) -> dict:
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "windows_released": self.windows_released,
            "windows_withheld": self.windows_withheld,
            "attestations": self.attestations,
            "decryptions": decryptions,
        }


class Enclave:
    def __init__(
        self,
        keys: EnclaveKeys,
        policy: EnclavePolicy,
        policy_bytes: bytes,
        code_digest: bytes,
        measurement: bytes,
        quote: Callable[[bytes], bytes],
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.policy_bytes = policy_bytes
        self.code_digest = code_digest
        self.measurement = measurement
        self._quote = quote
        self.streams = {name: StreamState(p, keys.paillier_public) for name, p in policy.streams.items()}
        self.size_limit = max_record_bytes(policy, keys)
        self.stats = Stats()
        # Signed releases not yet confirmed by the broker, by (stream, window).
        self.pending: dict[tuple[str, int], SignedRelease] = {}

    # -- attestation ------------------------------------------------------------------
    def attest(self, request: bytes) -> bytes:
        """Answer an attestation request.

        :raises InvalidMessage: the request is not one.
        """
        nonce = wire.AttestRequest.from_bytes(request).nonce
        keys = self.keys.bundle_bytes
        quote = self._quote(wire.report_data(keys, self.policy_bytes, nonce))
        self.stats.attestations += 1
        return wire.AttestReply(nonce, self.code_digest, keys, self.policy_bytes, quote).to_bytes()

    # -- records ----------------------------------------------------------------------
    def on_record(self, body: bytes, now_ms: int) -> RecordOutcome:
        try:
            envelope, stream = open_record(body, self.keys, self.policy, now_ms, self.size_limit)
            state = self.streams[stream.name]
            state.check_duplicate(envelope)
            check_age(envelope, self.policy, now_ms)
            forget_at = envelope.sent_at_ms + int((self.policy.max_record_age_seconds + 1) * 1000)
            closed = state.accept(envelope, forget_at, now_ms)
        except RecordRejected as rejection:
            self.stats.rejected[rejection.reason.value] += 1
            return RecordOutcome(rejection=rejection)
        except Exception as err:  # noqa: BLE001 - the enclave must never die on input
            log.exception("unexpected error on a record; dead-lettering it")
            rejection = RecordRejected(RejectReason.MALFORMED, f"internal error: {type(err).__name__}")
            self.stats.rejected[rejection.reason.value] += 1
            return RecordOutcome(rejection=rejection)
        self.stats.accepted += 1
        return RecordOutcome(releases=self._close([closed], now_ms) if closed else ())

    def on_tick(self, now_ms: int) -> tuple[SignedRelease, ...]:
        """Close windows whose time is up; forget record ids past the replay horizon."""
        closed = []
        for state in self.streams.values():
            w = state.due(now_ms)
            if w is not None:
                closed.append(w)
            state.forget_expired(now_ms)
        return self._close(closed, now_ms)

    def confirm_published(self, release: SignedRelease) -> None:
        self.pending.pop((release.stream, release.window), None)

    def _close(self, windows: list[Window], now_ms: int) -> tuple[SignedRelease, ...]:
        out = []
        for w in windows:
            policy = self.policy.streams[w.stream]
            if w.count < policy.min_batch:
                self.stats.windows_withheld += 1
                log.info("window withheld", extra={"fields": {
                    "stream": w.stream, "window": w.index, "reason": "below min_batch",
                    "min_batch": policy.min_batch}})
                continue
            signed = noised_release(w, policy, self.keys, self.measurement, now_ms)
            self.pending[(signed.stream, signed.window)] = signed
            self.stats.windows_released += 1
            log.info("window released", extra={"fields": {"stream": w.stream, "window": w.index}})
            out.append(signed)
        return tuple(out)
