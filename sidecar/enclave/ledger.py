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
"""

from __future__ import annotations

from dataclasses import dataclass

from sealedsum.common import ledger_chain as chain, privacy
from sealedsum.common.ledger_chain import LEDGER_LABEL, genesis, next_head
from sealedsum.common.policy import StreamPolicy

__all__ = ["LEDGER_LABEL", "StreamLedger", "charge_bytes", "genesis", "next_head"]


def charge_bytes(policy: StreamPolicy, window: int, seq: int) -> bytes:
    """The charge of a release of ``policy``'s stream (:func:`sealedsum.common.ledger_chain.charge_bytes`)."""
    return chain.charge_bytes(policy.name, window, seq, policy.mechanism, policy.epsilon, policy.delta,
                              policy.noise_plan().rho)


@dataclass(slots=True)
class StreamLedger:
    policy: StreamPolicy
    releases: int = 0
    head: bytes = b""

    def __post_init__(self) -> None:
        if not self.head:
            self.head = genesis(self.policy.name)

    def allows(self, releases: int = 1) -> bool:
        """Whether ``releases`` more releases stay within the stream's budget."""
        p = self.policy
        return privacy.budget_allows(p.mechanism, p.epsilon, p.delta, self.releases + releases,
                                     p.budget_epsilon, p.budget_delta)

    def charge(self, window: int) -> None:
        """Record one release. Call only when :meth:`allows` said yes."""
        if not self.allows():
            raise ValueError("charge beyond the budget")  # a bug, never input
        self.releases += 1
        self.head = next_head(self.head, charge_bytes(self.policy, window, self.releases))

    def summary(self) -> dict:
        p = self.policy
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

    def to_json(self) -> dict:
        return {"releases": self.releases, "head": self.head.hex()}

    @classmethod
    def from_json(cls, policy: StreamPolicy, raw: dict) -> "StreamLedger":
        return cls(policy, int(raw["releases"]), bytes.fromhex(raw["head"]))
