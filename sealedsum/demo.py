"""``sealedsum demo``: the whole system on the local broker, in under a minute.

Starts the platform and the enclave, several producer processes publishing synthetic
sensitive records, and a consumer; prints each release beside the true value it stands
for and the expected noise, then cleans up the broker objects it created.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from common import privacy
from common.attestation import encode_platform_key
from common.errors import TransportError

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

CONFIG_TEMPLATE = """\
# Written by `sealedsum demo`.
[broker]
url = "{url}"
prefix = "{prefix}"

[trust]
platform_key = "{platform_key}"
measurements = ["{measurement}"]

[enclave]
paillier_bits = 2048

[streams.purchases]          # one purchase amount per record
dimension = 1
lower = 0.0
upper = 200.0
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 100.0

[streams.wellbeing]          # hours of sleep and of exercise per record
dimension = 2
lower = 0.0
upper = 12.0
window_records = {window}
window_seconds = 60
min_batch = 10
mechanism = "gaussian"
epsilon = 2.0
delta = 1e-6
budget_epsilon = 100.0
budget_delta = 1e-5
"""


def _synthetic(stream: str, rng: random.Random) -> list[float]:
    if stream == "purchases":
        # Mostly small baskets, a few large ones that clipping caps at 200.
        return [round(rng.lognormvariate(3.6, 0.8), 2)]
    return [round(rng.gauss(7, 1.2), 1), round(rng.expovariate(1.5), 1)]


def _broker_url() -> str:
    """The broker to use: $AMQP_URL, the local default, or a throwaway container."""
    from common import amqp
    from common.config import BrokerSettings

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


def _cleanup_broker(cfg) -> None:
    from common import amqp

    t = cfg.broker.topology
    try:
        conn = amqp.connect(cfg.broker)
        ch = conn.channel()
        for q in (t.records_queue, t.rejected_queue, t.attest_queue):
            ch.queue_delete(q)
        for x in (t.records_exchange, t.rejected_exchange, t.results_exchange):
            ch.exchange_delete(x)
        conn.close()
    except Exception:  # noqa: BLE001 - best effort; the demo's result stands
        pass


def _wait_attestable(cfg, sidecar: subprocess.Popen, timeout: float) -> None:
    from common import amqp

    deadline = time.monotonic() + timeout
    while True:
        if sidecar.poll() is not None:
            raise TransportError("the sidecar exited during start-up; see its log")
        try:
            conn = amqp.connect(cfg.broker)
            try:
                amqp.attest(conn, cfg.broker, cfg.require_trust())
                return
            finally:
                conn.close()
        except TransportError:
            if time.monotonic() > deadline:
                raise


def run(args) -> int:
    from common import config as config_mod
    from consumers.client import Consumer
    from sidecar.platform import measure
    from sidecar.platform.emulated import EmulatedPlatform

    url = _broker_url()
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="sealedsum-demo-"))
    window = args.producers * args.records
    platform = EmulatedPlatform.init(state)
    prefix = f"sealedsum-demo-{os.getpid()}"
    path = state / "sealedsum.toml"
    text = CONFIG_TEMPLATE.format(url=url, prefix=prefix, window=window, measurement="0" * 64,
                                  platform_key=encode_platform_key(platform.public_key()))
    policy = config_mod.from_mapping(tomllib.loads(text), env={}).require_policy()
    _, measurement = measure.measure(policy.to_bytes())
    path.write_text(text.replace("0" * 64, measurement.hex()))
    cfg = config_mod.load(path, env={})

    print(f"state directory {state} (config: {path})")
    print(f"platform key    {encode_platform_key(platform.public_key())}")
    print(f"measurement     {measurement.hex()}")
    log_path = state / "sidecar.log"
    log_file = open(log_path, "w")
    env = dict(os.environ, AMQP_URL=url)
    sidecar = subprocess.Popen([sys.executable, "-m", "sealedsum", "sidecar", "--config", str(path),
                                "--state", str(state)], stderr=log_file, env=env)
    rng = random.Random(args.seed)
    failures = 0
    try:
        _wait_attestable(cfg, sidecar, 30)
        print(f"sidecar running (pid {sidecar.pid}, log {log_path}); enclave attested\n")
        with Consumer(cfg, ["purchases", "wellbeing"]) as consumer:
            plans = {name: s.noise_plan() for name, s in consumer.enclave.policy.streams.items()}
            print(f"{args.producers} producer processes x {args.records} records per stream per round; "
                  f"windows close at {window} records\n")
            for rnd in range(1, args.rounds + 1):
                truth = {"purchases": [0.0], "wellbeing": [0.0, 0.0]}
                procs = []
                for p in range(args.producers):
                    for stream in ("purchases", "wellbeing"):
                        lines = []
                        policy = cfg.policy.streams[stream]
                        for _ in range(args.records):
                            values = _synthetic(stream, rng)
                            lines.append(",".join(str(v) for v in values))
                            for i, v in enumerate(values):
                                truth[stream][i] += min(max(v, policy.lower), policy.upper)
                        f = state / f"round{rnd}-producer{p}-{stream}.csv"
                        f.write_text("\n".join(lines) + "\n")
                        procs.append(subprocess.Popen(
                            [sys.executable, "-m", "sealedsum", "produce", "--config", str(path),
                             "--stream", stream, "--input", str(f)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
                for proc in procs:
                    _, err = proc.communicate(timeout=120)
                    if proc.returncode != 0:
                        failures += 1
                        print(f"producer failed ({proc.returncode}): {err.strip()}", file=sys.stderr)
                got = {}
                for release in consumer.releases(idle_timeout=30):
                    got[release.stream] = release
                    if len(got) == 2:
                        break
                for stream in ("purchases", "wellbeing"):
                    _print_release(stream, got.get(stream), truth[stream], window, plans[stream],
                                   cfg.policy.streams[stream].fraction_bits)
                    if stream not in got:
                        failures += 1
                print()
    finally:
        sidecar.send_signal(signal.SIGTERM)
        try:
            sidecar.wait(timeout=15)
        except subprocess.TimeoutExpired:
            sidecar.kill()
        log_file.close()
        _cleanup_broker(cfg)
    if failures:
        print(f"demo finished with {failures} failure(s); see {log_path}", file=sys.stderr)
        return 1
    print("Every number above was released by the enclave with noise; the true values are known here only "
          "because the demo generated the data. The broker carried nothing but sealed boxes and signed results.")
    return 0


def _print_release(stream, release, truth, window, plan, fraction_bits) -> None:
    sum_sd = privacy.noise_std(plan.mechanism, plan.sum_scale) / (1 << fraction_bits)
    count_sd = privacy.noise_std(plan.mechanism, plan.count_scale)
    if release is None:
        print(f"  {stream:<9} no release arrived (see the sidecar log)")
        return
    print(f"  {stream:<9} window {release.window} ({plan.mechanism}, eps={plan.epsilon:g}"
          + (f", delta={plan.delta:g}" if plan.mechanism == "gaussian" else "") + ")")
    print(f"    count  released {release.count:>10}   true {window:>10}   noise sd {count_sd:8.2f}")
    for i, (got, true) in enumerate(zip(release.sum, truth)):
        label = "sum" if len(truth) == 1 else f"sum[{i}]"
        print(f"    {label:<6} released {got:>10.1f}   true {true:>10.1f}   noise sd {sum_sd:8.2f}")
    if release.mean is not None:
        means = ", ".join(f"{m:.2f}" for m in release.mean)
        trues = ", ".join(f"{t / window:.2f}" for t in truth)
        print(f"    mean   released {means:>10}   true {trues:>10}")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="run platform, enclave, producers and a consumer on the local broker",
        description="Run the whole system on the broker at $AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/). "
                    "Producers in separate processes publish synthetic purchase amounts and hours of sleep and exercise; "
                    "each release is printed beside the true value and the expected noise. The emulated "
                    "platform stands in for TEE hardware.",
    )
    d.add_argument("--rounds", type=int, default=3, help="windows per stream (default 3)")
    d.add_argument("--producers", type=int, default=4, help="producer processes per stream (default 4)")
    d.add_argument("--records", type=int, default=25, help="records per producer per round (default 25)")
    d.add_argument("--seed", type=int, default=None, help="seed for the synthetic data (not the noise)")
    d.add_argument("--state", metavar="DIR", help="state directory (default: a new temporary one)")
    d.set_defaults(func=run, role="demo", default_log_level="WARNING")
