"""What a client demands of a stream's attested policy (``[require]`` in the config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from sealedsum.common.errors import ConfigError, PolicyTooWeak
from sealedsum.common.policy import HARD_MAX_WINDOW_RECORDS, StreamPolicy
from sealedsum.common.tables import integer, number, take


@dataclass(frozen=True, slots=True)
class Requirements:
    """The weakest guarantee a client accepts for a stream (``[require]`` in the config).

    Checked against the *attested* policy before anything is sent: a stream that
    promises less is refused with :class:`~sealedsum.common.errors.PolicyTooWeak`.
    """

    max_epsilon: float | None = None
    max_delta: float | None = None
    max_budget_epsilon: float | None = None
    max_budget_delta: float | None = None
    min_min_batch: int | None = None

    KEYS = {"max_epsilon", "max_delta", "max_budget_epsilon", "max_budget_delta", "min_min_batch"}

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "require") -> "Requirements":
        d = take(raw, cls.KEYS, where)
        out: dict[str, Any] = {}
        for key in cls.KEYS - {"min_min_batch"}:
            if key in d:
                out[key] = number(d[key], f"{where}.{key}")
                if out[key] < 0:
                    raise ConfigError(f"{where}.{key} must be >= 0")
        if "min_min_batch" in d:
            out["min_min_batch"] = integer(d["min_min_batch"], f"{where}.min_min_batch", 1, HARD_MAX_WINDOW_RECORDS)
        return cls(**out)

    def merged(self, override: "Requirements") -> "Requirements":
        return Requirements(**{k: getattr(override, k) if getattr(override, k) is not None else getattr(self, k)
                               for k in self.KEYS})

    def check(self, stream: StreamPolicy) -> None:
        """:raises PolicyTooWeak: naming every requirement the stream's policy misses."""
        misses = []
        if self.max_epsilon is not None and stream.epsilon > self.max_epsilon:
            misses.append(f"epsilon per release {stream.epsilon:g} > {self.max_epsilon:g}")
        if self.max_delta is not None and stream.delta > self.max_delta:
            misses.append(f"delta per release {stream.delta:g} > {self.max_delta:g}")
        if self.max_budget_epsilon is not None and stream.budget_epsilon > self.max_budget_epsilon:
            misses.append(f"budget_epsilon {stream.budget_epsilon:g} > {self.max_budget_epsilon:g}")
        if self.max_budget_delta is not None and stream.budget_delta > self.max_budget_delta:
            misses.append(f"budget_delta {stream.budget_delta:g} > {self.max_budget_delta:g}")
        if self.min_min_batch is not None and stream.min_batch < self.min_min_batch:
            misses.append(f"min_batch {stream.min_batch} < {self.min_min_batch}")
        if misses:
            raise PolicyTooWeak(
                f"stream {stream.name!r} promises less privacy than required: {'; '.join(misses)}",
                hint="nothing was sent; relax [require] only if the weaker guarantee is acceptable",
            )
