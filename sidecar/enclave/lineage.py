"""The spend a stream carries from one measurement to the next (docs/protocol.md, 15.7).

Any policy change (enrolling one producer key, say) is a new measurement, with a new
sealing key that cannot open the old sealed state. The budget belongs to the stream, not
to a measurement, so the enclave also keeps a *sealed ledger*: per stream, its releases,
its chain head, the window it numbers next and the privacy parameters those releases were
charged at. It is sealed under the platform's ledger key, which depends on the code digest
only (the same code under any policy gets it, other code does not), and written with every
checkpoint that charges a release, before the release is published.

This module is the pure part: what the sealed ledger holds, and how a starting enclave
reconciles it with its own sealed state. The enclave process seals, writes and reads it
(``sealedsum.sidecar.enclave_process.store.SealedLedgerStore``).

The rules, per stream of the policy that the sealed ledger holds:

- its parameters must be those the policy gives the stream, else the enclave refuses to
  start (:class:`InheritedSpendMismatch`): mixing two accountings under one name, or
  starting the name afresh, would both break the budget's promise;
- an enclave without sealed state of its own (a new measurement) continues the stream
  from the ledger: its releases, its head (so release n+1 links to the head of release n)
  and its window numbering;
- an enclave with sealed state continues from that state if it *holds* the stream (it
  wrote the ledger's entry last: its state is at least as recent, since the state is
  written first); if another measurement took the stream over since, the ledger wins, and
  what the old state still had queued for the stream beyond the point where it handed the
  stream over (releases charged but never published) is dropped: publishing it would fork
  the chain the other measurement continued.

Streams only in the policy start fresh (and enter the ledger at their first release);
streams only in the ledger stay in it untouched, for a later policy that brings them back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from sealedsum.common import privacy
from sealedsum.common.errors import InheritedSpendMismatch
from sealedsum.common.policy import BudgetGroup, StreamPolicy
from sealedsum.sidecar.enclave.ledger import StreamLedger
from sealedsum.sidecar.enclave.state import EnclaveState

log = logging.getLogger("sealedsum.enclave")

LINEAGE_FORMAT = 1
# What a release's cost, the budget, or what a release protects depends on: a change to
# any of these makes the old releases' spend not comparable to the new ones'. Window
# length, min_batch, fraction bits and packing do not change what one release spends; the
# neighbouring relation (whether windows close by count or by time) does, see parameters().
PARAMETER_KEYS = ("kind", "dimension", "lower", "upper", "l2_bound", "edges", "max_records_per_producer",
                  "count_share", "mechanism", "epsilon", "delta", "budget_epsilon", "budget_delta")
# How many earlier holders an entry remembers (the releases at which each handed over).
MAX_HANDOFFS = 16


def parameters(policy: StreamPolicy, group: BudgetGroup | None = None) -> dict:
    """The privacy parameters of a stream, as the sealed ledger records them: the keys of
    :data:`PARAMETER_KEYS` as the canonical policy writes them (``None`` where it leaves
    one out: a grouped stream's budget is its group's), ``rho``, the per-release zCDP cost
    (``None`` for Laplace), and ``budget_group``: ``None``, or the group's name, budget and
    member streams (a stream leaving the group would take its spend out of the group's total)."""
    mapping = policy.to_mapping()
    out = {key: mapping.get(key) for key in PARAMETER_KEYS}
    out["rho"] = policy.noise_plan().rho
    # Count-closed and time-closed windows protect different neighbours (replace-one or
    # add/remove): spends under the two do not add up to one guarantee.
    out["neighbouring"] = policy.neighbouring
    out["budget_group"] = None if group is None else {
        "name": group.name, "budget_epsilon": group.budget_epsilon, "budget_delta": group.budget_delta,
        "streams": sorted(group.streams)}
    return json.loads(json.dumps(out))  # the form it has once read back: lists, not tuples


@dataclass(slots=True)
class Entry:
    """One stream in the sealed ledger."""

    releases: int
    head: bytes
    next_window: int
    parameters: dict
    holder: bytes  # the measurement that wrote this entry last
    budget_group: str | None = None  # the stream's group, if any (its spend counts in the group's)
    # measurement hex -> the stream's releases when that measurement last handed it over
    handoffs: dict[str, int] = field(default_factory=dict)
    # When the stream's last window closed, for a stream with a release interval: a policy
    # change (the operator's lever, like a restart) must not start the interval again.
    last_close_ms: int | None = None

    def to_json(self) -> dict:
        return {"releases": self.releases, "head": self.head.hex(), "next_window": self.next_window,
                "parameters": self.parameters, "budget_group": self.budget_group, "holder": self.holder.hex(),
                "handoffs": dict(self.handoffs)} | (
                    {} if self.last_close_ms is None else {"last_close_ms": self.last_close_ms})

    @classmethod
    def from_json(cls, raw: dict) -> "Entry":
        releases, next_window = int(raw["releases"]), int(raw["next_window"])
        head, holder = bytes.fromhex(raw["head"]), bytes.fromhex(raw["holder"])
        if releases < 0 or next_window < 0 or len(head) != 32 or len(holder) != 32:
            raise ValueError("a ledger entry is out of range")
        if not isinstance(raw["parameters"], dict) or not isinstance(raw["handoffs"], dict):
            raise TypeError("a ledger entry's parameters and handoffs are objects")
        group = raw["budget_group"]
        if group is not None and not isinstance(group, str):
            raise TypeError("a ledger entry's budget_group is a string or null")
        last_close = raw.get("last_close_ms")
        return cls(releases, head, next_window, raw["parameters"], holder, group,
                   {str(m): int(n) for m, n in raw["handoffs"].items()},
                   None if last_close is None else int(last_close))


def _changed(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _spent(entry: Entry) -> str:
    p = entry.parameters
    try:
        eps, _ = privacy.spent(p["mechanism"], p["epsilon"], p.get("delta") or 0.0, entry.releases,
                               p.get("budget_delta") or 0.0)
        return f"{entry.releases} release(s), epsilon {eps:g} of {p['budget_epsilon']:g}"
    except (KeyError, TypeError, ValueError):
        return f"{entry.releases} release(s)"


class Lineage:
    """The sealed ledger as one enclave sees it: the entries it read, and what it writes.

    :param measurement: this enclave's measurement (the holder of what it writes).
    :param doc: the sealed ledger's contents (:meth:`to_json` of an earlier enclave of the
        same code), or ``None`` when there is none yet.
    :raises ValueError, KeyError, TypeError: ``doc`` is not one this code wrote.
    """

    def __init__(self, measurement: bytes, doc: dict | None = None) -> None:
        self.measurement = measurement
        self.entries: dict[str, Entry] = {}
        self._parameters: dict[str, dict] = {}  # per stream, computed once: to_json runs at every checkpoint
        self._groups: dict[str, BudgetGroup] = {}
        if doc is not None:
            if doc.get("format") != LINEAGE_FORMAT:
                raise ValueError(f"the sealed ledger has format {doc.get('format')!r}; this code reads "
                                 f"{LINEAGE_FORMAT}")
            self.entries = {str(name): Entry.from_json(raw) for name, raw in doc["streams"].items()}

    def apply(self, state: EnclaveState, restored: bool) -> list[str]:
        """Bring ``state`` (fresh, or ``restored`` from this measurement's sealed state) in
        line with the sealed ledger; return the streams whose spend it took from the ledger.

        :raises InheritedSpendMismatch: a stream of the policy was charged under other
            privacy parameters.
        """
        self._groups = state.policy.budget_groups
        me = self.measurement.hex()
        taken = []
        for name, policy in state.policy.streams.items():
            entry = self.entries.get(name)
            if entry is None:
                continue
            mine = self._params(policy)
            if entry.parameters != mine:
                raise InheritedSpendMismatch(
                    f"stream {name!r} has spent {_spent(entry)} under other privacy parameters "
                    f"({_changed(entry.parameters, mine)}); refusing to start rather than reset or mix its budget")
            if restored and entry.holder == self.measurement:
                continue  # this state wrote the entry: it is as recent (it is written first)
            kept = entry.handoffs.get(me, 0) if restored else 0
            if restored:
                self._drop_superseded(state, name, kept)
            state.ledgers[name] = StreamLedger(policy, entry.releases, entry.head, state.ledgers[name].group)
            window = state.streams[name].current
            if policy.window_ms is None:  # count-closed: no window number is used twice
                window.index = max(window.index, entry.next_window)
            if entry.last_close_ms is not None:  # the later close: the interval never starts earlier
                st = state.streams[name]
                st.last_close_ms = max(st.last_close_ms or entry.last_close_ms, entry.last_close_ms)
            # (time-closed windows are numbered by the clock, which never gives a number twice)
            if entry.holder != self.measurement:
                entry.handoffs.pop(entry.holder.hex(), None)  # re-inserted last: the latest handoff
                entry.handoffs[entry.holder.hex()] = entry.releases
                while len(entry.handoffs) > MAX_HANDOFFS:
                    del entry.handoffs[next(iter(entry.handoffs))]
            log.info("spend inherited from the sealed ledger", extra={"fields": {
                "stream": name, "releases": entry.releases, "from_measurement": entry.holder.hex(),
                "next_window": window.index}})
            taken.append(name)
        return taken

    def _params(self, policy: StreamPolicy) -> dict:
        if policy.name not in self._parameters:
            self._parameters[policy.name] = parameters(policy, self._groups.get(policy.budget_group))
        return self._parameters[policy.name]

    @staticmethod
    def _drop_superseded(state: EnclaveState, stream: str, kept: int) -> None:
        """Another measurement continued ``stream`` from release ``kept`` on: what this state
        queued beyond that was never published (a release goes out only after the ledger
        holding its charge is written), and must not be now."""
        state.exhausted.discard(stream)  # decided again from the ledger taken over
        for key, closing in list(state.closing.items()):
            if closing.window.stream == stream and closing.budget["releases"] > kept:
                del state.closing[key]
        for key, publication in list(state.pending.items()):
            budget = getattr(publication.message, "budget", None)
            if publication.stream == stream and budget is not None and budget["releases"] > kept:
                del state.pending[key]
        log.warning("sealed state superseded by the sealed ledger for a stream", extra={"fields": {
            "stream": stream, "kept_up_to_release": kept}})

    def to_json(self, state: EnclaveState) -> dict:
        """The sealed ledger to write now: every stream of the policy that has spent anything
        (or was in the ledger), held by this measurement, and every other stream as it was."""
        self._groups = state.policy.budget_groups
        streams = {name: e.to_json() for name, e in self.entries.items() if name not in state.policy.streams}
        for name, policy in state.policy.streams.items():
            ledger, old = state.ledgers[name], self.entries.get(name)
            if ledger.releases == 0 and old is None:
                continue  # nothing spent: its parameters are not pinned yet
            st = state.streams[name]
            last_close = st.last_close_ms if policy.min_release_interval_ms is not None else None
            streams[name] = Entry(ledger.releases, ledger.head, st.current.index, self._params(policy),
                                  self.measurement, policy.budget_group,
                                  dict(old.handoffs) if old else {}, last_close).to_json()
        return {"format": LINEAGE_FORMAT, "streams": dict(sorted(streams.items()))}
