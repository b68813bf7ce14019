"""The measured policy: streams, bounds, windows, thresholds and privacy parameters.

The policy has canonical bytes (sorted-key compact JSON). Those bytes are hashed
into the measurement, returned in every attestation, and parsed back here by
producers and consumers, so every role reads the same numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from common import privacy
from common.errors import ConfigError, InvalidMessage
from common.wire import STREAM_NAME

# A window closes at this many records even when only window_seconds is set, so a
# total always fits OpenDP's 64-bit integers.
HARD_MAX_WINDOW_RECORDS = 1_000_000
MAX_DIMENSION = 4096
SECURE_PAILLIER_BITS = (2048, 3072, 4096)


def _take(raw: Mapping[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                          hint=f"allowed keys: {', '.join(sorted(allowed))}")
    return dict(raw)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a finite number")
    try:
        value = float(value)  # an integer beyond float range raises OverflowError
    except OverflowError:
        raise ConfigError(f"{where} must be a finite number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number")
    return value


def _integer(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer in [{lo}, {hi}]")
    return value


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """One stream: what a record holds, how windows close, and what a release spends."""

    name: str
    dimension: int
    lower: float
    upper: float
    min_batch: int
    mechanism: str
    epsilon: float
    delta: float = 0.0
    window_records: int | None = None
    window_seconds: float | None = None
    fraction_bits: int = 16
    count_share: float = 0.5

    KEYS = {
        "dimension", "lower", "upper", "min_batch", "mechanism", "epsilon", "delta",
        "window_records", "window_seconds", "fraction_bits", "count_share",
    }

    @classmethod
    def from_mapping(cls, name: str, raw: Mapping[str, Any]) -> "StreamPolicy":
        where = f"streams.{name}"
        if not STREAM_NAME.fullmatch(name):
            raise ConfigError(f"{where}: stream names are 1-64 characters of A-Z a-z 0-9 _ -")
        d = _take(raw, cls.KEYS, where)
        for key in ("lower", "upper", "min_batch", "mechanism", "epsilon"):
            if key not in d:
                raise ConfigError(f"{where}: missing required key {key!r}")
        mechanism = d["mechanism"]
        if mechanism not in privacy.MECHANISMS:
            raise ConfigError(f"{where}.mechanism must be one of {', '.join(privacy.MECHANISMS)}")
        epsilon = _number(d["epsilon"], f"{where}.epsilon")
        if epsilon <= 0:
            raise ConfigError(f"{where}.epsilon must be > 0 (smaller is more private)")
        if mechanism == privacy.GAUSSIAN:
            if "delta" not in d:
                raise ConfigError(f"{where}: the gaussian mechanism needs delta (e.g. 1e-6)")
            delta = _number(d["delta"], f"{where}.delta")
            if not 0 < delta < 1:
                raise ConfigError(f"{where}.delta must be in (0, 1)")
        else:
            if d.get("delta", 0) not in (0, 0.0):
                raise ConfigError(f"{where}: delta applies to the gaussian mechanism only")
            delta = 0.0
        lower, upper = _number(d["lower"], f"{where}.lower"), _number(d["upper"], f"{where}.upper")
        if not lower < upper:
            raise ConfigError(f"{where}: lower must be below upper")
        window_records = d.get("window_records")
        window_seconds = d.get("window_seconds")
        if window_records is None and window_seconds is None:
            raise ConfigError(f"{where}: set window_records, window_seconds or both")
        if window_records is not None:
            window_records = _integer(window_records, f"{where}.window_records", 1, HARD_MAX_WINDOW_RECORDS)
        if window_seconds is not None:
            window_seconds = _number(window_seconds, f"{where}.window_seconds")
            if window_seconds <= 0:
                raise ConfigError(f"{where}.window_seconds must be > 0")
        min_batch = _integer(d["min_batch"], f"{where}.min_batch", 1, HARD_MAX_WINDOW_RECORDS)
        if window_records is not None and min_batch > window_records:
            raise ConfigError(f"{where}: min_batch above window_records: no window could ever be released")
        fraction_bits = _integer(d.get("fraction_bits", 16), f"{where}.fraction_bits", 0, 40)
        count_share = _number(d.get("count_share", 0.5), f"{where}.count_share")
        if not 0 < count_share < 1:
            raise ConfigError(f"{where}.count_share must be strictly between 0 and 1")
        policy = cls(
            name=name,
            dimension=_integer(d.get("dimension", 1), f"{where}.dimension", 1, MAX_DIMENSION),
            lower=lower, upper=upper, min_batch=min_batch, mechanism=mechanism,
            epsilon=epsilon, delta=delta, window_records=window_records,
            window_seconds=window_seconds, fraction_bits=fraction_bits, count_share=count_share,
        )
        bound = privacy.fixed_bound(lower, upper, fraction_bits)
        if bound * policy.max_window_records * policy.dimension >= 1 << 62:
            raise ConfigError(f"{where}: bounds × fraction_bits × window size overflow 62 bits",
                              hint="lower fraction_bits or window_records")
        return policy

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dimension": self.dimension, "lower": self.lower, "upper": self.upper,
            "min_batch": self.min_batch, "mechanism": self.mechanism, "epsilon": self.epsilon,
            "fraction_bits": self.fraction_bits, "count_share": self.count_share,
        }
        if self.mechanism == privacy.GAUSSIAN:
            out["delta"] = self.delta
        if self.window_records is not None:
            out["window_records"] = self.window_records
        if self.window_seconds is not None:
            out["window_seconds"] = self.window_seconds
        return out

    @property
    def max_window_records(self) -> int:
        return self.window_records or HARD_MAX_WINDOW_RECORDS

    @property
    def value_bound(self) -> int:
        """max(|l|, |u|) per coordinate, in fixed-point units."""
        return privacy.fixed_bound(self.lower, self.upper, self.fraction_bits)

    def noise_plan(self) -> privacy.NoisePlan:
        return privacy.plan(
            self.mechanism, [self.value_bound] * self.dimension,
            self.epsilon, self.delta, self.count_share,
        )


@dataclass(frozen=True, slots=True)
class EnclavePolicy:
    """Everything the measurement covers besides code."""

    streams: dict[str, StreamPolicy] = field(default_factory=dict)
    paillier_bits: int = 3072
    max_record_age_seconds: float = 900.0
    max_clock_skew_seconds: float = 60.0
    insecure_test_keys: bool = False

    KEYS = {"paillier_bits", "max_record_age_seconds", "max_clock_skew_seconds", "insecure_test_keys"}

    @classmethod
    def from_mapping(cls, enclave: Mapping[str, Any], streams: Mapping[str, Any]) -> "EnclavePolicy":
        d = _take(enclave, cls.KEYS, "enclave")
        insecure = d.get("insecure_test_keys", False)
        if not isinstance(insecure, bool):
            raise ConfigError("enclave.insecure_test_keys must be true or false")
        bits = _integer(d.get("paillier_bits", 3072), "enclave.paillier_bits", 512, 8192)
        if bits not in SECURE_PAILLIER_BITS and not (insecure and bits % 256 == 0):
            raise ConfigError(
                f"enclave.paillier_bits must be one of {SECURE_PAILLIER_BITS}",
                hint="smaller keys are for tests only: set insecure_test_keys = true (it is attested)",
            )
        age = _number(d.get("max_record_age_seconds", 900.0), "enclave.max_record_age_seconds")
        skew = _number(d.get("max_clock_skew_seconds", 60.0), "enclave.max_clock_skew_seconds")
        if age <= 0 or skew < 0:
            raise ConfigError("enclave: record age must be > 0 and clock skew >= 0")
        if not isinstance(streams, Mapping) or not streams:
            raise ConfigError("the policy defines no streams", hint="add a [streams.NAME] table")
        parsed = {name: StreamPolicy.from_mapping(name, raw) for name, raw in streams.items()}
        return cls(parsed, bits, age, skew, insecure)

    def to_mapping(self) -> dict[str, Any]:
        return {
            "version": 1,
            "enclave": {
                "paillier_bits": self.paillier_bits,
                "max_record_age_seconds": self.max_record_age_seconds,
                "max_clock_skew_seconds": self.max_clock_skew_seconds,
                "insecure_test_keys": self.insecure_test_keys,
            },
            "streams": {name: s.to_mapping() for name, s in sorted(self.streams.items())},
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> "EnclavePolicy":
        """Parse attested policy bytes; any problem is an ``InvalidMessage``."""
        try:
            raw = json.loads(data.decode("ascii"))
            if not isinstance(raw, dict) or raw.get("version") != 1 or set(raw) != {"version", "enclave", "streams"}:
                raise InvalidMessage("policy: not a version 1 policy document")
            return cls.from_mapping(raw["enclave"], raw["streams"])
        except (UnicodeDecodeError, json.JSONDecodeError, ConfigError) as err:
            raise InvalidMessage(f"policy: {err}") from err

    def stream(self, name: str) -> StreamPolicy:
        try:
            return self.streams[name]
        except KeyError:
            raise ConfigError(
                f"unknown stream {name!r}", hint=f"the policy defines: {', '.join(sorted(self.streams))}"
            ) from None
