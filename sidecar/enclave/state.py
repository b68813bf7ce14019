"""What the enclave's sealed state holds, and its format: the open windows (ciphertext
totals, counts, contributors), the record ids within the replay horizon, the ledgers, the
window numbers, which streams are exhausted, the windows closed but not yet drawn, and
the signed but unconfirmed publications (so a retry never draws new noise).

Pure: the enclave process's store (``sealedsum.sidecar.enclave_process.store``) seals and
writes what :meth:`EnclaveState.checkpoint` returns, and hands back what it read to
:meth:`EnclaveState.restore`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from phe import PaillierPublicKey

from sealedsum.common import wire
from sealedsum.common.errors import StateIncompatible
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.results import PAYLOADS
from sealedsum.sidecar.enclave.aggregate import StreamState, Window
from sealedsum.sidecar.enclave.ledger import StreamLedger, ledgers
from sealedsum.sidecar.enclave.release import Publication

STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Closing:
    """A closed window whose release is charged to the ledger but not drawn yet. Its totals
    are ciphertexts, safe in the sealed state, until :meth:`Enclave.draw` decrypts,
    noises and signs them. ``budget`` is the ledger's summary after this release's charge;
    ``exhausts``: no release of the stream fits the budget after this one."""

    key: str
    window: Window
    budget: dict
    closed_at_ms: int
    exhausts: bool

    def to_json(self) -> dict:
        return {"stream": self.window.stream, "window": self.window.to_json(), "budget": self.budget,
                "closed_at_ms": self.closed_at_ms, "exhausts": self.exhausts}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint of the sealed state: the whole state (``base``) or the changes since the
    previous checkpoint (a journal entry). The record ids it adds stay on the core's list of
    new ids until :meth:`Enclave.checkpointed` says it is durable, so a failed write loses
    none of them."""

    base: bool
    state: dict
    new_ids: int


@dataclass(slots=True)
class EnclaveState:
    policy: EnclavePolicy
    streams: dict[str, StreamState]
    ledgers: dict[str, StreamLedger]
    exhausted: set[str] = field(default_factory=set)
    # Signed messages not yet confirmed by the broker, by Publication.key.
    pending: dict[str, Publication] = field(default_factory=dict)
    closing: dict[str, Closing] = field(default_factory=dict)
    # Record ids accepted since the last durable checkpoint: (stream, id, forget_at_ms).
    new_seen: list[tuple[str, bytes, int]] = field(default_factory=list)

    @classmethod
    def fresh(cls, policy: EnclavePolicy) -> "EnclaveState":
        return cls(policy, {name: StreamState(p) for name, p in policy.streams.items()}, ledgers(policy))

    def _core(self, key_epoch: int) -> dict:
        return {
            "version": STATE_VERSION,
            "key_epoch": key_epoch,
            "streams": {name: self._stream_json(name) for name in self.policy.streams},
            "pending": {key: {"stream": p.stream, "body": base64.b64encode(p.body).decode()}
                        for key, p in self.pending.items()},
        } | ({"closing": {key: c.to_json() for key, c in self.closing.items()}} if self.closing else {})

    def _stream_json(self, name: str) -> dict:
        st = self.streams[name]
        out = {"window": st.current.to_json(), "ledger": self.ledgers[name].to_json(), "exhausted": name in self.exhausted}
        # Only for a stream with a release interval (the only one it matters to), so the state of
        # streams without one is what it was before intervals existed.
        if st.policy.min_release_interval_ms is not None and st.last_close_ms is not None:
            out["last_close_ms"] = st.last_close_ms
        return out

    def checkpoint(self, base: bool, key_epoch: int) -> Checkpoint:
        """The state to make durable: all of it (``base``, for a fresh base), or the (small)
        core and the record ids accepted since the last durable checkpoint (a journal entry).
        Changes nothing: call :meth:`checkpointed` once it is on disk."""
        if base:
            seen = {name: [[rid.hex(), t] for rid, t in st.seen.items()] for name, st in self.streams.items()}
        else:
            seen = {}
            for stream, rid, t in self.new_seen:
                seen.setdefault(stream, []).append([rid.hex(), t])
        return Checkpoint(base, {"core": self._core(key_epoch), "seen": seen}, len(self.new_seen))

    def checkpointed(self, checkpoint: Checkpoint) -> None:
        del self.new_seen[:checkpoint.new_ids]

    def restore(self, checkpoints: list[dict], public_keys: dict[int, PaillierPublicKey]) -> None:
        """Apply a base snapshot and the journal entries after it, in order.

        :raises StateIncompatible: not a state this code wrote (an unknown version, or
            streams or fields this policy does not have).
        """
        try:
            self._apply(checkpoints, public_keys)
        except StateIncompatible:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise StateIncompatible(f"the sealed state does not fit this code: {type(err).__name__}: {err}") from err

    def _apply(self, checkpoints: list[dict], public_keys: dict[int, PaillierPublicKey]) -> None:
        for checkpoint in checkpoints:
            for name, ids in checkpoint["seen"].items():
                for rid, t in ids:
                    self.streams[name].remember(bytes.fromhex(rid), int(t))
        core = checkpoints[-1]["core"]
        if core.get("version") != STATE_VERSION:
            raise StateIncompatible(f"the sealed state has version {core.get('version')!r}; this code reads "
                                    f"version {STATE_VERSION}")
        for name, raw in core["streams"].items():
            policy = self.policy.streams[name]
            self.ledgers[name] = StreamLedger.from_json(policy, raw["ledger"], self.ledgers[name].group)
            self.streams[name].current = Window.from_json(policy, raw["window"], public_keys)
            # Absent: no window has closed since the stream had an interval (a state written
            # before intervals existed reads the same way).
            last_close = raw.get("last_close_ms")
            self.streams[name].last_close_ms = None if last_close is None else int(last_close)
            if raw["exhausted"]:
                self.exhausted.add(name)
        for key, raw in core.get("closing", {}).items():
            policy = self.policy.streams[raw["stream"]]
            window = Window.from_json(policy, raw["window"], public_keys)
            self.closing[key] = Closing(key, window, raw["budget"], int(raw["closed_at_ms"]), bool(raw["exhausts"]))
        for key, raw in core["pending"].items():
            body = base64.b64decode(raw["body"])
            payload = wire.SignedMessage.from_bytes(body).payload
            kind = json.loads(payload)["kind"]
            self.pending[key] = Publication(key, raw["stream"], body, PAYLOADS[kind].from_payload(payload))
