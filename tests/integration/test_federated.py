"""The federated scenario end to end: real platform, enclave, four producer processes,
2048-bit Paillier, eight rounds; the DP model must stay within 3 points of the
non-private one at a total eps <= 8 (delta = 1e-6).

This test fails a correct system in about 1% of runs: the enclave's noise cannot be seeded,
and in a simulation of the same training with the same noise (docs/federated.md, below the
table of runs) the gap exceeded 3 points in about 1% of 1,200 runs. At a total of eps 8 that
is not cheap to lower (more rounds would each get more noise), so a lone failure of the gap
assertion is expected now and then; rerun before suspecting the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pika
import pika.exceptions as pe
import pytest

from tests.integration.conftest import REPO

ROUND = re.compile(r"^round (\d+)/(\d+)\s+accuracy\s+([\d.]+)%\s+clipped (\d+)/(\d+)\s+released count (-?\d+)\s+"
                   r"privacy spent eps ([\d.]+) \(rho ([\d.]+)\) of 8 at delta 1e-06", re.M)
FINAL = re.compile(r"^comparison: federated with DP ([\d.]+)% vs non-private ([\d.]+)% -> gap (-?[\d.]+) points; "
                   r"total privacy spent eps=([\d.]+) delta=([\d.e+-]+) \(rho=([\d.]+)\) over (\d+) rounds$", re.M)


@pytest.mark.slow
def test_federated_demo_trains_within_3_points_at_eps_8(amqp_url, tmp_path):
    state = tmp_path / "state"
    out = subprocess.run([sys.executable, "-m", "sealedsum", "demo", "--scenario", "federated", "--state", str(state)],
                         cwd=REPO, env=dict(os.environ, AMQP_URL=amqp_url), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr

    rounds = ROUND.findall(out.stdout)
    assert [int(r[0]) for r in rounds] == list(range(1, 9)), out.stdout
    spent = [float(r[6]) for r in rounds]
    assert spent == sorted(spent) and spent[-1] <= 8.0 + 1e-6  # the ledger composes, within the budget
    for _, _, acc, clipped, clients, *_ in rounds:
        assert 0 <= float(acc) <= 100 and 0 <= int(clipped) <= int(clients) == 40

    final = FINAL.search(out.stdout)
    assert final, out.stdout
    private, central, gap, eps, delta, _rho, n = final.groups()
    private, central, gap, eps = float(private), float(central), float(gap), float(eps)
    assert int(n) == 8 and float(delta) == 1e-6
    assert abs((central - private) - gap) < 0.02
    assert central >= 93.0  # the non-private model is a sane logistic regression
    assert gap <= 3.0, out.stdout  # fails a correct system in about 1% of runs (see the docstring)
    assert eps <= 8.0 + 1e-6 and abs(eps - spent[-1]) < 1e-3
    assert "non-private model" in out.stdout

    # The model server deleted its fanout exchange; DemoSystem removed the rest.
    prefix = tomllib.loads((state / "sealedsum.toml").read_text())["broker"]["prefix"]
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        with pytest.raises(pe.ChannelClosedByBroker):
            conn.channel().exchange_declare(f"{prefix}.model", passive=True)
    finally:
        conn.close()
