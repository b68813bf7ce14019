"""The shared reconnect policy, ``common.amqp.Backoff``: capped doubling waits within a total
budget, whether a caller sleeps through them (:meth:`retry`) or schedules them itself."""

from __future__ import annotations

import itertools

import pytest

from sealedsum.common import amqp
from sealedsum.common.errors import TransportError, Unroutable


def test_delays_double_up_to_the_cap_and_start_again_per_iterator():
    backoff = amqp.Backoff(60, first=0.5, cap=5.0)
    assert list(itertools.islice(backoff.delays(), 7)) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert next(backoff.delays()) == 0.5


def test_allows_a_wait_only_within_the_budget():
    backoff = amqp.Backoff(10)
    assert backoff.allows(2.0, since=100.0, now=105.0)
    assert backoff.allows(5.0, since=100.0, now=105.0)  # ends exactly at the budget
    assert not backoff.allows(5.5, since=100.0, now=105.0)
    assert not amqp.Backoff(0).allows(0.5, since=1.0, now=1.0)


def test_retry_sleeps_the_delays_reconnects_and_gives_up_with_the_last_error(monkeypatch):
    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    monkeypatch.setattr(amqp.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(amqp.time, "sleep", sleep)
    reconnects = []

    def failing():
        raise TransportError(f"down at {clock[0]}")

    with pytest.raises(TransportError, match="down at 7.5"):
        amqp.Backoff(10).retry(failing, lambda: reconnects.append(clock[0]), "test")
    assert slept == [0.5, 1.0, 2.0, 4.0] and reconnects == [0.5, 1.5, 3.5, 7.5]

    calls = iter([TransportError("once"), "done"])

    def flaky():
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert amqp.Backoff(10).retry(flaky, lambda: None, "test") == "done"


@pytest.mark.parametrize("error", [TransportError("refused", retryable=False), Unroutable("no queue")])
def test_retry_does_not_retry_what_waiting_cannot_fix(error, monkeypatch):
    monkeypatch.setattr(amqp.time, "sleep", lambda s: pytest.fail("slept"))

    def fails():
        raise error

    with pytest.raises(type(error)):
        amqp.Backoff(60).retry(fails, lambda: None, "test")
