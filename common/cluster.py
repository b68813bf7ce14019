"""Enclave replicas (``[cluster]`` in the config): how many record shards a deployment has,
which platforms its replicas may run on and which other measurements may join it.

Part of the measured policy, so a producer that attests one replica knows the deployment it
trusts is sharded and who may hold its keys: an operator cannot widen the list of code that
receives the keys without changing the measurement every client pins.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Mapping

from sealedsum.common.errors import ConfigError
from sealedsum.common.tables import integer, number, take

MAX_SHARDS = 64
DEFAULT_WINDOW_GRACE_SECONDS = 2.0


def _platform_keys(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("cluster.platform_keys must be a non-empty list of base64 Ed25519 keys",
                          hint="the platform keys replicas run on, as `sealedsum platform init` prints them")
    out = []
    for i, text in enumerate(raw):
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError, TypeError) as err:
            raise ConfigError(f"cluster.platform_keys[{i}] is not base64") from err
        if len(key) != 32:
            raise ConfigError(f"cluster.platform_keys[{i}] must be a 32-byte Ed25519 key")
        out.append(key)
    if len(set(out)) != len(out):
        raise ConfigError("cluster.platform_keys lists a key twice")
    return tuple(sorted(out))


def _measurements(raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list):
        raise ConfigError("cluster.peer_measurements must be a list of hex measurements")
    out = []
    for i, text in enumerate(raw):
        try:
            m = bytes.fromhex(text)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"cluster.peer_measurements[{i}] is not hex") from err
        if len(m) != 32:
            raise ConfigError(f"cluster.peer_measurements[{i}] must be 64 hex digits, as `sealedsum measure` prints")
        out.append(m)
    return tuple(sorted(set(out)))


@dataclass(frozen=True, slots=True)
class Cluster:
    """Replicas of one deployment.

    :param shards: record queues the records exchange hashes over (``PREFIX.records.0`` ...).
    :param platform_keys: the emulated platforms a replica may run on: a replica hands the
        deployment's keys only to a quote signed by one of them.
    :param peer_measurements: measurements other than this one that may join (and that this
        one may join): an upgrade runs old and new code side by side.
    :param window_grace_seconds: how long past a window's end the release holder waits for a
        replica that has not reported the window yet before it closes the window anyway.
    """

    shards: int
    platform_keys: tuple[bytes, ...]
    peer_measurements: tuple[bytes, ...] = ()
    window_grace_seconds: float = DEFAULT_WINDOW_GRACE_SECONDS

    KEYS = {"shards", "platform_keys", "peer_measurements", "window_grace_seconds"}

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Cluster":
        d = take(raw, cls.KEYS, "cluster")
        shards = integer(d.get("shards", 3), "cluster.shards", 1, MAX_SHARDS)
        grace = number(d.get("window_grace_seconds", DEFAULT_WINDOW_GRACE_SECONDS), "cluster.window_grace_seconds")
        if not 0 <= grace <= 3600:
            raise ConfigError("cluster.window_grace_seconds must be in [0, 3600]")
        if "platform_keys" not in d:
            raise ConfigError("cluster.platform_keys is missing",
                              hint="list the platform key of every machine a replica runs on")
        return cls(shards, _platform_keys(d["platform_keys"]), _measurements(d.get("peer_measurements", [])), grace)

    def to_mapping(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "platform_keys": [base64.b64encode(k).decode("ascii") for k in self.platform_keys],
            "peer_measurements": [m.hex() for m in self.peer_measurements],
            "window_grace_seconds": self.window_grace_seconds,
        }

    @property
    def window_grace_ms(self) -> int:
        return round(self.window_grace_seconds * 1000)
