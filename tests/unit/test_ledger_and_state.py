"""Privacy budget: composition, exhaustion, the hash chain, and sealed state that survives
restarts and refuses rollback. No broker: the real enclave core, keys and samplers."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from sealedsum.common import privacy
from sealedsum.common.errors import PolicyTooWeak, RejectReason, SealingError
from sealedsum.common.requirements import Requirements
from sealedsum.common.results import BudgetExhausted, BudgetReport, Release, verify_signed
from sealedsum.common import wire
from sealedsum.producers.client import RecordSealer
from sealedsum.sidecar.enclave import ledger as ledger_mod
from sealedsum.sidecar.enclave.service import Enclave
from sealedsum.common.errors import RollbackDetected
from sealedsum.sidecar.enclave_process.store import SealedStateStore
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from tests.conftest import PlatformCounter, make_policy, make_world, now_ms, stream_table, checkpoint


def releases_until_exhausted(world, limit=400):
    out, notices = [], []
    for i in range(limit):
        outcome = world.enclave.on_record(world.sealer.seal("s", [1.0]).body, now_ms())
        if outcome.rejection is not None:
            return out, notices, outcome.rejection, i
        for p in outcome.publish:
            (notices if isinstance(p.message, BudgetExhausted) else out).append(p)
    raise AssertionError("the budget never ran out")


def test_laplace_budget_is_exact_decimal_and_stops_with_one_notice(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        epsilon=0.1, budget_epsilon=1.0, window_records=1, min_batch=1)}))
    out, notices, rejection, sent = releases_until_exhausted(world)
    assert len(out) == 10  # 10 x 0.1 fits 1.0 exactly; an 11th would not
    assert len(notices) == 1 and sent == 10
    notice = notices[0].message
    assert notice.budget["releases"] == 10 and notice.budget["remaining_releases"] == 0
    assert notice.budget["spent_epsilon"] == pytest.approx(1.0)
    assert rejection.reason is RejectReason.BUDGET_EXHAUSTED
    # Nothing is decrypted or noised for the refused record, and the notice is not repeated.
    before = small_keys.decryptions
    again = world.enclave.on_record(world.sealer.seal("s", [1.0]).body, now_ms())
    assert again.rejection.reason is RejectReason.BUDGET_EXHAUSTED and again.publish == ()
    assert small_keys.decryptions == before
    # The notice verifies as a signed message of the attested enclave.
    assert verify_signed(notices[0].body, world.attested) == notice


def test_the_notice_is_dated_by_the_release_it_follows_not_by_when_its_draw_finished(small_keys):
    """at_ms = the exhausting release's closed_at_ms (sections 13.4 and 15.3), even when the
    runtime draws the release on a thread of its own and completes it later."""
    world = make_world(small_keys, make_policy({"s": stream_table(
        epsilon=1.0, budget_epsilon=1.0, window_records=1, min_batch=1)}))
    e = Enclave(small_keys, world.enclave.policy, world.enclave.policy_bytes, world.enclave.code_digest,
                world.measurement, lambda rd: b"", draw_inline=False)
    t = now_ms()
    (closing,) = e.on_record(world.sealer.seal("s", [1.0]).body, t).draw
    release, notice = e.complete(closing, e.draw(closing), t + 25).publish
    assert isinstance(notice.message, BudgetExhausted) and release.message.closed_at_ms == t
    assert notice.message.at_ms == release.message.closed_at_ms == t


def test_gaussian_budget_composes_in_zcdp(small_keys):
    eps, delta, budget_eps, budget_delta = 0.5, 1e-6, 3.0, 1e-6
    world = make_world(small_keys, make_policy({"s": stream_table(
        mechanism="gaussian", epsilon=eps, delta=delta, budget_epsilon=budget_eps, budget_delta=budget_delta,
        window_records=1, min_batch=1)}))
    out, notices, rejection, _ = releases_until_exhausted(world)
    # By hand: rho per release, and the largest n with n*rho + 2 sqrt(n*rho ln(1/delta)) <= 3.
    rho = (math.sqrt(math.log(1e6) + eps) - math.sqrt(math.log(1e6))) ** 2
    n = max(k for k in range(1, 1000) if k * rho + 2 * math.sqrt(k * rho * math.log(1e6)) <= budget_eps)
    assert len(out) == n == 33
    last = out[-1].message.budget
    assert last["spent_rho"] == pytest.approx(n * rho, rel=1e-12)
    assert last["spent_epsilon"] <= budget_eps
    assert privacy.epsilon_from_rho_delta((n + 1) * rho, budget_delta) > budget_eps
    # Far better than adding up epsilons: n releases at eps 0.5 would "cost" 17 naively.
    assert n * eps > 5 * budget_eps
    assert rejection.reason is RejectReason.BUDGET_EXHAUSTED and len(notices) == 1


def test_a_budget_too_small_for_one_release_is_a_config_error():
    from sealedsum.common.errors import ConfigError

    with pytest.raises(ConfigError, match="smaller than the cost of one release"):
        make_policy({"s": stream_table(epsilon=1.0, budget_epsilon=0.5)})


def test_ledger_chain_can_be_recomputed_from_the_releases(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(window_records=1, min_batch=1)}))
    heads = [ledger_mod.genesis("s").hex()]
    policy = world.enclave.policy.streams["s"]
    for seq in range(1, 6):
        (pub,) = world.enclave.on_record(world.sealer.seal("s", [3.0]).body, now_ms()).publish
        rel = pub.message
        assert rel.budget["releases"] == seq
        charge = json.dumps({"stream": rel.stream, "window": rel.window, "seq": seq, "mechanism": rel.mechanism,
                             "epsilon": rel.epsilon, "delta": rel.delta, "rho": rel.rho},
                            sort_keys=True, separators=(",", ":")).encode()
        assert charge == ledger_mod.charge_bytes(policy, rel.window, seq)
        heads.append(ledger_mod.next_head(bytes.fromhex(heads[-1]), charge).hex())
        assert rel.budget["ledger_head"] == heads[-1]


def test_budget_report_answers_the_nonce_and_verifies(world):
    for _ in range(5):
        world.enclave.on_record(world.sealer.seal("s", [1.0]).body, now_ms())
    nonce = bytes(range(32))
    body = world.enclave.answer(wire.BudgetRequest(nonce, "s").to_bytes(), now_ms())
    report = verify_signed(body, world.attested, ("budget",))
    assert isinstance(report, BudgetReport) and report.nonce == nonce.hex() and not report.exhausted
    assert report.budget["releases"] == 1 and report.budget["spent_epsilon"] == 1.0
    with pytest.raises(Exception):
        verify_signed(body, world.attested)  # a report is not a result


@pytest.fixture
def two_streams(small_keys):
    return make_world(small_keys, make_policy({"s": stream_table(), "t": stream_table()}))


def enclave_answering(world, *, nonce=None, stream=None):
    """``amqp.call_enclave`` for an enclave that answers a request other than the one sent:
    a report replayed from an earlier nonce, or one about another stream."""
    def call(_connection, _settings, request, kind):
        assert kind == "budget-request"
        req = wire.BudgetRequest.from_bytes(request)
        asked = wire.BudgetRequest(nonce or req.nonce, stream or req.stream)
        return world.enclave.answer(asked.to_bytes(), now_ms())
    return call


def test_the_budget_rpc_checks_its_nonce_and_stream(two_streams, monkeypatch):
    from sealedsum.common import amqp

    monkeypatch.setattr(amqp, "call_enclave", enclave_answering(two_streams))
    report = amqp.budget(None, None, two_streams.attested, "t")
    assert isinstance(report, BudgetReport) and report.stream == "t"


@pytest.mark.parametrize("replayed", [dict(nonce=bytes(range(32))), dict(stream="t")])
def test_a_budget_report_answering_another_request_is_refused(two_streams, monkeypatch, replayed):
    from sealedsum.common import amqp
    from sealedsum.common.errors import InvalidResultSignature

    monkeypatch.setattr(amqp, "call_enclave", enclave_answering(two_streams, **replayed))
    with pytest.raises(InvalidResultSignature, match=re.escape("answers another request (replayed?)")):
        amqp.budget(None, None, two_streams.attested, "s")


# -- sealed state ----------------------------------------------------------------------
Counter = PlatformCounter


def store_for(tmp_path, platform, measurement):
    return SealedStateStore(tmp_path, platform.sealing_key(measurement), measurement,
                            Counter(platform, measurement))


def test_a_restarted_enclave_continues_the_spend_and_republishes_pending_bytes(small_keys, tmp_path):
    policy = make_policy({"s": stream_table(window_records=2, min_batch=1, budget_epsilon=5.0)})
    world = make_world(small_keys, policy)
    platform = EmulatedPlatform.init(tmp_path / "platform")
    store = store_for(tmp_path, platform, world.measurement)
    for _ in range(4):
        world.enclave.on_record(world.sealer.seal("s", [1.0]).body, now_ms())
    assert set(world.enclave.pending) == {"s/1", "s/2"}
    world.enclave.confirm_published(world.enclave.pending["s/1"])
    store.save(checkpoint(world.enclave, base=True))

    # A new process: same keys and policy, state from disk.
    reloaded = store_for(tmp_path, platform, world.measurement).load()
    e2 = Enclave(small_keys, policy, world.enclave.policy_bytes, world.enclave.code_digest, world.measurement,
                 lambda rd: platform.quote(world.measurement, rd), reloaded, now_ms())
    assert e2.ledgers["s"].releases == 2 and e2.ledgers["s"].head == world.enclave.ledgers["s"].head
    assert e2.streams["s"].current.index == 3  # window numbers continue
    assert set(e2.pending) == {"s/2"} and e2.pending["s/2"].body == world.enclave.pending["s/2"].body
    sealer = RecordSealer(world.attested)
    outs = [e2.on_record(sealer.seal("s", [1.0]).body, now_ms()) for _ in range(8)]
    released = [p.message for o in outs for p in o.publish if isinstance(p.message, Release)]
    assert [r.window for r in released] == [3, 4, 5]  # 5 in total, then the budget is spent
    assert outs[-1].rejection.reason is RejectReason.BUDGET_EXHAUSTED


def test_rolled_back_state_is_refused(small_keys, tmp_path):
    world = make_world(small_keys)
    platform = EmulatedPlatform.init(tmp_path / "platform")
    store = store_for(tmp_path, platform, world.measurement)
    store.save({"n": 1})
    shutil.copy(store.base_path, tmp_path / "old")
    store.save({"n": 2})
    assert store_for(tmp_path, platform, world.measurement).load() == [{"n": 2}]
    shutil.copy(tmp_path / "old", store.base_path)
    with pytest.raises(RollbackDetected, match="older copy"):
        store_for(tmp_path, platform, world.measurement).load()
    store.base_path.unlink()
    with pytest.raises(RollbackDetected, match="missing"):
        store_for(tmp_path, platform, world.measurement).load()


def test_a_crash_between_write_and_counter_is_recovered(small_keys, tmp_path):
    world = make_world(small_keys)
    platform = EmulatedPlatform.init(tmp_path / "platform")
    store = store_for(tmp_path, platform, world.measurement)
    store.save({"n": 1})

    class Crashing(Counter):
        def advance(self, value):
            raise KeyboardInterrupt  # the process dies before the counter step

    crashing = SealedStateStore(tmp_path, platform.sealing_key(world.measurement), world.measurement,
                                Crashing(platform, world.measurement))
    crashing.version = 1
    with pytest.raises(KeyboardInterrupt):
        crashing.save({"n": 2})
    assert platform.counter_read(world.measurement) == 1
    assert store_for(tmp_path, platform, world.measurement).load() == [{"n": 2}]
    assert platform.counter_read(world.measurement) == 2


def test_tampered_or_foreign_state_does_not_open(small_keys, tmp_path):
    world = make_world(small_keys)
    platform = EmulatedPlatform.init(tmp_path / "platform")
    store = store_for(tmp_path, platform, world.measurement)
    store.save({"n": 1})
    data = bytearray(store.base_path.read_bytes())
    data[-1] ^= 1
    store.base_path.write_bytes(bytes(data))
    with pytest.raises(SealingError):
        store_for(tmp_path, platform, world.measurement).load()
    other = EmulatedPlatform.init(tmp_path / "other")
    store.save({"n": 2})
    foreign = SealedStateStore(tmp_path, other.sealing_key(world.measurement), world.measurement,
                               Counter(platform, world.measurement))
    with pytest.raises(SealingError):
        foreign.load()


def test_platform_counter_never_goes_down_and_persists(tmp_path):
    platform = EmulatedPlatform.init(tmp_path)
    m = bytes(32)
    assert platform.counter_advance(m, 5) == 5 and platform.counter_advance(m, 3) == 5
    assert EmulatedPlatform.load(tmp_path).counter_read(m) == 5


# -- what a producer demands ---------------------------------------------------------------
@pytest.mark.parametrize("require, message", [
    (Requirements(max_epsilon=0.5), "epsilon per release 1 > 0.5"),
    (Requirements(max_budget_epsilon=10.0), "budget_epsilon 1e+06 > 10"),
    (Requirements(min_min_batch=50), "min_batch 3 < 50"),
])
def test_a_producer_refuses_a_weaker_attested_policy(world, require, message):
    sealer = RecordSealer(world.attested, lambda stream: require)
    with pytest.raises(PolicyTooWeak, match=re.escape(message)) as info:
        sealer.seal("s", [1.0])
    assert "nothing was sent" in info.value.hint


@pytest.fixture(scope="module")
def gaussian_world(small_keys):
    """A Gaussian stream: delta 1e-6 per release, its budget stated at budget_delta 1e-5."""
    return make_world(small_keys, make_policy({"s": stream_table(
        mechanism="gaussian", delta=1e-6, budget_delta=1e-5, budget_epsilon=10.0)}))


@pytest.mark.parametrize("require, message", [
    (Requirements(max_delta=1e-7), "delta per release 1e-06 > 1e-07"),
    (Requirements(max_budget_delta=2e-6), "budget_delta 1e-05 > 2e-06"),
    (Requirements(max_delta=0.0, max_budget_delta=0.0), "delta per release 1e-06 > 0; budget_delta 1e-05 > 0"),
])
def test_a_producer_refuses_a_weaker_attested_delta(gaussian_world, require, message):
    sealer = RecordSealer(gaussian_world.attested, lambda stream: require)
    with pytest.raises(PolicyTooWeak, match=re.escape(message)) as info:
        sealer.seal("s", [1.0])
    assert "nothing was sent" in info.value.hint


@pytest.mark.parametrize("require", [
    Requirements(max_delta=1e-6, max_budget_delta=1e-5),  # equal is enough
    Requirements(max_delta=1e-5, max_budget_delta=1e-4),
])
def test_delta_requirements_that_hold_let_records_through(gaussian_world, require):
    sealer = RecordSealer(gaussian_world.attested, lambda stream: require)
    assert gaussian_world.enclave.on_record(sealer.seal("s", [1.0]).body, now_ms()).rejection is None


def test_a_laplace_stream_meets_any_delta_requirement(world):
    sealer = RecordSealer(world.attested, lambda stream: Requirements(max_delta=0.0, max_budget_delta=0.0))
    assert world.enclave.on_record(sealer.seal("s", [1.0]).body, now_ms()).rejection is None


def test_requirements_that_hold_let_records_through(world):
    sealer = RecordSealer(world.attested, lambda stream: Requirements(max_epsilon=1.0, min_min_batch=3))
    assert world.enclave.on_record(sealer.seal("s", [1.0]).body, now_ms()).rejection is None


def test_require_tables_in_the_config():
    from sealedsum.common import config

    cfg = config.from_mapping({"require": {"max_epsilon": 2.0, "min_min_batch": 5,
                                           "streams": {"s": {"max_epsilon": 0.5}}}}, env={})
    assert cfg.requirements("s") == Requirements(max_epsilon=0.5, min_min_batch=5)
    assert cfg.requirements("t") == Requirements(max_epsilon=2.0, min_min_batch=5)
