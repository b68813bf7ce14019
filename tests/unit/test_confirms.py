"""The producer's confirm pipeline without a broker: the I/O thread's side is driven by hand
(published under tag N, acked, nacked, returned, connection lost) and the caller's side
sees each record resolve once, its error raised once, and back-pressure at max_unconfirmed."""

from __future__ import annotations

import pytest

from sealedsum.common.backoff import Backoff
from sealedsum.common.errors import TransportError, Unroutable
from sealedsum.producers.confirms import ConfirmPipeline


def pipeline(max_unconfirmed: int = 8, budget: float = 10.0) -> ConfirmPipeline:
    return ConfirmPipeline(max_unconfirmed, Backoff(budget), "t.records")


def publish_all(p: ConfirmPipeline) -> list:
    batch = p.take_batch(ready=True)
    for ticket in batch:
        p.published(ticket)
    return batch


def test_records_go_out_in_order_and_acks_resolve_them_singly_or_together():
    p = pipeline()
    tickets = [p.submit(b"r%d" % i)[0] for i in range(4)]
    assert p.take_batch(ready=False) == [] and p.has_queued  # no channel yet: they wait
    assert publish_all(p) == tickets and not p.has_queued
    p.on_confirm(1, multiple=False, nack=False, now=0.0)
    assert tickets[0].confirmed and not tickets[1].done
    p.on_confirm(3, multiple=True, nack=False, now=0.0)
    assert [t.confirmed for t in tickets] == [True, True, True, False]
    assert p.outstanding == 1 and p.confirmed == 3
    p.on_confirm(4, multiple=False, nack=False, now=0.0)
    p.flush(timeout=0)


def test_only_the_first_submit_asks_for_a_wake_up_until_the_io_thread_takes_the_queue():
    p = pipeline()
    assert p.submit(b"a")[1] is True
    assert p.submit(b"b")[1] is False
    p.take_batch(ready=True)
    assert p.submit(b"c")[1] is True


def test_submit_blocks_at_max_unconfirmed():
    p = pipeline(max_unconfirmed=2)
    p.submit(b"a")
    p.submit(b"b")
    with pytest.raises(TransportError, match="no confirms for 2 outstanding records"):
        p.submit(b"c", timeout=0.05)
    publish_all(p)
    p.on_confirm(1, multiple=False, nack=False, now=0.0)
    p.submit(b"c", timeout=0.05)  # room again


def test_a_nacked_record_is_retried_after_the_backoff_and_fails_once_it_would_pass_the_budget():
    p = pipeline(budget=2.0)
    (ticket, _) = p.submit(b"r")
    publish_all(p)
    p.on_confirm(1, multiple=False, nack=True, now=100.0)  # retry in 0.5 s
    assert not ticket.done and ticket.nacks == 1
    assert p.on_tick(100.4, down=False) and p.take_batch(ready=True) == []
    p.on_tick(100.5, down=False)
    assert publish_all(p) == [ticket]
    p.on_confirm(2, multiple=False, nack=True, now=100.5)  # retry in 1 s: 101.5, within 102
    p.on_tick(101.5, down=False)
    assert publish_all(p) == [ticket]
    p.on_confirm(3, multiple=False, nack=True, now=101.5)  # 2 s more would end past 102: fails
    assert ticket.failed and "nack" in str(ticket.error) and "max_queued_records" in ticket.error.hint
    with pytest.raises(TransportError, match="nack"):
        p.flush(timeout=0)
    p.flush(timeout=0)  # raised once


def test_a_returned_record_fails_at_once_as_unroutable():
    p = pipeline()
    (ticket, _) = p.submit(b"nowhere")
    publish_all(p)
    p.on_return(b"nowhere")
    p.on_confirm(1, multiple=False, nack=False, now=0.0)
    assert ticket.failed and isinstance(ticket.error, Unroutable) and "t.records" in str(ticket.error)
    with pytest.raises(Unroutable):
        p.wait(ticket, timeout=0)


def test_a_lost_connection_puts_what_was_in_flight_first_and_a_new_channel_counts_tags_from_one():
    p = pipeline()
    first = [p.submit(b"a")[0], p.submit(b"b")[0]]
    publish_all(p)
    later = p.submit(b"c")[0]
    p.on_connection_lost(TransportError("gone"), now=5.0)
    assert p.republished == 2 and all(t.trouble_since == 5.0 for t in (*first, later))
    p.on_channel_ready()
    assert all(t.trouble_since is None for t in (*first, later))
    assert publish_all(p) == [*first, later]
    p.on_confirm(3, multiple=True, nack=False, now=6.0)
    assert all(t.confirmed for t in (*first, later))


def test_records_in_trouble_past_the_budget_fail_with_the_error_that_held_them_up():
    p = pipeline(budget=3.0)
    (ticket, _) = p.submit(b"a")
    p.on_connection_lost(TransportError("cannot reach the broker"), now=10.0)
    p.on_tick(12.9, down=True)
    assert not ticket.done
    p.on_tick(13.0, down=True)
    assert ticket.failed and str(ticket.error) == "cannot reach the broker"


def test_an_error_that_reconnecting_cannot_fix_fails_every_record_at_once():
    p = pipeline()
    tickets = [p.submit(b"a")[0], p.submit(b"b")[0]]
    p.on_connection_lost(TransportError("refused the login", retryable=False), now=0.0)
    assert all(t.failed for t in tickets) and p.fatal is not None
    assert p.take_batch(ready=True) == []


def test_a_channel_closed_by_the_broker_fails_what_was_in_flight_only():
    p = pipeline()
    sent = p.submit(b"a")[0]
    publish_all(p)
    waiting = p.submit(b"b")[0]
    p.on_channel_failed(TransportError("channel error: 406", retryable=False))
    assert sent.failed and not waiting.done


def test_closing_refuses_new_records_and_abandoned_ones_are_not_raised_later():
    p = pipeline()
    (ticket, _) = p.submit(b"a")
    assert p.close() and not p.close()
    with pytest.raises(TransportError, match="closed"):
        p.submit(b"b")
    p.abandon(TransportError("closed before the broker confirmed"))
    assert ticket.failed
    p.flush(timeout=0)
