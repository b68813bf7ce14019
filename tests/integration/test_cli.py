"""The `sealedsum` command as users run it: exit codes, one-line errors, summaries, JSON output."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import REPO
from tests.integration.test_end_to_end import STREAM

pytestmark = pytest.mark.integration


def run(*args, input: str | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealedsum", *args], input=input, capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, **(env or {})), timeout=timeout)


def test_attest_prints_the_verified_document(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    out = run("attest", "--config", str(sc.config_path), env={"AMQP_URL": sc.config.broker.url})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["measurement"] == sc.measurement.hex()
    assert doc["policy"]["streams"]["s"]["epsilon"] == 1.0
    assert doc["keys"]["paillier_n_bits"] == 1024


def test_attest_fails_with_one_line_and_exit_1_for_an_unknown_measurement(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    text = sc.config_path.read_text().replace(sc.measurement.hex(), "ab" * 32)
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    out = run("attest", "--config", str(bad))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: measurement ") and "not in trust.measurements" in lines[0]
    assert out.stdout == ""


def test_no_broker_is_exit_3_with_a_hint(tmp_path, sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    out = run("attest", "--config", str(sc.config_path), env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"})
    assert out.returncode == 3
    assert "cannot reach the broker" in out.stderr and "rabbitmq-server -detached" in out.stderr
    assert "guest:guest" not in out.stderr  # passwords are redacted


def test_produce_and_consume_from_the_command_line(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    consumer = subprocess.Popen([sys.executable, "-m", "sealedsum", "consume", "--config", str(sc.config_path),
                                 "--stream", "s", "--count", "1", "--json", "--idle-timeout", "60"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = "\n".join(["# comment", *[str(v) for v in range(20)], "not a number", "[1, 2]", "500"]) + "\n"
    # The consumer says it is waiting only once its queue is bound.
    assert "waiting for releases" in consumer.stderr.readline()
    out = run("produce", "--config", str(sc.config_path), "--stream", "s", "--json", input=lines)
    assert out.returncode == 4, out.stderr  # some lines rejected
    summary = json.loads(out.stdout)
    assert summary["sent"] == summary["confirmed"] == 21
    assert summary["rejected_by_validation"] == 2 and summary["clipped"] == 1
    assert "line 22: rejected" in out.stderr and "line 23: rejected" in out.stderr
    stdout, stderr = consumer.communicate(timeout=90)
    assert consumer.returncode == 0, stderr
    (view,) = [json.loads(line) for line in stdout.splitlines()]
    assert {"stream", "window", "count", "sum", "mean", "mechanism", "epsilon", "delta"} <= set(view)
    assert view["stream"] == "s" and view["window"] == 1 and view["mechanism"] == "laplace"


def test_measure_is_reproducible_and_matches_the_running_enclave(sidecar_factory):
    sc = sidecar_factory({"s": STREAM})
    a = run("measure", "--config", str(sc.config_path))
    b = run("measure", "--config", str(sc.config_path))
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout.strip() == sc.measurement.hex()
    assert sc.events("enclave measured")[0]["measurement"] == sc.measurement.hex()


def test_config_errors_are_exit_2(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text('[streams.s]\ndimension = 1\nlower = 0\nupper = 1\nmin_batch = 1\nwindow_records = 1\n'
                   'mechanism = "laplace"\nepsilon = 1\ncolour = "red"\n')
    out = run("measure", "--config", str(bad))
    assert out.returncode == 2 and "unknown key(s) colour" in out.stderr


DEMO_LIMIT_SECONDS = 60  # issue 2: `sealedsum demo` "exits 0 within a minute"


def test_the_readmes_demo_command_prints_releases_and_exits_0_within_a_minute(amqp_url, tmp_path):
    """The README's `.venv/bin/sealedsum demo`, exactly: the console script, no arguments (so
    the default 3 rounds of 4 producers x 25 records and 2048-bit keys). Only TMPDIR is set,
    so that its default temporary state directory lands in tmp_path."""
    import glob
    import signal
    import time

    script = os.path.join(os.path.dirname(sys.executable), "sealedsum")
    assert os.access(script, os.X_OK), f"no console script {script}: is the project installed (pip install -e)?"
    started = time.monotonic()
    proc = subprocess.Popen([script, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=dict(os.environ, AMQP_URL=amqp_url, TMPDIR=str(tmp_path)), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=DEMO_LIMIT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the demo and the sidecar, producers it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"`sealedsum demo` still running after {DEMO_LIMIT_SECONDS} s:\n{stdout}\n{stderr}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, stdout + stderr
    print(f"sealedsum demo: {elapsed:.1f} s")
    for window in (1, 2, 3):
        assert f"purchases    window {window} " in stdout and f"basket_sizes window {window} " in stdout, stdout
    # Each window: count, sum and mean of purchases, six histogram buckets, released next to the true value.
    rows = [line for line in stdout.splitlines() if re.search(r"\breleased +-?[\d.]+ +true +[\d.]+", line)]
    assert len(rows) == 3 * (3 + 6), stdout
    assert "no release arrived" not in stdout and "failure" not in stderr
    # Both streams spend the one budget of group purchases: three windows of each, composed in
    # zCDP (docs/protocol.md section 15.6), the total printed from the signed budget report.
    rho = 3 * (0.5 + (math.sqrt(math.log(1e6) + 1) - math.sqrt(math.log(1e6))) ** 2)
    eps = rho + 2 * math.sqrt(rho * math.log(1e6))
    total = f"privacy spent eps {eps:.4g} (rho {rho:.4f}) of 20 at delta 1e-06 " \
            "(budget group purchases: streams basket_sizes, purchases)"
    assert total in stdout, stdout
    assert re.search(r"^measurement +[0-9a-f]{64} \(2048-bit Paillier keys\)$", stdout, re.M), stdout
    # Its temporary state directory (platform key, config, log) goes when it ends well.
    assert glob.glob(str(tmp_path / "sealedsum-demo-*")) == [] and "removed the temporary state directory" in stdout


def test_demo_without_a_broker_says_how_to_start_one(tmp_path):
    out = run("demo", "--state", str(tmp_path / "demo"), env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"},
              timeout=60)
    assert out.returncode == 3
    assert "rabbitmq-server -detached" in out.stderr and "AMQP_URL" in out.stderr
    # Without --state, no temporary directory is left behind either.
    out = run("demo", env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F", "TMPDIR": str(tmp_path)}, timeout=60)
    assert out.returncode == 3 and list(tmp_path.glob("sealedsum-demo-*")) == []


def test_produce_counts_what_the_broker_refused(sidecar_factory):
    """Pipelined `produce` into a full records queue: each line is confirmed or reported as
    not confirmed, the summary adds up, and the exit code says a transport failure."""
    import time

    from sealedsum.common import amqp
    from sealedsum.common.topology import RECORD_ROUTING_KEY

    sc = sidecar_factory({"s": STREAM}, broker_extra="max_queued_records = 5\nreconnect_seconds = 1")
    proc = subprocess.Popen([sys.executable, "-m", "sealedsum", "produce", "--config", str(sc.config_path),
                             "--stream", "s", "--json", "--encrypt-workers", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    proc.stdin.write("1.0\n")
    proc.stdin.flush()
    time.sleep(3.0)  # it attests (the enclave must be up for that) and sends the first record
    assert sc.stop() == 0  # now nothing consumes
    # Fill the queue to its limit one message at a time (a quorum queue enforces the limit
    # late for a burst in flight); from then on the broker nacks.
    conn = amqp.connect(sc.config.broker)
    ch = conn.channel()
    ch.confirm_delivery()
    for _ in range(10):
        try:
            amqp.publish_confirmed(ch, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY, b"filler" * 20,
                                   amqp.properties("record"))
        except Exception:  # noqa: BLE001 - the nack we are waiting for
            break
    before = ch.queue_declare(sc.config.broker.topology.records_queue, passive=True).method.message_count
    conn.close()
    proc.stdin.write("".join(f"{i % 10}\n" for i in range(30)))
    proc.stdin.close()
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 3, stderr  # EXIT_TRANSPORT
    summary = json.loads(stdout)
    refused = [line for line in stderr.splitlines() if ": not confirmed: " in line]
    assert refused and all("nack" in line for line in refused)
    assert summary["confirmed"] >= 1 and summary["confirmed"] + len(refused) == summary["sent"]
    conn = amqp.connect(sc.config.broker)
    try:
        depth = conn.channel().queue_declare(sc.config.broker.topology.records_queue, passive=True).method.message_count
    finally:
        conn.close()
    assert depth == before + summary["confirmed"] - 1  # the first record went to the enclave


def test_produce_refuses_a_broken_attestation_and_publishes_nothing(sidecar_factory, tmp_path):
    """`sealedsum produce` against an enclave it must not trust (measurement not allowed, or
    quotes not signed by the pinned platform key): exit 1, one line saying why, no record
    on the records exchange and none counted by the enclave. The same command with the
    genuine config then does publish, so the capture below would have seen a record."""
    from sealedsum.common.attestation import encode_platform_key
    from sealedsum.common.topology import RECORD_ROUTING_KEY
    from sealedsum.sidecar.platform.emulated import EmulatedPlatform
    from tests.integration.test_end_to_end import capture_queue, drain

    sc = sidecar_factory({"s": STREAM})
    conn, q = capture_queue(sc, sc.config.broker.topology.records_exchange, RECORD_ROUTING_KEY)
    genuine = sc.config_path.read_text()
    real_key = encode_platform_key(sc.platform.public_key())
    assert genuine.count(sc.measurement.hex()) == 1 and genuine.count(real_key) == 1
    cases = {
        "measurement": (genuine.replace(sc.measurement.hex(), "ab" * 32),
                        f"error: measurement {sc.measurement.hex()} is not in trust.measurements"),
        "platform_key": (genuine.replace(real_key, encode_platform_key(EmulatedPlatform.generate().public_key())),
                         "error: quote: signature does not verify"),
    }
    lines = "".join(f"{v}\n" for v in range(20))
    for name, (text, reason) in cases.items():
        bad = tmp_path / f"bad-{name}.toml"
        bad.write_text(text)
        out = run("produce", "--config", str(bad), "--stream", "s", "--json", input=lines)
        assert out.returncode == 1, (name, out.stdout, out.stderr)
        stderr = out.stderr.strip().splitlines()
        assert len(stderr) == 1 and stderr[0].startswith(reason), (name, out.stderr)
        assert out.stdout == ""  # no summary: nothing was read, sealed or sent
    assert drain(conn, q, expect=0, timeout=1.0) == []
    out = run("produce", "--config", str(sc.config_path), "--stream", "s", "--json", input="1.5\n")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["confirmed"] == 1
    assert len(drain(conn, q, expect=1)) == 1
    conn.close()
    assert sc.stop() == 0
    assert sc.events("stats")[-1]["accepted"] == 1  # the genuine record only


def test_consume_reports_forged_and_altered_results_loudly_and_exits_1(sidecar_factory):
    """`sealedsum consume`, run as the README shows it (until interrupted), sees a genuine
    release, then an altered copy and a forgery: it prints the genuine one only, an error
    line on stderr for each of the others, and exits 1 when interrupted (README: exit 1,
    "forged results were seen"), not 130."""
    import queue
    import signal
    import threading

    from sealedsum.producers.client import Producer
    from tests.integration.test_end_to_end import capture_queue, drain
    from tests.integration.test_faults import altered_and_forged

    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    conn, q = capture_queue(sc, t.results_exchange, "s")
    proc = subprocess.Popen([sys.executable, "-m", "sealedsum", "consume", "--config", str(sc.config_path),
                             "--stream", "s", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            # As from a terminal: a test run in the background (`cmd &`) ignores
                            # SIGINT, and the child would inherit that and never see the Ctrl-C.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [err_lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()

    def stderr_until(predicate, timeout=60) -> list[str]:
        seen = []
        while True:
            line = err_lines.get(timeout=timeout)
            seen.append(line)
            if predicate(line):
                return seen

    try:
        assert "waiting for releases" in stderr_until(lambda line: "waiting for releases" in line)[-1]
        with Producer(sc.config) as producer:
            for i in range(20):
                producer.send("s", [float(i)])
        ((_, genuine),) = drain(conn, q, expect=1)
        altered, forged = altered_and_forged(genuine)
        ch = conn.channel()
        for body in (altered, forged):
            ch.basic_publish(t.results_exchange, "s", body)
        rejected = []
        stderr_until(lambda line: "result rejected" in line and len(rejected.append(line) or rejected) == 2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)  # not communicate(): stderr is the reader thread's
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        stdout = proc.stdout.read()
        conn.close()
    reader.join(10)
    rest = []
    while not err_lines.empty():
        rest.append(err_lines.get())
    for line in rejected:
        event = json.loads(line)
        assert event["level"] == "error" and event["event"] == "result rejected"
        assert event["reason"] == "result: signature does not verify"
    assert any("received 1 verified release(s), rejected 2" in line for line in rest), rest
    assert rest[-1].startswith("error: 2 result(s) failed verification (forged, altered"), rest
    (view,) = [json.loads(line) for line in stdout.splitlines()]
    assert view["stream"] == "s" and view["window"] == 1  # the genuine release, once
    assert proc.returncode == 1


def test_a_prefix_no_sidecar_ever_used_fails_at_once_and_names_broker_prefix(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    text = sc.config_path.read_text().replace(f'prefix = "{sc.prefix}"', 'prefix = "never-declared"')
    assert "never-declared" in text
    other = tmp_path / "other.toml"
    other.write_text(text)
    started = time.monotonic()
    out = run("attest", "--config", str(other), env={"AMQP_URL": sc.config.broker.url})
    assert out.returncode == 3, out.stderr
    assert "no exchange 'never-declared.attest'" in out.stderr and "broker.prefix = 'never-declared'" in out.stderr
    assert time.monotonic() - started < 8  # not the 10 s reply timeout


def test_a_wrong_platform_key_says_which_key_to_pin(sidecar_factory, tmp_path):
    from sealedsum.common.attestation import encode_platform_key

    sc = sidecar_factory({"s": STREAM})
    text = re.sub(r'platform_key = "[^"]*"', f'platform_key = "{encode_platform_key(bytes(range(32)))}"',
                  sc.config_path.read_text())
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    out = run("attest", "--config", str(bad), env={"AMQP_URL": sc.config.broker.url})
    assert out.returncode == 1
    assert "signature does not verify" in out.stderr and "sealedsum platform show --state DIR" in out.stderr
