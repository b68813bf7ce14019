"""Layering, checked on the source with ``ast``: no import cycle between project modules,
commands on top (no library imports one), a pure enclave core, pika only at the edge,
clients never import the sidecar, no ``random``/``np.random`` near noise, no ``assert``
for validation.

Each rule is also run against a small bad snippet, so the scanner itself is known to catch it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "sidecar", "producers", "consumers", "sealedsum")
PIKA_EDGE = {"common/amqp.py", "sidecar/enclave_process/runtime.py", "sidecar/cluster/runtime.py",
             "producers/transport.py", "consumers/transport.py"}


def sources(*packages: str) -> dict[str, ast.Module]:
    out = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            out[rel] = ast.parse(path.read_text(encoding="utf-8"), rel)
    return out


def imported_modules(tree: ast.AST, package: str = "") -> set[str]:
    """Every module an ``import``, ``from ... import`` (absolute or relative to ``package``),
    ``__import__("x")`` or ``importlib.import_module("x")`` names, anywhere in the file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "__import__") or \
                    (isinstance(f, ast.Attribute) and f.attr == "import_module"):
                found.add(node.args[0].value)
    return found


def imports(tree: ast.AST, top: str, package: str = "") -> bool:
    return any(m == top or m.startswith(top + ".") for m in imported_modules(tree, package))


# Where each top-level folder installs (pyproject.toml's package-dir).
NAMESPACE = {"common": "sealedsum.common", "sidecar": "sealedsum.sidecar", "producers": "sealedsum.producers",
             "consumers": "sealedsum.consumers", "sealedsum": "sealedsum"}


def package_of(rel: str) -> str:
    """The package a source file's relative imports start from."""
    folder, _, rest = rel.rsplit("/", 1)[0].partition("/")
    return ".".join(filter(None, [NAMESPACE.get(folder, folder), rest.replace("/", ".")]))


def np_random_uses(tree: ast.AST) -> list[int]:
    """Lines using ``numpy.random`` / ``np.random`` in any spelling."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "random":
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("np", "numpy"):
                lines.append(node.lineno)
    return lines


def asserts(tree: ast.AST) -> list[int]:
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)]


# -- the scanner catches what it should ------------------------------------------------------
@pytest.mark.parametrize("snippet,top", [
    ("import pika", "pika"),
    ("import pika.exceptions as pe", "pika"),
    ("from pika import BlockingConnection", "pika"),
    ("from pika.exceptions import AMQPError", "pika"),
    ("def f():\n    import pika", "pika"),
    ("__import__('pika')", "pika"),
    ("import importlib\nimportlib.import_module('pika.adapters')", "pika"),
    ("from sealedsum.sidecar.enclave import keyring", "sealedsum.sidecar"),
    ("import sealedsum.sidecar", "sealedsum.sidecar"),
    ("from numpy import random", "numpy.random"),
    ("import numpy.random as npr", "numpy.random"),
    ("import random", "random"),
    ("from random import SystemRandom", "random"),
])
def test_scanner_finds_imports(snippet, top):
    assert imports(ast.parse(snippet), top)


def test_scanner_resolves_relative_imports():
    assert imports(ast.parse("from ..enclave import noise"), "sealedsum.sidecar", "sealedsum.sidecar.platform")
    assert imports(ast.parse("from . import random"), "sealedsum.sidecar.enclave.random", "sealedsum.sidecar.enclave")
    assert not imports(ast.parse("from . import noise"), "random", "sealedsum.sidecar.enclave")
    assert package_of("sidecar/enclave/__init__.py") == package_of("sidecar/enclave/noise.py") == "sealedsum.sidecar.enclave"


def test_scanner_is_not_fooled_by_prefixes():
    assert not imports(ast.parse("import pikachu\nimport randomness\nimport sidecars"), "pika")
    assert not imports(ast.parse("import randomness"), "random")
    assert not imports(ast.parse("import sealedsum.sidecars"), "sealedsum.sidecar")


def test_scanner_finds_np_random_and_asserts():
    assert np_random_uses(ast.parse("import numpy as np\nx = np.random.laplace(0, 1)"))
    assert np_random_uses(ast.parse("import numpy\nnumpy.random.default_rng()"))
    assert not np_random_uses(ast.parse("import secrets\nsecrets.randbits(8)"))
    assert asserts(ast.parse("def f(x):\n    assert x > 0"))


# -- the rules on the real source ---------------------------------------------------------------
def test_there_is_source_to_scan():
    trees = sources(*PACKAGES)
    for package in PACKAGES:
        assert any(rel.startswith(package + "/") for rel in trees), package
    assert PIKA_EDGE <= set(trees)


def test_pika_only_at_the_edge():
    trees = sources(*PACKAGES)
    users = {rel for rel, tree in trees.items() if imports(tree, "pika", package_of(rel))}
    assert users <= PIKA_EDGE, sorted(users - PIKA_EDGE)
    # The rule is not vacuous: the broker edges do use pika.
    assert {"common/amqp.py", "sidecar/enclave_process/runtime.py"} <= users


def test_producers_and_consumers_never_import_the_sidecar():
    trees = sources("producers", "consumers")
    offenders = sorted(rel for rel, tree in trees.items() if imports(tree, "sealedsum.sidecar", package_of(rel)))
    assert offenders == []


def test_common_imports_no_role_package():
    trees = sources("common")
    for role in ("sealedsum.sidecar", "sealedsum.producers", "sealedsum.consumers", "sealedsum.commands",
                 "sealedsum.demos", "sealedsum.testbed", "sealedsum.broker", "sealedsum.accounts",
                 "sealedsum.rabbitmqctl"):
        offenders = sorted(rel for rel, tree in trees.items() if imports(tree, role, package_of(rel)))
        assert offenders == [], role


def test_no_random_module_or_numpy_random_for_noise():
    trees = sources("common", "sidecar/enclave")
    for rel, tree in trees.items():
        name = package_of(rel)
        assert not imports(tree, "random", name), rel
        assert not imports(tree, "numpy.random", name), rel
        assert np_random_uses(tree) == [], rel


def test_no_np_random_anywhere_in_the_sidecar():
    for rel, tree in sources("sidecar").items():
        assert np_random_uses(tree) == [], rel
        assert not imports(tree, "numpy.random", package_of(rel)), rel
        assert not imports(tree, "random", package_of(rel)), rel


def test_noise_comes_from_opendp():
    tree = sources("sidecar/enclave")["sidecar/enclave/noise.py"]
    assert imports(tree, "opendp", "sealedsum.sidecar.enclave")


def test_no_assert_for_validation():
    found = {rel: asserts(tree) for rel, tree in sources("common", "sidecar").items()}
    assert {rel: lines for rel, lines in found.items() if lines} == {}


def test_client_libraries_load_neither_pika_nor_the_sidecar():
    """At run time too: importing the client libraries loads no sidecar module, and pika
    only once a transport is opened."""
    code = textwrap.dedent("""
        import sys
        import sealedsum.producers.client, sealedsum.producers.inputs, sealedsum.consumers.client, sealedsum.common.attestation, sealedsum.common.results
        import sealedsum.producers.confirms, sealedsum.producers.encryption
        bad = sorted(m for m in sys.modules if m == "pika" or m.startswith(("pika.", "sealedsum.sidecar")))
        print(",".join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# -- the import graph -------------------------------------------------------------------------
COMMANDS = "sealedsum.commands"
ENTRY_POINTS = {"sealedsum.__main__"}  # ``python -m sealedsum``: the command itself
CORE = "sealedsum.sidecar.enclave"
# What the measured enclave core may import besides the standard library: the shared package,
# itself, and its crypto, arithmetic and DP libraries.
CORE_MAY_IMPORT = ("sealedsum.common", CORE, "nacl", "cryptography", "phe", "gmpy2", "opendp")
# Standard-library modules that reach the disk, the OS or the network: not in the core.
CORE_MUST_NOT_IMPORT = ("os", "pathlib", "io", "shutil", "tempfile", "subprocess", "socket", "signal",
                        "ctypes", "resource", "fcntl", "mmap", "select", "selectors", "multiprocessing")


def module_of(rel: str) -> str:
    """The dotted module name a source file installs as."""
    package = package_of(rel)
    stem = rel.rsplit("/", 1)[-1][:-3]
    return package if stem == "__init__" else f"{package}.{stem}"


def project_graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file: an import inside a
    function is an edge too). ``from P import m`` is an edge to the module ``P.m`` where
    there is one, else to ``P``; importing a package's module is not an edge to the package."""
    modules = {module_of(rel) for rel in trees}
    graph: dict[str, set[str]] = {}
    for rel, tree in trees.items():
        me = module_of(rel)
        edges = {name for name in imported_modules(tree, package_of(rel)) if name in modules}
        # Drop P where only P.m was meant (``from P import m`` names both).
        for name in list(edges):
            children = {e for e in edges if e.startswith(name + ".")}
            if children and not _uses_attribute_of(tree, name, children):
                edges.discard(name)
        edges.discard(me)
        graph[me] = edges
    return graph


def _uses_attribute_of(tree: ast.Module, package: str, children: set[str]) -> bool:
    """Whether a ``from package import ...`` also names something that is not a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == package:
            if any(f"{package}.{a.name}" not in children for a in node.names):
                return True
        elif isinstance(node, ast.Import) and any(a.name == package for a in node.names):
            return True
    return False


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _toy(files: dict[str, str]) -> dict[str, ast.Module]:
    return {rel: ast.parse(textwrap.dedent(src)) for rel, src in files.items()}


def test_the_graph_scanner_finds_cycles_and_resolves_modules():
    looped = _toy({
        "sealedsum/a.py": "from sealedsum import b",
        "sealedsum/b.py": "def f():\n    from sealedsum.c import x",   # inside a function: still an edge
        "sealedsum/c.py": "import sealedsum.a",
        "common/__init__.py": "",
        "common/wire.py": "from sealedsum.common import fixedpoint",
        "common/fixedpoint.py": "",
    })
    graph = project_graph(looped)
    assert graph["sealedsum.a"] == {"sealedsum.b"} and graph["sealedsum.common.wire"] == {"sealedsum.common.fixedpoint"}
    assert cycles(graph) == [["sealedsum.a", "sealedsum.b", "sealedsum.c"]]
    assert cycles(project_graph(_toy({"sealedsum/a.py": "from sealedsum import b", "sealedsum/b.py": ""}))) == []
    assert module_of("sidecar/enclave/__init__.py") == "sealedsum.sidecar.enclave"
    assert module_of("sealedsum/commands/produce.py") == "sealedsum.commands.produce"


def test_no_import_cycle_between_project_modules():
    assert cycles(project_graph(sources(*PACKAGES))) == []


def test_no_library_imports_a_command():
    graph = project_graph(sources(*PACKAGES))
    offenders = sorted((m, t) for m, targets in graph.items() if not m.startswith(COMMANDS)
                       and m not in ENTRY_POINTS for t in targets if t == COMMANDS or t.startswith(COMMANDS + "."))
    assert offenders == []
    # Not vacuous: the command package does import the libraries.
    assert graph["sealedsum.commands.produce"] & {"sealedsum.producers.client"}


def core_violations(trees: dict[str, ast.Module]) -> list[tuple[str, str]]:
    out = []
    for rel, tree in trees.items():
        for name in imported_modules(tree, package_of(rel)):
            top = name.split(".")[0]
            if name.startswith(CORE_MAY_IMPORT) and any(name == p or name.startswith(p + ".") for p in CORE_MAY_IMPORT):
                continue
            if top == "__future__" or (top in sys.stdlib_module_names and top not in CORE_MUST_NOT_IMPORT):
                continue
            out.append((rel, name))
    return sorted(out)


def test_the_core_rule_catches_what_it_should():
    assert core_violations(_toy({"sidecar/enclave/x.py": "import os"})) == [("sidecar/enclave/x.py", "os")]
    assert core_violations(_toy({"sidecar/enclave/x.py": "import pika"})) == [("sidecar/enclave/x.py", "pika")]
    assert core_violations(_toy({"sidecar/enclave/x.py": "from sealedsum.sidecar import durable"})) != []
    assert core_violations(_toy({"sidecar/enclave/x.py": "from sealedsum.producers import client"})) != []
    assert core_violations(_toy({"sidecar/enclave/x.py": "import json, heapq\nfrom phe import paillier\n"
                                                         "from sealedsum.common import wire\nfrom . import noise"})) == []


def test_the_enclave_core_imports_only_the_shared_package_the_stdlib_and_its_libraries():
    trees = sources("sidecar/enclave")
    assert "sidecar/enclave/service.py" in trees
    assert core_violations(trees) == []


def io_imports(tree: ast.Module, package: str) -> list[str]:
    """What a pure module must not import: the disk, the OS, the network, a broker edge."""
    return sorted(name for name in imported_modules(tree, package)
                  if name.split(".")[0] in CORE_MUST_NOT_IMPORT or name.split(".")[0] == "pika"
                  or name.startswith(("sealedsum.consumers.chain_store", "sealedsum.consumers.transport",
                                      "sealedsum.common.amqp")))


def test_the_consumers_chain_checks_do_no_io():
    """What a consumer remembers of a ledger chain and checks against it is pure; chain_store.py
    is its file and client.py the one that calls both."""
    assert io_imports(ast.parse("import os\nfrom sealedsum.consumers import chain_store"), "sealedsum.consumers") == \
        ["os", "sealedsum.consumers.chain_store"]
    trees = sources("consumers")
    for rel in ("consumers/chain_state.py", "consumers/chain_audit.py"):
        assert io_imports(trees[rel], package_of(rel)) == [], rel
    assert io_imports(trees["consumers/chain_store.py"], "sealedsum.consumers")  # not vacuous: the edge does


# -- one error tree, one statement of the exit codes ----------------------------------------
def test_every_error_class_is_defined_in_the_error_tree():
    """Product errors live in common/errors.py, under SealedsumError, each with its exit code."""
    from sealedsum.common import errors

    defined_elsewhere = []
    for rel, tree in sources(*PACKAGES).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and rel != "common/errors.py" and any(
                    isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception")) for b in node.bases):
                defined_elsewhere.append((rel, node.name))
    assert defined_elsewhere == []
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert classes and all(issubclass(c, errors.SealedsumError) for c in classes)
    assert all(isinstance(c.exit_code, errors.ExitCode) for c in classes)


def test_the_readme_states_the_exit_codes_the_enum_defines():
    from sealedsum.common.errors import ExitCode

    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|$", readme, re.M))
    assert {int(k) for k in rows} == {int(c) for c in ExitCode}
