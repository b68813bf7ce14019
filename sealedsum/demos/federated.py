"""``sealedsum demo --scenario federated``: hospitals train a model together, privately.

Forty "hospitals" (clients) each hold a shard of the Wisconsin breast cancer training
data. They train a logistic regression (30 weights and a bias) with federated
averaging: every round each client takes the current global model, runs a few local
gradient-descent epochs on its own shard, clips its model delta to the stream's
``l2_bound`` and seals it to the enclave as one record of the ``model_updates`` stream.
The clients run in ``--producers`` separate OS processes (``python -m
sealedsum.demos.federated --client-worker ...``), one producer id per client, so the
enclave's ``max_records_per_producer = 1`` bounds what any one client adds to a round.

The enclave adds the deltas up under Paillier encryption, adds discrete Gaussian noise
to the sum and the count, charges the stream's zCDP ledger and publishes the signed
release. The model server (this process) verifies it, averages (noised sum / noised
count), updates the global model and broadcasts it on a plain fanout exchange
``<prefix>.model``: the model is public, it needs no enclave. After the last round it
compares the held-out accuracy with the same model trained centrally without privacy.

Exit status: 0 when every round was released, the accuracy gap to the non-private
model is at most 3 points and the total privacy spent is at most eps = 8 at
delta = 1e-6; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np

from sealedsum.common import amqp, logs, privacy
from sealedsum.common import config as config_mod
from sealedsum.common.errors import TransportError
from sealedsum.common.results import BudgetExhausted
from sealedsum.consumers.client import Consumer
from sealedsum.demos import demo_testbed
from sealedsum.producers.client import Producer, RecordSealer

STREAM = "model_updates"
FEATURES = 30
DIMENSION = FEATURES + 1          # weights and bias
CLIENTS = 40                      # hospitals
TEST_SHARE = 0.25                 # held out, stratified
DEFAULT_SEED = 0                  # data split and sharding (never the noise: that is the enclave's)

# The model and its training.
L2_REG = 0.01                     # ridge penalty on the weights (not the bias), same for both models
LOCAL_EPOCHS = 5                  # full-batch gradient steps per client per round
LOCAL_LR = 1.0
CENTRAL_STEPS = 1000              # the non-private baseline: plain gradient descent on pooled data
CENTRAL_LR = 0.5

# The stream's policy.
CLIP = 0.75                       # l2_bound of one client's model delta
TOTAL_EPSILON = 8.0               # for the whole training, at ...
TOTAL_DELTA = 1e-6
COUNT_SHARE = 0.1                 # the count is known-ish: most of each round's budget goes to the sum
FRACTION_BITS = 16
WINDOW_SECONDS = 120              # safety net: a round closes when every client sent, or after this
MAX_GAP_POINTS = 3.0

READY_TIMEOUT = 120
ROUND_TIMEOUT = WINDOW_SECONDS + 90


# -- the model ----------------------------------------------------------------------------
def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1/(1+e^-z), without overflow warnings


def gradient(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean logistic loss plus (L2_REG/2)·|weights|² (the bias is not penalised)."""
    g = X.T @ (_sigmoid(X @ w) - y) / len(y)
    reg = L2_REG * w
    reg[-1] = 0.0
    return g + reg


def accuracy(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((X @ w > 0) == (y > 0.5)))


def local_update(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """FedAvg: a few local epochs from the global model; the update is the model delta."""
    v = w.copy()
    for _ in range(LOCAL_EPOCHS):
        v -= LOCAL_LR * gradient(v, X, y)
    return v - w


def clip_l2(u: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    norm = float(np.linalg.norm(u))
    if norm <= bound:
        return u, False
    # A hair inside the bound, so that the library's own clip (same rule) leaves it alone.
    return u * (bound * (1 - 1e-12) / norm), True


def train_central(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The same model without privacy: gradient descent on the pooled training data."""
    w = np.zeros(X.shape[1])
    for _ in range(CENTRAL_STEPS):
        w -= CENTRAL_LR * gradient(w, X, y)
    return w


# -- the data -----------------------------------------------------------------------------
def load_split(seed: int):
    """Standardised train/test split of the breast cancer data (scaler fit on train only),
    with a constant 1 column for the bias. Labels: 1 = benign, 0 = malignant."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=TEST_SHARE, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(Xtr)

    def design(A):
        return np.hstack([scaler.transform(A), np.ones((len(A), 1))])

    return design(Xtr), ytr.astype(float), design(Xte), yte.astype(float)


def shard(n: int, clients: int, seed: int) -> list[np.ndarray]:
    """Random, disjoint shards of the training rows, one per client."""
    return np.array_split(np.random.default_rng(seed).permutation(n), clients)


# -- the policy ---------------------------------------------------------------------------
def per_round_epsilon(rounds: int) -> float:
    """The per-release epsilon (at delta = TOTAL_DELTA) whose rho, composed over ``rounds``
    releases in zCDP, stays within TOTAL_EPSILON at TOTAL_DELTA; rounded down."""
    rho = privacy.rho_from_epsilon_delta(TOTAL_EPSILON, TOTAL_DELTA) / rounds
    eps = math.floor(privacy.epsilon_from_rho_delta(rho, TOTAL_DELTA) * 1e6) / 1e6
    while privacy.max_releases(privacy.Mechanism.GAUSSIAN, eps, TOTAL_DELTA, TOTAL_EPSILON, TOTAL_DELTA) < rounds:
        eps = math.floor(eps * 1e6 - 1) / 1e6
    return eps


def streams_toml(rounds: int, clients: int) -> str:
    rows = [
        ("kind", '"vector"', ""),
        ("dimension", DIMENSION, "30 weights and a bias"),
        ("l2_bound", repr(CLIP), "each client's model delta is clipped to this L2 norm"),
        ("window_records", clients, "a round closes when every client contributed ..."),
        ("window_seconds", WINDOW_SECONDS, "... or after this long (stragglers are then late)"),
        ("min_batch", max(1, clients // 2), ""),
        ("max_records_per_producer", 1, "one update per client per round: client-level DP"),
        ("mechanism", '"gaussian"', ""),
        ("epsilon", repr(per_round_epsilon(rounds)), f"per round; {rounds} rounds compose (zCDP) to ..."),
        ("delta", repr(TOTAL_DELTA), ""),
        ("budget_epsilon", repr(TOTAL_EPSILON), "... at most this for the whole training"),
        ("budget_delta", repr(TOTAL_DELTA), ""),
        ("fraction_bits", FRACTION_BITS, ""),
        ("count_share", repr(COUNT_SHARE), "the count is known-ish: most of the budget goes to the sum"),
        ("packing", "true", "all 31 values in one Paillier plaintext: one encryption per update"),
    ]
    lines = [f"[streams.{STREAM}]".ljust(38) + "# one clipped model delta per client per round"]
    for key, value, comment in rows:
        line = f"{key} = {value}"
        lines.append(line.ljust(38) + f"# {comment}" if comment else line)
    return "\n".join(lines) + "\n"


# -- the model server (the demo's main process) -------------------------------------------
class _Workers:
    """The client processes and the JSON lines they print."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.lines: queue.Queue = queue.Queue()

    def start(self, argv: list[str], env: dict) -> None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        self.procs.append(proc)
        threading.Thread(target=self._pump, args=(len(self.procs) - 1, proc), daemon=True).start()

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass
        self.lines.put({"event": "eof", "worker": index})

    def collect(self, event: str, count: int, timeout: float, round_: int | None = None) -> list[dict]:
        """Wait for ``count`` messages of ``event`` (for ``round_``)."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                msg = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the client processes did not all report {event!r} in {timeout:.0f} s") from None
            if msg.get("event") == "error":
                raise RuntimeError(f"client process {msg.get('worker')} failed: {msg.get('message')}")
            if msg.get("event") == "eof":
                raise RuntimeError(f"client process {msg.get('worker')} exited early "
                                   f"(status {self.procs[msg['worker']].wait()})")
            if msg.get("event") == event and (round_ is None or msg.get("round") == round_):
                got.append(msg)
        return got

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(f"client process {i} exited early (status {p.returncode})")

    def stop(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def run(args) -> int:
    rounds = 8 if args.rounds is None else args.rounds
    if rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    clients = getattr(args, "clients", None) or CLIENTS
    processes = max(1, min(args.producers, clients))
    seed = DEFAULT_SEED if args.seed is None else args.seed

    try:
        Xtr, ytr, Xte, yte = load_split(seed)
    except ImportError as err:
        print(f"the federated scenario needs scikit-learn for its data set ({err}); install the demo extra: "
              "pip install -e '.[demo]'", file=sys.stderr)
        return 2
    shards = shard(len(ytr), clients, seed)
    t_start = time.monotonic()

    with demo_testbed(streams_toml(rounds, clients), args.state) as system:
        stream = system.config.policy.streams[STREAM]
        exchange = f"{system.config.broker.topology.prefix}.model"
        workdir = system.state / "federated"
        workdir.mkdir(exist_ok=True)
        # Each client process gets only its own hospitals' rows.
        owners = [list(range(i, clients, processes)) for i in range(processes)]
        for i, mine in enumerate(owners):
            arrays = {"client_ids": np.array(mine)}
            for c in mine:
                arrays[f"X_{c}"], arrays[f"y_{c}"] = Xtr[shards[c]], ytr[shards[c]]
            np.savez(workdir / f"worker{i}.npz", **arrays)

        model_conn = amqp.connect(system.config.broker, heartbeat=0)  # idle between rounds
        model_ch = model_conn.channel()
        model_ch.exchange_declare(exchange, exchange_type="fanout", auto_delete=False)
        workers = _Workers()
        try:
            with Consumer(system.config, STREAM) as consumer:
                if consumer.budget(STREAM).budget["releases"]:
                    print(f"the state directory {system.state} has been used for training already (its ledger "
                          "holds releases); use a fresh --state", file=sys.stderr)
                    return 1
                plan = consumer.enclave.policy.streams[STREAM].noise_plan()
                sum_sd = plan.sum_scale / (1 << stream.fraction_bits)
                print(f"{clients} hospitals ({len(ytr)} training rows, {min(map(len, shards))}-"
                      f"{max(map(len, shards))} each) in {processes} producer processes; {len(yte)} held-out rows; "
                      f"data split seed {seed}")
                print(f"each round: {LOCAL_EPOCHS} local epochs per hospital, model delta clipped to L2 norm "
                      f"{stream.l2_bound:g}, one sealed {DIMENSION}-value record per hospital")
                print(f"privacy per round: gaussian eps={stream.epsilon:g} delta={stream.delta:g} "
                      f"(rho={plan.rho:.4f}); noise sd {sum_sd:.3f} per coordinate of the sum "
                      f"(~{sum_sd / clients:.4f} of the average), {plan.count_scale:.2f} on the count")
                print(f"budget for the whole training: eps={stream.budget_epsilon:g} at delta="
                      f"{stream.budget_delta:g}, composed in zCDP\n")

                for i in range(processes):
                    workers.start([sys.executable, "-m", "sealedsum.demos.federated", "--client-worker",
                                   "--config", str(system.config_path), "--shards", str(workdir / f"worker{i}.npz"),
                                   "--exchange", exchange, "--worker", str(i)], system.env)
                workers.collect("ready", processes, READY_TIMEOUT)

                releases = _ReleaseWaiter(consumer, workers)
                w = np.zeros(DIMENSION)
                budget = None
                for r in range(1, rounds + 1):
                    t0 = time.monotonic()
                    _broadcast(model_ch, exchange, {"round": r, "weights": w.tolist()})
                    release = releases.wait(r, ROUND_TIMEOUT)
                    if isinstance(release, BudgetExhausted):
                        print(f"round {r}: the stream's budget is exhausted; training stops", file=sys.stderr)
                        return 1
                    reports = workers.collect("round", processes, 60, round_=r)
                    clipped = sum(m["clipped"] for m in reports)
                    sent = sum(m["clients"] for m in reports)
                    # Only released (noised) numbers: average = noised sum / noised count. A released
                    # window holds between min_batch and window_records records, so clamping the
                    # noised count to that public range is post-processing: it costs no privacy.
                    count = min(max(release.count, stream.min_batch), stream.max_window_records)
                    avg = np.array(release.sum) / count
                    w = w + avg
                    budget = release.budget
                    print(f"round {r}/{rounds}  accuracy {100 * accuracy(w, Xte, yte):5.1f}%  "
                          f"clipped {clipped}/{sent}  released count {release.count}  "
                          f"privacy spent eps {budget['spent_epsilon']:.3f} (rho {budget['spent_rho']:.4f}) "
                          f"of {budget['budget_epsilon']:g} at delta {budget['budget_delta']:g}  "
                          f"[{time.monotonic() - t0:.1f} s]", flush=True)
                _broadcast(model_ch, exchange, {"done": True})
                notice = releases.wait(None, 5)
                if isinstance(notice, BudgetExhausted):
                    print("the enclave has closed the stream: its privacy budget is spent")
                workers.stop(30)
        except RuntimeError as err:
            print(f"federated demo failed: {err} (sidecar log: {system.log_path})", file=sys.stderr)
            return 1
        finally:
            workers.stop(0)
            try:
                model_ch.exchange_delete(exchange)
                model_conn.close()
            except Exception:  # noqa: BLE001 - best effort, like the rest of the clean-up
                pass

    central = accuracy(train_central(Xtr, ytr), Xte, yte)
    private = accuracy(w, Xte, yte)
    gap = 100 * (central - private)
    eps, rho = budget["spent_epsilon"], budget["spent_rho"]
    print(f"\nnon-private model (same logistic regression, centralised on the pooled training data): "
          f"accuracy {100 * central:.1f}%")
    print(f"comparison: federated with DP {100 * private:.2f}% vs non-private {100 * central:.2f}% -> "
          f"gap {gap:.2f} points; total privacy spent eps={eps:.4f} delta={budget['budget_delta']:g} "
          f"(rho={rho:.4f}) over {rounds} rounds")
    print(f"(ran {time.monotonic() - t_start:.0f} s; the privacy unit is one hospital's whole update in a round, "
          f"and the eps above covers all {rounds} rounds of every hospital)")
    failed = []
    if gap > MAX_GAP_POINTS:
        failed.append(f"the accuracy gap {gap:.2f} points is above {MAX_GAP_POINTS:g}")
    if eps > TOTAL_EPSILON * (1 + 1e-9):
        failed.append(f"the privacy spent eps={eps:.4f} is above {TOTAL_EPSILON:g}")
    for f in failed:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failed else 0


def _broadcast(channel, exchange: str, message: dict) -> None:
    """Publish the public model (or the end of training) to every client process."""
    channel.basic_publish(exchange, "", json.dumps(message).encode(), properties=amqp.properties("model"))


class _ReleaseWaiter:
    """Verified releases of one consumer, read with a short idle timeout so the client
    processes can be watched in between. One generator is kept across rounds, so each
    release is acknowledged when the next one is asked for."""

    def __init__(self, consumer, workers: _Workers) -> None:
        self.consumer = consumer
        self.workers = workers
        self._it = None

    def wait(self, window: int | None, timeout: float):
        """The release of ``window`` (or a budget notice); with ``window=None``, whatever
        comes next, or ``None`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._it is None:
                self._it = self.consumer.releases(idle_timeout=2)
            try:
                message = next(self._it)
            except StopIteration:
                self._it = None
                if window is not None:
                    self.workers.check_alive()
                continue
            if window is None or isinstance(message, BudgetExhausted) or message.window == window:
                return message
            print(f"  (ignoring a release for window {message.window} while waiting for round {window})",
                  file=sys.stderr)
        if window is None:
            return None
        raise RuntimeError(f"no release for round {window} within {timeout:.0f} s (a window below min_batch "
                           "is withheld; is every client process sending?)")


# -- the client processes -----------------------------------------------------------------
def worker_main(argv: list[str]) -> int:
    """One producer process: some hospitals, one Producer connection, one producer id each."""
    p = argparse.ArgumentParser(prog="python -m sealedsum.demos.federated")
    p.add_argument("--client-worker", action="store_true", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--shards", required=True, help="the .npz file with this process's hospitals")
    p.add_argument("--exchange", required=True, help="the fanout exchange the model is broadcast on")
    p.add_argument("--worker", type=int, default=0)
    a = p.parse_args(argv)

    def say(event: str, **fields) -> None:
        print(json.dumps({"event": event, "worker": a.worker, **fields}), flush=True)

    try:
        return _client_loop(a, say)
    except Exception as err:  # noqa: BLE001 - reported to the model server, which stops the demo
        say("error", message=f"{type(err).__name__}: {err}")
        return 1


def _client_loop(a, say) -> int:
    logs.setup("producer", "WARNING")
    cfg = config_mod.load(a.config)
    data = np.load(a.shards)
    ids = [int(c) for c in data["client_ids"]]
    hospitals = {c: (data[f"X_{c}"], data[f"y_{c}"]) for c in ids}

    conn = amqp.connect(cfg.broker, heartbeat=0)  # idle while the others encrypt
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    ch.queue_bind(q, a.exchange)
    producer = Producer(cfg)
    # One producer id per hospital, kept for the whole training: the enclave takes at most
    # one record per id and window (max_records_per_producer = 1).
    sealers = {c: RecordSealer(producer.enclave, cfg.requirements, os.urandom(16)) for c in ids}
    bound = sealers[ids[0]].stream(STREAM).l2_bound  # the attested bound, not a constant
    say("ready", clients=len(ids))
    last = time.monotonic()
    try:
        for _method, _props, body in ch.consume(q, auto_ack=True, inactivity_timeout=2):
            if body is None:
                if time.monotonic() - last > 2 * ROUND_TIMEOUT:
                    raise TimeoutError(f"no model from the server for {2 * ROUND_TIMEOUT} s")
                continue
            last = time.monotonic()
            msg = json.loads(body)
            if msg.get("done"):
                return 0
            r, w = int(msg["round"]), np.array(msg["weights"], dtype=float)
            t0 = time.monotonic()
            clipped = 0
            for c in ids:
                u, was_clipped = clip_l2(local_update(w, *hospitals[c]), bound)
                clipped += was_clipped
                record = sealers[c].seal(STREAM, u.tolist(), window=r)
                try:
                    producer.publish(record)
                except TransportError:
                    # Reconnect once and resend the same sealed bytes: if the first copy did
                    # arrive, the enclave drops this one as a duplicate record id.
                    producer.close()
                    producer = Producer(cfg)
                    producer.publish(record)
            say("round", round=r, clients=len(ids), clipped=clipped, seconds=round(time.monotonic() - t0, 2))
            last = time.monotonic()
    finally:
        producer.close()
        if conn.is_open:
            conn.close()
    return 1


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
