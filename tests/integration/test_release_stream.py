"""Releases in the release stream PREFIX.releases (docs/protocol.md sections 2 and 2.1), over the
real broker and sidecar: every consumer reads it from a start of its own, so none drains
releases for the others, a release drawn while no consumer runs is read by one that starts
later, a consumer with chain memory reads on where it stopped (and rereads without refusing
or printing twice), gaps name the windows around them, and with the stream deleted the
enclave holds its releases again until some queue takes them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pika
import pytest
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.platform.emulated import KEY_FILE

from tests.integration.conftest import relaunch, stream_bodies
from tests.integration.test_budget import collect
from tests.integration.test_chain_state import STREAM, remembered
from tests.integration.test_cli import run
from tests.integration.test_crash import HOLDING, wait_for
from tests.integration.test_publisher import _close_connections_from

pytestmark = pytest.mark.integration


def produce(sc, stream: str, windows: int) -> None:
    """``windows`` releases of ``stream`` (two records close a window of STREAM), each in the
    release stream before this returns (no budget notice is due: the budget is far away)."""
    before = len(stream_bodies(sc.config.broker, timeout=1.0))
    with Producer(sc.config) as producer:
        for _ in range(2 * windows):
            producer.send(stream, [1.0])
    wait_for(f"{windows} release(s) of {stream} in the release stream",
             lambda: len(stream_bodies(sc.config.broker, expect=before + windows)) >= before + windows)


def positions(messages) -> list[tuple[str, int]]:
    return [(m.stream, m.budget["releases"]) for m in messages]


def consume(sc, *args: str) -> subprocess.CompletedProcess:
    """``sealedsum consume`` on the testbed's config, run to its end."""
    return run("consume", "--config", str(sc.config_path), *args)


def test_consumers_started_apart_each_get_every_release_of_their_stream_only(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM, "t": STREAM})
    with Consumer(sc.config, "s", chain_state=None) as early:
        assert early.start == "next"
        produce(sc, "s", 2)
        produce(sc, "t", 1)
        # A short-lived consumer takes one and goes: nothing is drained for anyone else.
        short = consume(sc, "--stream", "s", "--count", "1", "--from", "first", "--no-chain-state", "--json")
        assert short.returncode == 0, short.stderr
        assert [json.loads(line)["window"] for line in short.stdout.splitlines()] == [1]
        with Consumer(sc.config, "s", chain_state=None, start="first") as late, \
                Consumer(sc.config, "t", chain_state=None, start="first") as other:
            assert positions(collect(late, 2)) == [("s", 1), ("s", 2)]
            assert positions(collect(other, 1)) == [("t", 1)]
            produce(sc, "s", 1)
            assert positions(collect(late, 1, timeout=20)) == [("s", 3)]
            assert collect(other, 1, timeout=2) == []  # s's releases are not t's consumer's
        assert positions(collect(early, 3)) == [("s", 1), ("s", 2), ("s", 3)]
        assert early.verifier.rejected == 0 and early.repeats == 0


def test_from_an_offset_and_from_last(sidecar_factory):
    sc = sidecar_factory({"s": STREAM, "t": STREAM})
    produce(sc, "s", 3)
    produce(sc, "t", 2)  # the newest messages of the stream are t's: its last chunk may hold no s
    with Consumer(sc.config, "s", chain_state=None, start="first") as reader:
        collect(reader, 1)
        first_offset = reader.chains["s"].offset
    with Consumer(sc.config, "s", chain_state=None, start=first_offset + 1) as from_offset:
        assert positions(collect(from_offset, 2)) == [("s", 2), ("s", 3)]
    with Consumer(sc.config, ["s", "t"], chain_state=None, start="last") as newest:
        assert sorted(positions(collect(newest, 2))) == [("s", 3), ("t", 2)]
        produce(sc, "s", 1)
        assert positions(collect(newest, 1, timeout=20)) == [("s", 4)]  # then what follows
    out = consume(sc, "--stream", "s", "--from", "last", "--count", "1", "--no-chain-state", "--json")
    assert out.returncode == 0, out.stderr
    assert '"window": 4' in out.stdout and len(out.stdout.splitlines()) == 1
    bad = consume(sc, "--stream", "s", "--from", "newest", "--no-chain-state")
    assert bad.returncode == 2 and "is not first, last, next or an offset" in bad.stderr


def test_a_release_drawn_while_no_consumer_runs_is_read_by_a_later_one(sidecar_factory, tmp_path):
    """The held-release promise, through the stream: with it bound, nothing is held, and
    nothing released is lost before a consumer reads it."""
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    produce(sc, "s", 1)
    assert sc.events(HOLDING) == []  # the stream took it: confirmed, not held
    with Consumer(sc.config, "s", chain_state=chains, start="first") as consumer:
        assert positions(collect(consumer, 1)) == [("s", 1)]
    produce(sc, "s", 2)  # nobody runs
    # A new run on the same memory reads on after what it admitted, by default.
    resume = remembered(chains)["offset"] + 1
    out = consume(sc, "--stream", "s", "--chain-state", str(chains), "--idle-timeout", "3", "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["window"] for line in out.stdout.splitlines()] == [2, 3]
    assert f"from {resume} (after the offset the chain state read last)" in out.stderr


def test_a_reread_from_first_prints_nothing_twice_and_a_restarted_chain_is_still_refused(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    produce(sc, "s", 2)
    read = consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "first", "--count", "2")
    assert read.returncode == 0 and len(read.stdout.splitlines()) == 2, read.stderr
    again = consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "first", "--idle-timeout", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout == "" and "received 0 verified release(s), rejected 0, dropped 2 received again" in again.stderr

    # The operator starts the sidecar again on a fresh state directory: its ledger restarts,
    # and its releases are appended to the same stream, after everything read.
    assert sc.stop() == 0
    old = sc.state.with_name("state.old")
    sc.state.rename(old)
    sc.state.mkdir()
    shutil.copy(old / KEY_FILE, sc.state / KEY_FILE)
    relaunch(sc)
    produce(sc, "s", 1)
    refused = consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "first", "--idle-timeout", "5")
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == ""
    assert "release 1 of stream 's' (window 1) starts the ledger again from genesis" in refused.stderr
    assert remembered(chains)["releases"] == 2


def test_a_gap_names_the_windows_it_lies_between(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    produce(sc, "s", 1)
    assert consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "first", "--count", "1").returncode == 0
    produce(sc, "s", 3)
    out = consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "last", "--count", "1")
    assert out.returncode == 0, out.stderr
    assert "s window 4:" in out.stdout
    assert "warning: releases 2-3 of stream 's' not received: windows between 1 and 4" in out.stderr


def test_with_the_stream_deleted_a_release_is_held_until_a_queue_takes_it(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    conn = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
    conn.channel().queue_delete(t.releases_stream)  # an operator deletes it
    conn.close()
    missing = consume(sc, "--stream", "s", "--no-chain-state", "--idle-timeout", "1")
    assert missing.returncode == 3 and "cannot read the release stream" in missing.stderr, missing.stderr
    named = f"{t.consumer_queue_prefix}held"
    try:
        with Producer(sc.config) as producer:
            producer.send("s", [1.0])
            producer.send("s", [1.0])
        wait_for("the enclave to hold the release", lambda: sc.events(HOLDING))
        with Consumer(sc.config, "s", queue=named, chain_state=None) as durable:
            (release,) = collect(durable, 1, timeout=20)  # retried every 5 s, now routable
        assert release.window == 1
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
        conn.channel().queue_delete(named)
        conn.close()


def test_the_stream_survives_the_sidecar_and_holds_releases_for_any_later_reader(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    produce(sc, "s", 1)
    assert sc.stop() == 0
    bodies = stream_bodies(sc.config.broker)
    assert len(bodies) == 1 and bodies[0].startswith(b"SSS\x01")


def test_a_consumer_whose_stream_was_deleted_and_declared_again_reads_the_new_one(sidecar_factory, tmp_path):
    """Offsets start at 0 again in a stream declared anew; the broker would make a consumer
    resuming at its remembered offset wait for that offset. It reads the new stream from its
    start instead, checking everything (its chain memory stays)."""
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    produce(sc, "s", 3)
    assert consume(sc, "--stream", "s", "--chain-state", str(chains), "--from", "first", "--count", "3").returncode == 0
    assert sc.stop() == 0
    conn = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
    conn.channel().queue_delete(sc.config.broker.topology.releases_stream)
    conn.close()
    relaunch(sc)  # declares it again
    produce(sc, "s", 1)
    out = consume(sc, "--stream", "s", "--chain-state", str(chains), "--count", "1", "--idle-timeout", "20")
    assert out.returncode == 0, out.stderr
    assert "s window 4:" in out.stdout and "from first" in out.stderr
    assert "it was deleted and declared again" in out.stderr
    assert remembered(chains)["releases"] == 4 and remembered(chains)["offset"] == 0


def test_a_reader_from_next_that_loses_the_broker_before_any_release_misses_nothing(sidecar_factory):
    """Subscribing again at "next" would skip what was published while it was away."""
    sc = sidecar_factory({"s": STREAM})
    produce(sc, "s", 1)  # before it starts: not for a reader from next
    with Consumer(sc.config, "s", chain_state=None) as consumer:
        assert consumer.start == "next"
        port = consumer._transport.connection._impl._transport._sock.getsockname()[1]
        assert _close_connections_from({port}) == 1  # the broker is lost before anything came
        produce(sc, "s", 2)  # while it is away
        got = positions(collect(consumer, 3, timeout=10))
        # Subscribing again by time may bring the chunk before too (section 2.1): never less.
        assert got[-2:] == [("s", 2), ("s", 3)] and got[:-2] in ([], [("s", 1)]), got
