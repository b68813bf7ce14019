"""The measurement covers exactly the code the enclave process runs: its import closure.

Command-line code is outside it (a help text can change without forcing every client to
re-pin ``trust.measurements``), and the enclave process loads nothing outside it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sealedsum.sidecar import measurement

REPO = Path(__file__).resolve().parents[2]
# Where each folder installs (pyproject.toml's package-dir), to lay out a wheel-like tree.
INSTALLS_AS = {"sealedsum": "sealedsum", "common": "sealedsum/common", "sidecar": "sealedsum/sidecar",
               "producers": "sealedsum/producers", "consumers": "sealedsum/consumers"}


def test_the_closure_is_the_enclave_process_and_nothing_of_the_commands():
    closure = set(measurement.import_closure())
    assert {"sealedsum.sidecar.enclave_process.__main__", "sealedsum.sidecar.enclave_process.runtime",
            "sealedsum.sidecar.enclave.service", "sealedsum.sidecar.enclave.noise", "sealedsum.common.wire",
            "sealedsum.sidecar.measurement", "sealedsum", "sealedsum.sidecar"} <= closure
    outside = ("sealedsum.commands", "sealedsum.demos", "sealedsum.testbed", "sealedsum.broker",
               "sealedsum.producers", "sealedsum.consumers", "sealedsum.sidecar.platform")
    assert [m for m in closure if m.startswith(outside)] == []


def installed_copy(tmp_path: Path) -> Path:
    """The package laid out as a wheel installs it (sealedsum/common/..., not common/...)."""
    site = tmp_path / "site"
    for folder, target in INSTALLS_AS.items():
        shutil.copytree(REPO / folder, site / target, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def digest_in(site: Path) -> str:
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from sealedsum.sidecar import measurement\n"
            "assert measurement.__file__.startswith(sys.argv[1]), measurement.__file__\n"
            "print(measurement.code_digest().hex())")
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=site, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_help_text_does_not_change_the_measurement_and_enclave_code_does(tmp_path):
    site = installed_copy(tmp_path)
    before = digest_in(site)
    # Installed as a wheel or from this checkout, the same code measures the same.
    assert before == measurement.code_digest().hex()

    produce = site / "sealedsum" / "commands" / "produce.py"
    text = produce.read_text()
    assert 'help="the stream name, as in the attested policy"' in text
    produce.write_text(text.replace("the stream name, as in the attested policy", "which stream to feed"))
    sidecar_help = site / "sealedsum" / "commands" / "sidecar.py"
    sidecar_help.write_text(sidecar_help.read_text().replace("print the platform's public key", "show the key"))
    assert digest_in(site) == before

    service = site / "sealedsum" / "sidecar" / "enclave" / "service.py"
    service.write_text(service.read_text() + "\n# one more comment\n")
    assert digest_in(site) != before


def test_the_enclave_process_imports_nothing_outside_what_is_measured():
    code = textwrap.dedent("""
        import sys
        import sealedsum.sidecar.enclave_process.__main__  # everything the process imports at start
        from sealedsum.sidecar import measurement
        loaded = sorted(m for m in sys.modules if m.startswith("sealedsum"))
        print(",".join(loaded))
        print(",".join(measurement.unmeasured_modules(loaded)))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded, unmeasured = out.stdout.splitlines()
    assert "sealedsum.sidecar.enclave_process.runtime" in loaded.split(",")
    assert unmeasured == ""


def test_the_closure_follows_imports_inside_functions_and_relative_ones(tmp_path, monkeypatch):
    root = tmp_path / "toyroot"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "entry.py": "from toyroot import a\ndef later():\n    from toyroot.sub import lazy\n",
        "a.py": "from .sub.helpers import THING\nimport json\n",
        "cli.py": "HELP = 'not imported by the entry'\n",
        "sub/__init__.py": "",
        "sub/helpers.py": "THING = 1\n",
        "sub/lazy.py": "from toyroot.a import THING as X\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    closure = measurement.import_closure("toyroot.entry", root="toyroot")
    assert sorted(closure) == ["toyroot", "toyroot.a", "toyroot.entry", "toyroot.sub", "toyroot.sub.helpers",
                               "toyroot.sub.lazy"]
    assert "toyroot.a" not in sys.modules  # measuring imports packages only, never a measured module


def test_an_entry_without_source_is_an_error_not_an_empty_measurement():
    with pytest.raises(ValueError):
        measurement.import_closure("sealedsum.sidecar.no_such_entry")
