"""The one reconnect policy: capped exponential backoff.

Every place that waits before trying again uses it: clients reconnecting to the broker
(within ``broker.reconnect_seconds``), producers attesting again, the enclave runtime
reconnecting, and the platform restarting a dead enclave. pika does not reconnect by
itself. No I/O here: :meth:`Backoff.retry` sleeps, the rest only counts.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, TypeVar

from sealedsum.common.errors import TransportError, Unroutable

log = logging.getLogger("sealedsum.backoff")
T = TypeVar("T")


class Backoff:
    """Waits ``first``, ``2·first``, ``4·first``, ... never more than ``cap``; :meth:`reset`
    after a success starts again at ``first``.

    :param budget_seconds: for :meth:`retry`: give up once the next wait would end past
        this many seconds after the first try (``None``: no limit).
    """

    def __init__(self, budget_seconds: float | None = None, first: float = 0.5, cap: float = 5.0) -> None:
        if first <= 0 or cap < first:
            raise ValueError("backoff needs 0 < first <= cap")
        self.budget, self.first, self.cap = budget_seconds, first, cap
        self._next = first

    def next_delay(self) -> float:
        """The wait before the next try; each call doubles the one after, up to ``cap``."""
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first

    def delays(self) -> Iterator[float]:
        """The same waits, for code that must not block (an I/O loop, a producer sealing on
        while it cannot attest) and schedules its tries itself; a new iterator starts again."""
        delay = self.first
        while True:
            yield delay
            delay = min(delay * 2, self.cap)

    def allows(self, delay: float, since: float, now: float) -> bool:
        """Whether waiting ``delay`` more seconds at ``now`` stays within the budget of trouble
        that began at ``since`` (all ``time.monotonic()``)."""
        return self.budget is None or now + delay <= since + self.budget

    def retry(self, operation: Callable[[], T], reconnect: Callable[[], None], what: str) -> T:
        """Run ``operation``; on a retryable ``TransportError``, wait, ``reconnect`` and run it
        again, until it succeeds or the budget is spent (then the last error is raised)."""
        started = time.monotonic()
        self.reset()
        while True:
            try:
                return operation()
            except TransportError as err:
                delay = self.next_delay()
                if not err.retryable or isinstance(err, Unroutable) or not self.allows(delay, started,
                                                                                         time.monotonic()):
                    raise
                log.warning("broker unavailable; retrying", extra={"fields": {
                    "operation": what, "error": str(err), "retry_in_s": delay}})
            time.sleep(delay)
            try:
                reconnect()
            except TransportError as err:
                log.info("reconnect failed", extra={"fields": {"operation": what, "error": str(err)}})
