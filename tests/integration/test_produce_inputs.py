"""`sealedsum produce` on real files, against a real broker and sidecar: CSV with a header and
JSON-lines objects count as the plain numbers they hold, and a run interrupted with Ctrl-C
then resumed counts every line exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from sealedsum.consumers.client import Consumer
from tests.integration.conftest import REPO
from tests.integration.test_publisher import releases_of

pytestmark = pytest.mark.integration

# Huge epsilon: the released sums are the true ones to well within 1e-3.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 100.0, "window_records": 20, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def produce(sc, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealedsum", "produce", "--config", str(sc.config_path),
                           "--stream", "s", "--json", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def test_csv_with_a_header_and_jsonl_objects_release_what_plain_numbers_do(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    amounts = [round(1.25 * i + 0.5, 2) for i in range(20)]
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(f"{v}\n" for v in amounts))
    csv = tmp_path / "orders.csv"
    csv.write_text("order_id,customer,amount\n" + "".join(f'{i},"Smith, {i}",{v}\n' for i, v in enumerate(amounts)))
    jsonl = tmp_path / "orders.jsonl"
    jsonl.write_text("".join(json.dumps({"order_id": i, "amount": v}) + "\n" for i, v in enumerate(amounts)))
    with Consumer(sc.config, "s") as consumer:
        runs = [produce(sc, "--input", str(plain)), produce(sc, "--input", str(csv), "--column", "amount"),
                produce(sc, "--input", str(jsonl), "--field", "amount")]
        got = releases_of(consumer, 3)
    for out in runs:
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["sent"] == summary["confirmed"] == 20 and summary["rejected_by_validation"] == 0
    assert "line 1: header: order_id, customer, amount" in runs[1].stderr
    assert sorted(got) == [1, 2, 3]
    for window in (1, 2, 3):
        assert got[window].count == pytest.approx(20, abs=1e-3)
        assert got[window].sum[0] == pytest.approx(sum(amounts), abs=1e-3)
    # Without --column every column is a value: a one-value stream rejects each row.
    out = produce(sc, "--input", str(csv))
    assert out.returncode == 4 and json.loads(out.stdout)["rejected_by_validation"] == 20
    assert "line 2: rejected: " in out.stderr
    # A column the header lacks is a usage error before anything is sent.
    out = produce(sc, "--input", str(csv), "--column", "total")
    assert out.returncode == 2 and "no such column in the header" in out.stderr and out.stdout == ""


RESUME_STREAM = dict(STREAM, window_records=1000, upper=10.0)
LINES = 10_000


@pytest.mark.parametrize("per_message", ["1", "25"])
def test_ctrl_c_prints_the_summary_and_resume_counts_every_line_once(sidecar_factory, tmp_path, per_message):
    sc = sidecar_factory({"s": RESUME_STREAM})
    values = [i % 10 for i in range(LINES)]
    data = tmp_path / "data.csv"
    data.write_text("amount\n" + "".join(f"{v}\n" for v in values))
    state = tmp_path / "resume.json"
    with Consumer(sc.config, "s") as consumer:
        proc = subprocess.Popen([sys.executable, "-m", "sealedsum", "produce", "--config", str(sc.config_path),
                                 "--stream", "s", "--json", "--progress", "--input", str(data), "--resume", str(state),
                                 "--per-message", per_message],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        told = proc.stderr.readline()  # once attested and reading
        assert "line 1: header: amount" in told, told + proc.stderr.read()
        time.sleep(1.0)  # at about 1500 records/s, a good way into the file and far from its end
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        first = json.loads(stdout)
        assert first["interrupted"] is True and 0 < first["confirmed"] < LINES, first
        assert first["confirmed"] <= first["sent"]
        assert "interrupted: " in stderr and f"--resume {state}" in stderr
        saved = json.loads(state.read_text())
        assert saved["lines_done"] == first["resume_line"] > 1
        assert saved["confirmed"] == first["resume_line"] - 1  # every line up to it but the header

        # Another input under the same state file is refused, and sends nothing.
        other = tmp_path / "other.csv"
        other.write_text(data.read_text().replace("amount\n0\n", "amount\n1\n", 1))
        out = produce(sc, "--input", str(other), "--resume", str(state), "--per-message", per_message)
        assert out.returncode == 2 and "another run" in out.stderr, out.stderr

        # The same file changed within the lines sent (same size): refused too.
        original = data.read_text()
        data.write_text(original.replace("\n5\n", "\n6\n", 1))
        out = produce(sc, "--input", str(data), "--resume", str(state), "--per-message", per_message)
        assert out.returncode == 2 and "the input changed" in out.stderr, out.stderr
        assert json.loads(state.read_text()) == saved
        data.write_text(original)

        second = produce(sc, "--input", str(data), "--resume", str(state), "--per-message", per_message, timeout=300)
        assert second.returncode == 0, second.stderr
        rest = json.loads(second.stdout)
        assert rest["resumed_after_line"] == first["resume_line"]
        assert rest["skipped"] == first["resume_line"] - 1  # record lines: not the header
        assert rest["confirmed_all_runs"] == LINES
        got = releases_of(consumer, LINES // 1000, timeout=120)
        # A rerun of a finished run sends nothing.
        again = produce(sc, "--input", str(data), "--resume", str(state))
        assert again.returncode == 0 and json.loads(again.stdout)["sent"] == 0, again.stderr
        # The input grew (a log appended to): the rerun sends the new lines only.
        grown = [3] * 1000
        with data.open("a") as f:
            f.write("".join(f"{v}\n" for v in grown))
        more = produce(sc, "--input", str(data), "--resume", str(state))
        assert more.returncode == 0 and json.loads(more.stdout)["sent"] == len(grown), more.stderr
        got.update(releases_of(consumer, 1, timeout=60))
    values += grown
    assert sorted(got) == list(range(1, len(values) // 1000 + 1))
    assert sum(r.count for r in got.values()) == pytest.approx(len(values), abs=0.01)
    assert sum(r.sum[0] for r in got.values()) == pytest.approx(sum(values), abs=0.01)
    time.sleep(1)
    sc.stop()
    (stats,) = sc.events("stats")[-1:]
    assert stats["accepted"] == len(values)
