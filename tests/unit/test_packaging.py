"""The distribution: one top-level package, ``sealedsum``, however it is installed.

The user's folders (``common/``, ``sidecar/``, ``producers/``, ``consumers/``) stay at
the top of the repository; pyproject.toml maps them under the ``sealedsum`` namespace.
A wheel built from the repository must therefore hold ``sealedsum/`` and its metadata
and nothing else, so that no generic ``common`` lands in site-packages.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("common", "sidecar", "producers", "consumers", "sealedsum")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (found,) = out.glob("sealedsum-*.whl")
    return found


def test_the_wheel_installs_only_the_sealedsum_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"sealedsum"}, sorted(tops)
    for role in ("common", "sidecar", "producers", "consumers"):
        assert f"sealedsum/{role}/__init__.py" in names, role
    (info,) = dist_info
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "sealedsum = sealedsum." in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License: Apache-2.0" in metadata or "License-Expression: Apache-2.0" in metadata
    assert any(n.startswith(info) and n.endswith("/LICENSE") for n in names), "LICENSE is not in the wheel"
    assert "Apache License" in (REPO / "LICENSE").read_text() and "Version 2.0" in (REPO / "LICENSE").read_text()
    # Every source file of the user's folders is in the wheel, under the namespace.
    for folder in ("common", "sidecar", "producers", "consumers"):
        for path in (REPO / folder).rglob("*.py"):
            assert f"sealedsum/{path.relative_to(REPO).as_posix()}" in names, path


def test_the_installed_wheel_imports_under_the_namespace(wheel, tmp_path):
    site = tmp_path / "site"
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--target", str(site), str(wheel)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert installed == ["sealedsum"]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import importlib.util\n"
        "import sealedsum.producers, sealedsum.consumers, sealedsum.common.wire, sealedsum.sidecar.enclave\n"
        "from sealedsum.producers.client import Producer\n"
        "from sealedsum.consumers.client import Consumer\n"
        "assert sealedsum.common.wire.__file__.startswith(sys.argv[1]), sealedsum.common.wire.__file__\n"
        "assert importlib.util.find_spec('common') is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_version_is_the_packages(wheel):
    """``sealedsum --version``, the package's ``__version__`` and the wheel's metadata agree."""
    import tomllib

    from sealedsum import __version__
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert __version__ == declared and wheel.name.startswith(f"sealedsum-{declared}-")
    out = subprocess.run([sys.executable, "-m", "sealedsum", "--version"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"sealedsum {declared}", out
