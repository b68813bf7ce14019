"""The measured policy and the operational config: every mistake is a ``ConfigError``
naming the key, and the policy's canonical bytes do not depend on how it was written."""

from __future__ import annotations

import json
import os

import pytest

from sealedsum.common import config as config_mod
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.errors import ConfigError, InvalidMessage
from sealedsum.common.policy import HARD_MAX_WINDOW_RECORDS, StreamPolicy
from sealedsum.common.policy_parse import enclave_policy, policy_from_bytes
from tests.conftest import make_policy, stream_table

PLATFORM_KEY = encode_platform_key(b"\x01" * 32)
MEASUREMENT = "ab" * 32
SECURE = {"paillier_bits": 2048}


def policy_error(enclave: dict, streams: dict, match: str) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as exc:
        enclave_policy(enclave, streams)
    return exc.value


# -- streams -----------------------------------------------------------------------------
def test_defaults_and_a_valid_stream():
    p = enclave_policy({}, {"s": stream_table()})
    assert p.paillier_bits == 3072 and not p.insecure_test_keys
    s = p.streams["s"]
    assert (s.dimension, s.fraction_bits, s.count_share, s.delta, s.window_seconds) == (1, 16, 0.5, 0.0, None)
    assert s.kind == "sum" and s.coordinate_ranges(1) == [(0, 100 * 2**16)]
    assert s.sensitivities() == (100 * 2**16, 100.0 * 2**16)


def test_unknown_stream_key():
    err = policy_error(SECURE, {"s": stream_table(epsilon_total=1.0)}, r"streams\.s: unknown key\(s\) epsilon_total")
    assert "allowed keys" in err.hint


def test_unknown_enclave_key():
    policy_error({"paillier_bits": 2048, "paillier_bit": 3072}, {"s": stream_table()}, "enclave: unknown key")


@pytest.mark.parametrize("key", ["min_batch", "mechanism", "epsilon", "budget_epsilon"])
def test_missing_required_key(key):
    table = stream_table()
    table.pop(key)
    policy_error(SECURE, {"s": table}, f"missing required key '{key}'")


@pytest.mark.parametrize("key", ["lower", "upper"])
def test_missing_bounds(key):
    table = stream_table()
    table.pop(key)
    policy_error(SECURE, {"s": table}, "missing lower and upper")


def test_sensitivity_cannot_be_typed_in():
    policy_error(SECURE, {"s": stream_table(sensitivity=1.0)}, "unknown key")


def test_delta_with_laplace():
    policy_error(SECURE, {"s": stream_table(delta=1e-6)}, "delta applies to the gaussian mechanism only")
    # An explicit zero is harmless.
    enclave_policy(SECURE, {"s": stream_table(delta=0)})


def test_gaussian_needs_delta_in_range():
    policy_error(SECURE, {"s": stream_table(mechanism="gaussian")}, "needs delta")
    for bad in (0, 0.0, 1, 1.5, -1e-6):
        policy_error(SECURE, {"s": stream_table(mechanism="gaussian", delta=bad)}, r"delta must be in \(0, 1\)")
    p = enclave_policy(SECURE, {"s": stream_table(mechanism="gaussian", delta=1e-6)})
    assert p.streams["s"].delta == 1e-6


@pytest.mark.parametrize("mechanism", ["Laplace", "geometric", "", None, 1])
def test_unknown_mechanism(mechanism):
    policy_error(SECURE, {"s": stream_table(mechanism="x") | {"mechanism": mechanism}}, "mechanism must be one of")


@pytest.mark.parametrize("epsilon", [0, 0.0, -1.0])
def test_epsilon_must_be_positive(epsilon):
    policy_error(SECURE, {"s": stream_table(epsilon=epsilon)}, "epsilon must be > 0")


@pytest.mark.parametrize("epsilon", [float("nan"), float("inf"), "1.0", True])
def test_epsilon_must_be_a_finite_number(epsilon):
    policy_error(SECURE, {"s": stream_table(epsilon=epsilon)}, "epsilon must be a finite number")


@pytest.mark.parametrize("lower,upper", [(5.0, 5.0), (6.0, 5.0), (0, -1)])
def test_lower_below_upper(lower, upper):
    policy_error(SECURE, {"s": stream_table(lower=lower, upper=upper)}, "lower must be below upper")


def test_min_batch_above_window_records():
    policy_error(SECURE, {"s": stream_table(window_records=5, min_batch=6)}, "min_batch above window_records")
    enclave_policy(SECURE, {"s": stream_table(window_records=5, min_batch=5)})
    # Time windows alone admit any min_batch up to the hard cap.
    enclave_policy(SECURE, {"s": stream_table(window_records=None, window_seconds=1, min_batch=1000)})


def test_min_batch_is_required_and_positive():
    policy_error(SECURE, {"s": stream_table(min_batch=0)}, "min_batch must be an integer")
    policy_error(SECURE, {"s": stream_table(min_batch=2.0)}, "min_batch must be an integer")


def test_no_window():
    policy_error(SECURE, {"s": stream_table(window_records=None)}, "set window_records, window_seconds or both")


@pytest.mark.parametrize("table,match", [
    ({"window_records": 0}, "window_records must be an integer"),
    ({"window_records": HARD_MAX_WINDOW_RECORDS + 1}, "window_records must be an integer"),
    ({"window_records": None, "window_seconds": 0}, "window_seconds must be > 0"),
    ({"window_seconds": -5}, "window_seconds must be > 0"),
    ({"dimension": 0}, "dimension must be an integer"),
    ({"dimension": 4097}, "dimension must be an integer"),
    ({"fraction_bits": -1}, "fraction_bits must be an integer"),
    ({"fraction_bits": 41}, "fraction_bits must be an integer"),
    ({"count_share": 0}, "count_share must be strictly between 0 and 1"),
    ({"count_share": 1}, "count_share must be strictly between 0 and 1"),
    ({"lower": "0"}, "lower must be a finite number"),
    ({"upper": float("inf")}, "upper must be a finite number"),
], ids=lambda v: str(v))
def test_stream_ranges(table, match):
    policy_error(SECURE, {"s": stream_table(**table)}, match)


def test_fixed_point_overflow_is_refused():
    policy_error(SECURE, {"s": stream_table(upper=1e6, fraction_bits=40, window_records=1000, min_batch=3)},
                 "overflow 62 bits")


@pytest.mark.parametrize("end", ["lower", "upper"])
def test_the_62_bit_rule_holds_at_both_ends_of_a_range(end):
    """Section 4: max(|round(lower·2^f)|, |round(upper·2^f)|) · R < 2^62, a negative lower bound
    as much as an upper one; every window total then lies strictly within (−2^62, 2^62)."""
    widest = ((1 << 62) - 1) // 1000  # R = window_records = 1000, f = 16
    for magnitude, fits in ((widest, True), (widest + 1, False)):
        bound = magnitude / 2**16  # exact: magnitude < 2^53
        table = stream_table(fraction_bits=16, window_records=1000, min_batch=3,
                             **({"lower": -bound, "upper": 0.0} if end == "lower" else {"lower": 0.0, "upper": bound}))
        if fits:
            (lo, hi), = enclave_policy(SECURE, {"s": table}).streams["s"].coordinate_ranges(1000)
            assert -(1 << 62) < lo <= hi < 1 << 62 and max(-lo, hi) == 1000 * widest
        else:
            policy_error(SECURE, {"s": table}, "overflow 62 bits")
    policy_error(SECURE, {"s": stream_table(**{end: (-1e300 if end == "lower" else 1e300)}, fraction_bits=40)},
                 "overflow 62 bits")  # bound · 2^f beyond what a double holds


@pytest.mark.parametrize("name", ["", "a b", "é", "x" * 65, "a.b"])
def test_bad_stream_names(name):
    policy_error(SECURE, {name: stream_table()}, "stream names are 1-64 characters")


def test_no_streams():
    policy_error(SECURE, {}, "defines no streams")
    policy_error(SECURE, [], "defines no streams")


def test_stream_table_must_be_a_table():
    policy_error(SECURE, {"s": [1, 2]}, "streams.s must be a table")


# -- enclave -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1024, 1536, 512])
def test_small_paillier_keys_need_the_insecure_flag(bits):
    err = policy_error({"paillier_bits": bits}, {"s": stream_table()}, "paillier_bits must be one of")
    assert "insecure_test_keys" in err.hint
    assert enclave_policy({"paillier_bits": bits, "insecure_test_keys": True},
                                      {"s": stream_table()}).paillier_bits == bits


@pytest.mark.parametrize("bits", [1000, 256, 16384, "2048", 2048.0, True])
def test_bad_paillier_bits_even_when_insecure(bits):
    with pytest.raises(ConfigError, match="paillier_bits"):
        enclave_policy({"paillier_bits": bits, "insecure_test_keys": True}, {"s": stream_table()})


@pytest.mark.parametrize("bits", [2048, 3072, 4096])
def test_secure_paillier_bits(bits):
    assert enclave_policy({"paillier_bits": bits}, {"s": stream_table()}).paillier_bits == bits


def test_insecure_flag_is_a_bool():
    with pytest.raises(ConfigError, match="insecure_test_keys must be true or false"):
        enclave_policy({"insecure_test_keys": "yes"}, {"s": stream_table()})


def test_huge_integers_in_the_enclave_table():
    policy_error({"max_record_age_seconds": 10**400}, {"s": stream_table()}, "must be a finite number")


@pytest.mark.parametrize("enclave", [{"max_record_age_seconds": 0}, {"max_record_age_seconds": -1},
                                     {"max_clock_skew_seconds": -1}])
def test_record_age_and_skew(enclave):
    policy_error(SECURE | enclave, {"s": stream_table()}, "record age must be > 0 and clock skew >= 0")


# -- canonical bytes ----------------------------------------------------------------------
def test_canonical_bytes_do_not_depend_on_key_order_or_number_spelling():
    a_stream = {"dimension": 2, "lower": -1, "upper": 3, "window_records": 10, "window_seconds": 30,
                "min_batch": 4, "mechanism": "gaussian", "epsilon": 2, "delta": 1e-6, "fraction_bits": 8,
                "count_share": 0.25, "budget_epsilon": 20, "budget_delta": 1e-5}
    b_stream = dict(reversed(list(a_stream.items())))
    b_stream.update(lower=-1.0, upper=3.0, epsilon=2.0, budget_epsilon=20.0)
    a = enclave_policy({"paillier_bits": 2048, "max_clock_skew_seconds": 10},
                                   {"x": a_stream, "y": stream_table()})
    b = enclave_policy({"max_clock_skew_seconds": 10.0, "paillier_bits": 2048},
                                   {"y": dict(reversed(list(stream_table().items()))), "x": b_stream})
    assert list(a_stream) != list(b_stream)
    assert a.to_bytes() == b.to_bytes()
    assert a == b


def test_defaults_are_written_out():
    """A default spelled out and a default left out measure the same."""
    implicit = enclave_policy({}, {"s": stream_table()})
    explicit = enclave_policy(
        {"paillier_bits": 3072, "max_record_age_seconds": 900, "max_clock_skew_seconds": 60,
         "insecure_test_keys": False},
        {"s": stream_table(dimension=1, fraction_bits=16, count_share=0.5)})
    assert implicit.to_bytes() == explicit.to_bytes()
    # Section 4: insecure_test_keys is written out when false too.
    assert b'"insecure_test_keys":false,' in implicit.to_bytes()


def test_any_policy_change_changes_the_bytes():
    base = make_policy().to_bytes()
    for change in ({"epsilon": 1.5}, {"upper": 101.0}, {"min_batch": 4}, {"window_records": 6},
                   {"fraction_bits": 15}, {"count_share": 0.4}, {"mechanism": "gaussian", "delta": 1e-6}):
        assert make_policy({"s": stream_table(**change)}).to_bytes() != base, change
    assert make_policy({"t": stream_table()}).to_bytes() != base
    assert make_policy(max_record_age_seconds=600).to_bytes() != base


def test_round_trip():
    p = make_policy({"a": stream_table(), "b": stream_table(mechanism="gaussian", delta=1e-5, dimension=4,
                                                             window_seconds=2.5)})
    data = p.to_bytes()
    q = policy_from_bytes(data)
    assert q == p
    assert q.to_bytes() == data
    assert data.isascii() and b" " not in data
    # Canonical form: sorted keys at every level, compact separators.
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("data", [
    b"",
    b"\xff",
    b"[]",
    b'{"version": 2, "enclave": {}, "streams": {"s": {}}}',
    b'{"version": 1, "enclave": {}}',
    b'{"version": 1, "enclave": {}, "streams": {}, "extra": 1}',
    b'{"version": 1, "enclave": {"paillier_bits": 1024}, "streams": {"s": {"lower": 0, "upper": 1, "min_batch": 1,'
    b' "mechanism": "laplace", "epsilon": 1, "window_records": 1}}}',
])
def test_from_bytes_refuses_with_invalid_message(data):
    with pytest.raises(InvalidMessage):
        policy_from_bytes(data)


@pytest.mark.parametrize("change", [
    lambda b: b.replace(b'{"enclave":', b'{"version":1,"enclave":', 1),
    lambda b: b.replace(b'"min_batch":', b'"min_batch":1,"min_batch":', 1),
    lambda b: b.replace(b'"epsilon":1.0', b'"epsilon":NaN', 1),
    lambda b: b.replace(b'"epsilon":1.0', b'"epsilon":-Infinity', 1),
    lambda b: b.replace(b'"epsilon":1.0', b'"epsilon":1e999', 1),
], ids=["duplicate top-level key", "duplicate stream key", "NaN", "-Infinity", "1e999"])
def test_attested_policy_bytes_are_strict_json(change):
    good = make_policy().to_bytes()
    assert b'"epsilon":1.0' in good and policy_from_bytes(good).to_bytes() == good
    bad = change(good)
    assert bad != good
    with pytest.raises(InvalidMessage, match="policy: "):
        policy_from_bytes(bad)


def test_stream_lookup():
    p = make_policy()
    assert isinstance(p.stream("s"), StreamPolicy)
    with pytest.raises(ConfigError, match="unknown stream"):
        p.stream("nope")


# -- operational config ----------------------------------------------------------------------
def full(**top) -> dict:
    raw = {
        "broker": {"url": "amqp://u:secret@broker:5672/%2F", "prefix": "t1"},
        "trust": {"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT]},
        "enclave": {"paillier_bits": 2048},
        "streams": {"s": stream_table()},
    }
    raw.update(top)
    return {k: v for k, v in raw.items() if v is not None}


def test_full_config():
    cfg = config_mod.from_mapping(full(), env={})
    assert cfg.broker.url == "amqp://u:secret@broker:5672/%2F"
    assert cfg.broker.topology.records_queue == "t1.records"
    assert cfg.trust.platform_key == b"\x01" * 32 and cfg.trust.measurements == {bytes.fromhex(MEASUREMENT)}
    assert cfg.policy.paillier_bits == 2048
    assert "secret" not in repr(cfg.broker)
    assert "secret" not in config_mod.redact_url(cfg.broker.url)


def test_amqp_url_env_overrides():
    cfg = config_mod.from_mapping(full(), env={"AMQP_URL": "amqps://other:pw@elsewhere:5671/v"})
    assert cfg.broker.url == "amqps://other:pw@elsewhere:5671/v"
    assert config_mod.from_mapping(full(broker=None), env={}).broker.url == config_mod.DEFAULT_AMQP_URL
    # An empty AMQP_URL does not count as set.
    assert config_mod.from_mapping(full(), env={"AMQP_URL": ""}).broker.url.startswith("amqp://u:")


@pytest.mark.parametrize("url", ["http://broker", "broker:5672", 5672, ["amqp://h"]])
def test_bad_url(url):
    with pytest.raises(ConfigError, match="amqp:// or amqps://"):
        config_mod.from_mapping(full(broker={"url": url}), env={})


def test_bad_amqp_url_env_overrides_a_good_one():
    with pytest.raises(ConfigError, match="amqp:// or amqps://"):
        config_mod.from_mapping(full(), env={"AMQP_URL": "ftp://x"})


def test_unknown_keys_everywhere():
    for raw, where in [
        (full(logging={}), "config: unknown key"),
        (full(broker={"url": "amqp://h", "vhost": "/"}), "broker: unknown key"),
        (full(trust={"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT], "pin": 1}), "trust: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=where):
            config_mod.from_mapping(raw, env={})


@pytest.mark.parametrize("broker,match", [
    ({"prefix": ""}, "broker.prefix"),
    ({"prefix": "a#b"}, "broker.prefix"),
    ({"prefix": "a b"}, "broker.prefix"),
    ({"queue_type": "stream"}, "queue_type"),
    ({"attest_timeout_seconds": 0}, "attest_timeout_seconds"),
    ({"attest_timeout_seconds": True}, "attest_timeout_seconds"),
    ({"attest_timeout_seconds": float("nan")}, "attest_timeout_seconds"),
    ({"attest_timeout_seconds": float("inf")}, "attest_timeout_seconds"),
    ({"attest_timeout_seconds": 10**400}, "attest_timeout_seconds"),
])
def test_bad_broker_settings(broker, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.from_mapping(full(broker=broker), env={})


@pytest.mark.parametrize("trust,match", [
    ({"measurements": [MEASUREMENT]}, "platform_key is missing"),
    ({"platform_key": "!!", "measurements": [MEASUREMENT]}, "not base64"),
    ({"platform_key": encode_platform_key(b"\x01" * 31), "measurements": [MEASUREMENT]}, "32-byte"),
    ({"platform_key": PLATFORM_KEY, "measurements": []}, "measurements is empty"),
    ({"platform_key": PLATFORM_KEY}, "measurements is empty"),
    ({"platform_key": PLATFORM_KEY, "measurements": MEASUREMENT}, "list of hex strings"),
    ({"platform_key": PLATFORM_KEY, "measurements": ["xyz"]}, "not hex"),
    ({"platform_key": PLATFORM_KEY, "measurements": ["ab"]}, "64 hex digits"),
    ({"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT], "max_quote_age_seconds": "5"},
     "max_quote_age_seconds must be a finite number"),
    ({"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT], "max_quote_age_seconds": float("inf")},
     "max_quote_age_seconds must be a finite number"),
    ({"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT], "max_quote_age_seconds": 10**400},
     "max_quote_age_seconds must be a finite number"),
    ({"platform_key": PLATFORM_KEY, "measurements": [MEASUREMENT], "max_quote_age_seconds": 0}, "must be > 0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_trust(trust, match):
    with pytest.raises(ConfigError, match=match):
        config_mod.from_mapping(full(trust=trust), env={})


def test_enclave_without_streams():
    with pytest.raises(ConfigError, match="no \\[streams.NAME\\]"):
        config_mod.from_mapping(full(streams=None), env={})


def test_client_only_config_and_requirements():
    cfg = config_mod.from_mapping(full(enclave=None, streams=None), env={})
    assert cfg.policy is None
    with pytest.raises(ConfigError):
        cfg.require_policy()
    cfg = config_mod.from_mapping(full(trust=None), env={})
    with pytest.raises(ConfigError, match="no \\[trust\\] table"):
        cfg.require_trust()


def test_operational_config_does_not_change_the_policy():
    a = config_mod.from_mapping(full(), env={})
    b = config_mod.from_mapping(full(broker={"url": "amqp://x@y/z", "prefix": "other", "queue_type": "classic"},
                                     trust=None), env={"AMQP_URL": "amqp://q"})
    assert a.policy.to_bytes() == b.policy.to_bytes()


def test_load(tmp_path):
    path = tmp_path / "sealedsum.toml"
    path.write_text(
        '[broker]\nurl = "amqp://guest:guest@127.0.0.1:5672/%2F"\n'
        f'[trust]\nplatform_key = "{PLATFORM_KEY}"\nmeasurements = ["{MEASUREMENT}"]\n'
        "[enclave]\npaillier_bits = 2048\n"
        '[streams.purchases]\nlower = 0.0\nupper = 100.0\nwindow_records = 100\nmin_batch = 10\n'
        'mechanism = "laplace"\nepsilon = 1.0\nbudget_epsilon = 10\n'
    )
    cfg = config_mod.load(path, env={})
    assert cfg.path == path and set(cfg.policy.streams) == {"purchases"}
    with pytest.raises(ConfigError, match="does not exist"):
        config_mod.load(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\nurl = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_mod.load(bad, env={})


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setitem(os.environ, "AMQP_URL", "amqp://from-env/")
    assert config_mod.from_mapping(full()).broker.url == "amqp://from-env/"


def test_a_directory_is_no_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        config_mod.load(tmp_path, env={})
    assert info.value.exit_code == 2


def test_one_process_connects_with_two_accounts(monkeypatch):
    """AMQP_URL sets every config a process loads; with_broker_url derives one per account."""
    monkeypatch.setitem(os.environ, "AMQP_URL", "amqp://admin@from-env/")
    base = config_mod.from_mapping(full())
    producer = base.with_broker_url("amqp://producer:p@broker/%2F")
    consumer = base.with_broker_url("amqps://consumer:c@broker/%2F")
    assert (producer.broker.url, consumer.broker.url, base.broker.url) == (
        "amqp://producer:p@broker/%2F", "amqps://consumer:c@broker/%2F", "amqp://admin@from-env/")
    assert producer.broker.topology == base.broker.topology and producer.policy is base.policy
    assert producer.trust == base.trust and producer.chain_state == base.chain_state
    with pytest.raises(ConfigError, match="amqp:// or amqps://"):
        base.with_broker_url("http://broker/")


@pytest.mark.parametrize("table", [
    dict(kind="histogram", dimension=None, lower=None, upper=None, edges=[0, 1, 5]),
    dict(kind="vector", dimension=3, lower=[0.0, -1.0, 2.0], upper=[1.0, 1.0, 3.0]),
    dict(kind="vector", dimension=2, lower=None, upper=None, l2_bound=2.5, mechanism="gaussian", delta=1e-6),
    dict(kind="mean", max_records_per_producer=2, window_seconds=5.0),
])
def test_every_kind_round_trips_through_its_canonical_bytes(table):
    """What the enclave attests, clients must be able to parse back to the same policy."""
    p = enclave_policy(SECURE, {"s": stream_table(**table)})
    assert policy_from_bytes(p.to_bytes()) == p
