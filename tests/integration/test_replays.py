"""Genuine release bytes republished to the results exchange (as any account allowed to publish
there can, and as the enclave itself does with a release the broker had not confirmed when it
reconnects) reach the application once: `Consumer.releases()` yields each window once, with and
without a chain-state file and in a later run on the file, and `sealedsum consume` prints each
once in every output mode, a dropped copy never counting toward --count (docs/protocol.md
section 15.5). Over the real broker, with a real sidecar; the copies are published as guest."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sealedsum.common import amqp
from sealedsum.common.results import Release
from sealedsum.consumers.client import Consumer

from tests.integration.conftest import REPO
from tests.integration.test_chain_state import STREAM, produce_windows
from tests.integration.test_end_to_end import capture_queue, drain

pytestmark = pytest.mark.integration


def consume_cli(sc, *args: str) -> subprocess.Popen:
    """`sealedsum consume` on stream s, once its queue is bound."""
    proc = subprocess.Popen([sys.executable, "-m", "sealedsum", "consume", "--config", str(sc.config_path),
                             "--stream", "s", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stderr.readline()
    if "waiting for releases" not in line:
        proc.kill()
        raise AssertionError(f"consume did not start: {line}{proc.stderr.read()}")
    return proc


def windows(messages) -> list[int]:
    return [m.window for m in messages if isinstance(m, Release)]


def test_republished_releases_reach_the_application_once(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    t = sc.config.broker.topology
    capture, q = capture_queue(sc, t.results_exchange, "s")
    guest = amqp.connect(sc.config.broker)  # the testbed's broker URL is guest's
    publish = guest.channel()

    def republish(body: bytes, times: int) -> None:
        for _ in range(times):
            publish.basic_publish(t.results_exchange, "s", body)

    def next_genuine() -> bytes:
        produce_windows(sc, 1)
        # The capture queue gets the copies too: the new release is what it has not seen.
        new = []
        while not new:
            new = [body for _, body in drain(capture, q, expect=1) if body not in genuine]
        (body,) = new
        return body

    genuine: list[bytes] = []
    chains = tmp_path / "chains.json"
    as_json = consume_cli(sc, "--json", "--count", "4", "--no-chain-state", "--idle-timeout", "60")
    plain = consume_cli(sc, "--chain-state", str(tmp_path / "cli-chains.json"), "--idle-timeout", "20")
    try:
        with Consumer(sc.config, "s", chain_state=chains) as remembering, \
                Consumer(sc.config, "s", chain_state=None) as forgetful:
            genuine.append(next_genuine())
            genuine.append(next_genuine())
            republish(genuine[0], 3)
            republish(genuine[1], 2)
            genuine.append(next_genuine())
            republish(genuine[2], 2)
            genuine.append(next_genuine())
            for consumer in (remembering, forgetful):
                assert windows(consumer.releases(idle_timeout=5)) == [1, 2, 3, 4]
                assert consumer.repeats == 7 and consumer.verifier.rejected == 0

        # A later run on the same file: every copy republished now is known, so none is yielded.
        with Consumer(sc.config, "s", chain_state=chains) as later:
            for body in genuine:
                republish(body, 2)
            assert windows(later.releases(idle_timeout=5)) == [] and later.repeats == 8

        # --count 4: the copies are not counted, so it stops after window 4, having printed each once.
        out, err = as_json.communicate(timeout=90)
        assert as_json.returncode == 0, err
        assert [json.loads(line)["window"] for line in out.splitlines()] == [1, 2, 3, 4]
        assert "received 4 verified release(s), rejected 0, dropped 7 received again" in err
        assert '"level": "error"' not in err and '"level": "warning"' not in err
        out, err = plain.communicate(timeout=90)
        assert plain.returncode == 0, err
        lines = out.splitlines()
        assert [line.split(":")[0] for line in lines] == [f"s window {w}" for w in (1, 2, 3, 4)], out
        assert "received 4 verified release(s), rejected 0, dropped 15 received again" in err
    finally:
        for proc in (as_json, plain):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        guest.close()
        capture.close()
