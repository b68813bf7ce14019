"""``sealedsum demo``."""

from __future__ import annotations

import argparse

from sealedsum.demos import analytics, federated

SCENARIOS = {"analytics": (analytics.run, 3), "federated": (federated.run, 8)}


def _demo(args) -> int:
    run, default_rounds = SCENARIOS[args.scenario]
    if args.rounds is None:
        args.rounds = default_rounds
    return run(args)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="run platform, enclave, producers and a consumer on the local broker",
        description="Run the whole system on the broker at $AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/). "
                    "--scenario analytics (default): producer processes publish synthetic purchase amounts; "
                    "each noisy sum, mean and histogram release is printed beside the true value and the "
                    "expected noise. --scenario federated: hospitals train a logistic regression on the "
                    "Wisconsin breast cancer data through the enclave, with the accuracy and privacy spent "
                    "per round. The emulated platform stands in for TEE hardware.",
    )
    d.add_argument("--scenario", choices=tuple(SCENARIOS), default="analytics")
    d.add_argument("--rounds", type=int, default=None,
                   help="windows per stream (analytics, default 3) or training rounds (federated, default 8)")
    d.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    d.add_argument("--records", type=int, default=25, help="analytics: purchases per producer per round (default 25)")
    d.add_argument("--seed", type=int, default=None, help="seed for the synthetic data and data split (not the noise)")
    d.add_argument("--state", metavar="DIR", help="state directory (default: a new temporary one)")
    d.set_defaults(func=_demo, role="demo", default_log_level="WARNING")
