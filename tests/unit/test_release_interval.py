"""A count-closed stream's release interval (issue 11: one producer must not burn a stream's
budget). No broker: the real enclave core on a fake clock.

The finding: under the default policy one producer that sends records as fast as it can closes
count-closed windows as fast as it sends, and spends the stream's whole budget in seconds. With
``min_release_interval_seconds`` a window closes only once it holds its count *and* the interval
has passed since the stream's previous close; records keep folding into it meanwhile."""

from __future__ import annotations

import logging
import math

import pytest

from sealedsum.common import policy as policy_module
from sealedsum.common.errors import ConfigError, InvalidMessage, RejectReason
from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
from sealedsum.common.results import BudgetExhausted, Release
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.enclave.service import Enclave
from tests.conftest import TEST_BITS, checkpoint, make_policy, make_world, stream_table

T0 = 1_767_225_600_000  # ms since the Unix epoch
INTERVAL_MS = 1_000
EPS = 1e9  # noise far below one fixed-point unit: counts and sums come out exact


def flood_table(**overrides) -> dict:
    return stream_table(**{"window_records": 2, "min_batch": 1, "epsilon": EPS,
                           "min_release_interval_seconds": INTERVAL_MS / 1000, **overrides})


def interval_world(keys, **overrides):
    return make_world(keys, make_policy({"s": flood_table(**overrides)}))


def releases_of(effects) -> list[Release]:
    return [p.message for p in effects.publish if isinstance(p.message, Release)]


def send(w, value: float, t: int):
    return w.enclave.on_record(w.sealer.seal("s", [value], now_ms=t).body, t)


def test_one_producer_flooding_cannot_release_faster_than_the_interval(small_keys):
    """The dishonest input: one (anonymous) producer sends a record every 10 ms for 4.5 s to a
    stream whose windows close at 2 records, with ticks every 100 ms. Without the interval that
    would be 225 releases; with it, by any time T after the first release at most
    floor(T / interval) + 1. Nothing is refused and nothing is lost: every record is in a
    release or in the open window, with exact totals."""
    w = interval_world(small_keys)
    e = w.enclave
    released: list[Release] = []
    sent_values = []
    for i in range(450):
        t = T0 + 10 * i
        value = float(i % 7)
        out = send(w, value, t)
        assert out.rejection is None
        sent_values.append(value)
        released += releases_of(out)
        if i % 10 == 0:
            released += releases_of(e.on_tick(t))
        elapsed = t - T0
        assert len(released) <= elapsed // INTERVAL_MS + 1
    assert len(released) == 5  # at 0, 1, 2, 3 and 4 s
    gaps = [b.closed_at_ms - a.closed_at_ms for a, b in zip(released, released[1:])]
    assert all(g >= INTERVAL_MS for g in gaps)
    assert e.ledgers["s"].releases == len(released)
    assert [r.budget["releases"] for r in released] == list(range(1, len(released) + 1))
    assert [r.window for r in released] == list(range(1, len(released) + 1))
    # A window waiting for the interval held far more than window_records, all of it counted.
    assert max(r.count for r in released) > 2
    open_window = e.streams["s"].current
    assert sum(r.count for r in released) + open_window.count == len(sent_values)
    assert e.stats.accepted == len(sent_values) and not e.stats.rejected
    # Every record up to the last close is in a release, exactly (ε = 1e9: no noise to speak of).
    released_values = sent_values[:sum(r.count for r in released)]
    assert sum(r.sum[0] for r in released) == pytest.approx(sum(released_values), abs=1e-3)


def test_without_the_interval_the_same_flood_burns_the_budget(small_keys):
    """What the audit found, kept as the contrast: no interval, 10 records, 5 releases in 90 ms."""
    w = make_world(small_keys, make_policy({"s": stream_table(window_records=2, min_batch=1, epsilon=EPS)}))
    releases = [r for i in range(10) for r in releases_of(send(w, 1.0, T0 + 10 * i))]
    assert len(releases) == 5


def test_the_budget_lasts_at_least_its_releases_times_the_interval(small_keys):
    """budget_epsilon = 4·ε: N = 4 releases. A flood exhausts the stream no sooner than
    (N − 1)·interval after its first release; until then it refuses nothing, and the notice
    follows the N-th release."""
    w = interval_world(small_keys, budget_epsilon=4 * EPS)
    e = w.enclave
    published = []
    for i in range(400):
        t = T0 + 10 * i
        out = send(w, 1.0, t)
        published += [p.message for p in out.publish]
        published += [p.message for p in e.on_tick(t).publish]
        if "s" in e.exhausted:
            break
        assert out.rejection is None
    assert t - T0 >= (4 - 1) * INTERVAL_MS
    assert [type(m) for m in published] == [Release] * 4 + [BudgetExhausted]
    assert published[-2].closed_at_ms - published[0].closed_at_ms >= 3 * INTERVAL_MS


def test_a_tick_closes_a_full_window_once_the_interval_has_passed(small_keys):
    """A trickle: the second window is full 100 ms after the first closed; no record comes after
    it, and a tick closes it as soon as the interval is over (not a tick before)."""
    w = interval_world(small_keys)
    e = w.enclave
    first = releases_of(send(w, 1.0, T0)) + releases_of(send(w, 2.0, T0 + 1))
    assert [r.count for r in first] == [2]  # the first close of a stream need not wait
    assert releases_of(send(w, 3.0, T0 + 100)) + releases_of(send(w, 4.0, T0 + 101)) == []
    assert e.streams["s"].current.count == 2
    assert releases_of(e.on_tick(T0 + 1 + INTERVAL_MS - 1)) == []
    (second,) = releases_of(e.on_tick(T0 + 1 + INTERVAL_MS))
    assert second.window == 2 and second.count == 2 and second.sum[0] == pytest.approx(7.0, abs=1e-3)
    assert second.closed_at_ms == T0 + 1 + INTERVAL_MS
    assert e.streams["s"].current.count == 0


def test_a_window_short_of_its_count_does_not_close_by_the_interval_alone(small_keys):
    w = interval_world(small_keys)
    e = w.enclave
    send(w, 1.0, T0), send(w, 1.0, T0)
    send(w, 1.0, T0 + 10)
    assert e.on_tick(T0 + 10 * INTERVAL_MS).publish == ()
    assert e.streams["s"].current.count == 1


def test_window_seconds_of_a_count_closed_stream_waits_for_the_interval_too(small_keys):
    """window_seconds closes a count-closed window after its first record; with the interval it
    still never closes sooner than the interval after the previous close."""
    w = interval_world(small_keys, window_seconds=0.1, min_release_interval_seconds=1.0)
    e = w.enclave
    assert len(releases_of(send(w, 1.0, T0) | e.on_tick(T0 + 100))) == 1
    send(w, 1.0, T0 + 150)
    assert releases_of(e.on_tick(T0 + 300)) == []  # window_seconds passed, the interval not
    (r,) = releases_of(e.on_tick(T0 + 100 + INTERVAL_MS))
    assert r.count == 1


def restarted(w, keys, state, now: int) -> Enclave:
    e = w.enclave
    return Enclave(keys, e.policy, e.policy_bytes, e.code_digest, e.measurement,
                   lambda rd: w.platform.quote(w.measurement, rd), state, now)


def test_a_restart_does_not_start_the_interval_again(small_keys):
    """The operator's lever: kill the enclave right after a release and start it again from its
    checkpoint. The next window still waits for the interval from the last close."""
    w = interval_world(small_keys)
    assert len(releases_of(send(w, 1.0, T0) | send(w, 1.0, T0))) == 1
    base = checkpoint(w.enclave, base=True)
    assert base["core"]["streams"]["s"]["last_close_ms"] == T0
    e = restarted(w, small_keys, [base], T0 + 50)
    assert e.streams["s"].last_close_ms == T0
    for t in (T0 + 60, T0 + 70, T0 + 80):
        out = e.on_record(w.sealer.seal("s", [1.0], now_ms=t).body, t)
        assert out.rejection is None and releases_of(out) == []
    assert releases_of(e.on_tick(T0 + INTERVAL_MS - 1)) == []
    (r,) = releases_of(e.on_tick(T0 + INTERVAL_MS))
    assert r.window == 2 and r.count == 3
    # And from a journal entry after the base, the same.
    entry = checkpoint(e, base=False)
    again = restarted(w, small_keys, [base, entry], T0 + INTERVAL_MS + 5)
    assert again.streams["s"].last_close_ms == T0 + INTERVAL_MS


def test_a_policy_change_does_not_start_the_interval_again(small_keys, other_keys):
    """A new measurement (min_batch changed: the spend carries over, section 15.7) continues
    from the sealed ledger, which carries the last close with the spend."""
    w = interval_world(small_keys)
    assert len(releases_of(send(w, 1.0, T0) | send(w, 1.0, T0))) == 1
    ledger = w.enclave.sealed_ledger()
    assert ledger["streams"]["s"]["last_close_ms"] == T0
    policy = make_policy({"s": flood_table(min_batch=2)})
    policy_bytes = policy.to_bytes()
    digest, meas = measure.measure(policy_bytes)
    e = Enclave(other_keys, policy, policy_bytes, digest, meas, lambda rd: b"", None, T0 + 10, ledger=ledger)
    assert e.streams["s"].last_close_ms == T0 and e.ledgers["s"].releases == 1
    assert e.streams["s"].current.index == 2


def test_a_stream_without_an_interval_keeps_its_state_and_ledger_formats(small_keys):
    w = make_world(small_keys, make_policy({"s": stream_table(window_records=2, min_batch=1, epsilon=EPS)}))
    send(w, 1.0, T0), send(w, 1.0, T0)
    assert "last_close_ms" not in checkpoint(w.enclave, base=True)["core"]["streams"]["s"]
    assert "last_close_ms" not in w.enclave.sealed_ledger()["streams"]["s"]


def test_a_waiting_window_refuses_records_only_at_the_hard_cap(small_keys, monkeypatch):
    """Totals and packed slots are sized for the hard cap (a waiting window takes records past
    window_records); at the cap, records are refused future_window, as a time-closed window's."""
    monkeypatch.setattr(policy_module, "HARD_MAX_WINDOW_RECORDS", 4)
    w = interval_world(small_keys)
    assert w.enclave.policy.streams["s"].max_window_records == 4
    send(w, 1.0, T0), send(w, 1.0, T0)  # the first window: closed at once
    outs = [send(w, 1.0, T0 + 10 + i) for i in range(5)]
    assert [o.rejection.reason if o.rejection else None for o in outs] == [None] * 4 + [RejectReason.FUTURE_WINDOW]
    (r,) = releases_of(w.enclave.on_tick(T0 + INTERVAL_MS))
    assert r.count == 4


# -- policy ------------------------------------------------------------------------------------

def test_the_interval_is_in_the_canonical_bytes_only_when_set():
    plain = make_policy({"s": stream_table()})
    assert b"min_release_interval_seconds" not in plain.to_bytes()
    assert plain.streams["s"].min_release_interval_ms is None
    assert plain.streams["s"].max_window_records == 5  # as before intervals existed
    timed = make_policy({"s": stream_table(min_release_interval_seconds=2)})
    assert b'"min_release_interval_seconds":2.0' in timed.to_bytes()
    assert policy_from_bytes(timed.to_bytes()) == timed
    assert timed.streams["s"].min_release_interval_ms == 2000
    assert timed.streams["s"].max_window_records == policy_module.HARD_MAX_WINDOW_RECORDS
    assert make_policy({"s": stream_table(min_release_interval_seconds=0.0001)}).streams["s"].min_release_interval_ms == 1


@pytest.mark.parametrize("table, message", [
    (dict(min_release_interval_seconds=0), "must be > 0"),
    (dict(min_release_interval_seconds=-1.0), "must be > 0"),
    (dict(min_release_interval_seconds="1"), "finite number"),
    (dict(min_release_interval_seconds=math.inf), "finite number"),
    (dict(min_release_interval_seconds=True), "finite number"),
    (dict(window_records=None, window_seconds=10.0, min_release_interval_seconds=1.0), "count-closed streams only"),
])
def test_bad_intervals_are_refused(table, message):
    with pytest.raises(ConfigError, match=message):
        make_policy({"s": stream_table(**table)})


def test_policy_bytes_with_a_bad_interval_are_refused():
    good = make_policy({"s": stream_table(min_release_interval_seconds=2)}).to_bytes()
    with pytest.raises(InvalidMessage, match="min_release_interval_seconds"):
        policy_from_bytes(good.replace(b'"min_release_interval_seconds":2.0', b'"min_release_interval_seconds":0.0'))


def test_a_window_that_may_grow_must_fit_its_totals_at_the_hard_cap():
    """Bounds that fit 5 records but not 1 000 000: refused once the window may grow."""
    table = stream_table(lower=0.0, upper=2.0 ** 30, fraction_bits=16)
    make_policy({"s": table})
    with pytest.raises(ConfigError, match="overflow 62 bits"):
        make_policy({"s": dict(table, min_release_interval_seconds=1.0)})


def test_sensitivities_do_not_depend_on_the_interval():
    """Replace-one keeps a window's count and changes at most one unit's records, however many
    the window holds: the sensitivities and the noise are those of a window of window_records."""
    for kind in (dict(), dict(kind="histogram", edges=[0, 1, 5], lower=None, upper=None, dimension=None),
                 dict(kind="vector", dimension=3, l2_bound=2.0, lower=None, upper=None, max_records_per_producer=2)):
        plain = make_policy({"s": stream_table(**kind)}).streams["s"]
        timed = make_policy({"s": stream_table(min_release_interval_seconds=1.0, **kind)}).streams["s"]
        assert timed.neighbouring == plain.neighbouring == "replace-one"
        assert timed.sensitivities() == plain.sensitivities()
        assert timed.noise_plan() == plain.noise_plan()


def test_start_up_warns_about_streams_one_producer_can_burn(small_keys, caplog):
    enrolled = {"required": True, "enrolled": {"a": "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="}, "revoked": {}}
    streams = {
        "bare": stream_table(),
        "timed": stream_table(min_release_interval_seconds=1.0),
        "clock": stream_table(window_records=None, window_seconds=10.0),
        "bounded": stream_table(max_records_per_producer=1),
        "loose": stream_table(max_records_per_producer=5),  # = window_records: one producer fills a window
    }
    anonymous = enclave_policy({"paillier_bits": TEST_BITS, "insecure_test_keys": True}, streams)
    signed = enclave_policy({"paillier_bits": TEST_BITS, "insecure_test_keys": True}, streams, enrolled)
    assert anonymous.burnable_streams() == ["bare", "bounded", "loose"]
    assert signed.burnable_streams() == ["bare", "loose"]
    with caplog.at_level(logging.WARNING, logger="sealedsum.enclave"):
        make_world(small_keys, signed)
    warned = [r.fields["stream"] for r in caplog.records if "whole privacy budget" in r.getMessage()]
    assert warned == ["bare", "loose"]
    assert all("min_release_interval_seconds" in r.fields["hint"] for r in caplog.records
               if "whole privacy budget" in r.getMessage())
