"""Budget groups (docs/protocol.md section 15.6): the composition arithmetic against hand-computed
cases, the policy rules, and the real enclave core spending one budget from two streams."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from sealedsum.common import config, privacy
from sealedsum.common.errors import ConfigError, InvalidMessage, RejectReason
from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
from sealedsum.common.privacy import Mechanism, ReleaseCost
from sealedsum.common.results import BudgetExhausted, BudgetReport, Release, verify_signed
from sealedsum.common import wire
from sealedsum.sidecar.enclave.service import Enclave
from tests.conftest import TEST_BITS, checkpoint, make_world, now_ms, stream_table

LN = math.log(1e6)  # ln(1/δ) at δ = 1e-6
LAP = Mechanism.LAPLACE
GAU = Mechanism.GAUSSIAN


def rho1(eps: float, lg: float = LN) -> float:
    return (math.sqrt(lg + eps) - math.sqrt(lg)) ** 2


# -- arithmetic ---------------------------------------------------------------------------

def test_laplace_and_laplace_add_up_in_exact_decimal():
    members = {"a": (ReleaseCost(LAP, 0.1), 3), "b": (ReleaseCost(LAP, 0.2), 1)}
    assert privacy.group_spent(members, 0.0) == (0.5, None)  # not 0.5000000000000001
    assert privacy.group_allows(members, 0.5, 0.0)
    assert not privacy.group_allows({**members, "a": (ReleaseCost(LAP, 0.1), 4)}, 0.5, 0.0)
    # Room: (0.6 - 0.5) / 0.1 = 1 more of a, (0.6 - 0.5) / 0.2 = 0 more of b.
    assert privacy.group_remaining(members, "a", 0.6, 0.0) == 1
    assert privacy.group_remaining(members, "b", 0.6, 0.0) == 0
    assert privacy.group_remaining(members, "b", 1.0, 0.0) == 2


def test_gaussian_and_gaussian_compose_in_zcdp():
    members = {"a": (ReleaseCost(GAU, 1.0, 1e-6), 2), "b": (ReleaseCost(GAU, 0.5, 1e-6), 1)}
    rho = 2 * rho1(1.0) + rho1(0.5)
    eps, got_rho = privacy.group_spent(members, 1e-5)
    assert got_rho == pytest.approx(rho, rel=1e-15)
    assert eps == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)), rel=1e-15)
    assert eps == pytest.approx(1.3860784179390795)  # budget_group.json's vitals after three charges
    # Far below the sum of the per-release epsilons (2.5): zCDP composes better.
    assert privacy.group_allows(members, 1.39, 1e-5) and not privacy.group_allows(members, 1.38, 1e-5)
    # Room for a: the largest k with (rho + k*rho1(1)) within 4 at 1e-5, by brute force.
    k = max(k for k in range(200) if privacy.epsilon_from_rho_delta(rho + k * rho1(1.0), 1e-5) <= 4)
    assert privacy.group_remaining(members, "a", 4.0, 1e-5) == k == 14


def test_mixed_groups_convert_laplace_to_zcdp():
    # A pure eps-DP release is (eps^2/2)-zCDP: eps = 1 -> rho = 0.5.
    assert ReleaseCost(LAP, 1.0).zcdp_rho == 0.5 and ReleaseCost(LAP, 0.2).zcdp_rho == pytest.approx(0.02)
    members = {"amounts": (ReleaseCost(LAP, 1.0), 1), "baskets": (ReleaseCost(GAU, 1.0, 1e-6), 2)}
    rho = 0.5 + 2 * rho1(1.0)
    eps, got_rho = privacy.group_spent(members, 1e-6)
    assert got_rho == pytest.approx(rho, rel=1e-15)
    assert eps == pytest.approx(rho + 2 * math.sqrt(rho * LN), rel=1e-15) == pytest.approx(5.972010167169671)
    # Within 8 at 1e-6 the zCDP budget is rho_max = (sqrt(ln 1e6 + 8) - sqrt(ln 1e6))^2 = 0.9098...:
    # no second Laplace release (0.5 more), 21 more Gaussian ones (0.01747 each).
    rho_max = rho1(8.0)
    assert privacy.group_remaining(members, "amounts", 8.0, 1e-6) == 0
    assert privacy.group_remaining(members, "baskets", 8.0, 1e-6) == int((rho_max - rho) / rho1(1.0)) == 21
    # The conversion applies from the start, even before any Gaussian release.
    only_laplace_so_far = {"amounts": (ReleaseCost(LAP, 1.0), 1), "baskets": (ReleaseCost(GAU, 1.0, 1e-6), 0)}
    assert privacy.group_spent(only_laplace_so_far, 1e-6) == (0.5 + 2 * math.sqrt(0.5 * LN), 0.5)
    assert privacy.group_spent({"a": (ReleaseCost(LAP, 1.0), 0), "b": (ReleaseCost(GAU, 1.0, 1e-6), 0)},
                               1e-6) == (0.0, 0.0)


@pytest.mark.parametrize("cost,budget,budget_delta", [
    (ReleaseCost(LAP, 0.1), 1.0, 0.0), (ReleaseCost(LAP, 0.3), 1.0, 0.0),
    (ReleaseCost(GAU, 0.5, 1e-6), 3.0, 1e-6), (ReleaseCost(GAU, 2.0, 1e-6), 8.0, 1e-5),
])
def test_a_group_of_one_charges_what_the_stream_alone_would(cost, budget, budget_delta):
    total = privacy.max_releases(cost.mechanism, cost.epsilon, cost.delta, budget, budget_delta)
    for n in range(total + 2):
        members = {"s": (cost, n)}
        assert privacy.group_spent(members, budget_delta) == privacy.spent(
            cost.mechanism, cost.epsilon, cost.delta, n, budget_delta)
        assert privacy.group_allows(members, budget, budget_delta) == privacy.budget_allows(
            cost.mechanism, cost.epsilon, cost.delta, n, budget, budget_delta)
        assert privacy.group_remaining(members, "s", budget, budget_delta) == max(total - n, 0)


def test_laplace_room_is_exact():
    members = {"a": (ReleaseCost(LAP, 0.1), 7), "b": (ReleaseCost(LAP, 0.1), 0)}
    assert privacy.group_remaining(members, "b", 1.0, 0.0) == 3
    assert Fraction("0.1") * 10 == Fraction("1.0")


# -- policy -------------------------------------------------------------------------------

ENCLAVE = {"paillier_bits": TEST_BITS, "insecure_test_keys": True}


def grouped(**overrides) -> dict:
    table = stream_table(**overrides)
    del table["budget_epsilon"]
    table.pop("budget_delta", None)
    table.setdefault("budget_group", "g")
    return table


def two_stream_policy(groups=None, a=None, b=None):
    return enclave_policy(ENCLAVE, {"a": a or grouped(), "b": b or grouped()},
                          None, groups if groups is not None else {"g": {"budget_epsilon": 3}})


def test_grouped_policy_bytes_state_the_budget_once():
    policy = two_stream_policy()
    doc = json.loads(policy.to_bytes())
    assert doc["budget_groups"] == {"g": {"budget_epsilon": 3.0}}
    for name in ("a", "b"):
        assert doc["streams"][name]["budget_group"] == "g"
        assert "budget_epsilon" not in doc["streams"][name] and "budget_delta" not in doc["streams"][name]
        # The parsed stream still knows its effective budget (requirements, tools read it).
        assert policy.streams[name].budget_epsilon == 3.0 and policy.streams[name].budget_group == "g"
    assert policy.budget_groups["g"].streams == ("a", "b")
    assert policy_from_bytes(policy.to_bytes()).to_bytes() == policy.to_bytes()
    gaussian = two_stream_policy({"g": {"budget_epsilon": 8, "budget_delta": 1e-6}},
                                 b=grouped(mechanism="gaussian", delta=1e-6))
    doc = json.loads(gaussian.to_bytes())
    assert doc["budget_groups"]["g"] == {"budget_epsilon": 8.0, "budget_delta": 1e-06}
    assert doc["streams"]["b"]["delta"] == 1e-06 and "budget_delta" not in doc["streams"]["b"]
    assert gaussian.streams["a"].budget_delta == 1e-6  # the group's, for the Laplace stream too


def test_a_policy_without_groups_keeps_its_bytes():
    policy = enclave_policy(ENCLAVE, {"s": stream_table()})
    raw = policy.to_bytes()
    assert b"budget_group" not in raw
    assert set(json.loads(raw)) == {"version", "enclave", "streams"}


@pytest.mark.parametrize("groups,a,b,match", [
    (None, {**grouped(), "budget_epsilon": 3}, None,
     r"streams\.a\.budget_epsilon: the stream spends budget group 'g'"),
    ({"g": {"budget_epsilon": 8, "budget_delta": 1e-6}}, None,
     {**grouped(mechanism="gaussian", delta=1e-6), "budget_delta": 1e-6},
     r"streams\.b\.budget_delta: the stream spends budget group 'g'"),
    (None, grouped(budget_group="nope"), None, r"no budget group 'nope' is defined"),
    (None, grouped(budget_group=7), None, r"no budget group 7"),
    ({"g": {"budget_epsilon": 3}, "h": {"budget_epsilon": 3}}, None, None, r"budget_groups\.h: no stream"),
    ({"g": {"budget_epsilon": 8}}, None, grouped(mechanism="gaussian", delta=1e-6), r"needs budget_delta"),
    ({"g": {"budget_epsilon": 8, "budget_delta": 1.5}}, None, grouped(mechanism="gaussian", delta=1e-6),
     r"budget_delta must be in \(0, 1\)"),
    ({"g": {"budget_epsilon": 3, "budget_delta": 1e-6}}, None, None, r"applies only to a group with a gaussian"),
    ({"g": {"budget_epsilon": 0.5}}, None, None, r"smaller than the cost of one release"),
    ({"g": {}}, None, None, r"missing required key 'budget_epsilon'"),
    ({"g": {"budget_epsilon": 3, "epsilon": 1}}, None, None, r"unknown key"),
    ({"bad name": {"budget_epsilon": 3}}, None, None, r"group names"),
    ({"g": {"budget_epsilon": 3}}, None, grouped(mechanism="gaussian"), r"needs delta"),
])
def test_group_rules_are_config_errors(groups, a, b, match):
    with pytest.raises(ConfigError, match=match):
        two_stream_policy(groups, a, b)


def test_a_mixed_group_must_fit_one_release_of_each_stream_alone():
    # eps = 1 Laplace is rho = 0.5: at delta 1e-6 that alone is eps 5.76 > 5.
    with pytest.raises(ConfigError, match=r"streams\.a: budget group 'g'"):
        two_stream_policy({"g": {"budget_epsilon": 5, "budget_delta": 1e-6}},
                          b=grouped(mechanism="gaussian", delta=1e-6))


def test_budget_groups_in_a_configuration_file():
    raw = {"enclave": ENCLAVE, "streams": {"a": grouped(), "b": grouped()},
           "budget_groups": {"g": {"budget_epsilon": 3}}}
    cfg = config.from_mapping(raw, env={})
    assert cfg.policy.budget_groups["g"].budget_epsilon == 3.0
    with pytest.raises(ConfigError, match="no \\[streams.NAME\\]"):
        config.from_mapping({"budget_groups": {"g": {"budget_epsilon": 3}}}, env={})


def test_attested_policy_bytes_with_an_empty_group_table_are_refused():
    doc = json.loads(enclave_policy(ENCLAVE, {"s": stream_table()}).to_bytes())
    doc["budget_groups"] = {}
    with pytest.raises(InvalidMessage):
        policy_from_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


# -- the enclave core ---------------------------------------------------------------------

def world_of(small_keys, groups, a, b):
    small_keys.decryptions = 0
    return make_world(small_keys, two_stream_policy(groups, a, b))


def send(world, stream, enclave=None):
    return (enclave or world.enclave).on_record(world.sealer.seal(stream, [1.0]).body, now_ms())


def test_two_streams_spend_one_budget(small_keys):
    one = dict(window_records=1, min_batch=1)
    world = world_of(small_keys, {"g": {"budget_epsilon": 3}}, grouped(**one), grouped(**one))
    first, second, third = send(world, "a"), send(world, "b"), send(world, "a")
    releases = [p.message for o in (first, second, third) for p in o.publish if isinstance(p.message, Release)]
    assert [(r.stream, r.budget["releases"], r.budget["spent_epsilon"]) for r in releases] == [
        ("a", 1, 1.0), ("b", 1, 2.0), ("a", 2, 3.0)]  # one budget: 1 + 1 + 1, not two budgets of 3
    assert releases[1].budget["group_releases"] == {"a": 1, "b": 1}
    assert releases[1].budget["remaining_releases"] == 1 and releases[1].budget["budget_group"] == "g"
    # The third release spends the group: a and b both get their notice, a's after its release.
    kinds = [(type(p.message).__name__, p.stream) for p in third.publish]
    assert sorted(kinds) == [("BudgetExhausted", "a"), ("BudgetExhausted", "b"), ("Release", "a")]
    assert kinds.index(("Release", "a")) < kinds.index(("BudgetExhausted", "a"))
    notice_b = next(p for p in third.publish if p.stream == "b").message
    assert notice_b.budget["releases"] == 1 and notice_b.budget["spent_epsilon"] == 3.0
    assert notice_b.budget["remaining_releases"] == 0
    assert verify_signed(next(p for p in third.publish if p.stream == "b").body, world.attested) == notice_b
    assert world.enclave.exhausted == {"a", "b"}
    assert send(world, "b").rejection.reason is RejectReason.BUDGET_EXHAUSTED
    # Each stream keeps its own chain: sequence numbers 1, 2 for a and 1 for b.
    assert world.enclave.ledgers["a"].releases == 2 and world.enclave.ledgers["b"].releases == 1
    # The signed budget report shows the group's total.
    report = BudgetReport.from_payload(wire.SignedMessage.from_bytes(world.enclave.budget(
        wire.BudgetRequest(bytes(32), "b").to_bytes(), now_ms())).payload)
    assert report.exhausted and report.budget["spent_epsilon"] == 3.0
    assert report.budget["group_releases"] == {"a": 2, "b": 1}


def test_a_mixed_group_exhausts_the_dearer_stream_first(small_keys):
    one = dict(window_records=1, min_batch=1)
    world = world_of(small_keys, {"g": {"budget_epsilon": 8, "budget_delta": 1e-6}},
                     grouped(**one), grouped(mechanism="gaussian", delta=1e-6, **one))
    out = send(world, "a")
    assert sorted(type(p.message).__name__ for p in out.publish) == ["BudgetExhausted", "Release"]
    assert world.enclave.exhausted == {"a"}  # rho 0.5 of 0.9098: no room for another 0.5
    assert send(world, "a").rejection.reason is RejectReason.BUDGET_EXHAUSTED
    b = send(world, "b")
    (release,) = [p.message for p in b.publish]
    assert release.budget["spent_rho"] == pytest.approx(0.5 + rho1(1.0))
    assert release.budget["remaining_releases"] == 22 and release.budget["group_releases"] == {"a": 1, "b": 1}


def test_a_peer_drawing_a_window_gets_its_notice_after_that_release(small_keys):
    one = dict(window_records=1, min_batch=1)
    policy = two_stream_policy({"g": {"budget_epsilon": 2}}, grouped(**one), grouped(**one))
    world = make_world(small_keys, policy)
    e = Enclave(small_keys, policy, world.enclave.policy_bytes, world.enclave.code_digest, world.measurement,
                lambda rd: b"", draw_inline=False)
    b_closing = send(world, "b", e).draw[0]  # b is charged (1 of 2), its noise not drawn yet
    a_out = send(world, "a", e)  # a's charge spends the group: b too is out of room
    assert a_out.publish == () and e.exhausted == {"a", "b"}
    assert send(world, "b", e).rejection.reason is RejectReason.BUDGET_EXHAUSTED
    # b's notice waits for b's release, even though the runtime hands back its old copy.
    done_b = e.complete(b_closing, e.draw(b_closing), now_ms() + 25)
    assert [type(p.message) for p in done_b.publish] == [Release, BudgetExhausted]
    done_a = e.complete(a_out.draw[0], e.draw(a_out.draw[0]), now_ms() + 25)
    assert [type(p.message) for p in done_a.publish] == [Release, BudgetExhausted]
    # Each notice is dated by the release it follows (section 13.4), not by when the draw ended.
    for done in (done_b, done_a):
        release, notice = (p.message for p in done.publish)
        assert notice.at_ms == release.closed_at_ms


def test_a_peer_exhausted_by_another_streams_charge_is_dated_by_that_window(small_keys):
    one = dict(window_records=1, min_batch=1)
    world = world_of(small_keys, {"g": {"budget_epsilon": 2}}, grouped(**one), grouped(**one))
    send(world, "b")
    t = now_ms()
    out = world.enclave.on_record(world.sealer.seal("a", [1.0]).body, t)
    notices = {p.stream: p.message for p in out.publish if isinstance(p.message, BudgetExhausted)}
    (release,) = [p.message for p in out.publish if isinstance(p.message, Release)]
    assert set(notices) == {"a", "b"} and release.closed_at_ms == t
    assert notices["a"].at_ms == notices["b"].at_ms == t  # the closing time of the window just charged


def test_a_restarted_enclave_recomputes_the_group_spend(small_keys):
    one = dict(window_records=1, min_batch=1)
    world = world_of(small_keys, {"g": {"budget_epsilon": 3}}, grouped(**one), grouped(**one))
    send(world, "a"), send(world, "b")
    state = [checkpoint(world.enclave, base=True)]
    e2 = Enclave(small_keys, world.enclave.policy, world.enclave.policy_bytes, world.enclave.code_digest,
                 world.measurement, lambda rd: b"", state, now_ms())
    assert e2.ledgers["b"].summary() == world.enclave.ledgers["b"].summary()
    assert e2.ledgers["a"].summary()["spent_epsilon"] == 2.0
    out = send(world, "b", e2)
    assert {p.stream for p in out.publish if isinstance(p.message, BudgetExhausted)} == {"a", "b"}
