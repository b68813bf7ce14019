"""Released aggregates: the signed payload the enclave publishes and consumers verify.

A result on the wire is a :class:`common.wire.SignedMessage` whose payload is UTF-8
JSON with a ``kind`` field, signed under the label ``sealedsum/v1/result`` with the
enclave's attested Ed25519 key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from common import privacy, signing, wire
from common.attestation import AttestedEnclave
from common.errors import InvalidMessage, InvalidResultSignature

RESULT_KIND = "result"


@dataclass(frozen=True, slots=True)
class Release:
    """One noised window. ``sum`` and ``mean`` hold one entry per coordinate."""

    stream: str
    window: int
    count: int
    sum: list[float]
    sum_fixed: list[int]
    mean: list[float] | None
    dimension: int
    fraction_bits: int
    mechanism: str
    epsilon: float
    delta: float
    rho: float | None
    sum_noise_scale: float
    count_noise_scale: float
    key_epoch: int
    measurement: str
    closed_at_ms: int
    kind: str = RESULT_KIND

    def to_payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    @classmethod
    def from_payload(cls, payload: bytes) -> "Release":
        try:
            raw = json.loads(payload.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidMessage("result: payload is not ASCII JSON") from err
        if not isinstance(raw, dict) or raw.get("kind") != RESULT_KIND:
            raise InvalidMessage("result: not a result payload")
        expected = set(cls.__dataclass_fields__)
        if set(raw) != expected:
            raise InvalidMessage("result: unexpected or missing fields")
        release = cls(**raw)
        release._check()
        return release

    def _check(self) -> None:
        def num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        ok = (
            isinstance(self.stream, str) and wire.STREAM_NAME.fullmatch(self.stream)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in (self.window, self.count, self.dimension, self.fraction_bits, self.key_epoch, self.closed_at_ms))
            and isinstance(self.sum, list) and len(self.sum) == self.dimension and all(num(v) for v in self.sum)
            and isinstance(self.sum_fixed, list) and len(self.sum_fixed) == self.dimension
            and all(isinstance(v, int) and not isinstance(v, bool) for v in self.sum_fixed)
            and (self.mean is None or (isinstance(self.mean, list) and len(self.mean) == self.dimension and all(num(v) for v in self.mean)))
            and all(num(v) for v in (self.epsilon, self.delta, self.sum_noise_scale, self.count_noise_scale))
            and (self.rho is None or num(self.rho))
            and self.mechanism in privacy.MECHANISMS and isinstance(self.measurement, str)
        )
        if not ok:
            raise InvalidMessage("result: a field has the wrong type or length")

    def to_json(self) -> dict[str, Any]:
        """The consumer-facing view: scalars for one-dimensional streams."""
        scalar = self.dimension == 1
        out = {
            "stream": self.stream,
            "window": self.window,
            "count": self.count,
            "sum": self.sum[0] if scalar else self.sum,
            "mean": (self.mean[0] if scalar else self.mean) if self.mean is not None else None,
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "sum_noise_scale": self.sum_noise_scale * 2.0 ** -self.fraction_bits,
            "count_noise_scale": self.count_noise_scale,
            "closed_at_ms": self.closed_at_ms,
            "key_epoch": self.key_epoch,
        }
        if self.rho is not None:
            out["rho"] = self.rho
        return out


def verify_result(body: bytes, enclave: AttestedEnclave) -> Release:
    """Check a result's signature under the attested key, then parse it.

    :raises InvalidResultSignature: forged, altered, or signed by another enclave.
    :raises InvalidMessage: signed but not a well-formed result.
    """
    try:
        message = wire.SignedMessage.from_bytes(body)
    except InvalidMessage as err:
        raise InvalidResultSignature(f"result is not a signed message: {err}") from err
    signing.verify(enclave.keys.ed25519, signing.RESULT, message.payload, message.signature,
                   error=InvalidResultSignature, what="result")
    release = Release.from_payload(message.payload)
    if release.measurement != enclave.measurement.hex():
        raise InvalidResultSignature("result names another measurement than the attested enclave")
    if release.key_epoch != enclave.keys.epoch:
        raise InvalidResultSignature(f"result names key epoch {release.key_epoch}, attested {enclave.keys.epoch}")
    return release
