"""Pieces of ``sealedsum produce`` that need no broker: Ctrl-C handling and the progress line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sealedsum.commands import produce
from sealedsum.common.errors import PolicyMismatch
from sealedsum.producers.outcomes import Outcomes


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


# -- the produce loop against a stand-in producer: which lines count, and where --resume resumes --------


class FakePending:
    def __init__(self, record) -> None:
        self.record, self.done, self.confirmed, self.error = record, False, False, None


class FakeProducer:
    """Confirms every record at once, except those at line numbers in ``unconfirmed``; raises
    KeyboardInterrupt (a Ctrl-C while reading) when asked to seal the line ``interrupt_at``."""

    interrupt_at: int | None = None
    unconfirmed: set = set()
    runs: list = []

    def __init__(self, cfg) -> None:
        self.sealer = SimpleNamespace(stream=lambda name: None)
        self.sent: list[FakePending] = []
        FakeProducer.runs.append(self)

    def seal_current(self, stream, values, *, window=0, record_id=None):
        line = int(values[0])
        if line == FakeProducer.interrupt_at:
            raise KeyboardInterrupt
        if len(values) != 1:
            raise PolicyMismatch("the stream has dimension 1")
        return SimpleNamespace(body=b"x" * 10, clipped=0, record_id=record_id, line=line)

    def submit_batch(self, records):
        out = [FakePending(r) for r in records]
        for p in out:
            p.done = p.confirmed = p.record.line not in FakeProducer.unconfirmed
        self.sent += out
        return out

    def flush(self, timeout=None) -> None:
        pass

    def check_stream(self, stream) -> None:
        pass

    def outcomes(self) -> Outcomes:
        """The enclave counts every confirmed record."""
        return Outcomes(counted=sum(p.confirmed for p in self.sent), rejected=0, unknown=0)

    def wait_outcomes(self, timeout, progress=None) -> Outcomes:
        return self.outcomes()

    @property
    def outstanding(self) -> int:
        return sum(not p.done for p in self.sent)

    def close(self) -> None:
        for p in self.sent:
            if not p.done:
                p.done, p.error = True, "closed"


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(produce, "Producer", FakeProducer)
    monkeypatch.setattr(produce, "load_config", lambda args: None)
    monkeypatch.setattr(produce, "INTERRUPT_WAIT_S", 0.05)
    FakeProducer.runs, FakeProducer.interrupt_at, FakeProducer.unconfirmed = [], None, set()
    return FakeProducer


def run_produce(*argv) -> tuple[int, dict]:
    from sealedsum.commands import build_parser

    args = build_parser().parse_args(["produce", "--config", "unused.toml", "--stream", "s", "--json", *argv])
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = produce._produce(args)
    return code, json.loads(out.getvalue())


def confirmed_lines() -> list[int]:
    return sorted(p.record.line for run in FakeProducer.runs for p in run.sent if p.confirmed)


def write_input(tmp_path, n: int = 40):
    # Each record's value is its line number; every 7th line is bad.
    lines = ["id,amount"]
    for number in range(2, n + 1):
        lines.append(f"{number},x" if number % 7 == 0 else f"{number},{number}")
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n\n# the end\n")
    return path, [n for n in range(2, n + 1) if n % 7]


@pytest.mark.parametrize("per_message,interrupt_at", [("1", 26), ("3", 26), ("3", 22)])
def test_an_interrupted_run_and_its_rerun_send_each_line_once(fake, tmp_path, per_message, interrupt_at):
    """With 3 records a message, lines 19 and 20 wait in the group when 21 is rejected: a Ctrl-C
    at 22 leaves them unsent, so the frontier must stay before them."""
    path, good = write_input(tmp_path)
    state = tmp_path / "r.json"
    fake.interrupt_at = interrupt_at
    code, first = run_produce("--input", str(path), "--column", "2", "--per-message", per_message,
                              "--resume", str(state))
    assert code == produce.ExitCode.INTERRUPTED and first["interrupted"] is True
    # Lines still in the group when Ctrl-C came were never sent: the frontier stays before them.
    assert first["resume_line"] < interrupt_at and all(n < interrupt_at for n in confirmed_lines())
    fake.interrupt_at = None
    code, second = run_produce("--input", str(path), "--column", "2", "--per-message", per_message,
                               "--resume", str(state))
    assert code == produce.ExitCode.PARTIAL  # the bad lines
    assert confirmed_lines() == good  # every good line once, over both runs
    assert second["resume_line"] == 42 and second["confirmed_all_runs"] == len(good)
    # A bad line past the frontier is reported again; none is sent.
    assert first["rejected_by_validation"] + second["rejected_by_validation"] >= 5


def test_a_line_left_unconfirmed_stops_the_frontier_and_its_rerun_sends_it_again(fake, tmp_path):
    path, good = write_input(tmp_path, 20)
    state = tmp_path / "r.json"
    fake.unconfirmed = {9}
    code, first = run_produce("--input", str(path), "--column", "amount", "--resume", str(state))
    assert code == produce.ExitCode.TRANSPORT and first["resume_line"] == 8
    fake.unconfirmed = set()
    code, second = run_produce("--input", str(path), "--column", "amount", "--resume", str(state))
    assert second["resumed_after_line"] == 8
    # Lines after 9 that the first run had confirmed go again (the enclave drops them as
    # duplicates: their record ids are the same).
    again = [p.record for p in FakeProducer.runs[1].sent]
    assert again[0].line == 9
    first_ids = {p.record.line: p.record.record_id for p in FakeProducer.runs[0].sent}
    assert all(r.record_id == first_ids[r.line] for r in again if r.line in first_ids)


def test_an_input_that_grew_resumes_and_sends_only_the_new_lines(fake, tmp_path):
    path, good = write_input(tmp_path, 20)
    state = tmp_path / "r.json"
    code, _ = run_produce("--input", str(path), "--column", "amount", "--resume", str(state))
    assert code == produce.ExitCode.PARTIAL and confirmed_lines() == good
    with path.open("a") as f:  # a log appended to: two records after the blank line and the comment
        f.write("23,23\n24,24\n")
    code, second = run_produce("--input", str(path), "--column", "amount", "--resume", str(state))
    assert code == produce.ExitCode.OK and second["sent"] == 2
    assert confirmed_lines() == good + [23, 24]
    # Lines already sent that changed are still refused.
    path.write_text(path.read_text().replace("\n3,3\n", "\n3,4\n"))
    from sealedsum.common.errors import ResumeError

    with pytest.raises(ResumeError, match="the input changed"):
        run_produce("--input", str(path), "--column", "amount", "--resume", str(state))


def test_no_header_reads_the_first_line_as_a_record(fake, tmp_path):
    path, good = write_input(tmp_path, 10)
    code, summary = run_produce("--input", str(path), "--column", "2", "--no-header")
    assert code == produce.ExitCode.PARTIAL
    assert summary["rejected_by_validation"] == 2  # the header line and line 7
    assert confirmed_lines() == good
    code, summary = run_produce("--input", str(path), "--column", "2")
    assert summary["rejected_by_validation"] == 1


def test_ctrl_c_summary_counts_what_was_confirmed(fake, tmp_path):
    path, good = write_input(tmp_path, 20)
    fake.interrupt_at = 12
    code, summary = run_produce("--input", str(path), "--column", "amount")
    assert code == produce.ExitCode.INTERRUPTED
    assert summary["sent"] == summary["confirmed"] == len([n for n in good if n < 12])
    assert summary["unconfirmed"] == 0 and "resume_line" not in summary


def test_an_unwritable_resume_file_is_refused_before_connecting(fake, tmp_path):
    from sealedsum.common.errors import ResumeError

    path, _ = write_input(tmp_path, 5)
    with pytest.raises(ResumeError, match="cannot write"):
        run_produce("--input", str(path), "--resume", str(tmp_path / "no" / "such" / "dir.json"))
    assert FakeProducer.runs == []


def test_records_the_enclave_rejected_make_exit_4_with_one_line_naming_the_reasons(fake, tmp_path, monkeypatch, capsys):
    rejected = Outcomes(counted=1, rejected=3, unknown=0, by_reason={"future_window": 2, "budget_exhausted": 1})
    monkeypatch.setattr(FakeProducer, "wait_outcomes", lambda self, timeout, progress=None: rejected)
    monkeypatch.setattr(FakeProducer, "outcomes", lambda self: Outcomes(counted=0, rejected=0, unknown=4))
    path = tmp_path / "in.txt"
    path.write_text("1\n2\n3\n4\n")
    code, summary = run_produce("--input", str(path))
    assert code == produce.ExitCode.PARTIAL
    assert (summary["counted"], summary["rejected_by_enclave"], summary["unknown"]) == (1, 3, 0)
    assert summary["rejected_by_reason"] == {"budget_exhausted": 1, "future_window": 2}
    err = capsys.readouterr().err
    assert "waiting up to 20 s for the enclave to count or reject 4 record(s)" in err
    assert "error: the enclave rejected 3 record(s): future_window (2), budget_exhausted (1); --window" in err
    assert "counted 1, rejected by the enclave 3, unknown 0" in err


def test_no_wait_when_told_not_to_and_unknown_records_are_said_to_be(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FakeProducer, "outcomes", lambda self: Outcomes(counted=0, rejected=0, unknown=2))
    monkeypatch.setattr(FakeProducer, "wait_outcomes", lambda self, timeout, progress=None: pytest.fail("waited"))
    path = tmp_path / "in.txt"
    path.write_text("1\n2\n")
    code, summary = run_produce("--input", str(path), "--outcome-wait", "0")
    assert code == produce.ExitCode.OK and summary["unknown"] == 2
    assert "2 record(s) confirmed by the broker but neither counted nor rejected yet" in capsys.readouterr().err


def test_ctrl_c_summary_says_what_the_enclave_said_so_far(fake, tmp_path):
    path, good = write_input(tmp_path, 20)
    fake.interrupt_at = 12
    code, summary = run_produce("--input", str(path), "--column", "amount")
    assert code == produce.ExitCode.INTERRUPTED and summary["interrupted"] is True
    assert summary["counted"] == summary["confirmed"] and summary["rejected_by_enclave"] == 0


def test_a_spent_stream_is_refused_before_any_input_is_read(fake, tmp_path, monkeypatch):
    from sealedsum.common.errors import StreamExhausted

    def spent(self, stream):
        raise StreamExhausted(f"stream {stream!r} has spent its privacy budget")

    monkeypatch.setattr(FakeProducer, "check_stream", spent)
    path = tmp_path / "in.txt"
    path.write_text("1\n2\n")
    with pytest.raises(StreamExhausted) as info:
        run_produce("--input", str(path))
    assert info.value.exit_code == produce.ExitCode.PARTIAL == 4
    assert FakeProducer.runs[0].sent == []
