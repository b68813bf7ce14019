"""``sealedsum plan``: a stream's noise, accuracy and budget, from the policy alone."""

from __future__ import annotations

import argparse
import json

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import planning
from sealedsum.common.errors import ConfigError, ExitCode


def _g(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.3g}%"


def _list(values: list | None, fmt) -> str:
    if values is None:
        return "n/a"
    if all(v is None for v in values):
        return "n/a"
    if len(set(values)) == 1:
        return fmt(values[0]) + (" (each)" if len(values) > 1 else "")
    return "[" + ", ".join(fmt(v) for v in values[:6]) + (", ..." if len(values) > 6 else "") + "]"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds:g} s ({seconds / size:.3g} {unit})"
    return f"{seconds:g} s"


def describe(p: planning.StreamPlan) -> str:
    """A stream's plan as a few readable lines."""
    privacy = f"epsilon {p.epsilon:g}" + (f", delta {p.delta:g} (rho {p.rho:.6g})" if p.rho is not None else "")
    unit = "" if p.privacy_unit_records == 1 else f" (a privacy unit: one producer's {p.privacy_unit_records} records)"
    lines = [f"{p.stream} ({p.kind}, d={p.dimension}, {p.mechanism}): {privacy} per release; "
             f"guarantee: {p.neighbouring} neighbouring{unit}"]
    figure = "each bucket" if p.kind == "histogram" else "sum, per coordinate"
    lines.append(f"  {figure}: noise scale {_g(p.sum_noise_scale)} (fixed point {p.sum_noise_scale_fixed:.6g}), "
                 f"std {_g(p.sum_std)}")
    if p.count_noise_scale is None:
        lines.append(f"  count: std {_g(p.count_std)} (the sum of the noised buckets)")
    else:
        lines.append(f"  count: noise scale {_g(p.count_noise_scale)}, std {_g(p.count_std)}")
    if p.records_per_window is None:
        lines.append("  relative error: pass --records-per-window (time-closed windows hold what arrives)")
    elif p.typical_value is None and p.kind != "histogram":
        lines.append(f"  with {p.records_per_window} records per window: count relative error "
                     f"{_pct(p.count_relative_error)}; sum and mean errors need a typical value ({p.assumption})")
    else:
        lines.append(f"  with {p.records_per_window} records per window, assuming {p.assumption}:")
        if p.kind == "histogram":
            lines.append(f"    bucket relative error {_list(p.sum_relative_error, _pct)}, "
                         f"count {_pct(p.count_relative_error)}")
        else:
            lines.append(f"    sum relative error {_list(p.sum_relative_error, _pct)}, "
                         f"count {_pct(p.count_relative_error)}")
            lines.append(f"    mean: approx. std {_list(p.mean_std, _g)}, "
                         f"relative error {_list(p.mean_relative_error, _pct)}")
    if p.publish_probability is not None:
        lines.append(f"  a window of {p.records_per_window} records is published with probability "
                     f"{p.publish_probability:.4g} (noised count >= min_batch {p.min_batch}); withheld ones are "
                     "charged too")
    budget = f"epsilon {p.budget_epsilon:g}" + (f", delta {p.budget_delta:g}" if p.budget_delta else "")
    group = f" (budget group {p.budget_group})" if p.budget_group else ""
    line = f"  budget{group} {budget}: {p.releases} release(s)"
    if p.budget_lasts_seconds is not None:
        line += f", one per {p.window_seconds:g} s window: lasts {_duration(p.budget_lasts_seconds)} of running"
    elif p.budget_lasts_at_least_seconds is not None:
        line += (f", at least {p.min_release_interval_seconds:g} s apart: lasts at least "
                 f"{_duration(p.budget_lasts_at_least_seconds)} from the first release")
    lines.append(line)
    lines.extend(f"  note: {n}" for n in p.notes)
    return "\n".join(lines)


def _typical_values(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--typical-value {text!r}: not a number or comma-separated numbers") from None


def _plan(args) -> int:
    policy = load_config(args).require_policy()
    found = planning.plans(policy, args.stream, args.records_per_window, _typical_values(args.typical_value))
    if args.json:
        for p in found:
            print(json.dumps(p.to_json()))
    else:
        print("\n\n".join(describe(p) for p in found))
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="preview each stream's noise, accuracy and budget from the config alone",
        description="Read the policy from the config (no broker, no keys) and print, for each stream, the "
                    "noise scale and standard deviation of every released figure, the relative errors to "
                    "expect for a window of N records, how many releases the budget buys and for how long, "
                    "and the neighbouring relation of the guarantee. The scales are computed by the same "
                    "functions the enclave calibrates with, so they equal the sum_noise_scale and "
                    "count_noise_scale of its releases.",
    )
    add_config_argument(p)
    p.add_argument("--stream", help="only this stream (default: every stream)")
    p.add_argument("--records-per-window", type=int, metavar="N",
                   help="records a window holds (default: window_records; needed for time-closed streams)")
    p.add_argument("--typical-value", metavar="V[,V...]",
                   help="the value a record typically holds, one for all coordinates or one per coordinate "
                        "(default: the midpoint of [lower, upper])")
    p.add_argument("--json", action="store_true", help="one JSON object per stream on stdout")
    p.set_defaults(func=_plan, role="consumer", default_log_level="WARNING")
