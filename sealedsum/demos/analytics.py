"""``sealedsum demo --scenario analytics`` (the default): producer processes publish
synthetic purchase amounts; the enclave releases a windowed noisy sum, count and mean, and
a noisy histogram of purchase sizes. Each release is printed beside the true value and the
noise scale."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from sealedsum.common import privacy
from sealedsum.common.results import BudgetExhausted
from sealedsum.consumers.client import Consumer
from sealedsum.demos import demo_testbed
from sealedsum.testbed import Testbed

# -- the analytics scenario ---------------------------------------------------------------
EDGES = [0, 10, 25, 50, 100, 200, 500]

ANALYTICS_STREAMS = """\
[budget_groups.purchases]    # both streams see every purchase: one budget for the two of them
budget_epsilon = 20.0        # composed in zCDP (the Laplace releases converted): about 8 rounds
budget_delta = 1e-6

[streams.purchases]          # one purchase amount per record: noisy sum, count and mean
kind = "mean"
lower = 0.0
upper = 200.0                # larger baskets are clipped to 200 by the producer
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "laplace"
epsilon = 1.0
budget_group = "purchases"

[streams.basket_sizes]       # the same purchases, counted per size bucket
kind = "histogram"
edges = {edges}
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "gaussian"
epsilon = 1.0
delta = 1e-6
budget_group = "purchases"
"""


def _purchase(rng: random.Random) -> float:
    # Mostly small baskets, a few large ones.
    return round(rng.lognormvariate(3.4, 0.9), 2)


def produce(system: Testbed, stream: str, path: Path) -> subprocess.Popen:
    """Start a real ``sealedsum produce`` process on a file of records."""
    return subprocess.Popen([sys.executable, "-m", "sealedsum", "produce", "--config", str(system.config_path),
                             "--stream", stream, "--input", str(path)], env=system.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run(args) -> int:
    window = args.producers * args.records
    streams = ANALYTICS_STREAMS.format(window=window, edges=EDGES)
    rng = random.Random(args.seed)
    failures = 0
    with demo_testbed(streams, args.state) as system:
        policy = system.config.policy
        with Consumer(system.config, ["purchases", "basket_sizes"]) as consumer:
            plans = {name: s.noise_plan() for name, s in consumer.enclave.policy.streams.items()}
            print(f"{args.producers} producer processes x {args.records} purchases per round; each purchase goes "
                  f"to both streams; windows close at {window} records\n")
            for rnd in range(1, args.rounds + 1):
                amounts = [[_purchase(rng) for _ in range(args.records)] for _ in range(args.producers)]
                procs = []
                for p, mine in enumerate(amounts):
                    path = system.state / f"round{rnd}-producer{p}.csv"
                    path.write_text("\n".join(str(a) for a in mine) + "\n")
                    procs += [produce(system, "purchases", path), produce(system, "basket_sizes", path)]
                for proc in procs:
                    _, err = proc.communicate(timeout=180)
                    if proc.returncode != 0:
                        failures += 1
                        print(f"producer failed ({proc.returncode}): {err.strip()}", file=sys.stderr)
                flat = [a for mine in amounts for a in mine]
                got = {}
                for message in consumer.releases(idle_timeout=30):
                    if isinstance(message, BudgetExhausted):
                        print(f"  {message.stream}: budget exhausted", file=sys.stderr)
                        continue
                    got[message.stream] = message
                    if len(got) == 2:
                        break
                failures += _print_purchases(got.get("purchases"), flat, policy.streams["purchases"], plans["purchases"])
                failures += _print_histogram(got.get("basket_sizes"), flat, plans["basket_sizes"])
                print()
            report = consumer.budget("purchases")  # signed by the enclave: the group's total
    if failures:
        print(f"demo finished with {failures} failure(s); see the sidecar log in the state directory", file=sys.stderr)
        return 1
    print("Every number above was released by the enclave with noise; the true values are known here only "
          "because the demo made the data. The broker carried nothing but sealed boxes and signed results.\n"
          "Each purchase went to both streams, so both spend one budget: each window's pair of releases costs "
          f"rho = {plans['purchases'].epsilon ** 2 / 2:g} (the Laplace eps = {plans['purchases'].epsilon:g}, "
          f"converted) plus rho = {plans['basket_sizes'].rho:.4f} (Gaussian), composed in zCDP.")
    print(total_line(report.budget))
    return 0


def total_line(b: dict) -> str:
    """The group's total spend from a signed budget object (docs/protocol.md section 15.6)."""
    rho = f" (rho {b['spent_rho']:.4f})" if b["spent_rho"] is not None else ""
    delta = f" at delta {b['budget_delta']:g}" if b["budget_delta"] else ""
    return (f"privacy spent eps {b['spent_epsilon']:.4g}{rho} of {b['budget_epsilon']:g}{delta} "
            f"(budget group {b['budget_group']}: streams {', '.join(b['group_releases'])})")


def _print_purchases(release, amounts, stream, plan) -> int:
    if release is None:
        print("  purchases    no release arrived (see the sidecar log)")
        return 1
    clipped = [min(max(a, stream.lower), stream.upper) for a in amounts]
    sum_sd = privacy.noise_std(plan.mechanism, plan.sum_scale) / (1 << stream.fraction_bits)
    count_sd = privacy.noise_std(plan.mechanism, plan.count_scale)
    b = release.budget
    print(f"  purchases    window {release.window} (laplace, eps={plan.epsilon:g}; group spent eps "
          f"{b['spent_epsilon']:.3g} of {b['budget_epsilon']:g})")
    print(f"    count  released {release.count:>10}   true {len(amounts):>10}   noise sd {count_sd:8.2f}")
    print(f"    sum    released {release.sum[0]:>10.1f}   true {sum(clipped):>10.1f}   noise sd {sum_sd:8.2f}")
    mean = f"{release.mean[0]:.2f}" if release.mean else "n/a"
    print(f"    mean   released {mean:>10}   true {sum(clipped) / len(clipped):>10.2f}")
    return 0


def _print_histogram(release, amounts, plan) -> int:
    if release is None:
        print("  basket_sizes no release arrived (see the sidecar log)")
        return 1
    sd = privacy.noise_std(plan.mechanism, plan.sum_scale)
    true = [0] * (len(EDGES) - 1)
    for a in amounts:
        v = min(max(a, EDGES[0]), EDGES[-1])
        i = max(j for j in range(len(EDGES) - 1) if EDGES[j] <= v) if v < EDGES[-1] else len(EDGES) - 2
        true[i] += 1
    b = release.budget
    print(f"  basket_sizes window {release.window} (gaussian, eps={plan.epsilon:g}, delta={plan.delta:g}; "
          f"group spent eps {b['spent_epsilon']:.3g} of {b['budget_epsilon']:g}; noise sd {sd:.2f} per bucket)")
    for i, (got, t) in enumerate(zip(release.sum, true)):
        label = f"[{EDGES[i]}, {EDGES[i + 1]})"
        print(f"    {label:<11} released {got:>6.0f}   true {t:>6}")
    return 0

