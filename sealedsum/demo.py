"""``sealedsum demo``: the whole system on the local broker.

Scenarios:

- ``analytics`` (default): producer processes publish synthetic purchase amounts;
  the enclave releases a windowed noisy sum, count and mean, and a noisy histogram of
  purchase sizes. Each release is printed beside the true value and the noise scale.
- ``federated``: hospitals train a logistic regression together on the Wisconsin
  breast cancer data; see :mod:`sealedsum.federated`.

:class:`DemoSystem` starts and stops the real parts (platform, enclave, broker
objects) for any scenario.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from sealedsum.common import privacy
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.errors import TransportError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PLACEHOLDER = "0" * 64

CONFIG_HEAD = """\
# Written by `sealedsum demo`.
[broker]
url = "{url}"
prefix = "{prefix}"

[trust]
platform_key = "{platform_key}"
measurements = ["{measurement}"]

[enclave]
paillier_bits = {bits}

"""


def broker_url() -> str:
    """The broker to use: $AMQP_URL, the local default, or a throwaway container."""
    from sealedsum.common import amqp
    from sealedsum.common.config import BrokerSettings

    url = os.environ.get("AMQP_URL", DEFAULT_URL)
    try:
        amqp.connect(BrokerSettings(url=url)).close()
        return url
    except TransportError as err:
        first = err
    try:
        import docker  # noqa: F401 - only present with the test extra
        from testcontainers.community.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13")
        container.start()
    except Exception:  # noqa: BLE001 - no Docker engine: say how to get a broker
        raise TransportError(f"{first}; and no Docker engine is available to start one",
                             hint="start RabbitMQ (`rabbitmq-server -detached`, or `docker run -d -p 5672:5672 "
                                  "rabbitmq:3.13`) or set AMQP_URL, then run `sealedsum demo` again") from None
    p = container.get_connection_params()
    print(f"no broker at {DEFAULT_URL}; started a RabbitMQ container on port {p.port}", file=sys.stderr)
    return f"amqp://{p.credentials.username}:{p.credentials.password}@{p.host}:{p.port}/%2F"


class DemoSystem:
    """A platform, its measured enclave (the real ``sealedsum sidecar`` process) and a
    config that trusts exactly them, in a state directory; broker objects are removed
    on exit. Use as a context manager."""

    def __init__(self, streams_toml: str, *, state: str | None = None, bits: int = 2048) -> None:
        from sealedsum.common import config as config_mod
        from sealedsum.sidecar.platform import measure
        from sealedsum.sidecar.platform.emulated import EmulatedPlatform

        self.url = broker_url()
        self.state = Path(state) if state else Path(tempfile.mkdtemp(prefix="sealedsum-demo-"))
        self.platform = EmulatedPlatform.init(self.state)
        head = CONFIG_HEAD.format(url=self.url, prefix=f"sealedsum-demo-{os.getpid()}", bits=bits,
                                  platform_key=encode_platform_key(self.platform.public_key()),
                                  measurement=PLACEHOLDER)
        text = head + streams_toml
        policy = config_mod.from_mapping(tomllib.loads(text), env={}).require_policy()
        _, self.measurement = measure.measure(policy.to_bytes())
        self.config_path = self.state / "sealedsum.toml"
        self.config_path.write_text(text.replace(PLACEHOLDER, self.measurement.hex()))
        self.config = config_mod.load(self.config_path, env={})
        self.env = dict(os.environ, AMQP_URL=self.url)
        self.log_path = self.state / "sidecar.log"
        self.sidecar: subprocess.Popen | None = None

    def __enter__(self) -> "DemoSystem":
        print(f"state directory {self.state} (config: {self.config_path})")
        print(f"platform key    {encode_platform_key(self.platform.public_key())}")
        print(f"measurement     {self.measurement.hex()}")
        self._log = open(self.log_path, "w")
        self.sidecar = subprocess.Popen([sys.executable, "-m", "sealedsum", "sidecar", "--config",
                                         str(self.config_path), "--state", str(self.state)],
                                        stderr=self._log, env=self.env)
        try:
            self._wait_attestable(60)
        except BaseException:
            self.__exit__()
            raise
        print(f"sidecar running (pid {self.sidecar.pid}, log {self.log_path}); enclave attested\n")
        return self

    def __exit__(self, *exc) -> None:
        if self.sidecar is not None:
            self.sidecar.send_signal(signal.SIGTERM)
            try:
                self.sidecar.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()
        self._log.close()
        self._cleanup_broker()

    def produce(self, stream: str, path: Path) -> subprocess.Popen:
        """Start a real ``sealedsum produce`` process on a file of records."""
        return subprocess.Popen([sys.executable, "-m", "sealedsum", "produce", "--config", str(self.config_path),
                                 "--stream", stream, "--input", str(path)], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _wait_attestable(self, timeout: float) -> None:
        from sealedsum.common import amqp

        deadline = time.monotonic() + timeout
        while True:
            if self.sidecar.poll() is not None:
                raise TransportError(f"the sidecar exited during start-up; see {self.log_path}")
            try:
                conn = amqp.connect(self.config.broker)
                try:
                    amqp.attest(conn, self.config.broker, self.config.require_trust())
                    return
                finally:
                    conn.close()
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _cleanup_broker(self) -> None:
        from sealedsum.common import amqp

        amqp.delete_topology(self.config.broker)


# -- the analytics scenario ---------------------------------------------------------------
EDGES = [0, 10, 25, 50, 100, 200, 500]

ANALYTICS_STREAMS = """\
[streams.purchases]          # one purchase amount per record: noisy sum, count and mean
kind = "mean"
lower = 0.0
upper = 200.0                # larger baskets are clipped to 200 by the producer
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 50.0

[streams.basket_sizes]       # the same purchases, counted per size bucket
kind = "histogram"
edges = {edges}
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "gaussian"
epsilon = 1.0
delta = 1e-6
budget_epsilon = 8.0
budget_delta = 1e-6
"""


def _purchase(rng: random.Random) -> float:
    # Mostly small baskets, a few large ones.
    return round(rng.lognormvariate(3.4, 0.9), 2)


def run_analytics(args) -> int:
    from sealedsum.consumers.client import Consumer
    from sealedsum.common.results import BudgetExhausted

    window = args.producers * args.records
    streams = ANALYTICS_STREAMS.format(window=window, edges=EDGES)
    rng = random.Random(args.seed)
    failures = 0
    with DemoSystem(streams, state=args.state) as system:
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
                    procs += [system.produce("purchases", path), system.produce("basket_sizes", path)]
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
    if failures:
        print(f"demo finished with {failures} failure(s); see the sidecar log in the state directory", file=sys.stderr)
        return 1
    rho = plans["basket_sizes"].rho
    print("Every number above was released by the enclave with noise; the true values are known here only "
          "because the demo made the data. The broker carried nothing but sealed boxes and signed results.\n"
          f"Each purchase went to both streams, so each window's pair of releases spends eps = "
          f"{plans['purchases'].epsilon:g} (Laplace) plus rho = {rho:.4f} (Gaussian, zCDP) on it; "
          "`sealedsum budget --stream NAME` shows each stream's total.")
    return 0


def _print_purchases(release, amounts, stream, plan) -> int:
    if release is None:
        print("  purchases    no release arrived (see the sidecar log)")
        return 1
    clipped = [min(max(a, stream.lower), stream.upper) for a in amounts]
    sum_sd = privacy.noise_std(plan.mechanism, plan.sum_scale) / (1 << stream.fraction_bits)
    count_sd = privacy.noise_std(plan.mechanism, plan.count_scale)
    b = release.budget
    print(f"  purchases    window {release.window} (laplace, eps={plan.epsilon:g}; spent {b['spent_epsilon']:g} "
          f"of {b['budget_epsilon']:g})")
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
          f"spent eps {b['spent_epsilon']:.3g} of {b['budget_epsilon']:g} in zCDP; noise sd {sd:.2f} per bucket)")
    for i, (got, t) in enumerate(zip(release.sum, true)):
        label = f"[{EDGES[i]}, {EDGES[i + 1]})"
        print(f"    {label:<11} released {got:>6.0f}   true {t:>6}")
    return 0


def run(args) -> int:
    if args.rounds is None:
        args.rounds = 8 if args.scenario == "federated" else 3
    if args.scenario == "federated":
        from sealedsum import federated

        return federated.run(args)
    return run_analytics(args)


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
    d.add_argument("--scenario", choices=("analytics", "federated"), default="analytics")
    d.add_argument("--rounds", type=int, default=None,
                   help="windows per stream (analytics, default 3) or training rounds (federated, default 8)")
    d.add_argument("--producers", type=int, default=4, help="producer processes (default 4)")
    d.add_argument("--records", type=int, default=25, help="analytics: purchases per producer per round (default 25)")
    d.add_argument("--seed", type=int, default=None, help="seed for the synthetic data and data split (not the noise)")
    d.add_argument("--state", metavar="DIR", help="state directory (default: a new temporary one)")
    d.set_defaults(func=run, role="demo", default_log_level="WARNING")
