"""The privacy budget over the real broker and real processes: releases stop exactly at
the budget with one signed notice, a restart continues the spend, a rolled-back
ledger stops the enclave, and `sealedsum budget` reports it all, signed."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from sealedsum.common.errors import StreamExhausted
from sealedsum.common.results import BudgetExhausted, Release
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.conftest import launch, relaunch
from tests.integration.test_cli import run
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 2, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 3.0}


def collect(consumer, n, timeout=30):
    out = []
    for message in consumer.releases(idle_timeout=timeout):
        out.append(message)
        if len(out) >= n:
            break
    return out


def test_releases_stop_at_the_budget_with_one_signed_notice(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    dead_conn, dead_q = capture_queue(sc, t.rejected_exchange, "")
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for i in range(10):
                producer.send("s", [float(i)])
        messages = collect(consumer, 4)
        assert [type(m) for m in messages] == [Release, Release, Release, BudgetExhausted]
        assert [m.window for m in messages[:3]] == [1, 2, 3]
        assert [m.budget["spent_epsilon"] for m in messages[:3]] == [1.0, 2.0, 3.0]
        assert messages[3].budget["remaining_releases"] == 0
        assert messages[3].at_ms == messages[2].closed_at_ms  # dated by its release (section 13.4), live too
        assert collect(consumer, 1, timeout=3) == []  # the notice comes once, nothing after it
        report = consumer.budget("s")
    dead = drain(dead_conn, dead_q, expect=4)
    assert [p.headers["x-sealedsum-reason"] for p, _ in dead] == ["budget_exhausted"] * 4
    assert report.exhausted and report.budget["releases"] == 3
    out = run("budget", "--config", str(sc.config_path), "--stream", "s", "--json")
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["exhausted"] is True and view["spent_epsilon"] == 3.0 and view["remaining_releases"] == 0


def test_a_restart_continues_the_spend(sidecar_factory):
    sc = sidecar_factory({"s": dict(STREAM, budget_epsilon=4.0)})
    with Consumer(sc.config, "s") as consumer:
        with Producer(sc.config) as producer:
            for i in range(4):
                producer.send("s", [1.0])
        assert [m.window for m in collect(consumer, 2)] == [1, 2]
    assert sc.stop() == 0
    relaunch(sc)
    with Consumer(sc.config, "s") as consumer:
        report = consumer.budget("s")
        assert report.budget["releases"] == 2 and report.budget["spent_epsilon"] == 2.0
        with Producer(sc.config) as producer:
            for i in range(6):
                producer.send("s", [1.0])
        messages = collect(consumer, 3)
    # Window numbers and the spend continue: two more releases, then the notice.
    assert [type(m) for m in messages] == [Release, Release, BudgetExhausted]
    assert [m.window for m in messages[:2]] == [3, 4]
    assert messages[1].budget["spent_epsilon"] == 4.0
    assert messages[1].budget["ledger_head"] == messages[2].budget["ledger_head"]


def test_a_rolled_back_ledger_is_detected(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as producer:
        for i in range(2):
            producer.send("s", [1.0])
        collect(consumer, 1)
        time.sleep(1.5)  # the tick after the confirm checkpoints the state without pending
        (state_dir,) = {p.parent for p in sc.state.rglob("state.sealed")}
        files = ("state.sealed", "state.journal")
        for name in files:
            shutil.copy(state_dir / name, tmp_path / name)
        for i in range(2):
            producer.send("s", [1.0])
        collect(consumer, 1)
    assert sc.stop() == 0
    for name in files:  # the operator puts back the sealed files from when one release was spent
        shutil.copy(tmp_path / name, state_dir / name)
    proc = launch(sc)
    assert proc.wait(timeout=60) == 2  # the platform does not restart an enclave that refused
    (event,) = sc.events("sealed state rolled back; refusing to start")
    assert "older copy" in event["detail"]


GROUPED = {k: v for k, v in STREAM.items() if k != "budget_epsilon"} | {"budget_group": "shared"}


def test_a_budget_group_spends_once_for_both_streams(sidecar_factory):
    """Two streams fed by the same data: their releases draw on one budget of 3, so three
    releases in all (not three each) and then both streams are exhausted, each with its notice."""
    sc = sidecar_factory({"a": GROUPED, "b": GROUPED}, extra_toml="[budget_groups.shared]\nbudget_epsilon = 3.0\n")
    t = sc.config.broker.topology
    dead_conn, dead_q = capture_queue(sc, t.rejected_exchange, "")
    with Consumer(sc.config, ["a", "b"]) as consumer:
        with Producer(sc.config) as producer:
            for stream in ("a", "a", "b", "b"):  # a window of a, then one of b
                producer.send(stream, [1.0])
        first = collect(consumer, 2)
        with Producer(sc.config) as producer:
            for _ in range(2):
                producer.send("a", [1.0])  # a's second window: the group's third release
        rest = collect(consumer, 3)
        with Producer(sc.config) as producer:
            with pytest.raises(StreamExhausted):  # b has no room left although it released only once
                producer.send("b", [1.0])
            producer.publish(producer.sealer.seal("b", [1.0]))  # sent anyway, the enclave refuses it
        report = consumer.budget("b")
    releases = [m for m in first + rest if isinstance(m, Release)]
    assert [(m.stream, m.budget["releases"], m.budget["spent_epsilon"]) for m in releases] == [
        ("a", 1, 1.0), ("b", 1, 2.0), ("a", 2, 3.0)]
    assert all(m.budget["budget_group"] == "shared" and m.budget["budget_epsilon"] == 3.0 for m in releases)
    assert releases[-1].budget["group_releases"] == {"a": 2, "b": 1}
    notices = {m.stream: m for m in rest if isinstance(m, BudgetExhausted)}
    assert set(notices) == {"a", "b"}
    assert notices["a"].at_ms == notices["b"].at_ms == releases[-1].closed_at_ms  # section 15.6
    assert notices["b"].budget["releases"] == 1 and notices["b"].budget["spent_epsilon"] == 3.0
    assert report.exhausted and report.budget["spent_epsilon"] == 3.0 and report.budget["remaining_releases"] == 0
    (dead,) = drain(dead_conn, dead_q, expect=1)
    assert dead[0].headers["x-sealedsum-reason"] == "budget_exhausted"
    out = run("budget", "--config", str(sc.config_path), "--stream", "b")
    assert out.returncode == 0, out.stderr
    assert "spent epsilon 3 of 3 (budget group shared: a 2, b 1 releases) in 1 release(s)" in out.stdout
