"""Pieces of ``sealedsum produce`` that need no broker: Ctrl-C handling and the progress line."""

from __future__ import annotations

import pytest

from sealedsum.commands import produce


def test_ctrl_c_is_held_outside_allowed_steps_and_raised_at_the_next_one():
    interrupt = produce._Interrupt()
    interrupt.hold()
    interrupt(2, None)  # while bookkeeping: held
    with pytest.raises(KeyboardInterrupt):
        with interrupt.allowed():
            pass
    with interrupt.allowed():  # told once only
        pass


def test_ctrl_c_is_raised_at_once_where_allowed_and_a_second_one_always():
    interrupt = produce._Interrupt()
    interrupt.hold()
    with interrupt.allowed():
        with pytest.raises(KeyboardInterrupt):
            interrupt(2, None)
    with pytest.raises(KeyboardInterrupt):
        interrupt(2, None)  # the second Ctrl-C, even while bookkeeping


def test_interruptible_iteration_stops_with_keyboard_interrupt():
    interrupt = produce._Interrupt()
    interrupt.hold()

    def lines():
        yield 1
        interrupt(2, None)
        yield 2

    with pytest.raises(KeyboardInterrupt):
        list(produce._interruptible(lines(), interrupt))


def test_progress_gives_the_share_of_the_input_and_the_time_left(capsys, monkeypatch):
    clock = iter([100.0, 100.0, 110.0])
    monkeypatch.setattr(produce.time, "monotonic", lambda: next(clock))
    progress = produce.Progress(True, every_s=2.0, total_bytes=1000)
    progress.update(0, 0)      # starts counting here
    progress.update(250, 250)  # 10 s for a quarter: 30 s to go
    err = capsys.readouterr().err
    assert "250 records confirmed (25/s), 25% of the input, about 30 s to go" in err


@pytest.mark.parametrize("seconds,text", [(4.4, "4 s"), (75, "1 min 15 s"), (7260, "2 h 01 min")])
def test_durations(seconds, text):
    assert produce._duration(seconds) == text
