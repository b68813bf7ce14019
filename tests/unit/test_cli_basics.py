"""What a new user meets first: `measure` before the [trust] table is filled in, `--config`
naming a directory."""

from __future__ import annotations

import json
import re

import pytest

from sealedsum.commands import main

README_CONFIG = '''
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2F"

[trust]
platform_key = "..."
measurements = {measurements}

[streams.purchases]
lower = 0.0
upper = 100.0
window_records = 100
min_batch = 10
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 10
'''


@pytest.mark.parametrize("measurements", ['[]', '["..."]'])
def test_measure_runs_with_the_readmes_trust_placeholders(tmp_path, capsys, measurements):
    """Measuring needs no trust table: its output is what goes into it."""
    path = tmp_path / "sealedsum.toml"
    path.write_text(README_CONFIG.format(measurements=measurements))
    assert main(["measure", "--config", str(path)]) == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", capsys.readouterr().out)
    # Clients still read it, and refuse it.
    assert main(["attest", "--config", str(path)]) == 2
    assert "platform_key" in capsys.readouterr().err


def test_config_naming_a_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["measure", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a directory" in err and "Traceback" not in err


def test_json_output_rounds_float_dust_and_prints_whole_bucket_counts():
    from sealedsum.commands.consume import to_display_json
    view = {"stream": "h", "count": 9, "epsilon": 0.1, "delta": 1e-13, "budget_spent_epsilon": 1.0000000000000016,
            "sum_noise_scale": 20.0, "buckets": [-7.0, 16.0, 2.5], "sum": -12433.163528442383,
            "mean": 0.30000000000000004, "rho": None, "budget": {"spent_epsilon": 0.30000000000000004}}
    out = json.loads(to_display_json(view))
    assert out["budget_spent_epsilon"] == 1.0 and out["budget"]["spent_epsilon"] == 0.3
    assert out["delta"] == 1e-13 and out["epsilon"] == 0.1 and out["rho"] is None
    assert out["buckets"] == [-7, 16, 2.5] and '"buckets": [-7, 16, 2.5]' in to_display_json(view)
    # The release's sum and mean are printed with every digit the enclave signed.
    assert out["sum"] == -12433.163528442383 and out["mean"] == 0.30000000000000004
    assert view["budget_spent_epsilon"] == 1.0000000000000016  # the view itself is untouched
