"""``produce --resume``: the state file and the hashed input prefix, without a broker."""

from __future__ import annotations

import json

import pytest

from sealedsum.common.errors import ConfigError, ResumeError
from sealedsum.producers.resume import ResumeState, TrackedInput

RUN = {"input": "/data/in.csv", "stream": "s", "window": 0, "format": "auto",
       "column": ["amount"], "field": None, "header": False}


def test_a_missing_file_is_a_fresh_state(tmp_path):
    state = ResumeState.open(tmp_path / "r.json", RUN)
    assert state.lines_done == 0 and not (tmp_path / "r.json").exists()


def test_saved_and_opened_again(tmp_path):
    state = ResumeState.open(tmp_path / "r.json", RUN)
    state.lines_done, state.prefix_sha256, state.confirmed = 7, "ab" * 32, 6
    state.save()
    again = ResumeState.open(tmp_path / "r.json", dict(RUN))
    assert (again.lines_done, again.prefix_sha256, again.confirmed, again.salt) == (7, "ab" * 32, 6, state.salt)
    assert again.record_id(3) == state.record_id(3) != state.record_id(4)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


@pytest.mark.parametrize("change", [{"input": "/data/other.csv"}, {"stream": "t"},
                                    {"column": ["total"]}, {"window": 2}])
def test_another_run_is_refused(tmp_path, change):
    ResumeState.open(tmp_path / "r.json", RUN).save()
    with pytest.raises(ResumeError, match="another run") as err:
        ResumeState.open(tmp_path / "r.json", dict(RUN, **change))
    assert next(iter(change)) in str(err.value)
    assert issubclass(ResumeError, ConfigError)  # exit 2


def test_a_file_that_named_the_input_size_still_opens(tmp_path):
    """Files written before grown inputs could resume carry the size; it no longer ties a run."""
    ResumeState.open(tmp_path / "r.json", RUN).save()
    doc = json.loads((tmp_path / "r.json").read_text())
    doc["run"]["size"] = 12
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert ResumeState.open(tmp_path / "r.json", RUN).run == RUN


@pytest.mark.parametrize("text", ["", "{", "[]", '{"version": 1}', json.dumps({"version": 9})])
def test_not_a_state_file(tmp_path, text):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ResumeError, match="not a sealedsum produce resume file"):
        ResumeState.open(tmp_path / "r.json", RUN)


def test_an_unwritable_state_is_a_resume_error(tmp_path):
    state = ResumeState.open(tmp_path / "missing" / "r.json", RUN)
    with pytest.raises(ResumeError, match="cannot write"):
        state.save()


def test_the_prefix_hash_covers_exactly_the_lines_advanced_to():
    lines = ["a\n", "1\n", "\n", "2\n", "3\n"]
    tracked = TrackedInput(lines)
    assert list(tracked) == lines
    at_3 = tracked.advance(3)
    rerun = TrackedInput(lines, skip_through=3, expected=at_3)
    assert list(rerun) == lines and rerun.hashed_through == 3
    assert rerun.advance(5) == tracked.advance(5)
    assert tracked.bytes_read == sum(len(line) for line in lines)


def test_a_changed_prefix_is_refused_before_the_next_line_is_read():
    tracked = TrackedInput(["a\n", "1\n", "2\n"])
    list(tracked)
    expected = tracked.advance(2)
    rerun = iter(TrackedInput(["a\n", "9\n", "2\n"], skip_through=2, expected=expected))
    assert next(rerun) == "a\n"
    with pytest.raises(ResumeError, match="input changed"):
        next(rerun)


def test_a_shorter_input_is_refused():
    with pytest.raises(ResumeError, match="has 1 lines"):
        list(TrackedInput(["a\n"], skip_through=3, expected="00"))


def test_without_hashing_no_line_is_kept():
    tracked = TrackedInput([f"{i}\n" for i in range(1000)], hashing=False)
    assert sum(1 for _ in tracked) == 1000
    assert not tracked._unhashed and tracked.lines_read == 1000 and tracked.bytes_read == 3890
