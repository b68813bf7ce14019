"""A budget that outlives a policy change: the platform's ledger key (bound to the code, not
the policy), the sealed ledger file and its rollback protection, and the rules by which a
new measurement inherits the spend of the one it replaces (docs/protocol.md, 15.7). No
broker: the real enclave core, keys and samplers."""

from __future__ import annotations

import os
import shutil

import pytest

from sealedsum.common import wire
from sealedsum.common.attestation import TrustAnchors, verify_attestation
from sealedsum.common.errors import ExitCode, InheritedSpendMismatch, RollbackDetected, SealingError, \
    StateIncompatible
from sealedsum.common.results import BudgetExhausted, Release
from sealedsum.consumers.chain_audit import ChainVerifier
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.enclave.lineage import Lineage, parameters
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.sidecar.enclave_process.checkpoint import StateWriter
from sealedsum.sidecar.enclave_process.store import SealedLedgerStore, SealedStateStore
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import PlatformCounter, make_policy, now_ms, stream_table

S = stream_table(window_records=2, min_batch=1, budget_epsilon=10.0)


class LedgerCounter:
    def __init__(self, platform: EmulatedPlatform, code_digest: bytes) -> None:
        self.platform, self.code_digest = platform, code_digest

    def read(self) -> int:
        return self.platform.ledger_counter_read(self.code_digest)

    def advance(self, value: int) -> int:
        return self.platform.ledger_counter_advance(self.code_digest, value)


class Deployment:
    """One platform and one state directory, on which enclaves of several policies start in
    turn, as `sealedsum sidecar` would start them (the same code digest throughout)."""

    def __init__(self, tmp_path, small_keys, other_keys) -> None:
        self.dir = tmp_path
        self.platform = EmulatedPlatform.init(tmp_path / "platform")
        self.keys = {}  # measurement -> its enclave keys (as if unsealed from keys.sealed)
        self.spare = [small_keys, other_keys]

    def ledger_store(self, code_digest: bytes) -> SealedLedgerStore:
        return SealedLedgerStore(self.dir / "ledger" / f"{code_digest.hex()[:32]}.sealed",
                                 self.platform.ledger_key(code_digest), code_digest,
                                 LedgerCounter(self.platform, code_digest))

    def state_store(self, measurement: bytes) -> SealedStateStore:
        directory = self.dir / measurement.hex()[:32]
        directory.mkdir(exist_ok=True)
        return SealedStateStore(directory, self.platform.sealing_key(measurement), measurement,
                                PlatformCounter(self.platform, measurement))

    def start(self, policy):
        """Load state and ledger the way the enclave process does; return (enclave, writer, sealer)."""
        policy_bytes = policy.to_bytes()
        digest, measurement = measure.measure(policy_bytes)
        keys = self.keys.setdefault(measurement, self.spare[len(self.keys) % 2])
        store, ledger_store = self.state_store(measurement), self.ledger_store(digest)
        enclave = Enclave(keys, policy, policy_bytes, digest, measurement,
                          lambda rd: self.platform.quote(measurement, rd), store.load(), now_ms(),
                          ledger=ledger_store.load())
        writer = StateWriter(enclave, store, ledger_store=ledger_store)
        writer.checkpoint()  # every start begins with one (Enclave.start)
        return enclave, writer, measurement

    def sealer(self, enclave) -> RecordSealer:
        trust = TrustAnchors(self.platform.public_key(), frozenset({enclave.measurement}))
        nonce = os.urandom(wire.NONCE_SIZE)
        return RecordSealer(verify_attestation(enclave.attest(wire.AttestRequest(nonce).to_bytes()), nonce,
                                               trust, now_ms()))

    def send(self, enclave, writer, n, stream="s"):
        """n records; each call's effects committed (checkpoint, then 'publish'): the messages."""
        sealer = self.sealer(enclave)
        out = []
        for _ in range(n):
            effects = enclave.on_record(sealer.seal(stream, [1.0]).body, now_ms())
            if effects.checkpoint:
                writer.checkpoint()
            for p in effects.publish:
                out.append(p)
                enclave.confirm_published(p)
        writer.checkpoint()
        return [p.message for p in out]


@pytest.fixture
def dep(tmp_path, small_keys, other_keys):
    return Deployment(tmp_path, small_keys, other_keys)


def releases(messages):
    return [m for m in messages if isinstance(m, Release)]


# -- the platform ------------------------------------------------------------------------
def test_the_ledger_key_depends_on_the_code_digest_not_the_policy(tmp_path):
    platform = EmulatedPlatform.init(tmp_path)
    one = make_policy({"s": S}).to_bytes()
    two = make_policy({"s": S}, max_record_age_seconds=700).to_bytes()
    (d1, m1), (d2, m2) = measure.measure(one), measure.measure(two)
    assert d1 == d2 and m1 != m2  # a policy change: a new measurement, the same code
    assert platform.sealing_key(m1) != platform.sealing_key(m2)
    assert platform.ledger_key(d1) == platform.ledger_key(d2)
    assert platform.ledger_key(bytes(32)) != platform.ledger_key(d1)  # other code: another key
    assert platform.ledger_key(m1) != platform.sealing_key(m1)  # its own label
    assert EmulatedPlatform.init(tmp_path / "other").ledger_key(d1) != platform.ledger_key(d1)
    assert EmulatedPlatform.load(tmp_path).ledger_key(d1) == platform.ledger_key(d1)
    with pytest.raises(ValueError):
        platform.ledger_key(b"short")


def test_the_ledger_counter_is_its_own_never_goes_down_and_persists(tmp_path):
    platform = EmulatedPlatform.init(tmp_path)
    d = bytes(range(32))
    assert platform.ledger_counter_advance(d, 4) == 4 and platform.ledger_counter_advance(d, 2) == 4
    assert platform.counter_read(d) == 0  # the counter of a measurement with the same bytes is another one
    platform.counter_advance(d, 9)
    reloaded = EmulatedPlatform.load(tmp_path)
    assert reloaded.ledger_counter_read(d) == 4 and reloaded.counter_read(d) == 9


# -- the sealed ledger file ----------------------------------------------------------------
def test_the_sealed_ledger_round_trips_and_refuses_rollback_and_deletion(dep):
    digest = bytes(range(32))
    store = dep.ledger_store(digest)
    assert store.load() is None  # first start
    store.save({"n": 1})
    shutil.copy(store.path, dep.dir / "old")
    store.save({"n": 2})
    assert dep.ledger_store(digest).load() == {"n": 2}
    shutil.copy(dep.dir / "old", store.path)
    with pytest.raises(RollbackDetected, match="older copy"):
        dep.ledger_store(digest).load()
    store.path.unlink()
    with pytest.raises(RollbackDetected, match="missing"):
        dep.ledger_store(digest).load()


def test_a_crash_between_the_ledger_write_and_its_counter_step_is_recovered(dep):
    digest = bytes(range(32))
    store = dep.ledger_store(digest)
    store.save({"n": 1})

    class Crashing(LedgerCounter):
        def advance(self, value):
            raise KeyboardInterrupt  # the process dies before the counter step

    crashing = SealedLedgerStore(store.path, dep.platform.ledger_key(digest), digest, Crashing(dep.platform, digest))
    crashing.version = 1
    with pytest.raises(KeyboardInterrupt):
        crashing.save({"n": 2})
    assert dep.platform.ledger_counter_read(digest) == 1
    assert dep.ledger_store(digest).load() == {"n": 2}
    assert dep.platform.ledger_counter_read(digest) == 2


def test_other_code_or_a_tampered_file_cannot_open_the_ledger(dep):
    digest, other = bytes(range(32)), bytes(32)
    store = dep.ledger_store(digest)
    store.save({"n": 1})
    # Other code gets its own key; even with this code's key, the code digest is in the AAD.
    foreign = SealedLedgerStore(store.path, dep.platform.ledger_key(other), other, LedgerCounter(dep.platform, other))
    with pytest.raises(SealingError):
        foreign.load()
    wrong_aad = SealedLedgerStore(store.path, dep.platform.ledger_key(digest), other,
                                  LedgerCounter(dep.platform, digest))
    with pytest.raises(SealingError):
        wrong_aad.load()
    data = bytearray(store.path.read_bytes())
    data[-1] ^= 1
    store.path.write_bytes(bytes(data))
    with pytest.raises(SealingError):
        dep.ledger_store(digest).load()


# -- inheritance ---------------------------------------------------------------------------
def test_a_new_measurement_continues_the_spend_the_chain_and_the_window_numbers(dep):
    a, wa, ma = dep.start(make_policy({"s": S}))
    first = releases(dep.send(a, wa, 4))
    assert [r.budget["releases"] for r in first] == [1, 2]
    # The policy changes (here: the replay horizon; enrolling a producer works alike).
    b, wb, mb = dep.start(make_policy({"s": S}, max_record_age_seconds=700))
    assert mb != ma
    assert b.ledgers["s"].releases == 2 and b.ledgers["s"].head == a.ledgers["s"].head
    assert b.ledgers["s"].summary()["spent_epsilon"] == 2.0
    later = releases(dep.send(b, wb, 2))
    assert [(r.budget["releases"], r.window) for r in later] == [(3, 3)]  # no window number used twice
    chain = ChainVerifier("s")
    for r in first + later:
        chain.add(r)  # release 3 links to release 2's head
    assert chain.releases == 3


def test_changed_privacy_parameters_refuse_to_start(dep):
    a, wa, _ = dep.start(make_policy({"s": S}))
    dep.send(a, wa, 2)
    with pytest.raises(InheritedSpendMismatch, match=r"stream 's' has spent 1 release\(s\), epsilon 1 of 10 under "
                                                     r"other privacy parameters \(budget_epsilon 10.0 -> 20.0\)") as err:
        dep.start(make_policy({"s": dict(S, budget_epsilon=20.0)}))
    assert err.value.exit_code == ExitCode.USAGE and "new stream name" in err.value.hint
    for changed in (dict(S, epsilon=0.5), dict(S, upper=50.0), dict(S, mechanism="gaussian", delta=1e-6, budget_delta=1e-5),
                    dict(S, max_records_per_producer=2),
                    dict(S, window_records=None, window_seconds=60.0)):  # replace-one to add/remove
        with pytest.raises(InheritedSpendMismatch):
            dep.start(make_policy({"s": changed}))
    # What a release spends does not depend on these: the spend carries over.
    b, _, _ = dep.start(make_policy({"s": dict(S, window_records=3, min_batch=2)}))
    assert b.ledgers["s"].releases == 1


def test_new_streams_start_fresh_and_streams_left_out_stay_in_the_ledger(dep):
    a, wa, _ = dep.start(make_policy({"s": S, "t": S}))
    dep.send(a, wa, 2, "s")
    dep.send(a, wa, 4, "t")
    b, wb, _ = dep.start(make_policy({"t": S, "u": S}))  # s left out, u new
    assert b.ledgers["t"].releases == 2 and b.ledgers["u"].releases == 0
    dep.send(b, wb, 2, "t")
    assert set(b.sealed_ledger()["streams"]) == {"s", "t"}  # u has spent nothing yet
    c, _, _ = dep.start(make_policy({"s": S, "t": S}, max_record_age_seconds=900))
    assert c.ledgers["s"].releases == 1 and c.ledgers["s"].head == a.ledgers["s"].head
    assert c.ledgers["t"].releases == 3


def test_an_inherited_spent_budget_stays_spent(dep):
    tight = dict(S, budget_epsilon=2.0)
    a, wa, _ = dep.start(make_policy({"s": tight}))
    out = dep.send(a, wa, 4)
    assert isinstance(out[-1], BudgetExhausted)
    b, _, _ = dep.start(make_policy({"s": tight}, max_record_age_seconds=700))
    assert "s" in b.exhausted and b.ledgers["s"].releases == 2
    assert isinstance(b.pending["s/budget_exhausted"].message, BudgetExhausted)


def test_an_earlier_measurement_that_comes_back_takes_the_ledger_over_its_own_stale_state(dep):
    p1, p2 = make_policy({"s": S}), make_policy({"s": S}, max_record_age_seconds=700)
    a, wa, _ = dep.start(p1)
    dep.send(a, wa, 2)
    b, wb, _ = dep.start(p2)
    dep.send(b, wb, 4)  # releases 2 and 3, under B
    a2, wa2, _ = dep.start(p1)  # the config change is reverted: A's own sealed state says 1
    assert a2.ledgers["s"].releases == 3 and a2.ledgers["s"].head == b.ledgers["s"].head
    assert a2.streams["s"].current.index == 4
    assert releases(dep.send(a2, wa2, 2))[0].budget["releases"] == 4


def test_a_returning_measurement_drops_what_it_queued_but_never_published(dep, small_keys):
    """A charged release 2 into its state, but died before the ledger held it (so release 2
    never went out); B continued from 1 and published its own release 2. Back on A,
    publishing A's release 2 would fork the chain."""
    p1, p2 = make_policy({"s": S}), make_policy({"s": S}, max_record_age_seconds=700)
    a, wa, ma = dep.start(p1)
    dep.send(a, wa, 2)
    ledger_before = dep.ledger_store(a.code_digest).load()
    # A's state takes release 2 (pending, not published); the ledger write is lost.
    sealer = dep.sealer(a)
    for _ in range(2):
        a.on_record(sealer.seal("s", [1.0]).body, now_ms())
    assert "s/2" in a.pending
    store = dep.state_store(ma)
    store.load()
    cp = a.checkpoint(True)
    store.save(cp.state)
    a.checkpointed(cp)
    ledger_file = dep.ledger_store(a.code_digest)
    assert ledger_file.load() == ledger_before  # still at release 1
    b, wb, _ = dep.start(p2)
    (b2,) = releases(dep.send(b, wb, 2))
    assert b2.budget["releases"] == 2
    a2, _, _ = dep.start(p1)
    assert "s/2" not in a2.pending  # never published, and would fork B's release 2
    assert a2.ledgers["s"].releases == 2 and a2.ledgers["s"].head == b.ledgers["s"].head


def test_a_restart_of_the_same_measurement_trusts_its_own_state_over_a_lagging_ledger(dep):
    p1 = make_policy({"s": S})
    a, wa, ma = dep.start(p1)
    dep.send(a, wa, 2)
    # A checkpoint with release 2 whose ledger write is lost (a crash between the two writes).
    sealer = dep.sealer(a)
    for _ in range(2):
        a.on_record(sealer.seal("s", [1.0]).body, now_ms())
    store = dep.state_store(ma)
    store.load()
    cp = a.checkpoint(True)
    store.save(cp.state)
    a2, _, _ = dep.start(p1)
    assert a2.ledgers["s"].releases == 2 and "s/2" in a2.pending
    assert dep.ledger_store(a.code_digest).load()["streams"]["s"]["releases"] == 2  # the start caught it up


def test_the_ledger_is_written_after_the_state_and_only_when_it_changed(dep):
    a, wa, _ = dep.start(make_policy({"s": S}))
    store = dep.ledger_store(a.code_digest)
    assert store.load() == {"format": 1, "streams": {}}  # the start's write: nothing spent yet
    version = store.version
    dep.send(a, wa, 1)  # a record, no release: the ledger does not change
    assert dep.ledger_store(a.code_digest).load() is not None
    assert dep.platform.ledger_counter_read(a.code_digest) == version
    dep.send(a, wa, 1)
    entry = dep.ledger_store(a.code_digest).load()["streams"]["s"]
    assert entry["releases"] == 1 and entry["holder"] == a.measurement.hex()
    assert entry["parameters"] == parameters(a.policy.streams["s"]) and entry["budget_group"] is None
    assert entry["next_window"] == 2


def test_a_ledger_this_code_did_not_write_is_refused(small_keys):
    policy = make_policy({"s": S})
    digest, m = measure.measure(policy.to_bytes())
    with pytest.raises(StateIncompatible):
        Enclave(small_keys, policy, policy.to_bytes(), digest, m, lambda rd: b"", None, 0, ledger={"format": 9})
    with pytest.raises(StateIncompatible):
        Enclave(small_keys, policy, policy.to_bytes(), digest, m, lambda rd: b"", None, 0,
                ledger={"format": 1, "streams": {"s": {"releases": 1}}})
    assert Lineage(m, None).entries == {}


# -- budget groups and time-closed windows --------------------------------------------------
def grouped_policy(budget=6.0, members=("s", "t"), **enclave):
    from sealedsum.common.policy_parse import enclave_policy
    table = {k: v for k, v in S.items() if k != "budget_epsilon"}
    streams = {name: dict(table, budget_group="g") for name in members}
    return enclave_policy({"paillier_bits": 1024, "insecure_test_keys": True, **enclave}, streams, None,
                          {"g": {"budget_epsilon": budget}})


def test_a_grouped_stream_inherits_into_its_group_and_the_group_is_part_of_its_parameters(dep):
    a, wa, _ = dep.start(grouped_policy())
    dep.send(a, wa, 2, "s")
    dep.send(a, wa, 4, "t")
    b, wb, _ = dep.start(grouped_policy(max_record_age_seconds=700))
    assert b.ledgers["s"].releases == 1 and b.ledgers["t"].releases == 2
    assert b.ledgers["s"].group is not None  # the group's account counts the inherited releases
    assert b.ledgers["s"].summary()["spent_epsilon"] == 3.0 and b.ledgers["s"].summary()["remaining_releases"] == 3
    for changed in (grouped_policy(budget=12.0), grouped_policy(members=("s", "t", "u"))):
        with pytest.raises(InheritedSpendMismatch, match="budget_group"):
            dep.start(changed)


def test_time_closed_windows_keep_their_clock_numbers_when_inherited(dep):
    timed = {k: v for k, v in S.items() if k != "window_records"} | {"window_seconds": 3600}
    a, _, _ = dep.start(make_policy({"s": timed}))
    a.ledgers["s"].charge(7)  # as if window 7 had been released
    w = dep.ledger_store(a.code_digest)
    w.version = dep.platform.ledger_counter_read(a.code_digest)
    w.save(a.sealed_ledger())
    b, _, _ = dep.start(make_policy({"s": timed}, max_record_age_seconds=700))
    assert b.ledgers["s"].releases == 1
    assert b.streams["s"].current.index == 0  # not started: the clock numbers it, never the ledger
