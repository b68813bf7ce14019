"""The privacy budget ledger: what each stream has spent, and whether it may spend more.

Every release of a stream costs the same (its policy fixes ε, δ and the mechanism),
so a stream's spend is its number of releases; :mod:`sealedsum.common.privacy` turns that into
ε (Laplace, pure composition) or ρ and the ε it implies (Gaussian, zCDP).

The ledger is a hash chain per stream: each release's charge is hashed onto the
previous head, and every signed result carries its sequence number and the new head,
so anyone holding a stream's results can recompute the chain and see that none was
left out. The chain itself is defined in :mod:`sealedsum.common.ledger_chain`, which consumers share.
The ledger lives in the enclave's sealed state, which the platform's monotonic counter
protects against rollback (see ``sealedsum.sidecar.enclave_process.store``).

Streams in a budget group (docs/protocol.md section 15.6) keep their own chains and release
counts; a :class:`GroupAccount` composes the counts of all of them, and decides whether any
of them may release. Nothing about the group is stored: its spend follows from its streams'
counts, so the sealed state is the same with or without groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from sealedsum.common import ledger_chain as chain, privacy
from sealedsum.common.ledger_chain import LEDGER_LABEL, genesis, next_head
from sealedsum.common.policy import BudgetGroup, EnclavePolicy, StreamPolicy

__all__ = ["LEDGER_LABEL", "GroupAccount", "StreamLedger", "charge_bytes", "genesis", "ledgers", "next_head"]


def charge_bytes(policy: StreamPolicy, window: int, seq: int) -> bytes:
    """The charge of a release of ``policy``'s stream (:func:`sealedsum.common.ledger_chain.charge_bytes`)."""
    return chain.charge_bytes(policy.name, window, seq, policy.mechanism, policy.epsilon, policy.delta,
                              policy.noise_plan().rho)


@dataclass(slots=True)
class GroupAccount:
    """A budget group's spend: the composition of its streams' releases, read from the
    enclave's ledgers (the mapping itself, so a ledger restored from the sealed state
    counts as soon as it replaces the fresh one)."""

    group: BudgetGroup
    ledgers: Mapping[str, "StreamLedger"]

    def members(self, stream: str | None = None, more: int = 0) -> privacy.GroupReleases:
        """Each stream's cost and releases, with ``more`` releases added to ``stream``."""
        return {s: (self.ledgers[s].policy.cost, self.ledgers[s].releases + (more if s == stream else 0))
                for s in self.group.streams}

    def allows(self, stream: str, more: int = 1) -> bool:
        return privacy.group_allows(self.members(stream, more), self.group.budget_epsilon, self.group.budget_delta)

    def spent(self) -> tuple[float, float | None]:
        return privacy.group_spent(self.members(), self.group.budget_delta)

    def remaining(self, stream: str) -> int:
        return privacy.group_remaining(self.members(), stream, self.group.budget_epsilon, self.group.budget_delta)


@dataclass(slots=True)
class StreamLedger:
    policy: StreamPolicy
    releases: int = 0
    head: bytes = b""
    group: GroupAccount | None = None  # the stream's budget group, when it is in one

    def __post_init__(self) -> None:
        if not self.head:
            self.head = genesis(self.policy.name)

    def allows(self, releases: int = 1) -> bool:
        """Whether ``releases`` more releases stay within the stream's budget (its group's,
        given the other streams' releases so far)."""
        p = self.policy
        if self.group is not None:
            return self.group.allows(p.name, releases)
        return privacy.budget_allows(p.mechanism, p.epsilon, p.delta, self.releases + releases,
                                     p.budget_epsilon, p.budget_delta)

    @property
    def peers(self) -> tuple[str, ...]:
        """The other streams spending the same budget (none unless the stream is in a group)."""
        return () if self.group is None else tuple(s for s in self.group.group.streams if s != self.policy.name)

    def charge(self, window: int) -> None:
        """Record one release. Call only when :meth:`allows` said yes."""
        if not self.allows():
            raise ValueError("charge beyond the budget")  # a bug, never input
        self.releases += 1
        self.head = next_head(self.head, charge_bytes(self.policy, window, self.releases))

    def summary(self) -> dict:
        p = self.policy
        if self.group is not None:
            return self._group_summary()
        eps, rho = privacy.spent(p.mechanism, p.epsilon, p.delta, self.releases, p.budget_delta)
        total = privacy.max_releases(p.mechanism, p.epsilon, p.delta, p.budget_epsilon, p.budget_delta)
        remaining = max(total - self.releases, 0)
        return {
            "releases": self.releases,
            "spent_epsilon": eps,
            "spent_rho": rho,
            "budget_epsilon": p.budget_epsilon,
            "budget_delta": p.budget_delta,
            "remaining_releases": remaining,
            "ledger_head": self.head.hex(),
        }

    def _group_summary(self) -> dict:
        """The budget object of a grouped stream: the spend, budget and room are the group's,
        the releases and the chain this stream's (docs/protocol.md section 13.3)."""
        account = self.group
        eps, rho = account.spent()
        return {
            "releases": self.releases,
            "spent_epsilon": eps,
            "spent_rho": rho,
            "budget_epsilon": account.group.budget_epsilon,
            "budget_delta": account.group.budget_delta,
            "remaining_releases": account.remaining(self.policy.name),
            "ledger_head": self.head.hex(),
            "budget_group": account.group.name,
            "group_releases": {s: n for s, (_, n) in sorted(account.members().items())},
        }

    def to_json(self) -> dict:
        return {"releases": self.releases, "head": self.head.hex()}

    @classmethod
    def from_json(cls, policy: StreamPolicy, raw: dict, group: GroupAccount | None = None) -> "StreamLedger":
        return cls(policy, int(raw["releases"]), bytes.fromhex(raw["head"]), group)


def ledgers(policy: EnclavePolicy) -> dict[str, StreamLedger]:
    """A fresh ledger per stream, those of a budget group sharing its account."""
    out = {name: StreamLedger(p) for name, p in policy.streams.items()}
    for group in policy.budget_groups.values():
        account = GroupAccount(group, out)
        for name in group.streams:
            out[name].group = account
    return out
