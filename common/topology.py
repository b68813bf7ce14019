"""The broker layout of one deployment: exchange and queue names and routing keys.

Pure (no pika, no I/O), so every role, the enclave included, reads the same layout.

The rejected and announce exchanges are fanout, so their routing keys are ignored
(publishers use ``""``).
"""

from __future__ import annotations

from dataclasses import dataclass

# Records: records exchange (direct) -> records queue.
RECORD_ROUTING_KEY = "record"
# Attestation and budget requests: attest exchange (direct) -> attest queue.
ATTEST_ROUTING_KEY = "request"
# Binding key for every stream's results on the results exchange (topic).
ALL_RESULTS_KEY = "#"


def result_routing_key(stream: str) -> str:
    """Releases are published to the results exchange under their stream's name, so a
    consumer binds once per stream it wants."""
    return stream


@dataclass(frozen=True, slots=True)
class Topology:
    """Exchange and queue names, all derived from one prefix."""

    prefix: str = "sealedsum"

    @property
    def records_exchange(self) -> str:
        return f"{self.prefix}.records"

    @property
    def records_queue(self) -> str:
        return f"{self.prefix}.records"

    @property
    def rejected_exchange(self) -> str:
        return f"{self.prefix}.rejected"

    @property
    def rejected_queue(self) -> str:
        return f"{self.prefix}.rejected"

    @property
    def attest_exchange(self) -> str:
        """Requests to the enclave (attestation, budget) go through this exchange, so
        clients never need to publish to the default exchange."""
        return f"{self.prefix}.attest"

    @property
    def attest_queue(self) -> str:
        return f"{self.prefix}.attest"

    @property
    def announce_exchange(self) -> str:
        """Signed notices to producers (key rotations): a fanout exchange each producer binds
        a server-named exclusive queue of its own to."""
        return f"{self.prefix}.announce"

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.records_exchange, self.rejected_exchange, self.attest_exchange, self.results_exchange,
                self.announce_exchange)

    @property
    def queues(self) -> tuple[str, ...]:
        return (self.records_queue, self.rejected_queue, self.attest_queue)

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"

