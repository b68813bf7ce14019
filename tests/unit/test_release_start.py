"""Where a consumer starts in the release stream (sealedsum.consumers.client; docs/protocol.md
section 2.1): --from values, the default after the offset chain memory admitted last, a stream
too short for that offset (deleted and declared again), and 'last' as each stream's newest
release rather than the broker's last chunk."""

from __future__ import annotations

import pytest
from sealedsum.common.errors import ConfigError
from sealedsum.consumers.chain_state import StreamChain
from sealedsum.consumers.client import NewestAtStart, parse_start, reaches, resume_point
from sealedsum.consumers.transport import Delivery


def test_from_takes_first_last_next_or_an_offset():
    assert [parse_start(v) for v in ("first", "last", "next", "0", "42")] == ["first", "last", "next", 0, 42]
    for bad in ("", "-1", "1.5", "newest", "٣", "FIRST"):
        with pytest.raises(ConfigError, match="is not first, last, next or an offset"):
            parse_start(bad)


def test_the_default_resumes_after_the_lowest_offset_admitted_or_takes_next():
    assert resume_point([StreamChain("a"), StreamChain("b")]) == "next"
    assert resume_point([StreamChain("a", offset=9), StreamChain("b")]) == 10
    assert resume_point([StreamChain("a", offset=9), StreamChain("b", offset=4)]) == 5


def test_a_stream_shorter_than_the_offset_to_resume_at_is_not_the_one_memory_read():
    assert reaches(9, 10) and reaches(20, 10)
    assert not reaches(8, 10) and not reaches(None, 1)


def deliveries(*keys: str, at: int = 0) -> list[Delivery]:
    return [Delivery(key.encode(), False, key, at + i) for i, key in enumerate(keys)]


def test_last_hands_over_each_streams_newest_present_at_start_then_everything():
    old = deliveries("a", "b", "a", "c", "b", "c")  # offsets 0..5; c is not ours
    newest = NewestAtStart(tail=5, streams=["a", "b"])
    out = [d.offset for delivery in old for d in newest.feed(delivery)]
    assert out == [2, 4]  # a's newest, b's newest, in offset order, once the tail is read
    later = deliveries("a", "c", at=6)
    assert [d.offset for delivery in later for d in newest.feed(delivery)] == [6, 7]


def test_last_on_an_empty_stream_or_a_tail_never_reached_loses_nothing():
    assert NewestAtStart(tail=None, streams=["a"]).feed(deliveries("a")[0]) == deliveries("a")
    cut = NewestAtStart(tail=9, streams=["a"])
    assert [cut.feed(d) for d in deliveries("a", "a")] == [[], []]
    assert [d.offset for d in cut.flush()] == [1]  # e.g. the reader went idle first
    assert cut.feed(deliveries("a", at=3)[0]) == deliveries("a", at=3)


def test_a_start_is_refused_with_a_queue_and_must_be_one_of_the_values():
    from types import SimpleNamespace

    from sealedsum.consumers.client import Consumer

    with pytest.raises(ConfigError, match="does not apply to a queue"):
        Consumer(SimpleNamespace(), "s", queue="p.consumer.q", start="first")
    for bad in ("newest", -1, True, 1.0):
        with pytest.raises(ConfigError, match="is not first, last, next or an offset"):
            Consumer(SimpleNamespace(), "s", start=bad)


def test_closing_a_connection_pika_left_waiting_ends_within_its_bound():
    """A Ctrl-C inside pika can leave close() waiting for a frame that never comes: the
    socket is shut under it, so the consumer still exits."""
    import socket
    import time
    from types import SimpleNamespace

    import pika.exceptions as pe

    from sealedsum.consumers.transport import _close_quietly

    ours, theirs = socket.socketpair()

    class Stuck:
        is_open = True
        _impl = SimpleNamespace(_transport=SimpleNamespace(_sock=ours))

        def close(self):
            if ours.recv(1) == b"":  # blocks until the socket is shut
                raise pe.StreamLostError("shut")

    started = time.monotonic()
    try:
        _close_quietly(Stuck(), within=0.3)
        assert time.monotonic() - started < 3
    finally:
        ours.close()
        theirs.close()


def test_ctrl_c_during_a_pika_call_is_raised_once_the_call_returns():
    import signal

    # Python's own handler, as from a terminal (a run in the background ignores SIGINT).
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_is_held_until_the_call_returns()
    finally:
        signal.signal(signal.SIGINT, saved)


def _ctrl_c_is_held_until_the_call_returns():
    import os
    import signal
    import time

    from sealedsum.consumers.transport import _ctrl_c_after

    finished = []
    with pytest.raises(KeyboardInterrupt):
        with _ctrl_c_after():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled by now: held, not raised here
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    with _ctrl_c_after():  # no Ctrl-C: nothing raised
        pass
