"""The one reconnect policy (common/backoff.py)."""

from __future__ import annotations

import pytest

from sealedsum.common import backoff as backoff_mod
from sealedsum.common.backoff import Backoff
from sealedsum.common.errors import TransportError, Unroutable


def test_delays_double_up_to_the_cap_and_start_again_after_a_reset():
    b = Backoff(first=1.0, cap=30.0)
    assert [b.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next_delay() == 1.0
    with pytest.raises(ValueError):
        Backoff(first=0)


class Clock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_retry_reconnects_until_it_works_within_the_budget(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(backoff_mod, "time", clock)
    failures, reconnects = [TransportError("down")] * 3, []

    def operation():
        if failures:
            raise failures.pop()
        return "done"

    assert Backoff(10.0).retry(operation, lambda: reconnects.append(1), "publish") == "done"
    assert clock.slept == [0.5, 1.0, 2.0] and len(reconnects) == 3


def test_retry_gives_up_past_the_budget_and_never_retries_what_cannot_succeed(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(backoff_mod, "time", clock)

    def down():
        raise TransportError("down")

    with pytest.raises(TransportError):
        Backoff(3.0).retry(down, lambda: None, "publish")
    assert clock.slept == [0.5, 1.0]  # a third wait (2 s) would end past 3 s
    for final in (TransportError("refused", retryable=False), Unroutable("no queue")):
        clock.slept.clear()
        with pytest.raises(type(final)):
            Backoff(60.0).retry(lambda: (_ for _ in ()).throw(final), lambda: None, "publish")
        assert clock.slept == []


def test_delays_can_be_scheduled_without_sleeping_and_the_budget_asked():
    import itertools

    backoff = Backoff(60, first=0.5, cap=5.0)
    assert list(itertools.islice(backoff.delays(), 7)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert next(backoff.delays()) == 0.5  # a new iterator starts again
    b = Backoff(10)
    assert b.allows(2.0, since=100.0, now=105.0) and b.allows(5.0, since=100.0, now=105.0)
    assert not b.allows(5.5, since=100.0, now=105.0) and not Backoff(0).allows(0.5, since=1.0, now=1.0)
    assert Backoff().allows(1e9, since=0.0, now=0.0)  # no budget: any wait
