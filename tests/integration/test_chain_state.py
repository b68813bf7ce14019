"""A consumer that remembers the ledger chains it verified (docs/protocol.md section 15.5), over
the real broker and real sidecar processes, against the two things an operator who holds the
state directory can do: start the sidecar again on a fresh state directory with a copy of
platform.key (same measurement, a ledger from genesis and a fresh budget), and put back an older
copy of the sealed state together with the platform's counter (a window released again with
other noise). A new Consumer on the same chain-state file refuses both, and `sealedsum consume`
exits 1 saying why; a consumer that remembers nothing takes them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from sealedsum.common.errors import ChainContradiction, ChainRestarted, WindowRepeated
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.sidecar.platform.emulated import COUNTER_FILE, KEY_FILE

from tests.integration.conftest import REPO, relaunch
from tests.integration.test_budget import collect
from tests.integration.test_cli import run

pytestmark = pytest.mark.integration

# Two records close a window; the budget is far away.
STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 2, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 100.0}


def produce_windows(sc, windows: int) -> None:
    with Producer(sc.config) as producer:
        for _ in range(2 * windows):
            producer.send("s", [1.0])


def remembered(path) -> dict:
    (entry,) = json.loads(path.read_text())["chains"]
    return entry


def test_a_sidecar_started_again_on_a_fresh_state_directory_is_refused(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    with Consumer(sc.config, "s", chain_state=chains) as consumer:
        produce_windows(sc, 2)
        assert [m.budget["releases"] for m in collect(consumer, 2)] == [1, 2]
    before = chains.read_text()
    assert remembered(chains)["releases"] == 2 and remembered(chains)["stream"] == "s"

    # The operator keeps platform.key and nothing else, and starts the sidecar again.
    assert sc.stop() == 0
    old = sc.state.with_name("state.old")
    sc.state.rename(old)
    sc.state.mkdir()
    shutil.copy(old / KEY_FILE, sc.state / KEY_FILE)
    relaunch(sc)  # it attests: same platform, same measurement, new keys

    cli = subprocess.Popen([sys.executable, "-m", "sealedsum", "consume", "--config", str(sc.config_path),
                            "--stream", "s", "--chain-state", str(chains), "--idle-timeout", "60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert "waiting for releases" in cli.stderr.readline()  # its queue is bound
    with Consumer(sc.config, "s", chain_state=chains) as consumer, \
            Consumer(sc.config, "s", chain_state=None) as forgetful:
        produce_windows(sc, 1)
        with pytest.raises(ChainRestarted, match="release 1 of stream 's' \\(window 1\\) starts the ledger "
                                                 "again from genesis after 2 release") as err:
            collect(consumer, 1)
        assert consumer.verifier.rejected == 1
        assert str(chains) in err.value.hint and "rolled back" in err.value.hint
        # Without memory the same release looks like the start of a stream: the attack works.
        (fresh,) = collect(forgetful, 1)
        assert fresh.budget["releases"] == 1 and fresh.window == 1
    stdout, stderr = cli.communicate(timeout=90)
    assert cli.returncode == 1, stderr
    assert stdout == ""  # nothing was printed as verified
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: release 1 of stream 's' (window 1) starts the ledger again from genesis")
    assert "(hint: the sidecar's sealed state was rolled back, or replaced" in error and str(chains) in error
    assert chains.read_text() == before  # the refused release was not remembered


def test_a_rolled_back_state_and_counter_is_refused(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    with Consumer(sc.config, "s", chain_state=chains) as consumer:
        produce_windows(sc, 1)
        (first,) = collect(consumer, 1)
    time.sleep(1.5)  # the tick after the confirm checkpoints the state without the release pending
    (state_dir,) = {p.parent for p in sc.state.rglob("state.sealed")}
    saved = {state_dir / "state.sealed", state_dir / "state.journal", sc.state / COUNTER_FILE}
    for path in saved:
        shutil.copy(path, tmp_path / path.name)
    with Consumer(sc.config, "s", chain_state=chains) as consumer:  # a new run continues the chain
        produce_windows(sc, 1)
        (second,) = collect(consumer, 1)
    assert (first.window, second.window) == (1, 2) and remembered(chains)["releases"] == 2

    # The operator puts back the sealed state and the counter from when one release was spent.
    assert sc.stop() == 0
    for path in saved:
        shutil.copy(tmp_path / path.name, path)
    relaunch(sc)  # the counter agrees with the state, so the emulated platform cannot tell
    with Consumer(sc.config, "s", chain_state=chains) as consumer:
        assert consumer.budget("s").budget["releases"] == 1  # the enclave's ledger went back
        produce_windows(sc, 1)
        with pytest.raises(WindowRepeated, match="release 2 of stream 's' \\(window 2\\) releases window 2 "
                                                 "again with a different body") as err:
            collect(consumer, 1)
    assert isinstance(err.value, ChainContradiction)


def test_a_damaged_chain_state_file_stops_the_command_before_it_connects(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    chains = tmp_path / "chains.json"
    chains.write_text('{"format": "sealedsum/consumer-chains", "version": 1, "chains": [')
    # A broker that cannot be reached: the file is read, and refused, first (else this is exit 3).
    out = run("consume", "--config", str(sc.config_path), "--stream", "s", "--chain-state", str(chains),
              env={"AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"})
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: the chain-state file {chains} is not JSON") and "delete it to start over" in line
    assert chains.read_text().endswith('"chains": [')  # left as it was
    # And the testbed's own config names a file beside it, which a plain run uses.
    assert sc.config.chain_state == sc.workdir / "consumer-chains.json"
