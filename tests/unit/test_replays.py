"""A release received again byte for byte is handed to the application once
(sealedsum.consumers.client.LedgerFollower, what Consumer.releases() does with each body;
docs/protocol.md section 15.5): with and without a chain-state file, across runs with one, and
for the budget_exhausted notice. Only the broker's own redelivery of a message a run before
never acknowledged is handed over again; the same position with another body is still refused.

The bodies are the real enclave core's, signed, exactly as it publishes (and republishes) them."""

from __future__ import annotations

import logging

import pytest
from sealedsum.common.errors import ChainContradiction, ChainRestarted, WindowRepeated
from sealedsum.common.results import BudgetExhausted, Release
from sealedsum.consumers.chain_state import ChainKey, StreamChain
from sealedsum.consumers.chain_store import ChainStore
from sealedsum.consumers.client import LedgerFollower, ResultVerifier

from tests.conftest import make_policy, make_world, now_ms, stream_table

RELEASES = 3
POLICY = {"s": stream_table(window_records=1, min_batch=1, budget_epsilon=float(RELEASES))}
KEY = ChainKey("ab" * 32, "/", "sealedsum", "s")


def bodies(world) -> list[bytes]:
    """The stream's three releases and its notice, as signed bodies."""
    out = []
    for _ in range(RELEASES):
        out += [pub.body for pub in world.enclave.on_record(world.sealer.seal("s", [7.0]).body, now_ms()).publish]
    assert len(out) == RELEASES + 1
    return out


@pytest.fixture(scope="module")
def worlds(small_keys):
    """The enclave's bodies, and a second enclave's under the same keys and policy started from
    nothing (what a sidecar on a fresh state directory with a copy of platform.key signs)."""
    first, second = make_world(small_keys, make_policy(POLICY)), make_world(small_keys, make_policy(POLICY))
    return first, bodies(first), bodies(second)


def follower(world, store: ChainStore | None = None) -> LedgerFollower:
    remembered = store.load([KEY]) if store else {}
    return LedgerFollower(ResultVerifier(world.attested), {"s": remembered.get(KEY) or StreamChain("s")},
                          {"s": KEY}, store)


def handed(f: LedgerFollower, deliveries, *, redelivered: bool = False) -> list:
    """What the application gets from these bodies: each release's window, "notice" for the notice."""
    out = []
    for body in deliveries:
        m = f.take(body, redelivered=redelivered)
        if m is not None:
            out.append("notice" if isinstance(m, BudgetExhausted) else m.window)
    return out


@pytest.mark.parametrize("with_file", [False, True])
def test_a_republished_release_is_handed_over_once(worlds, tmp_path, caplog, with_file):
    world, (b1, b2, b3, notice), _ = worlds
    f = follower(world, ChainStore(tmp_path / "chains.json") if with_file else None)
    caplog.set_level(logging.INFO, logger="sealedsum.consumer")
    # As a red team measured it: windows 1 and 2 republished between the genuine deliveries.
    assert handed(f, [b1, b2, b1, b1, b2, b3, b3]) == [1, 2, 3]
    assert f.repeats == 4 and f.verifier.rejected == 0
    # The notice is the stream's last message; republished, it is not news either.
    assert handed(f, [notice, notice, b1]) == ["notice"]
    assert f.repeats == 6
    drops = [r for r in caplog.records if r.getMessage() == "release received again; dropped"]
    assert len(drops) == 6 and {r.levelno for r in drops} == {logging.INFO}
    assert drops[0].fields == {"stream": "s", "release": 1, "window": 1, "redelivered": False, "offset": None}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_across_runs_the_chain_state_file_drops_what_a_run_before_handed_over(worlds, tmp_path):
    world, (b1, b2, b3, _), _ = worlds
    store = ChainStore(tmp_path / "chains.json")
    assert handed(follower(world, store), [b1, b2]) == [1, 2]
    # The next run's durable queue holds copies republished while it was away, then window 3.
    again = follower(world, store)
    assert handed(again, [b1, b2, b3, b2]) == [3] and again.repeats == 3
    # A consumer that remembers nothing between runs cannot tell: it hands them over once each.
    forgetful = follower(world)
    assert handed(forgetful, [b1, b2, b1, b3, b2]) == [1, 2, 3] and forgetful.repeats == 2


def test_the_brokers_redelivery_of_an_unacknowledged_release_is_handed_over_once_more(worlds, tmp_path):
    """A consumer killed with a release in hand never acknowledged it, so the broker gives it to
    the next run flagged redelivered; that run hands it over (the one before may not have
    finished with it), once. A copy someone republished is never flagged."""
    world, (b1, b2, b3, _), _ = worlds
    store = ChainStore(tmp_path / "chains.json")
    assert handed(follower(world, store), [b1, b2]) == [1, 2]  # killed before acknowledging 2
    again = follower(world, store)
    assert handed(again, [b2], redelivered=True) == [2]
    assert handed(again, [b2, b1]) == [] and handed(again, [b2], redelivered=True) == []  # e.g. a reconnect
    assert handed(again, [b3]) == [3] and again.repeats == 3


def test_the_same_position_with_another_body_is_still_refused(worlds, tmp_path):
    world, (b1, b2, _, _), (r1, r2, _, _) = worlds
    store = ChainStore(tmp_path / "chains.json")
    f = follower(world, store)
    assert handed(f, [b1, b2, b1]) == [1, 2]
    for body, error in ((r1, ChainRestarted), (r2, WindowRepeated)):
        with pytest.raises(error) as err:
            f.take(body)
        assert isinstance(err.value, ChainContradiction) and str(store.path) in err.value.hint
        # Flagged redelivered or not: the flag only ever lets a byte-for-byte repeat through.
        with pytest.raises(error):
            f.take(body, redelivered=True)
    assert f.verifier.rejected == 4 and f.repeats == 1


def test_what_is_not_verified_or_not_subscribed_is_rejected_not_dropped(worlds, small_keys):
    world, (b1, _, _, _), _ = worlds
    f = follower(world)
    assert f.take(b1[:-1] + bytes([b1[-1] ^ 1])) is None and f.verifier.rejected == 1
    other = make_world(small_keys, make_policy({"t": stream_table(window_records=1, min_batch=1)}))
    (foreign,) = [pub.body for pub in other.enclave.on_record(other.sealer.seal("t", [1.0]).body, now_ms()).publish]
    f = LedgerFollower(ResultVerifier(other.attested), {"s": StreamChain("s")}, {"s": KEY}, None)
    assert f.take(foreign) is None and f.verifier.rejected == 1 and f.repeats == 0
    assert isinstance(follower(world).take(b1), Release)
