"""Reading the policy from its tables and enforcing the rules it must meet.

The same rules apply to a configuration's ``[enclave]`` and ``[streams.NAME]`` tables and to
attested policy bytes (:func:`policy_from_bytes`), so a client
refuses an enclave whose policy breaks them (docs/protocol.md section 4). Every failure is a
:class:`~sealedsum.common.errors.ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from sealedsum.common import privacy
from sealedsum.common.errors import ConfigError, InvalidMessage, LayoutError
from sealedsum.common.identities import Identities
from sealedsum.common.packing import PackingLayout
from sealedsum.common.policy import (
    HARD_MAX_WINDOW_RECORDS, MAX_DIMENSION, SECURE_PAILLIER_BITS, BudgetGroup, EnclavePolicy, StreamKind,
    StreamPolicy,
)
from sealedsum.common.cluster import Cluster
from sealedsum.common.privacy import Mechanism
from sealedsum.common.tables import integer, number, one_of, take
from sealedsum.common.wire import STREAM_NAME, strict_json


def policy_from_bytes(data: bytes) -> EnclavePolicy:
    """Parse attested policy bytes (canonical JSON, :meth:`EnclavePolicy.to_bytes`); any
    problem is an ``InvalidMessage``."""
    try:
        raw = strict_json(data.decode("ascii"))
        if (not isinstance(raw, dict) or raw.get("version") != 1
                or set(raw) - {"identities", "budget_groups", "cluster"} != {"version", "enclave", "streams"}):
            raise InvalidMessage("policy: not a version 1 policy document")
        if raw.get("budget_groups", True) == {}:  # the canonical form omits an empty table
            raise InvalidMessage("policy: an empty budget_groups table is not canonical")
        return enclave_policy(raw["enclave"], raw["streams"], raw.get("identities"), raw.get("budget_groups"),
                              raw.get("cluster"))
    except (ValueError, RecursionError, ConfigError) as err:
        # ValueError: not ASCII, not JSON, or an integer of more than 4300 digits;
        # RecursionError: nesting deeper than the interpreter's recursion limit.
        raise InvalidMessage(f"policy: {err}") from err


def enclave_policy(enclave: Mapping[str, Any], streams: Mapping[str, Any],
                   identities: Mapping[str, Any] | None = None,
                   budget_groups: Mapping[str, Any] | None = None,
                   cluster: Mapping[str, Any] | None = None) -> EnclavePolicy:
    """The policy of an ``[enclave]`` table, its ``[streams.NAME]`` tables, ``[identities]``,
    its ``[budget_groups.NAME]`` tables and ``[cluster]``."""
    d = take(enclave, EnclavePolicy.KEYS, "enclave")
    bits, insecure = _key_size(d)
    age = number(d.get("max_record_age_seconds", 900.0), "enclave.max_record_age_seconds")
    skew = number(d.get("max_clock_skew_seconds", 60.0), "enclave.max_clock_skew_seconds")
    if age <= 0 or skew < 0:
        raise ConfigError("enclave: record age must be > 0 and clock skew >= 0")
    if not isinstance(streams, Mapping) or not streams:
        raise ConfigError("the policy defines no streams", hint="add a [streams.NAME] table")
    budgets = _group_budgets(budget_groups)
    parsed = {name: stream_policy(name, raw, bits, budgets) for name, raw in streams.items()}
    groups = _budget_groups(budgets, parsed)
    grace, every = _key_rotation(d)
    replicas = None if cluster is None else Cluster.from_mapping(cluster)
    if replicas is not None and every is not None:
        raise ConfigError("enclave.rotate_keys_every_seconds cannot be set with [cluster]",
                          hint="replicas share one key epoch; rotate by deploying a new measurement")
    return EnclavePolicy(parsed, bits, age, skew, insecure, Identities.from_mapping(identities or {}), grace, every,
                         groups, replicas)


def _group_budgets(raw: Mapping[str, Any] | None) -> dict[str, tuple[float, float | None]]:
    """Each ``[budget_groups.NAME]`` table's budget: (budget_epsilon, budget_delta or None)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError("budget_groups must hold one table per group")
    out = {}
    for name, table in raw.items():
        where = f"budget_groups.{name}"
        if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
            raise ConfigError(f"{where}: group names are 1-64 characters of A-Z a-z 0-9 _ -")
        g = take(table, BudgetGroup.KEYS, where)
        if "budget_epsilon" not in g:
            raise ConfigError(f"{where}: missing required key 'budget_epsilon'",
                              hint="the total privacy budget the group's streams share, e.g. budget_epsilon = 10")
        delta = number(g["budget_delta"], f"{where}.budget_delta") if "budget_delta" in g else None
        out[name] = (number(g["budget_epsilon"], f"{where}.budget_epsilon"), delta)
    return out


def _budget_groups(budgets: Mapping[str, tuple[float, float | None]],
                   streams: Mapping[str, StreamPolicy]) -> dict[str, BudgetGroup]:
    """The groups, once their streams are known: a group must have a stream, a budget_delta
    exactly when a stream in it is Gaussian, and room for one release of each stream."""
    groups = {}
    for name, (budget_epsilon, budget_delta) in budgets.items():
        where = f"budget_groups.{name}"
        members = sorted(s for s, p in streams.items() if p.budget_group == name)
        if not members:
            raise ConfigError(f"{where}: no stream is in this group",
                              hint=f'add budget_group = "{name}" to the streams that share it, or remove the table')
        gaussian = any(streams[s].mechanism == Mechanism.GAUSSIAN for s in members)
        if gaussian and budget_delta is None:
            raise ConfigError(f"{where}: a group with a gaussian stream needs budget_delta (e.g. 1e-6)")
        if gaussian and not 0 < budget_delta < 1:
            raise ConfigError(f"{where}.budget_delta must be in (0, 1)")
        if not gaussian and budget_delta not in (None, 0, 0.0):
            raise ConfigError(f"{where}.budget_delta applies only to a group with a gaussian stream")
        group = BudgetGroup(name, budget_epsilon, budget_delta or 0.0, tuple(members))
        for s in members:  # each stream alone must fit: otherwise it could never release
            alone = {m: (streams[m].cost, 1 if m == s else 0) for m in members}
            if not privacy.group_allows(alone, group.budget_epsilon, group.budget_delta):
                raise ConfigError(f"streams.{s}: budget group {name!r}'s budget_epsilon is smaller than the cost "
                                  "of one release of this stream", hint=f"raise {where}.budget_epsilon or lower epsilon")
        groups[name] = group
    return groups


def _key_size(d: Mapping[str, Any]) -> tuple[int, bool]:
    insecure = d.get("insecure_test_keys", False)
    if not isinstance(insecure, bool):
        raise ConfigError("enclave.insecure_test_keys must be true or false")
    bits = integer(d.get("paillier_bits", 3072), "enclave.paillier_bits", 512, 8192)
    if bits not in SECURE_PAILLIER_BITS and not (insecure and bits % 256 == 0):
        raise ConfigError(
            f"enclave.paillier_bits must be one of {SECURE_PAILLIER_BITS}",
            hint="smaller keys are for tests only: set insecure_test_keys = true (it is attested)",
        )
    return bits, insecure


def _key_rotation(d: Mapping[str, Any]) -> tuple[float, float | None]:
    grace = number(d.get("key_grace_seconds", 900.0), "enclave.key_grace_seconds")
    if grace < 0:
        raise ConfigError("enclave.key_grace_seconds must be >= 0")
    every = d.get("rotate_keys_every_seconds")
    if every is not None:
        every = number(every, "enclave.rotate_keys_every_seconds")
        if every <= grace:
            raise ConfigError("enclave.rotate_keys_every_seconds must exceed key_grace_seconds",
                              hint="otherwise an epoch would retire before producers could move on")
    return grace, every


def stream_policy(name: str, raw: Mapping[str, Any], paillier_bits: int | None = None,
                  group_budgets: Mapping[str, tuple[float, float | None]] | None = None) -> StreamPolicy:
    """The policy of one ``[streams.NAME]`` table.

    :param paillier_bits: the enclave's key size; a packed stream's layout depends on it.
    :param group_budgets: the budget groups' (budget_epsilon, budget_delta or None), by name;
        a stream in a group spends the group's budget and states none of its own.
    """
    where = f"streams.{name}"
    if not STREAM_NAME.fullmatch(name):
        raise ConfigError(f"{where}: stream names are 1-64 characters of A-Z a-z 0-9 _ -")
    d = take(raw, StreamPolicy.KEYS, where)
    kind = one_of(StreamKind, d.get("kind", StreamKind.SUM), f"{where}.kind")
    group = _group_of(d, group_budgets or {}, where)
    for key in ("min_batch", "mechanism", "epsilon") + (() if group else ("budget_epsilon",)):
        if key not in d:
            hint = ("the total privacy budget of the stream, e.g. budget_epsilon = 10"
                    if key == "budget_epsilon" else None)
            raise ConfigError(f"{where}: missing required key {key!r}", hint=hint)
    # Each step checks its own keys; the order fixes which error a table with several sees.
    spending = _mechanism_and_budget(d, where, None if group is None else (group_budgets or {})[group])
    shape = _histogram_shape(d, where) if kind == StreamKind.HISTOGRAM else _value_shape(d, kind, where)
    windows = _windows(d, where)
    count_share = _count_share(d, kind, where)
    per_producer = d.get("max_records_per_producer")
    if per_producer is not None:
        per_producer = integer(per_producer, f"{where}.max_records_per_producer", 1, HARD_MAX_WINDOW_RECORDS)
    policy = StreamPolicy(name=name, kind=kind, count_share=count_share, max_records_per_producer=per_producer,
                          budget_group=group, **spending, **shape, **windows)
    _check_totals_fit(policy, where)
    _check_releasable(policy, where)  # a grouped stream's budget is checked with its group
    return _with_packing(policy, d.get("packing", False), paillier_bits, where)


def _group_of(d: Mapping[str, Any], group_budgets: Mapping[str, Any], where: str) -> str | None:
    """The stream's ``budget_group``; a stream in a group may not state a budget of its own
    (one budget, stated once: two copies could only disagree)."""
    group = d.get("budget_group")
    if group is None:
        return None
    if not isinstance(group, str) or group not in group_budgets:
        raise ConfigError(f"{where}.budget_group: no budget group {group!r} is defined",
                          hint=f"add a [budget_groups.{group}] table with budget_epsilon" if isinstance(group, str)
                          else "budget_group is the name of a [budget_groups.NAME] table")
    for key in ("budget_epsilon", "budget_delta"):
        if key in d:
            raise ConfigError(f"{where}.{key}: the stream spends budget group {group!r}'s budget",
                              hint=f"state the budget once, in [budget_groups.{group}], and remove it here")
    return group


def _mechanism_and_budget(d: Mapping[str, Any], where: str,
                          group_budget: tuple[float, float | None] | None = None) -> dict[str, Any]:
    """``mechanism``, the per-release ``epsilon``/``delta`` and the stream's budget (its
    group's, when ``group_budget`` is given)."""
    mechanism = one_of(Mechanism, d["mechanism"], f"{where}.mechanism")
    epsilon = number(d["epsilon"], f"{where}.epsilon")
    if epsilon <= 0:
        raise ConfigError(f"{where}.epsilon must be > 0 (smaller is more private)")
    if group_budget is not None:
        if mechanism == Mechanism.GAUSSIAN and "delta" not in d:
            raise ConfigError(f"{where}: the gaussian mechanism needs delta (e.g. 1e-6)")
        if mechanism == Mechanism.LAPLACE and d.get("delta", 0) not in (0, 0.0):
            raise ConfigError(f"{where}: delta applies to the gaussian mechanism only")
        delta = number(d["delta"], f"{where}.delta") if mechanism == Mechanism.GAUSSIAN else 0.0
        if mechanism == Mechanism.GAUSSIAN and not 0 < delta < 1:
            raise ConfigError(f"{where}: delta must be in (0, 1)")
        # budget_delta is checked with the group (it is needed once a stream in it is Gaussian).
        return dict(mechanism=mechanism, epsilon=epsilon, budget_epsilon=group_budget[0],
                    delta=delta, budget_delta=group_budget[1] or 0.0)
    budget_epsilon = number(d["budget_epsilon"], f"{where}.budget_epsilon")
    if mechanism == Mechanism.GAUSSIAN:
        for key in ("delta", "budget_delta"):
            if key not in d:
                raise ConfigError(f"{where}: the gaussian mechanism needs {key} (e.g. 1e-6)")
        delta = number(d["delta"], f"{where}.delta")
        budget_delta = number(d["budget_delta"], f"{where}.budget_delta")
        if not 0 < delta < 1 or not 0 < budget_delta < 1:
            raise ConfigError(f"{where}: delta and budget_delta must be in (0, 1)")
    else:
        for key in ("delta", "budget_delta"):
            if d.get(key, 0) not in (0, 0.0):
                raise ConfigError(f"{where}: {key} applies to the gaussian mechanism only")
        delta = budget_delta = 0.0
    return dict(mechanism=mechanism, epsilon=epsilon, budget_epsilon=budget_epsilon,
                delta=delta, budget_delta=budget_delta)


def _histogram_shape(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A histogram's buckets: its ``edges`` bound it, so no clipping bounds or fixed point."""
    for key in ("lower", "upper", "l2_bound", "fraction_bits"):
        if key in d:
            raise ConfigError(f"{where}: {key} does not apply to a histogram (its edges bound it)")
    edges = d.get("edges")
    if not isinstance(edges, list) or len(edges) < 2:
        raise ConfigError(f"{where}.edges must list at least two bucket edges")
    edges = tuple(number(e, f"{where}.edges") for e in edges)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"{where}.edges must increase strictly")
    dimension = len(edges) - 1
    if d.get("dimension", dimension) != dimension:
        raise ConfigError(f"{where}: a histogram's dimension is its number of buckets ({dimension})")
    return dict(dimension=dimension, edges=edges, fraction_bits=0)


def _value_shape(d: Mapping[str, Any], kind: StreamKind, where: str) -> dict[str, Any]:
    """``dimension`` values in fixed point, clipped to a box (``lower``/``upper``) or an L2 ball."""
    if "edges" in d:
        raise ConfigError(f"{where}: edges apply to histograms only")
    dimension = integer(d.get("dimension", 1), f"{where}.dimension", 1, MAX_DIMENSION)
    fraction_bits = integer(d.get("fraction_bits", 16), f"{where}.fraction_bits", 0, 40)
    if "l2_bound" in d:
        if kind != StreamKind.VECTOR:
            raise ConfigError(f"{where}: l2_bound applies to kind = \"vector\" only")
        if "lower" in d or "upper" in d:
            raise ConfigError(f"{where}: give either lower/upper or l2_bound, not both")
        l2 = number(d["l2_bound"], f"{where}.l2_bound")
        if l2 <= 0:
            raise ConfigError(f"{where}.l2_bound must be > 0")
        return dict(dimension=dimension, fraction_bits=fraction_bits, l2_bound=l2)
    if "lower" not in d or "upper" not in d:
        raise ConfigError(f"{where}: missing lower and upper (clipping bounds)")
    lower = _bounds(d["lower"], f"{where}.lower", dimension)
    upper = _bounds(d["upper"], f"{where}.upper", dimension)
    if kind != StreamKind.VECTOR and (isinstance(lower, tuple) or isinstance(upper, tuple)):
        raise ConfigError(f"{where}: per-coordinate bounds need kind = \"vector\"")
    lo = lower if isinstance(lower, tuple) else (lower,) * dimension
    hi = upper if isinstance(upper, tuple) else (upper,) * dimension
    if any(a >= b for a, b in zip(lo, hi)):
        raise ConfigError(f"{where}: lower must be below upper")
    return dict(dimension=dimension, fraction_bits=fraction_bits, lower=lower, upper=upper)


def _bounds(value: Any, where: str, dimension: int) -> float | tuple[float, ...]:
    if isinstance(value, list):
        if len(value) != dimension:
            raise ConfigError(f"{where} has {len(value)} entries; the stream has dimension {dimension}")
        return tuple(number(v, f"{where}[{i}]") for i, v in enumerate(value))
    return number(value, where)


def _windows(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """When a window closes (``window_records``, ``window_seconds``) and when it may be released."""
    window_records = d.get("window_records")
    window_seconds = d.get("window_seconds")
    if window_records is None and window_seconds is None:
        raise ConfigError(f"{where}: set window_records, window_seconds or both")
    if window_records is not None:
        window_records = integer(window_records, f"{where}.window_records", 1, HARD_MAX_WINDOW_RECORDS)
    if window_seconds is not None:
        window_seconds = number(window_seconds, f"{where}.window_seconds")
        if window_seconds <= 0:
            raise ConfigError(f"{where}.window_seconds must be > 0")
    min_batch = integer(d["min_batch"], f"{where}.min_batch", 1, HARD_MAX_WINDOW_RECORDS)
    if window_records is not None and min_batch > window_records:
        raise ConfigError(f"{where}: min_batch above window_records: no window could ever be released")
    interval = d.get("min_release_interval_seconds")
    if interval is not None:
        interval = number(interval, f"{where}.min_release_interval_seconds")
        if window_records is None:
            raise ConfigError(f"{where}.min_release_interval_seconds applies to count-closed streams only",
                              hint="a time-closed stream releases at most one window per window_seconds already")
        if interval <= 0:
            raise ConfigError(f"{where}.min_release_interval_seconds must be > 0",
                              hint="leave it out for no interval")
    return dict(window_records=window_records, window_seconds=window_seconds, min_batch=min_batch,
                min_release_interval_seconds=interval)


def _count_share(d: Mapping[str, Any], kind: StreamKind, where: str) -> float:
    count_share = number(d.get("count_share", 0.5), f"{where}.count_share")
    if not 0 < count_share < 1:
        raise ConfigError(f"{where}.count_share must be strictly between 0 and 1")
    if kind == StreamKind.HISTOGRAM and "count_share" in d:
        raise ConfigError(f"{where}: a histogram's count is the sum of its buckets; count_share does not apply")
    return count_share


def _check_totals_fit(policy: StreamPolicy, where: str) -> None:
    """A window's fixed-point totals must stay clear of OpenDP's 64-bit integers."""
    try:
        widest = max(max(abs(lo), abs(hi)) for lo, hi in policy.coordinate_ranges(1))
    except OverflowError:  # a bound times 2^fraction_bits is beyond the float range
        widest = math.inf
    if widest * policy.max_window_records >= 1 << 62:
        raise ConfigError(f"{where}: bounds × 2^fraction_bits × window size overflow 62 bits",
                          hint="lower fraction_bits or window_records" if policy.max_window_records == policy.window_records
                          else "lower fraction_bits (a window can hold 1 000 000 records)")


def _check_releasable(policy: StreamPolicy, where: str) -> None:
    """The budget must pay for one release, and the enclave must be able to noise it."""
    if policy.budget_group is None and not privacy.budget_allows(policy.mechanism, policy.epsilon, policy.delta, 1,
                                 policy.budget_epsilon, policy.budget_delta):
        raise ConfigError(f"{where}: budget_epsilon is smaller than the cost of one release",
                          hint="raise budget_epsilon or lower epsilon")
    try:  # OpenDP refuses infinite scales
        plan = policy.noise_plan()
        finite = math.isfinite(plan.sum_scale) and (plan.count_scale is None or math.isfinite(plan.count_scale))
    except ArithmeticError:  # epsilon × count_share rounds to 0
        finite = False
    if not finite:
        raise ConfigError(f"{where}: epsilon (or count_share) is too small for a finite noise scale",
                          hint="raise epsilon")


def _with_packing(policy: StreamPolicy, raw: Any, paillier_bits: int | None, where: str) -> StreamPolicy:
    """``packing = true`` in a configuration; in policy bytes, the derived layout table,
    which must be exactly the one these bounds and this key size give."""
    declared = None
    if isinstance(raw, Mapping):
        declared = raw
    elif not isinstance(raw, bool):
        raise ConfigError(f"{where}.packing must be true or false")
    elif not raw:
        return policy
    if paillier_bits is None:
        raise ConfigError(f"{where}: packing needs the enclave's paillier_bits")
    try:
        layout = PackingLayout.derive(policy.coordinate_ranges(1), policy.max_window_records, paillier_bits)
    except LayoutError as err:
        raise ConfigError(f"{where}.packing: {err}", hint="lower fraction_bits or window_records") from None
    if declared is not None and not layout.matches(declared):
        raise ConfigError(f"{where}.packing does not match the layout these bounds and keys give: "
                          f"{layout.to_mapping()}", hint="in a configuration, write packing = true")
    return dataclasses.replace(policy, packing=layout)
