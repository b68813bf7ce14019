"""Over the real broker and real processes: a policy change (enrolling a producer key) is a
new measurement, and the stream's spend, chain and window numbers carry over to it through
the sealed ledger; a change of the stream's privacy parameters makes the enclave refuse to
start, and a rolled-back sealed ledger too (docs/protocol.md, 15.7 and 17)."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealedsum.common import config as config_mod
from sealedsum.common.results import Release
from sealedsum.consumers.chain_audit import ChainVerifier
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.testbed import TRUST_COMMENT, measurement_of, trust_table
from tests.integration.conftest import launch, relaunch
from tests.integration.test_budget import collect
from tests.integration.test_cli import run

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 2, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 20.0}


def change_policy(sc, extra: str = "", replace: tuple[str, str] | None = None) -> bytes:
    """Rewrite the testbed's config as an operator would: a new policy, and the client trust
    table pinning its new measurement. Returns the old measurement."""
    text = sc.config_path.read_text().split("\n" + TRUST_COMMENT)[0]
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    text = text.rstrip("\n") + "\n" + extra
    old = sc.measurement
    sc.code_digest, sc.measurement = measurement_of(text)
    sc.config_path.write_text(text + trust_table(sc.platform.public_key(), sc.measurement))
    sc.config = config_mod.load(sc.config_path, env={})
    return old


def budget_json(sc) -> dict:
    out = run("budget", "--config", str(sc.config_path), "--stream", "s", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def enrol_a_producer() -> str:
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return f'\n[identities.enrolled]\nalice = "{base64.b64encode(key).decode()}"\n'


def test_enrolling_a_producer_keeps_the_spend_the_chain_and_the_window_numbers(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    # A consumer that remembers the chain between runs (it would refuse a chain that starts again).
    chains = tmp_path / "chains.json"
    with Consumer(sc.config, "s", chain_state=chains) as consumer:
        with Producer(sc.config) as producer:
            for _ in range(4):
                producer.send("s", [1.0])
        before = collect(consumer, 2)
    assert [m.budget["releases"] for m in before] == [1, 2]
    spent = budget_json(sc)
    assert spent["releases"] == 2 and spent["spent_epsilon"] == 2.0
    assert sc.stop() == 0

    old = change_policy(sc, enrol_a_producer())
    assert sc.measurement != old  # a new measurement: new sealing key, no access to the old state
    relaunch(sc)
    (inherited,) = sc.events("spend inherited from the sealed ledger")
    assert inherited["stream"] == "s" and inherited["from_measurement"] == old.hex()
    # The signed budget report of the new enclave shows the same spend (not "0 of 20").
    after = budget_json(sc)
    assert (after["releases"], after["spent_epsilon"], after["ledger_head"]) == (2, 2.0, spent["ledger_head"])
    assert after["measurement"] == sc.measurement.hex()

    with Consumer(sc.config, "s", chain_state=chains) as consumer:
        with Producer(sc.config) as producer:
            for _ in range(2):
                producer.send("s", [1.0])
        (third,) = collect(consumer, 1)
    assert isinstance(third, Release) and third.measurement == sc.measurement.hex()
    assert third.budget["releases"] == 3 and third.budget["spent_epsilon"] == 3.0
    assert third.window == 3  # window numbers continue: no window is released twice
    chain = ChainVerifier("s")
    for message in before + [third]:
        chain.add(message)  # release 3's head extends release 2's
    assert chain.releases == 3


def test_changed_privacy_parameters_or_a_rolled_back_ledger_refuse_to_start(sidecar_factory, tmp_path):
    sc = sidecar_factory({"s": STREAM})
    (ledger,) = list((sc.state / "ledger").glob("*.sealed"))
    shutil.copy(ledger, tmp_path / "ledger-before")  # nothing spent yet
    with Consumer(sc.config, "s") as consumer, Producer(sc.config) as producer:
        for _ in range(2):
            producer.send("s", [1.0])
        collect(consumer, 1)
    assert sc.stop() == 0

    change_policy(sc, replace=("budget_epsilon = 20.0", "budget_epsilon = 40.0"))
    proc = launch(sc)
    assert proc.wait(timeout=60) == 2  # refused, and not restarted
    (refused,) = sc.events("a stream's spend was charged under other privacy parameters; refusing to start")
    assert "stream 's' has spent 1 release(s)" in refused["detail"] and "budget_epsilon" in refused["detail"]
    assert "new stream name" in refused["hint"]

    # Back to the original budget, under a new policy still: the spend carries over...
    change_policy(sc, enrol_a_producer(), replace=("budget_epsilon = 40.0", "budget_epsilon = 20.0"))
    relaunch(sc)
    assert budget_json(sc)["releases"] == 1
    assert sc.stop() == 0
    # ...but not once the operator puts back the sealed ledger from before the release.
    shutil.copy(tmp_path / "ledger-before", ledger)
    change_policy(sc, replace=("[identities.enrolled]", "[identities.revoked]"))
    proc = launch(sc)
    assert proc.wait(timeout=60) == 2
    (rolled_back,) = sc.events("sealed state rolled back; refusing to start")
    assert "sealed ledger" in rolled_back["detail"] and "older copy" in rolled_back["detail"]
