"""A consumer recomputes a stream's ledger chain from its verified releases
(sealedsum.consumers.chain_audit, docs/protocol.md section 15.4): a missing, reordered, repeated or
altered release is found. Against the real enclave core and against tests/vectors/ledger.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sealedsum.common import ledger_chain as chain
from sealedsum.common import wire
from sealedsum.common.errors import LedgerChainError, LedgerHeadMismatch, MissingRelease, ReleaseOutOfOrder
from sealedsum.common.results import BudgetExhausted, Release, verify_signed
from sealedsum.consumers.client import ResultVerifier
from sealedsum.consumers.chain_audit import ChainVerifier, verify_chain
from sealedsum.sidecar.enclave import ledger as enclave_ledger
from tests.conftest import make_policy, make_world, now_ms, stream_table

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
RELEASES = 6


@pytest.fixture(scope="module")
def stream(small_keys):
    """Six one-record windows of ``s`` (eps 1 of a budget of 6), then its notice, as a
    consumer gets them: verified from the signed bytes. Plus a budget report at the end."""
    world = make_world(small_keys, make_policy({"s": stream_table(window_records=1, min_batch=1,
                                                                  budget_epsilon=float(RELEASES))}))
    verifier = ResultVerifier(world.attested)
    messages = []
    for _ in range(RELEASES):
        for pub in world.enclave.on_record(world.sealer.seal("s", [7.0]).body, now_ms()).publish:
            messages.append(verifier.verify(pub.body))
    report = verify_signed(world.enclave.answer(wire.BudgetRequest(bytes(32), "s").to_bytes(), now_ms()),
                           world.attested, ("budget",))
    return world, messages, report


def test_the_chain_recomputes_to_the_enclaves_head(stream):
    world, messages, report = stream
    releases, notice = messages[:-1], messages[-1]
    assert [r.budget["releases"] for r in releases] == list(range(1, RELEASES + 1))
    assert isinstance(notice, BudgetExhausted)
    verified = verify_chain(messages)
    assert verified.releases == RELEASES and verified.exhausted and verified.gaps == []
    assert verified.head == world.enclave.ledgers["s"].head == bytes.fromhex(report.budget["ledger_head"])
    assert verified.check_report(report) == 0
    assert verify_chain(releases[:3]).check_report(report) == 3  # three releases not received yet


def test_the_chain_is_defined_once():
    # The enclave's ledger uses the shared definition, not a copy of it.
    assert enclave_ledger.genesis is chain.genesis and enclave_ledger.next_head is chain.next_head
    assert enclave_ledger.LEDGER_LABEL is chain.LEDGER_LABEL


@pytest.mark.parametrize("drop", [0, 2, RELEASES - 1])
def test_a_missing_release_is_found(stream, drop):
    _, messages, _ = stream
    releases = messages[:-1]
    kept = releases[:drop] + releases[drop + 1:]
    with pytest.raises(MissingRelease, match=f"release {drop + 1} (of stream 's' missing|not seen)"):
        verify_chain(kept + [messages[-1]])


def test_a_missing_last_release_is_found_by_the_report(stream):
    _, messages, report = stream
    assert verify_chain(messages[:RELEASES - 1]).check_report(report) == 1


def test_a_reordered_release_is_found(stream):
    _, messages, _ = stream
    r = messages[:-1]
    with pytest.raises(ReleaseOutOfOrder, match="release 3 of stream 's' comes after release 4"):
        verify_chain([r[0], r[1], r[3], r[2], r[4], r[5]])
    with pytest.raises(ReleaseOutOfOrder):
        verify_chain([r[1], r[0]])


def test_a_repeated_release_is_skipped_but_a_different_one_with_its_number_is_not(stream):
    _, messages, _ = stream
    r = messages[:-1]
    assert verify_chain([r[0], r[1], r[1], r[0], r[2]]).releases == 3  # redeliveries
    redrawn = dataclasses.replace(r[1], sum_fixed=[r[1].sum_fixed[0] + 1])  # the same window noised again
    with pytest.raises(LedgerChainError, match="two different releases of stream 's' are both release 2"):
        verify_chain([r[0], r[1], redrawn])


def test_a_release_that_is_not_the_one_charged_breaks_the_chain(stream):
    _, messages, _ = stream
    r = messages[:-1]
    for altered in (dataclasses.replace(r[2], window=9), dataclasses.replace(r[2], epsilon=0.5),
                    dataclasses.replace(r[2], budget={**r[2].budget, "ledger_head": "00" * 32})):
        with pytest.raises(LedgerHeadMismatch, match="release 3 of stream 's'"):
            verify_chain([r[0], r[1], altered])
    with pytest.raises(LedgerChainError, match="not in the ledger of 't'"):
        verify_chain(r, stream="t")


def test_the_notice_must_close_the_chain(stream):
    _, messages, _ = stream
    r, notice = messages[:-1], messages[-1]
    with pytest.raises(MissingRelease, match="the budget_exhausted notice counts 6 releases"):
        verify_chain(r[:5] + [notice])
    with pytest.raises(ReleaseOutOfOrder, match="release 6 of stream 's' comes after the budget_exhausted notice"):
        verify_chain(r[:5] + [notice, r[5]])
    # Republished after a restart, the last release and the notice may come again: that is fine.
    assert verify_chain(r + [notice, r[5], notice]).releases == RELEASES
    seventh = dataclasses.replace(r[5], window=7, budget={**r[5].budget, "releases": 7})
    with pytest.raises(LedgerChainError, match="release 7 of stream 's' comes after its budget_exhausted notice"):
        verify_chain(r + [notice, seventh])


def test_a_report_behind_the_releases_is_refused(stream):
    _, messages, report = stream
    more = ChainVerifier("s", RELEASES + 1, bytes(32))
    with pytest.raises(LedgerHeadMismatch, match="the budget report"):
        more.check_report(report)


def test_a_late_consumer_joins_and_still_sees_gaps(stream):
    _, messages, _ = stream
    r = messages[:-1]
    joined = ChainVerifier.joining(r[2])
    assert joined.add(r[3]) and not joined.add(r[3])
    joined.add(r[5], allow_gaps=True)
    assert joined.gaps == [(5, 5)] and joined.releases == 6
    joined.add(messages[-1])
    assert joined.exhausted
    with pytest.raises(ReleaseOutOfOrder):
        joined.add(r[4])
    assert ChainVerifier.joining(r[0]).head == bytes.fromhex(r[0].budget["ledger_head"])


def vector_release(stream: str, charge: dict) -> Release:
    """A release with the charge and budget of a vector chain (noised values made up)."""
    c = json.loads(charge["charge"])
    return Release(stream=stream, window=c["window"], aggregate="sum", count=1, sum=[0.0], sum_fixed=[0],
                   mean=[0.0], dimension=1, fraction_bits=16, mechanism=c["mechanism"], epsilon=c["epsilon"],
                   delta=c["delta"], rho=c["rho"], sum_noise_scale=1.0, count_noise_scale=1.0, key_epoch=1,
                   measurement="00" * 32, closed_at_ms=0, budget=charge["budget"])


def test_the_ledger_vectors_verify():
    chains = json.loads((VECTORS / "ledger.json").read_text())["chains"]
    assert any(len(c["charges"]) >= 2 for c in chains)
    for c in chains:
        releases = [vector_release(c["stream"], charge) for charge in c["charges"]]
        assert verify_chain(releases).head.hex() == c["head"]
        assert verify_chain([], stream=c["stream"]).head.hex() == c["genesis"]
        if len(releases) >= 2:
            with pytest.raises(MissingRelease):
                verify_chain(releases[1:])
