"""What a consumer remembers of a stream's ledger chain between runs (sealedsum.consumers.chain_state,
chain_store; docs/protocol.md section 15.5): a chain that restarts from genesis, forks, or
releases a window again with another body is refused; redeliveries, gaps and late releases
are not; the memory survives a round trip through its file, and a damaged file is a clear error.

The releases are the real enclave core's, signed and verified; a second enclave core under the
same policy, started from nothing, is what a sidecar started on a fresh state directory with a
copy of platform.key publishes (the same charges, so the same heads, with other noise)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from sealedsum.common import wire
from sealedsum.common.config import from_mapping
from sealedsum.common.errors import (
    ChainContradiction,
    ChainForked,
    ChainRestarted,
    ChainStateError,
    ConfigError,
    ExitCode,
    LedgerChainError,
    WindowRepeated,
)
from sealedsum.common.results import BudgetExhausted
from sealedsum.consumers import chain_state
from sealedsum.consumers.chain_state import (
    Admission,
    ChainKey,
    Gap,
    StreamChain,
    payload_digest,
    vhost_of,
)
from sealedsum.consumers.chain_store import FORMAT, VERSION, ChainStore
from sealedsum.consumers.client import ResultVerifier

from tests.conftest import make_policy, make_world, now_ms, stream_table

RELEASES = 6
POLICY = {"s": stream_table(window_records=1, min_batch=1, budget_epsilon=float(RELEASES))}
KEY = ChainKey("ab" * 32, "/", "sealedsum", "s")


def run_enclave(keys):
    """Six one-record windows of ``s`` and the notice, as (message, digest of its signed payload)."""
    world = make_world(keys, make_policy(POLICY))
    verifier = ResultVerifier(world.attested)
    out = []
    for _ in range(RELEASES):
        for pub in world.enclave.on_record(world.sealer.seal("s", [7.0]).body, now_ms()).publish:
            out.append((verifier.verify(pub.body), payload_digest(wire.SignedMessage.from_bytes(pub.body).payload)))
    return out


@pytest.fixture(scope="module")
def chains(small_keys):
    """The stream as the first sidecar released it, and as one restarted from nothing releases it."""
    return run_enclave(small_keys), run_enclave(small_keys)


def followed(messages, upto: int) -> StreamChain:
    c = StreamChain("s")
    for m, d in messages[:upto]:
        c.admit(m, d)
    return c


def altered(message, **changes):
    """A release changed as an enclave could sign it, and its digest."""
    m = dataclasses.replace(message, **changes)
    return m, payload_digest(m.to_payload())


def test_the_chain_extends_and_a_redelivery_is_harmless(chains):
    first, _ = chains
    c = StreamChain("s")
    assert [c.admit(m, d) for m, d in first[:3]] == [Admission.EXTENDS] * 3
    assert c.releases == 3 and c.head == bytes.fromhex(first[2][0].budget["ledger_head"]) and c.gaps == []
    # The broker or the enclave may deliver any of them again: byte for byte, that is no news.
    assert [c.admit(m, d) for m, d in (first[2], first[0], first[1])] == [Admission.REDELIVERY] * 3
    assert c.releases == 3


def test_a_chain_that_starts_again_from_genesis_is_refused(chains):
    first, restarted = chains
    c = followed(first, 3)
    m, d = restarted[0]
    # Same charge, so the same head as the release 1 remembered: only the body tells them apart.
    assert m.budget["ledger_head"] == first[0][0].budget["ledger_head"] and d != first[0][1]
    with pytest.raises(ChainRestarted, match="release 1 of stream 's' \\(window 1\\) starts the ledger again "
                                             "from genesis after 3 release"):
        c.admit(m, d)
    assert c.releases == 3  # nothing of it was remembered


def test_a_window_released_again_with_other_noise_is_refused(chains):
    first, redrawn = chains
    c = followed(first, 4)
    # A rolled-back sealed state and counter: window 2 closes again, at position 2 again.
    with pytest.raises(WindowRepeated, match="release 2 of stream 's' \\(window 2\\) releases window 2 again "
                                             "with a different body"):
        c.admit(*redrawn[1])
    # One noised again in place (same position, head and window), or charged at a new position.
    with pytest.raises(WindowRepeated):
        c.admit(*altered(first[2][0], sum_fixed=[first[2][0].sum_fixed[0] + 1]))
    fifth = first[4][0]
    with pytest.raises(WindowRepeated, match="window 3 again"):
        c.admit(*altered(fifth, window=3))


def test_a_fork_is_refused(chains):
    first, _ = chains
    c = followed(first, 4)
    other_head = {**first[2][0].budget, "ledger_head": "00" * 32}
    with pytest.raises(ChainForked, match="release 3 of stream 's' \\(window 9\\) differs from the release 3 "
                                          "verified before \\(window 3\\)"):
        c.admit(*altered(first[2][0], window=9, budget=other_head))
    # At the same window, that is a second draw of it too, which says more.
    with pytest.raises(WindowRepeated):
        c.admit(*altered(first[2][0], budget=other_head))
    # The next release must link to the head remembered.
    with pytest.raises(ChainForked, match="does not extend the ledger verified up to release 4"):
        c.admit(*altered(first[4][0], budget={**first[4][0].budget, "ledger_head": "00" * 32}))
    with pytest.raises(ChainForked, match="does not extend"):
        c.admit(*altered(first[4][0], epsilon=0.5))  # not the charge its head commits to
    c.admit(*first[4])  # the real one still extends it


def test_every_contradiction_is_a_ledger_chain_error_that_exits_1():
    for cls in (ChainRestarted, ChainForked, WindowRepeated):
        assert issubclass(cls, ChainContradiction) and issubclass(cls, LedgerChainError)
        assert cls.exit_code == ExitCode.VERIFICATION
        assert "rolled back" in cls.hint and "delete" in cls.hint
    assert ChainStateError.exit_code == ExitCode.USAGE


def test_gaps_and_late_releases_are_allowed_and_checked(chains):
    first, _ = chains
    c = StreamChain("s")
    assert c.admit(*first[0]) is Admission.EXTENDS
    assert c.admit(*first[3]) is Admission.GAP and c.gaps == [(2, 3, 1, 4)]  # releases 2-3, windows 1 < . < 4
    # Held back by the enclave (it retries held releases every 5 s) or by a broker restart:
    assert c.admit(*first[1]) is Admission.LATE  # links to release 1
    assert c.admit(*first[2]) is Admission.LATE
    assert c.admit(*first[4]) is Admission.EXTENDS and c.releases == 5
    # A late release must still link to the one before it, and fit between the windows around it.
    c2 = StreamChain("s")
    for message in (first[0], first[3]):
        c2.admit(*message)
    with pytest.raises(ChainForked, match="does not link to the release before it"):
        c2.admit(*altered(first[1][0], budget={**first[1][0].budget, "ledger_head": "00" * 32}))
    with pytest.raises(ChainForked, match="windows went back"):
        c2.admit(*altered(first[2][0], window=7))
    with pytest.raises(ChainForked, match="windows went back"):
        c2.admit(*altered(first[4][0], window=2))


def test_joining_late_is_not_a_gap_and_earlier_releases_may_still_come(chains):
    first, _ = chains
    c = StreamChain("s")
    assert c.admit(*first[2]) is Admission.GAP and c.gaps == []  # nothing was missed: it just joined
    assert c.admit(*first[0]) is Admission.LATE  # checked from genesis
    assert c.admit(*first[1]) is Admission.LATE
    assert c.admit(*first[3]) is Admission.EXTENDS


def test_a_position_that_left_memory_is_refused_whatever_it_is(chains, monkeypatch):
    first, restarted = chains
    monkeypatch.setattr(chain_state, "RETAINED", 2)
    c = followed(first, 5)
    assert sorted(c.seen) == [4, 5] and c.passed == 3
    # Even the real release 2 again cannot be told from a second draw any more: refused.
    with pytest.raises(ChainForked, match="comes back to a position passed long ago"):
        c.admit(*first[1])
    with pytest.raises(ChainRestarted):
        c.admit(*restarted[0])
    with pytest.raises(ChainForked):  # window 3 is forgotten, but its position is not
        c.admit(*restarted[2])
    with pytest.raises(WindowRepeated):  # window 4 is remembered
        c.admit(*restarted[3])


def test_the_notice_closes_the_chain(chains):
    first, _ = chains
    notice, digest = first[-1]
    assert isinstance(notice, BudgetExhausted)
    c = followed(first, RELEASES)
    assert c.admit(notice, digest) is Admission.CLOSES and c.exhausted
    assert c.admit(notice, digest) is Admission.REDELIVERY
    assert c.admit(*first[5]) is Admission.REDELIVERY  # republished after a restart: fine
    seventh = first[5][0]
    with pytest.raises(ChainForked, match="comes after the stream's budget_exhausted notice"):
        c.admit(*altered(seventh, window=7, budget={**seventh.budget, "releases": 7}))
    early = followed(first, 3)
    with pytest.raises(ChainForked, match="budget_exhausted notice of stream 's' \\(after release 2\\) contradicts"):
        early.admit(dataclasses.replace(notice, budget={**notice.budget, "releases": 2}), digest)
    # A notice after releases never received is a gap; the last release may still come, at its head.
    gap = followed(first, 3)
    assert gap.admit(notice, digest) is Admission.GAP and gap.gaps == [(4, 6, 3, None)]
    assert gap.admit(*first[5]) is Admission.LATE
    g = followed(first, 3)
    g.admit(notice, digest)
    with pytest.raises(ChainForked, match="another ledger head than the one verified at release 6"):
        g.admit(*altered(first[5][0], budget={**first[5][0].budget, "ledger_head": "11" * 32}))


def test_the_memory_survives_its_json_form(chains):
    first, restarted = chains
    c = followed(first, 4)
    c.admit(*first[5])  # a gap at 5
    doc = json.loads(json.dumps(c.to_json()))
    back = StreamChain.from_json("s", doc)
    assert back.to_json() == doc and back.releases == 6 and back.seen == c.seen
    assert back.admit(*first[3]) is Admission.REDELIVERY
    assert back.admit(*first[4]) is Admission.LATE
    with pytest.raises(WindowRepeated):
        StreamChain.from_json("s", doc).admit(*restarted[1])
    assert StreamChain.from_json("s", StreamChain("s").to_json()).head == StreamChain("s").head


@pytest.mark.parametrize("change,match", [
    (lambda d: d.pop("passed"), "exactly the fields"),
    (lambda d: d.update(releases=-1), "not counts"),
    (lambda d: d.update(releases=True), "not counts"),
    (lambda d: d.update(passed=99), "passed above releases"),
    (lambda d: d.update(exhausted="no"), "exhausted"),
    (lambda d: d.update(head="AB" * 32), "64 hex digits"),
    (lambda d: d.update(head="ab" * 31), "64 hex digits"),
    (lambda d: d.update(head="ab" * 32), "not the one of its last release"),
    (lambda d: d["seen"].append(dict(d["seen"][0])), "two releases at one position"),
    (lambda d: d["seen"][0].update(n=9), "between positions 1 and 3"),
    (lambda d: d["seen"][0].pop("digest"), "exactly the fields n, window, head and digest"),
    (lambda d: d.pop("offset"), "exactly the fields"),
    (lambda d: d.update(offset=-1), "offset that is neither null nor a count"),
    (lambda d: d.update(offset="7"), "offset that is neither null nor a count"),
])
def test_a_damaged_entry_is_refused(chains, change, match):
    doc = followed(chains[0], 3).to_json()
    change(doc)
    with pytest.raises(ChainStateError, match=match):
        StreamChain.from_json("s", doc)


def test_a_gap_names_the_windows_between_the_releases_around_it():
    """Withheld windows leave holes in the window numbers: a gap can only name the range
    between the neighbours received, not the missing windows one by one."""
    assert Gap(4, 6, 7, 12).describe("x") == "releases 4-6 of stream 'x' not received: windows between 7 and 12"
    assert Gap(2, 2, None, 5).describe("x") == "release 2 of stream 'x' not received: windows before 5"
    assert Gap(4, 6, 3, None).describe("x") == \
        "releases 4-6 of stream 'x' not received: windows after 3, before the budget ran out"


def test_a_reread_of_the_release_stream_skips_what_memory_passed_and_checks_the_rest(chains, monkeypatch):
    """Rereading the release stream from its start: a message at or below the offset memory
    admitted, at a position that left memory, was read before (skipped, not refused as rule 2
    would); one still remembered is a redelivery; anything else is checked as always, so a
    restarted or rolled-back sidecar's releases, appended at new offsets, are still refused."""
    first, restarted = chains
    monkeypatch.setattr(chain_state, "RETAINED", 2)
    c = StreamChain("s")
    for offset, (m, d) in enumerate(first[:5]):
        c.admit(m, d, offset=10 + offset)
    assert (c.offset, c.passed, sorted(c.seen)) == (14, 3, [4, 5])
    assert [c.admit(m, d, offset=10 + o) for o, (m, d) in enumerate(first[:5])] == \
        [Admission.ALREADY_READ] * 3 + [Admission.REDELIVERY] * 2
    with pytest.raises(ChainForked, match="passed long ago"):  # the same, at a new offset: a second copy
        c.admit(*first[1], offset=15)
    with pytest.raises(ChainRestarted):
        c.admit(*restarted[0], offset=15)
    with pytest.raises(WindowRepeated):  # a remembered position, even at an old offset
        c.admit(*restarted[3], offset=13)
    assert c.admit(*first[5], offset=15) is Admission.EXTENDS and c.offset == 15
    # A memory that never read the stream (offset None) has nothing to skip by.
    queue_only = followed(first, 5)
    with pytest.raises(ChainForked, match="passed long ago"):
        queue_only.admit(*first[1], offset=0)
    assert queue_only.admit(*first[5], offset=40) is Admission.EXTENDS and queue_only.offset == 40


def test_a_version_1_file_is_read_and_written_back_as_version_2(tmp_path, chains):
    path = tmp_path / "chains.json"
    entry = {"platform_key": KEY.platform_key, "vhost": KEY.vhost, "prefix": KEY.prefix, "stream": KEY.stream,
             **followed(chains[0], 2).to_json()}
    del entry["offset"]
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "chains": [entry]}))
    (loaded,) = ChainStore(path).load([KEY]).values()
    assert loaded.releases == 2 and loaded.offset is None
    ChainStore(path).save({KEY: loaded})
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["chains"][0]["offset"] is None
    entry["offset"] = 3  # a version 1 entry has no offset
    path.write_text(json.dumps({"format": FORMAT, "version": 1, "chains": [entry]}))
    with pytest.raises(ChainStateError, match="exactly the fields"):
        ChainStore(path).load([KEY])


# -- the file -------------------------------------------------------------------------------
def test_the_store_round_trips_and_keeps_other_entries(tmp_path, chains):
    first, _ = chains
    path = tmp_path / "sub" / "chains.json"
    store = ChainStore(path)
    assert store.load([KEY]) == {}  # no file yet: nothing remembered
    other = dataclasses.replace(KEY, prefix="other")
    store.save({KEY: followed(first, 2)})
    ChainStore(path).save({other: followed(first, 4)})
    loaded = ChainStore(path).load([KEY, other, dataclasses.replace(KEY, stream="t")])
    assert {k: v.releases for k, v in loaded.items()} == {KEY: 2, other: 4}
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT and doc["version"] == VERSION == 2
    assert {e["prefix"] for e in doc["chains"]} == {"sealedsum", "other"}
    assert sorted(os.listdir(path.parent)) == ["chains.json", "chains.json.lock"]  # no temporary file left
    assert loaded[KEY].admit(*first[1]) is Admission.REDELIVERY
    assert loaded[KEY].admit(*first[2]) is Admission.EXTENDS


@pytest.mark.parametrize("text,match", [
    ("{not json", "is not JSON"),
    ('{"format": "x", "format": "y", "version": 1, "chains": []}', "is not JSON"),  # strict JSON (section 1)
    ('{"format": "sealedsum/consumer-chains", "version": NaN, "chains": []}', "is not JSON"),
    ('{"version": 1, "chains": []}', "is not a chain-state file"),
    (json.dumps({"format": FORMAT, "version": 3, "chains": []}), "has version 3"),
    (json.dumps({"format": FORMAT, "version": True, "chains": []}), "has version True"),
    (json.dumps({"format": FORMAT, "version": 1, "chains": {}}), "exactly the fields"),
    (json.dumps({"format": FORMAT, "version": 1, "chains": [{"stream": "s"}]}), "without platform_key"),
    (json.dumps({"format": FORMAT, "version": 1, "chains": [
        {"platform_key": "ab", "vhost": "/", "prefix": "p", "stream": "s", "releases": 1}]}), "entry of stream 's'"),
])
def test_a_damaged_file_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "chains.json"
    path.write_text(text)
    with pytest.raises(ChainStateError, match=match) as err:
        ChainStore(path).load([KEY])
    assert str(path) in str(err.value)
    if "has version" not in match:
        assert "delete it to start over" in err.value.hint
    with pytest.raises(ChainStateError):  # and nothing is written over it
        ChainStore(path).save({KEY: StreamChain("s")})
    assert path.read_text() == text


def test_an_unwritable_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ChainStateError, match="cannot (lock|write) the chain-state file"):
        ChainStore(blocker / "chains.json").save({KEY: StreamChain("s")})


# -- where it is kept -------------------------------------------------------------------------
def test_the_config_says_where_the_chains_are_kept(tmp_path):
    cfg = tmp_path / "sealedsum.toml"
    assert from_mapping({"consumer": {"chain_state": "c.json"}}, env={}, path=cfg).chain_state == tmp_path / "c.json"
    assert from_mapping({"consumer": {"chain_state": "/x/c.json"}}, env={}).chain_state.as_posix() == "/x/c.json"
    assert from_mapping({"consumer": {"chain_state": False}}, env={"HOME": "/home/u"}).chain_state is None
    # By default, persisted where the XDG rules put state; off only when no place can be derived.
    assert from_mapping({}, env={"HOME": "/home/u"}).chain_state.as_posix() == \
        "/home/u/.local/state/sealedsum/consumer-chains.json"
    assert from_mapping({}, env={"XDG_STATE_HOME": "/st", "HOME": "/home/u"}).chain_state.as_posix() == \
        "/st/sealedsum/consumer-chains.json"
    assert from_mapping({}, env={}).chain_state is None
    for bad in ({"chain_state": 3}, {"chain_state": ""}, {"path": "x"}):
        with pytest.raises(ConfigError, match="consumer"):
            from_mapping({"consumer": bad}, env={})


def test_the_key_is_the_deployment_and_stream_not_the_measurement():
    assert [f.name for f in dataclasses.fields(ChainKey)] == ["platform_key", "vhost", "prefix", "stream"]
    assert vhost_of("amqp://u:p@h:5672/%2F") == "/" and vhost_of("amqp://h") == "/"
    assert vhost_of("amqps://h/prod") == "prod" and vhost_of("amqp://h/") == "/"
