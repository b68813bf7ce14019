"""What a new user meets first: `measure` before the [trust] table is filled in, `--config`
naming a directory."""

from __future__ import annotations

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
