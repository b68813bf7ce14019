"""The measured policy: streams, bounds, windows, thresholds and privacy parameters.

The policy has canonical bytes (sorted-key compact JSON). Those bytes are hashed
into the measurement, returned in every attestation, and parsed back here by
producers and consumers, so every role reads the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from sealedsum.common import fixedpoint, privacy
from sealedsum.common.errors import ConfigError, InvalidMessage, PolicyMismatch
from sealedsum.common.identities import Identities
from sealedsum.common.packing import LayoutError, PackingLayout
from sealedsum.common.tables import integer, number, take
from sealedsum.common.wire import STREAM_NAME

# A window closes at this many records even when only window_seconds is set, so a
# total always fits OpenDP's 64-bit integers.
HARD_MAX_WINDOW_RECORDS = 1_000_000
MAX_DIMENSION = 4096
SECURE_PAILLIER_BITS = (2048, 3072, 4096)


KINDS = ("sum", "mean", "histogram", "vector")


def _bounds(value: Any, where: str, dimension: int) -> float | tuple[float, ...]:
    if isinstance(value, list):
        if len(value) != dimension:
            raise ConfigError(f"{where} has {len(value)} entries; the stream has dimension {dimension}")
        return tuple(number(v, f"{where}[{i}]") for i, v in enumerate(value))
    return number(value, where)


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    """One stream: what a record holds, how windows close, and what a release spends.

    ``kind`` decides what a record is:

    - ``sum`` / ``mean``: ``dimension`` values, each clipped to [lower, upper]; a
      release has noised sums, a noised count and means post-processed from them;
    - ``vector``: ``dimension`` values with per-coordinate bounds (``lower``/``upper``
      as lists) or an L2 norm bound (``l2_bound``), e.g. model updates;
    - ``histogram``: one value, counted in the bucket of ``edges`` it falls in; a
      release has noised bucket counts, and the count is their sum.

    ``packing`` (any kind; off unless the stream sets ``packing = true``) puts several
    coordinates into each Paillier plaintext (:mod:`sealedsum.common.packing`): a record is then
    ``ciphertexts_per_record`` ciphertexts instead of ``dimension``.
    """

    name: str
    kind: str
    dimension: int
    min_batch: int
    mechanism: str
    epsilon: float
    budget_epsilon: float
    delta: float = 0.0
    budget_delta: float = 0.0
    lower: float | tuple[float, ...] | None = None
    upper: float | tuple[float, ...] | None = None
    l2_bound: float | None = None
    edges: tuple[float, ...] | None = None
    window_records: int | None = None
    window_seconds: float | None = None
    fraction_bits: int = 16
    count_share: float = 0.5
    max_records_per_producer: int | None = None
    packing: PackingLayout | None = None

    KEYS = {
        "kind", "dimension", "lower", "upper", "l2_bound", "edges", "min_batch", "mechanism",
        "epsilon", "delta", "budget_epsilon", "budget_delta", "window_records", "window_seconds",
        "fraction_bits", "count_share", "max_records_per_producer", "packing",
    }

    @classmethod
    def from_mapping(cls, name: str, raw: Mapping[str, Any], paillier_bits: int | None = None) -> "StreamPolicy":
        """:param paillier_bits: the enclave's key size; a packed stream's layout depends on it."""
        where = f"streams.{name}"
        if not STREAM_NAME.fullmatch(name):
            raise ConfigError(f"{where}: stream names are 1-64 characters of A-Z a-z 0-9 _ -")
        d = take(raw, cls.KEYS, where)
        kind = d.get("kind", "sum")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind must be one of {', '.join(KINDS)}")
        for key in ("min_batch", "mechanism", "epsilon", "budget_epsilon"):
            if key not in d:
                hint = ("the total privacy budget of the stream, e.g. budget_epsilon = 10"
                        if key == "budget_epsilon" else None)
                raise ConfigError(f"{where}: missing required key {key!r}", hint=hint)
        mechanism = d["mechanism"]
        if mechanism not in privacy.MECHANISMS:
            raise ConfigError(f"{where}.mechanism must be one of {', '.join(privacy.MECHANISMS)}")
        epsilon = number(d["epsilon"], f"{where}.epsilon")
        if epsilon <= 0:
            raise ConfigError(f"{where}.epsilon must be > 0 (smaller is more private)")
        budget_epsilon = number(d["budget_epsilon"], f"{where}.budget_epsilon")
        if mechanism == privacy.GAUSSIAN:
            for key in ("delta", "budget_delta"):
                if key not in d:
                    raise ConfigError(f"{where}: the gaussian mechanism needs {key} (e.g. 1e-6)")
            delta = number(d["delta"], f"{where}.delta")
            budget_delta = number(d["budget_delta"], f"{where}.budget_delta")
            if not 0 < delta < 1 or not 0 < budget_delta < 1:
                raise ConfigError(f"{where}: delta and budget_delta must be in (0, 1)")
        else:
            for key in ("delta", "budget_delta"):
                if d.get(key, 0) not in (0, 0.0):
                    raise ConfigError(f"{where}: {key} applies to the gaussian mechanism only")
            delta = budget_delta = 0.0

        fields: dict[str, Any] = {}
        if kind == "histogram":
            for key in ("lower", "upper", "l2_bound", "fraction_bits"):
                if key in d:
                    raise ConfigError(f"{where}: {key} does not apply to a histogram (its edges bound it)")
            edges = d.get("edges")
            if not isinstance(edges, list) or len(edges) < 2:
                raise ConfigError(f"{where}.edges must list at least two bucket edges")
            edges = tuple(number(e, f"{where}.edges") for e in edges)
            if any(b <= a for a, b in zip(edges, edges[1:])):
                raise ConfigError(f"{where}.edges must increase strictly")
            dimension = len(edges) - 1
            if d.get("dimension", dimension) != dimension:
                raise ConfigError(f"{where}: a histogram's dimension is its number of buckets ({dimension})")
            fields.update(edges=edges, fraction_bits=0)
        else:
            if "edges" in d:
                raise ConfigError(f"{where}: edges apply to histograms only")
            dimension = integer(d.get("dimension", 1), f"{where}.dimension", 1, MAX_DIMENSION)
            fields["fraction_bits"] = integer(d.get("fraction_bits", 16), f"{where}.fraction_bits", 0, 40)
            if "l2_bound" in d:
                if kind != "vector":
                    raise ConfigError(f"{where}: l2_bound applies to kind = \"vector\" only")
                if "lower" in d or "upper" in d:
                    raise ConfigError(f"{where}: give either lower/upper or l2_bound, not both")
                l2 = number(d["l2_bound"], f"{where}.l2_bound")
                if l2 <= 0:
                    raise ConfigError(f"{where}.l2_bound must be > 0")
                fields["l2_bound"] = l2
            else:
                if "lower" not in d or "upper" not in d:
                    raise ConfigError(f"{where}: missing lower and upper (clipping bounds)")
                lower = _bounds(d["lower"], f"{where}.lower", dimension)
                upper = _bounds(d["upper"], f"{where}.upper", dimension)
                if kind != "vector" and (isinstance(lower, tuple) or isinstance(upper, tuple)):
                    raise ConfigError(f"{where}: per-coordinate bounds need kind = \"vector\"")
                lo = lower if isinstance(lower, tuple) else (lower,) * dimension
                hi = upper if isinstance(upper, tuple) else (upper,) * dimension
                if any(a >= b for a, b in zip(lo, hi)):
                    raise ConfigError(f"{where}: lower must be below upper")
                fields.update(lower=lower, upper=upper)

        window_records = d.get("window_records")
        window_seconds = d.get("window_seconds")
        if window_records is None and window_seconds is None:
            raise ConfigError(f"{where}: set window_records, window_seconds or both")
        if window_records is not None:
            window_records = integer(window_records, f"{where}.window_records", 1, HARD_MAX_WINDOW_RECORDS)
        if window_seconds is not None:
            window_seconds = number(window_seconds, f"{where}.window_seconds")
            if window_seconds <= 0:
                raise ConfigError(f"{where}.window_seconds must be > 0")
        min_batch = integer(d["min_batch"], f"{where}.min_batch", 1, HARD_MAX_WINDOW_RECORDS)
        if window_records is not None and min_batch > window_records:
            raise ConfigError(f"{where}: min_batch above window_records: no window could ever be released")
        count_share = number(d.get("count_share", 0.5), f"{where}.count_share")
        if not 0 < count_share < 1:
            raise ConfigError(f"{where}.count_share must be strictly between 0 and 1")
        if kind == "histogram" and "count_share" in d:
            raise ConfigError(f"{where}: a histogram's count is the sum of its buckets; count_share does not apply")
        per_producer = d.get("max_records_per_producer")
        if per_producer is not None:
            per_producer = integer(per_producer, f"{where}.max_records_per_producer", 1, HARD_MAX_WINDOW_RECORDS)

        policy = cls(
            name=name, kind=kind, dimension=dimension, min_batch=min_batch, mechanism=mechanism,
            epsilon=epsilon, budget_epsilon=budget_epsilon, delta=delta, budget_delta=budget_delta,
            window_records=window_records, window_seconds=window_seconds, count_share=count_share,
            max_records_per_producer=per_producer, **fields,
        )
        try:
            widest = max(max(abs(lo), abs(hi)) for lo, hi in policy.coordinate_ranges(1))
        except OverflowError:  # a bound times 2^fraction_bits is beyond the float range
            widest = math.inf
        if widest * policy.max_window_records >= 1 << 62:
            raise ConfigError(f"{where}: bounds × 2^fraction_bits × window size overflow 62 bits",
                              hint="lower fraction_bits or window_records")
        if not privacy.budget_allows(policy.mechanism, policy.epsilon, policy.delta, 1,
                                     policy.budget_epsilon, policy.budget_delta):
            raise ConfigError(f"{where}: budget_epsilon is smaller than the cost of one release",
                              hint="raise budget_epsilon or lower epsilon")
        try:  # the enclave must be able to noise a release: finite scales (OpenDP refuses others)
            plan = policy.noise_plan()
            finite = math.isfinite(plan.sum_scale) and (plan.count_scale is None or math.isfinite(plan.count_scale))
        except ArithmeticError:  # epsilon × count_share rounds to 0
            finite = False
        if not finite:
            raise ConfigError(f"{where}: epsilon (or count_share) is too small for a finite noise scale",
                              hint="raise epsilon")
        return policy._with_packing(d.get("packing", False), paillier_bits, where)

    def _with_packing(self, raw: Any, paillier_bits: int | None, where: str) -> "StreamPolicy":
        """``packing = true`` in a configuration; in policy bytes, the derived layout table,
        which must be exactly the one these bounds and this key size give."""
        declared = None
        if isinstance(raw, Mapping):
            declared = raw
        elif not isinstance(raw, bool):
            raise ConfigError(f"{where}.packing must be true or false")
        elif not raw:
            return self
        if paillier_bits is None:
            raise ConfigError(f"{where}: packing needs the enclave's paillier_bits")
        try:
            layout = PackingLayout.derive(self.coordinate_ranges(1), self.max_window_records, paillier_bits)
        except LayoutError as err:
            raise ConfigError(f"{where}.packing: {err}", hint="lower fraction_bits or window_records") from None
        if declared is not None and not layout.matches(declared):
            raise ConfigError(f"{where}.packing does not match the layout these bounds and keys give: "
                              f"{layout.to_mapping()}", hint="in a configuration, write packing = true")
        return dataclasses.replace(self, packing=layout)

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "dimension": self.dimension, "min_batch": self.min_batch,
            "mechanism": self.mechanism, "epsilon": self.epsilon, "budget_epsilon": self.budget_epsilon,
        }
        if self.kind != "histogram":  # a histogram counts whole records: no fixed point, no count share
            out.update(fraction_bits=self.fraction_bits, count_share=self.count_share)
        if self.mechanism == privacy.GAUSSIAN:
            out.update(delta=self.delta, budget_delta=self.budget_delta)
        for key in ("lower", "upper", "edges"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        for key in ("l2_bound", "window_records", "window_seconds", "max_records_per_producer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.packing is not None:  # only when on, so unpacked streams keep their bytes
            out["packing"] = self.packing.to_mapping()
        return out

    @property
    def max_window_records(self) -> int:
        return self.window_records or HARD_MAX_WINDOW_RECORDS

    @property
    def ciphertexts_per_record(self) -> int:
        """How many Paillier ciphertexts one record carries."""
        return self.packing.ciphertexts_per_record if self.packing is not None else self.dimension

    @property
    def values_per_record(self) -> int:
        """How many numbers a producer supplies for one record."""
        return 1 if self.kind == "histogram" else self.dimension

    @property
    def contributions(self) -> int:
        """Records one privacy unit can add to a window: 1, or the per-producer bound."""
        return self.max_records_per_producer or 1

    def _box(self) -> list[tuple[float, float]]:
        lo = self.lower if isinstance(self.lower, tuple) else (self.lower,) * self.dimension
        hi = self.upper if isinstance(self.upper, tuple) else (self.upper,) * self.dimension
        return list(zip(lo, hi))

    def coordinate_ranges(self, count: int) -> list[tuple[int, int]]:
        """The range each fixed-point total can take for ``count`` honest records.

        The enclave clamps decrypted totals to it, so a dishonest producer's value cannot
        overflow the noise domain or move a total where honest ones could not.
        """
        if self.kind == "histogram":
            return [(0, count)] * self.dimension
        if self.l2_bound is not None:
            m = math.floor(self.l2_bound * (1 << self.fraction_bits) + 0.5)
            return [(-count * m, count * m)] * self.dimension
        scale = 1 << self.fraction_bits
        return [(count * round(lo * scale), count * round(hi * scale)) for lo, hi in self._box()]

    def sensitivities(self) -> tuple[int, float]:
        """(L1, L2) sensitivity of the window's fixed-point sums, per privacy unit."""
        k = self.contributions
        if self.kind == "histogram":
            return k, float(k)
        if self.l2_bound is not None:
            l1, l2 = privacy.l2_ball_sensitivity(self.l2_bound, self.fraction_bits, self.dimension)
            return k * l1, k * l2
        bounds = [privacy.fixed_bound(lo, hi, self.fraction_bits) for lo, hi in self._box()]
        return k * privacy.sensitivity_l1(bounds), k * privacy.sensitivity_l2(bounds)

    def noise_plan(self) -> privacy.NoisePlan:
        l1, l2 = self.sensitivities()
        return privacy.plan(
            self.mechanism, l1, l2, self.epsilon, self.delta, self.count_share,
            count_sensitivity=None if self.kind == "histogram" else self.contributions,
        )

    def encode(self, values: list[float]) -> tuple[list[int], int]:
        """Clip and encode one record's values as the integers the producer encrypts.

        :returns: the integers and how many values clipping changed.
        :raises PolicyMismatch: wrong number of values, or not finite numbers.
        """
        if len(values) != self.values_per_record:
            raise PolicyMismatch(
                f"stream {self.name!r} takes {self.values_per_record} value(s) per record, got {len(values)}")
        if self.kind == "histogram":
            return fixedpoint.one_hot(values[0], self.edges)
        if self.l2_bound is not None:
            clipped, n = fixedpoint.clip_l2(values, self.l2_bound)
        else:
            clipped, n = fixedpoint.clip_box(values, self._box())
        return fixedpoint.encode(clipped, self.fraction_bits), n

    def plaintexts(self, encoded: list[int]) -> list[int]:
        """The Paillier plaintexts of one encoded record: the values themselves, or packed."""
        return encoded if self.packing is None else self.packing.pack(encoded)


@dataclass(frozen=True, slots=True)
class EnclavePolicy:
    """Everything the measurement covers besides code."""

    streams: dict[str, StreamPolicy] = field(default_factory=dict)
    paillier_bits: int = 3072
    max_record_age_seconds: float = 900.0
    max_clock_skew_seconds: float = 60.0
    insecure_test_keys: bool = False
    identities: Identities = Identities()
    key_grace_seconds: float = 900.0
    rotate_keys_every_seconds: float | None = None

    KEYS = {"paillier_bits", "max_record_age_seconds", "max_clock_skew_seconds", "insecure_test_keys",
            "key_grace_seconds", "rotate_keys_every_seconds"}

    @classmethod
    def from_mapping(cls, enclave: Mapping[str, Any], streams: Mapping[str, Any],
                     identities: Mapping[str, Any] | None = None) -> "EnclavePolicy":
        d = take(enclave, cls.KEYS, "enclave")
        insecure = d.get("insecure_test_keys", False)
        if not isinstance(insecure, bool):
            raise ConfigError("enclave.insecure_test_keys must be true or false")
        bits = integer(d.get("paillier_bits", 3072), "enclave.paillier_bits", 512, 8192)
        if bits not in SECURE_PAILLIER_BITS and not (insecure and bits % 256 == 0):
            raise ConfigError(
                f"enclave.paillier_bits must be one of {SECURE_PAILLIER_BITS}",
                hint="smaller keys are for tests only: set insecure_test_keys = true (it is attested)",
            )
        age = number(d.get("max_record_age_seconds", 900.0), "enclave.max_record_age_seconds")
        skew = number(d.get("max_clock_skew_seconds", 60.0), "enclave.max_clock_skew_seconds")
        if age <= 0 or skew < 0:
            raise ConfigError("enclave: record age must be > 0 and clock skew >= 0")
        if not isinstance(streams, Mapping) or not streams:
            raise ConfigError("the policy defines no streams", hint="add a [streams.NAME] table")
        parsed = {name: StreamPolicy.from_mapping(name, raw, bits) for name, raw in streams.items()}
        grace = number(d.get("key_grace_seconds", 900.0), "enclave.key_grace_seconds")
        if grace < 0:
            raise ConfigError("enclave.key_grace_seconds must be >= 0")
        every = d.get("rotate_keys_every_seconds")
        if every is not None:
            every = number(every, "enclave.rotate_keys_every_seconds")
            if every <= grace:
                raise ConfigError("enclave.rotate_keys_every_seconds must exceed key_grace_seconds",
                                  hint="otherwise an epoch would retire before producers could move on")
        return cls(parsed, bits, age, skew, insecure, Identities.from_mapping(identities or {}), grace, every)

    def to_mapping(self) -> dict[str, Any]:
        return {
            "version": 1,
            "enclave": {
                "paillier_bits": self.paillier_bits,
                "max_record_age_seconds": self.max_record_age_seconds,
                "max_clock_skew_seconds": self.max_clock_skew_seconds,
                "insecure_test_keys": self.insecure_test_keys,
                # Only present when not the default, so older policies keep their bytes.
                **({"key_grace_seconds": self.key_grace_seconds} if self.key_grace_seconds != 900.0 else {}),
                **({"rotate_keys_every_seconds": self.rotate_keys_every_seconds}
                   if self.rotate_keys_every_seconds is not None else {}),
            },
            "streams": {name: s.to_mapping() for name, s in sorted(self.streams.items())},
            # Only present when configured, so policies without identities keep their bytes.
            **({"identities": self.identities.to_mapping()} if self.identities else {}),
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> "EnclavePolicy":
        """Parse attested policy bytes; any problem is an ``InvalidMessage``."""
        try:
            raw = json.loads(data.decode("ascii"))
            if (not isinstance(raw, dict) or raw.get("version") != 1
                    or set(raw) - {"identities"} != {"version", "enclave", "streams"}):
                raise InvalidMessage("policy: not a version 1 policy document")
            return cls.from_mapping(raw["enclave"], raw["streams"], raw.get("identities"))
        except (ValueError, RecursionError, ConfigError) as err:
            # ValueError: not ASCII, not JSON, or an integer of more than 4300 digits;
            # RecursionError: nesting deeper than the interpreter's recursion limit.
            raise InvalidMessage(f"policy: {err}") from err

    def stream(self, name: str) -> StreamPolicy:
        try:
            return self.streams[name]
        except KeyError:
            raise ConfigError(
                f"unknown stream {name!r}", hint=f"the policy defines: {', '.join(sorted(self.streams))}"
            ) from None
