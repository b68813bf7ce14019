"""The boundary between the enclave core and its runtime: the core answers with Effects,
and one function, ``commit``, carries them out in the order exactly-once rests on.

The runtime on a real sealed store is tested in test_ack_after_fsync.py; here the order
itself, and that the runtime learns nothing from the core's attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sealedsum.sidecar.enclave.service import NOTHING, Effects
from sealedsum.sidecar.enclave_process.checkpoint import commit

REPO = Path(__file__).resolve().parents[2]
PROCESS = REPO / "sidecar" / "enclave_process"


def run(effects: Effects, deliveries, fail: str | None = None) -> list:
    log = []

    def step(name):
        def do(*args):
            if name == fail:
                raise OSError(f"{name} failed")
            log.append((name, *args))
        return do

    try:
        commit(effects, deliveries, seal_keys=step("seal_keys"), checkpoint=step("checkpoint"), ack=step("ack"),
               publish=lambda p: step("publish")(p))
    except OSError:
        log.append("raised")
    return log


def test_keys_then_checkpoint_then_ack_then_publish():
    effects = Effects(seal_keys=True, checkpoint=True, publish=("release", "notice"))
    assert run(effects, [3, 4, 7]) == [("seal_keys",), ("checkpoint",), ("ack", 7), ("publish", "release"),
                                       ("publish", "notice")]


@pytest.mark.parametrize("fail", ["seal_keys", "checkpoint"])
def test_nothing_is_acknowledged_or_published_when_a_write_fails(fail):
    log = run(Effects(seal_keys=True, checkpoint=True, publish=("release",)), [1, 2], fail=fail)
    assert log[-1] == "raised"
    assert not [e for e in log if e != "raised" and e[0] in ("ack", "publish")]


def test_a_lost_ack_still_publishes_nothing_after_it():
    log = run(Effects(checkpoint=True, publish=("release",)), [1], fail="ack")
    assert log == [("checkpoint",), "raised"]


def test_only_what_is_owed_is_done():
    assert run(NOTHING, []) == []
    assert run(Effects(publish=("confirmed-again",)), []) == [("publish", "confirmed-again")]
    assert run(NOTHING, [5]) == [("ack", 5)]  # dead-lettered or duplicate records: nothing to checkpoint


def test_effects_combine_without_losing_a_request():
    a = Effects(checkpoint=True, publish=("r1",), draw=("w1",))
    b = Effects(seal_keys=True, publish=("n1",))
    both = a | b
    assert both.seal_keys and both.checkpoint and both.publish == ("r1", "n1") and both.draw == ("w1",)
    assert (NOTHING | NOTHING) == NOTHING and not NOTHING and both


def core_attribute_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """Attributes of the enclave core (``enclave.X``, ``self.enclave.X``, ``self._enclave.X``)
    that are read or written rather than called."""
    calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        is_core = (isinstance(base, ast.Name) and base.id == "enclave") or \
                  (isinstance(base, ast.Attribute) and base.attr in ("enclave", "_enclave"))
        if is_core and id(node) not in calls:
            found.append((node.lineno, node.attr))
    return found


def test_the_scanner_sees_reads_and_writes_of_core_attributes():
    assert core_attribute_uses(ast.parse("x = self.enclave.pending")) == [(1, "pending")]
    assert core_attribute_uses(ast.parse("self.enclave.dirty = False")) == [(1, "dirty")]
    assert core_attribute_uses(ast.parse("if enclave.closing: pass")) == [(1, "closing")]
    assert core_attribute_uses(ast.parse("e = self.enclave.on_tick(now)\nself._enclave.checkpointed(cp)")) == []


def test_the_enclave_process_only_calls_the_core():
    """The runtime, the state writer and the entry point ask the core by calling it and act
    on the values it returns; none reads or sets a core attribute to learn what to do."""
    sources = sorted(PROCESS.glob("*.py"))
    assert {p.name for p in sources} >= {"runtime.py", "checkpoint.py", "__main__.py"}
    uses = {p.name: core_attribute_uses(ast.parse(p.read_text())) for p in sources}
    assert {name: u for name, u in uses.items() if u} == {}
