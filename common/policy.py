"""The measured policy: streams, bounds, windows, thresholds and privacy parameters.

The policy has canonical bytes (sorted-key compact JSON). Those bytes are hashed
into the measurement, returned in every attestation, and parsed back here by
producers and consumers, so every role reads the same numbers. The rules a policy
must meet are checked while it is read, in :mod:`sealedsum.common.policy_parse`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sealedsum.common import fixedpoint, privacy
from sealedsum.common.cluster import Cluster
from sealedsum.common.errors import ConfigError, PolicyMismatch
from sealedsum.common.identities import Identities
from sealedsum.common.packing import PackingLayout
from sealedsum.common.privacy import Mechanism

# A window holds at most this many records, so a total always fits OpenDP's 64-bit integers:
# a count-closed window closes at it, a time-closed one (or a count-closed one waiting for its
# release interval) refuses more (future_window).
HARD_MAX_WINDOW_RECORDS = 1_000_000
MAX_DIMENSION = 4096
SECURE_PAILLIER_BITS = (2048, 3072, 4096)


class StreamKind(StrEnum):
    """What a record of a stream holds (see :class:`StreamPolicy`); the value is the policy's
    and the wire's spelling."""

    SUM = "sum"
    MEAN = "mean"
    HISTOGRAM = "histogram"
    VECTOR = "vector"


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
    kind: StreamKind
    dimension: int
    min_batch: int
    mechanism: Mechanism
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
    # The budget group whose budget this stream spends (section 15.6); its budget_epsilon and
    # budget_delta above are then the group's, stated once in the group's table.
    budget_group: str | None = None
    # Count-closed streams only: no window closes sooner than this after the stream's previous
    # close, so records alone (one producer's flood) cannot spend the budget faster than the clock.
    min_release_interval_seconds: float | None = None

    KEYS = {
        "kind", "dimension", "lower", "upper", "l2_bound", "edges", "min_batch", "mechanism",
        "epsilon", "delta", "budget_epsilon", "budget_delta", "window_records", "window_seconds",
        "fraction_bits", "count_share", "max_records_per_producer", "packing",
        "budget_group", "min_release_interval_seconds",
    }

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "dimension": self.dimension, "min_batch": self.min_batch,
            "mechanism": self.mechanism, "epsilon": self.epsilon, "budget_epsilon": self.budget_epsilon,
        }
        if self.kind != StreamKind.HISTOGRAM:  # a histogram counts whole records: no fixed point, no count share
            out.update(fraction_bits=self.fraction_bits, count_share=self.count_share)
        if self.mechanism == Mechanism.GAUSSIAN:
            out.update(delta=self.delta, budget_delta=self.budget_delta)
        for key in ("lower", "upper", "edges"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        for key in ("l2_bound", "window_records", "window_seconds", "max_records_per_producer",
                    "min_release_interval_seconds"):  # each absent when not set: older policies keep their bytes
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.packing is not None:  # only when on, so unpacked streams keep their bytes
            out["packing"] = self.packing.to_mapping()
        if self.budget_group is not None:  # the budget is the group's: stated once, in its table
            del out["budget_epsilon"]
            out.pop("budget_delta", None)
            out["budget_group"] = self.budget_group
        return out

    @property
    def cost(self) -> privacy.ReleaseCost:
        """What one release of this stream costs."""
        return privacy.ReleaseCost(self.mechanism, self.epsilon, self.delta)

    @property
    def max_window_records(self) -> int:
        """The most records one window can hold: what totals and packed slots must fit. A
        count-closed window that must wait for its release interval keeps taking records past
        ``window_records`` (nothing honest is refused while a flood waits), up to the hard cap."""
        if self.window_records is None or self.min_release_interval_seconds is not None:
            return HARD_MAX_WINDOW_RECORDS
        return self.window_records

    @property
    def min_release_interval_ms(self) -> int | None:
        """The release interval in ms (at least 1), or ``None`` when the stream sets none."""
        if self.min_release_interval_seconds is None:
            return None
        return max(1, round(self.min_release_interval_seconds * 1000))

    @property
    def ciphertexts_per_record(self) -> int:
        """How many Paillier ciphertexts one record carries."""
        return self.packing.ciphertexts_per_record if self.packing is not None else self.dimension

    @property
    def values_per_record(self) -> int:
        """How many numbers a producer supplies for one record."""
        return 1 if self.kind == StreamKind.HISTOGRAM else self.dimension

    @property
    def contributions(self) -> int:
        """Records one privacy unit can add to a window: 1, or the per-producer bound."""
        return self.max_records_per_producer or 1

    def _box(self) -> list[tuple[float, float]]:
        lo = self.lower if isinstance(self.lower, tuple) else (self.lower,) * self.dimension
        hi = self.upper if isinstance(self.upper, tuple) else (self.upper,) * self.dimension
        return list(zip(lo, hi))

    @property
    def box(self) -> list[tuple[float, float]]:
        """Each coordinate's clipping bounds ``(lower, upper)``; box-bounded streams only."""
        return self._box()

    def coordinate_ranges(self, count: int) -> list[tuple[int, int]]:
        """The range each fixed-point total can take for ``count`` records; for ``count = 1``,
        what one record may hold, which the enclave checks every record against."""
        if self.kind == StreamKind.HISTOGRAM:
            return [(0, count)] * self.dimension
        if self.l2_bound is not None:
            m = math.floor(self.l2_bound * (1 << self.fraction_bits) + 0.5)
            return [(-count * m, count * m)] * self.dimension
        scale = 1 << self.fraction_bits
        return [(count * round(lo * scale), count * round(hi * scale)) for lo, hi in self._box()]

    @property
    def count_closed(self) -> bool:
        """Whether windows close at ``window_records`` records. Their count is then public by
        construction: it follows from how many records arrived and when (every window holds
        exactly ``window_records``, or, with a release interval, as many as arrived before the
        interval let it close), never from what the records hold. So their guarantee is for
        neighbouring datasets that *replace* one privacy unit's records (replace-one), and the
        sensitivities are those of a replacement, whatever the window's size. Windows closed by
        the clock alone give add/remove DP: one unit's records present or absent."""
        return self.window_records is not None

    @property
    def window_ms(self) -> int | None:
        """A time-closed stream's window length in ms: window ``w`` spans
        ``[w·window_ms, (w+1)·window_ms)`` of the enclave's clock (ms since the Unix epoch), the
        same numbers whatever arrived. ``None`` for count-closed streams."""
        if self.count_closed:
            return None
        return max(1, round(self.window_seconds * 1000))

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation of the stream's guarantee: ``replace-one`` or ``add/remove``."""
        return "replace-one" if self.count_closed else "add/remove"

    def sensitivities(self) -> tuple[int, float]:
        """(L1, L2) sensitivity of the window's fixed-point sums, per privacy unit of ``k``
        records, under the stream's neighbouring relation (:attr:`neighbouring`):

        ========== ======================================== =========================================
        kind       add/remove (one unit's records in or out) replace-one (one unit's records changed)
        ========== ======================================== =========================================
        box bounds ``k·Σ max(|l_i|, |u_i|)``, L2 alike       ``k·Σ (u_i − l_i)``, L2 alike
        L2 ball    ``k·L1(C)``, ``k·L2(C)``                   ``2k·L1(C)``, ``2k·L2(C)``
        histogram  ``k``, ``k``                               ``2k``, ``k·sqrt(2)``
        ========== ======================================== =========================================

        (``l_i``, ``u_i`` the fixed-point bounds; ``L1(C)``, ``L2(C)`` of
        :func:`privacy.l2_ball_sensitivity`; a histogram unit moving its ``k`` records from
        one bucket to another changes two buckets by ``k`` each.)
        """
        k = self.contributions
        replace = self.count_closed
        if self.kind == StreamKind.HISTOGRAM:
            return (2 * k, k * math.sqrt(2)) if replace else (k, float(k))
        if self.l2_bound is not None:
            l1, l2 = privacy.l2_ball_sensitivity(self.l2_bound, self.fraction_bits, self.dimension)
            return (2 * k * l1, 2 * k * l2) if replace else (k * l1, k * l2)
        if replace:
            bounds = [hi - lo for lo, hi in self.coordinate_ranges(1)]
        else:
            bounds = [privacy.fixed_bound(lo, hi, self.fraction_bits) for lo, hi in self._box()]
        return k * privacy.sensitivity_l1(bounds), k * privacy.sensitivity_l2(bounds)

    def noise_plan(self) -> privacy.NoisePlan:
        l1, l2 = self.sensitivities()
        return privacy.plan(
            self.mechanism, l1, l2, self.epsilon, self.delta, self.count_share,
            count_sensitivity=None if self.kind == StreamKind.HISTOGRAM else self.contributions,
        )

    def encode(self, values: list[float]) -> tuple[list[int], int]:
        """Clip and encode one record's values as the integers the producer encrypts.

        :returns: the integers and how many values clipping changed.
        :raises PolicyMismatch: wrong number of values, or not finite numbers.
        """
        if len(values) != self.values_per_record:
            raise PolicyMismatch(
                f"stream {self.name!r} takes {self.values_per_record} value(s) per record, got {len(values)}")
        if self.kind == StreamKind.HISTOGRAM:
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
class BudgetGroup:
    """Streams fed by the same data, sharing one budget (docs/protocol.md section 15.6).
    ``budget_delta`` is 0 when every stream in it is Laplace."""

    name: str
    budget_epsilon: float
    budget_delta: float
    streams: tuple[str, ...]  # sorted

    KEYS = {"budget_epsilon", "budget_delta"}

    def to_mapping(self) -> dict[str, Any]:
        # Membership is stated by the streams (their budget_group), not repeated here.
        return {"budget_epsilon": self.budget_epsilon,
                **({"budget_delta": self.budget_delta} if self.budget_delta else {})}


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
    budget_groups: dict[str, BudgetGroup] = field(default_factory=dict)
    # Enclave replicas sharing the work (None: one enclave per prefix).
    cluster: Cluster | None = None

    KEYS = {"paillier_bits", "max_record_age_seconds", "max_clock_skew_seconds", "insecure_test_keys",
            "key_grace_seconds", "rotate_keys_every_seconds"}

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
            # Only present when a group is defined, so policies without groups keep their bytes.
            **({"budget_groups": {name: g.to_mapping() for name, g in sorted(self.budget_groups.items())}}
               if self.budget_groups else {}),
            # Only present for replicas, so single-enclave policies keep their bytes.
            **({"cluster": self.cluster.to_mapping()} if self.cluster is not None else {}),
        }

    def burnable_streams(self) -> list[str]:
        """Count-closed streams whose budget one producer can spend as fast as it sends: no
        release interval, and not every producer held to fewer records per window than close
        one (an enrolled identity and a bound below ``window_records``); sorted."""
        out = []
        for name, s in sorted(self.streams.items()):
            if not s.count_closed or s.min_release_interval_seconds is not None:
                continue
            bounded = (self.identities.required and s.max_records_per_producer is not None
                       and s.max_records_per_producer < s.window_records)
            if not bounded:
                out.append(name)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    def stream(self, name: str) -> StreamPolicy:
        try:
            return self.streams[name]
        except KeyError:
            raise ConfigError(
                f"unknown stream {name!r}", hint=f"the policy defines: {', '.join(sorted(self.streams))}"
            ) from None
