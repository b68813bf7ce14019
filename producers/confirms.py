"""The producer's confirm pipeline: what became of each sealed record handed to the broker.

No pika here. The transport (``producers/transport.py``) tells a :class:`ConfirmPipeline`
what the broker did (published under delivery tag N, confirmed, nacked, returned, channel or
connection lost) from its one I/O thread; callers submit, wait and flush from theirs. Each
record gets a :class:`Ticket` that resolves once, to *confirmed* (the broker took it) or to a
:class:`TransportError`:

- **nack** (the broker refused it, e.g. the records queue is at ``max_queued_records``):
  the record is published again after the capped exponential waits of
  ``sealedsum.common.backoff.Backoff``; it stays outstanding meanwhile, so the pipeline fills and
  :meth:`ConfirmPipeline.submit` blocks (back-pressure). It fails once the next wait would
  take it past ``reconnect_seconds`` of nacks.
- **returned** (``mandatory`` and no queue bound, e.g. no sidecar yet): fails at once with
  :class:`Unroutable`, not retried.
- **connection lost**: every unconfirmed record is published again, in order, on the next
  channel (a record the broker had stored before the loss arrives twice; the enclave counts
  it once, by record id). Records still unconfirmed ``reconnect_seconds`` after their trouble
  began fail; an error that reconnecting cannot fix (a refused login) fails them all at once.
- **channel closed by the broker**: what was in flight on it may or may not have been
  stored; it fails, not retried.

A failed record's error is raised once, by the next :meth:`~ConfirmPipeline.submit`,
:meth:`~ConfirmPipeline.flush` or :meth:`~ConfirmPipeline.wait`; the ticket keeps it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterator

from sealedsum.common import topology, wire
from sealedsum.common.backoff import Backoff
from sealedsum.common.errors import TransportError, Unroutable

log = logging.getLogger("sealedsum.producer")

NACK_HINT = ("the records queue may be full (broker.max_queued_records): is the sidecar "
             "running and keeping up?")
UNROUTABLE_HINT = "is the sidecar running? it declares the queues"

PENDING, CONFIRMED, FAILED = "pending", "confirmed", "failed"


class Ticket:
    """One record's way through the broker: ``state`` is pending, confirmed or failed."""

    __slots__ = ("body", "kind", "state", "error", "trouble_since", "retry_at", "retry_delays", "reported", "nacks",
                 "in_flight")

    def __init__(self, body: bytes, kind: str = wire.RECORD_TYPE) -> None:
        self.body = body
        self.kind = kind  # the AMQP type: one sealed record, or a record batch
        self.state = PENDING
        self.error: TransportError | None = None
        self.trouble_since: float | None = None  # first nack or connection loss while pending
        self.retry_at = 0.0
        self.retry_delays: Iterator[float] | None = None  # its nack backoff, from the first nack on
        self.reported = False
        self.nacks = 0
        self.in_flight = False  # published on the current channel, confirm not yet in

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def confirmed(self) -> bool:
        return self.state == CONFIRMED

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    def __repr__(self) -> str:
        return f"Ticket({self.state}, {len(self.body)} bytes)"


class ConfirmPipeline:
    """The records between submit and their confirm (see the module docstring).

    The caller-side methods (:meth:`submit`, :meth:`wait`, :meth:`flush`, :meth:`close`) may
    run on any thread; the ``take_*`` and ``on_*`` methods belong to the one I/O thread that
    publishes. ``cond`` guards the shared state and is notified whenever a ticket resolves or
    the I/O thread made progress; the transport waits on it for its own state too.

    :param max_unconfirmed: records awaiting a confirm at once; :meth:`submit` blocks while
        that many do.
    :param backoff: the waits between tries of a nacked record, and the budget
        (``reconnect_seconds``) within which a record in trouble may still be confirmed.
    :param exchange: where the records go (named in the error of an unroutable one).
    """

    def __init__(self, max_unconfirmed: int, backoff: Backoff, exchange: str,
                 cond: threading.Condition | None = None) -> None:
        if max_unconfirmed < 1:
            raise ValueError("max_unconfirmed must be at least 1")
        self.max_unconfirmed = max_unconfirmed
        self.backoff = backoff
        self.exchange = exchange
        self.cond = cond if cond is not None else threading.Condition()
        # Guarded by cond: every ticket not yet resolved (in submit order), those waiting to be
        # published, nacked ones waiting for their retry time, and failures the caller has not
        # been told about.
        self._outstanding: dict[int, Ticket] = {}
        self._queued: deque[Ticket] = deque()
        self._retry: list[Ticket] = []
        self._unreported: deque[Ticket] = deque()
        self.closed = False
        self.fatal: TransportError | None = None  # every record fails with it (a refused login)
        self._wake_pending = False
        self.confirmed = 0
        self.failed = 0
        # The I/O thread's own: tickets by delivery tag on the current channel, bodies returned.
        self._by_tag: dict[int, Ticket] = {}
        self._next_tag = 1
        self._returned: set[bytes] = set()
        self.republished = 0  # records published again after a connection loss

    # -- the caller's side -----------------------------------------------------------------------
    def submit(self, body: bytes, kind: str = wire.RECORD_TYPE, timeout: float | None = None) -> tuple[Ticket, bool]:
        """Queue a record (or, with ``kind``, a record batch) to be published; return its ticket
        and whether the I/O thread must be woken to publish it (not if a wake-up is pending).

        Blocks while ``max_unconfirmed`` records await confirms.

        :raises TransportError: an earlier record failed (raised once per failure), no room
            opened up within ``timeout`` seconds, or the pipeline is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._raise_unreported()
            while len(self._outstanding) >= self.max_unconfirmed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(
                        f"no confirms for {self.max_unconfirmed} outstanding records within {timeout} s")
                self.cond.wait(remaining if remaining is not None else 1.0)
                self._raise_unreported()
            if self.closed:
                raise TransportError("the publisher is closed", retryable=False)
            ticket = Ticket(body, kind)
            self._outstanding[id(ticket)] = ticket
            self._queued.append(ticket)
            wake = not self._wake_pending
            self._wake_pending = True
        return ticket, wake

    def wait(self, ticket: Ticket, timeout: float | None = None) -> None:
        """Wait until ``ticket`` is resolved; raise its error if it failed (marking it reported)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not ticket.done:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"no confirm within {timeout} s")
                self.cond.wait(remaining if remaining is not None else 1.0)
            if ticket.state == FAILED:
                if not ticket.reported:
                    ticket.reported = True
                    try:
                        self._unreported.remove(ticket)
                    except ValueError:
                        pass
                raise ticket.error

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted record is resolved.

        :raises TransportError: the first failure not raised before (the others stay on
            their tickets and are raised by the following calls).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self._outstanding:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransportError(f"{len(self._outstanding)} records still unconfirmed after {timeout} s")
                self.cond.wait(remaining if remaining is not None else 1.0)
            self._raise_unreported()

    @property
    def outstanding(self) -> int:
        with self.cond:
            return len(self._outstanding)

    def close(self) -> bool:
        """Take no more records; return False if the pipeline was closed already."""
        with self.cond:
            if self.closed:
                return False
            self.closed = True
            return True

    def abandon(self, error: TransportError) -> None:
        """Fail every unresolved record with ``error``, without raising it later (the caller
        closed the publisher before they were confirmed)."""
        with self.cond:
            for ticket in list(self._outstanding.values()):
                self._resolve(ticket, error)
            self._unreported.clear()
            self.cond.notify_all()

    def fail_all(self, error: TransportError) -> None:
        """The I/O thread is gone: fail every unresolved record with ``error`` and close."""
        with self.cond:
            for ticket in list(self._outstanding.values()):
                self._resolve(ticket, error)
            self.closed = True
            self.cond.notify_all()

    # -- the I/O thread's side -------------------------------------------------------------------
    def take_batch(self, ready: bool) -> list[Ticket]:
        """The queued records to publish now, in order: none unless a channel is ``ready``, and
        none after a fatal error (they fail instead)."""
        with self.cond:
            self._wake_pending = False
            if self.fatal is not None:
                self._expire(time.monotonic())
                self.cond.notify_all()
                return []
            if not ready:
                return []
            batch = [t for t in self._queued if not t.done]
            self._queued.clear()
            return batch

    @property
    def has_queued(self) -> bool:
        """Whether records wait to be published (so a connection is wanted)."""
        with self.cond:
            return bool(self._queued)

    def published(self, ticket: Ticket) -> None:
        """``ticket`` went out on the current channel, under the next delivery tag."""
        ticket.in_flight = True
        self._by_tag[self._next_tag] = ticket
        self._next_tag += 1

    def requeue(self, tickets: list[Ticket]) -> None:
        """Publishing stopped before ``tickets`` went out: they go first next time, in order."""
        with self.cond:
            self._queued.extendleft(reversed(tickets))

    def on_channel_ready(self) -> None:
        """A new confirm-mode channel: delivery tags start again at 1, and the records a
        connection loss held up are out of trouble (nacked ones stay in theirs)."""
        self._by_tag.clear()
        self._next_tag = 1
        self._returned.clear()
        with self.cond:
            for ticket in self._outstanding.values():
                ticket.trouble_since = None if ticket.nacks == 0 else ticket.trouble_since

    def on_channel_failed(self, error: TransportError) -> None:
        """The broker closed the channel: what was in flight on it fails with ``error``."""
        with self.cond:
            for ticket in list(self._by_tag.values()):
                ticket.in_flight = False
                self._resolve(ticket, error)
            self.cond.notify_all()
        self._by_tag.clear()

    def on_connection_lost(self, error: TransportError, now: float) -> None:
        """The connection is down: what was in flight goes back to the front of the queue, every
        unresolved record is in trouble since ``now`` (or earlier), and fails with ``error`` if
        that outlasts the budget; with a non-retryable ``error``, every record fails with it."""
        in_flight = list(self._by_tag.values())
        self._by_tag.clear()
        for ticket in in_flight:
            ticket.in_flight = False
        self.republished += sum(1 for t in in_flight if not t.done)
        with self.cond:
            if not error.retryable:
                self.fatal = error
            # In flight first, in publish order, before what was never sent.
            self._queued.extendleft(reversed([t for t in in_flight if not t.done]))
            for ticket in self._outstanding.values():
                if ticket.trouble_since is None:
                    ticket.trouble_since = now
                ticket.error = error  # what it fails with if the budget runs out
            self._expire(now)
            self.cond.notify_all()

    def on_tick(self, now: float, down: bool) -> bool:
        """Move nacked records whose retry time has come back to the queue and fail those past
        the budget; while the broker is ``down`` (a connection was lost or could not be opened,
        and none is back yet), records submitted meanwhile are in trouble too. Returns whether
        any record is unresolved."""
        with self.cond:
            if self._retry:
                due = [t for t in self._retry if t.retry_at <= now]
                if due:
                    self._retry = [t for t in self._retry if t.retry_at > now]
                    self._queued.extend(t for t in due if not t.done)
            if down:
                for ticket in self._outstanding.values():
                    if ticket.trouble_since is None:
                        ticket.trouble_since = now
            if down or self._retry:
                self._expire(now)
                self._queued = deque(t for t in self._queued if not t.done)
                self._retry = [t for t in self._retry if not t.done]
            self.cond.notify_all()
            return bool(self._outstanding)

    def on_return(self, body: bytes) -> None:
        # The broker returns a mandatory message before it confirms it; the confirm resolves it.
        self._returned.add(body)

    def on_confirm(self, tag: int, multiple: bool, nack: bool, now: float) -> None:
        """The broker's ack (or ``nack``) for delivery ``tag`` (and, if ``multiple``, all before it)."""
        if multiple:
            tickets = []
            while self._by_tag:
                first = next(iter(self._by_tag))
                if first > tag:
                    break
                tickets.append(self._by_tag.pop(first))
        else:
            t = self._by_tag.pop(tag, None)
            tickets = [t] if t is not None else []
        with self.cond:
            for ticket in tickets:
                ticket.in_flight = False
                if ticket.done:
                    continue
                if nack:
                    self._nacked(ticket, now)
                elif self._returned and ticket.body in self._returned:
                    self._returned.discard(ticket.body)
                    self._resolve(ticket, Unroutable(
                        f"no queue takes messages sent to {self.exchange} with key {topology.RECORD_ROUTING_KEY!r}",
                        retryable=False, hint=UNROUTABLE_HINT))
                else:
                    self._resolve(ticket, None)
            self.cond.notify_all()

    # -- helpers (the caller holds cond) ------------------------------------------------------------
    def _nacked(self, ticket: Ticket, now: float) -> None:
        ticket.nacks += 1
        if ticket.trouble_since is None:
            ticket.trouble_since = now
        ticket.error = TransportError("the broker refused the message (nack)", hint=NACK_HINT)
        if ticket.retry_delays is None:
            ticket.retry_delays = self.backoff.delays()
        delay = next(ticket.retry_delays)
        if not self.backoff.allows(delay, ticket.trouble_since, now):
            self._resolve(ticket, ticket.error)
            return
        if not self._retry:  # once per episode, not per record
            log.warning("broker refused a record (nack); retrying", extra={"fields": {
                "operation": "publish record", "retry_in_s": delay}})
        ticket.retry_at = now + delay
        self._retry.append(ticket)

    def _expire(self, now: float) -> None:
        budget = self.backoff.budget
        for ticket in list(self._outstanding.values()):
            if self.fatal is not None:
                self._resolve(ticket, self.fatal)
            elif ticket.trouble_since is not None and now - ticket.trouble_since >= budget \
                    and not ticket.in_flight:
                self._resolve(ticket, ticket.error or TransportError("the broker did not confirm in time"))
        if self.fatal is not None or budget <= 0:
            self._queued = deque(t for t in self._queued if not t.done)
            self._retry = [t for t in self._retry if not t.done]

    def _raise_unreported(self) -> None:
        if self._unreported:
            ticket = self._unreported.popleft()
            ticket.reported = True
            raise ticket.error

    def _resolve(self, ticket: Ticket, error: TransportError | None) -> None:
        if ticket.done:
            return
        self._outstanding.pop(id(ticket), None)
        if error is None:
            ticket.state = CONFIRMED
            self.confirmed += 1
        else:
            ticket.state, ticket.error = FAILED, error
            self.failed += 1
            self._unreported.append(ticket)
