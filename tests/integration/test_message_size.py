"""`sealedsum broker setup` and the broker's max_message_size, against the real RabbitMQ
(docs/broker-accounts.md).

The node is shared with other engineers' tests, which publish 64 MiB messages, so no test
here leaves a limit below that for a moment: setup's own run goes through a rabbitmqctl
wrapper that answers the two `eval`s it makes (and records them) and passes everything else
to the real rabbitmqctl; the one test that changes the real node sets 96 MiB, publishes above
it, and puts the node's value back in a `finally` within about a second."""

from __future__ import annotations

import json
import sys
import textwrap
import time

import pika
import pika.exceptions as pe
import pytest
from sealedsum.message_limits import FLOOR
from sealedsum.rabbitmqctl import READ_MAX_MESSAGE_SIZE, Rabbitmqctl, set_max_message_size_expr

from tests.integration.test_acl import broker_config, ctl, new_prefix, sealedsum  # noqa: F401 - ctl is a fixture

pytestmark = pytest.mark.integration

POLICY = textwrap.dedent("""
    [enclave]
    paillier_bits = 3072

    [streams.v]
    kind = "vector"
    dimension = 2000
    lower = 0.0
    upper = 1.0
    window_records = 20
    min_batch = 10
    mechanism = "laplace"
    epsilon = 1.0
    budget_epsilon = 50.0
    """)
LIMIT = 3 * FLOOR  # a 2000-value record at 3072 bits is 2.2 MiB; with a quarter on top, 3 MiB

WRAPPER = textwrap.dedent("""
    import json, os, sys
    log, node = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    with open(log, "a") as f:
        f.write(json.dumps(args) + "\\n")
    if "eval" not in args or args[-1] == "node().":  # only the max_message_size calls are answered here
        os.execvp("rabbitmqctl", ["rabbitmqctl", *args])
    expr = args[-1]
    value = open(node).read().strip()
    if expr == {read!r}:
        print("{{{{ok,%s}},undefined}}" % value)
    else:
        open(node, "w").write(expr.split("max_message_size, ")[1].split(")")[0])
        print("ok")
    """)


def test_setup_lowers_the_node_wide_limit_says_so_and_can_leave_it_alone(ctl, amqp_url, tmp_path):  # noqa: F811
    prefix = new_prefix()
    path = broker_config(tmp_path, amqp_url, prefix)
    path.write_text(path.read_text() + POLICY)
    log, node = tmp_path / "calls.jsonl", tmp_path / "node"
    node.write_text(str(128 << 20))
    wrapper = tmp_path / "rabbitmqctl.py"
    wrapper.write_text(WRAPPER.format(read=READ_MAX_MESSAGE_SIZE))
    via = f"{sys.executable} {wrapper} {log} {node}"
    try:
        out = sealedsum("broker", "setup", "--config", str(path), "--out", str(tmp_path / "s"), "--rabbitmqctl", via)
        assert out.returncode == 0, out.stderr
        evals = [args for args in map(json.loads, log.read_text().splitlines())
                 if "eval" in args and args[-1] != "node()."]
        assert evals == [["-q", "eval", READ_MAX_MESSAGE_SIZE], ["-q", "eval", set_max_message_size_expr(LIMIT)],
                         ["-q", "eval", READ_MAX_MESSAGE_SIZE]]
        assert node.read_text() == str(LIMIT)
        lines = out.stdout.splitlines()
        assert "largest legitimate message: 2304273 bytes (record); max_message_size for this deployment: " \
               f"{LIMIT} bytes" in lines
        (said,) = [line for line in lines if line.startswith("max_message_size: set")]
        assert said.startswith(f"max_message_size: set from {128 << 20} to {LIMIT} bytes NODE-WIDE, for every vhost")
        assert "lost when the node restarts" in said
        assert lines[lines.index(said) + 1] == f"  max_message_size = {LIMIT}"

        # Again: the node's is no longer larger, so it is only read.
        log.unlink()
        out = sealedsum("broker", "setup", "--config", str(path), "--out", str(tmp_path / "s"), "--rabbitmqctl", via)
        assert out.returncode == 0, out.stderr
        assert [a for a in map(json.loads, log.read_text().splitlines()) if "eval" in a and a[-1] != "node()."] == \
            [["-q", "eval", READ_MAX_MESSAGE_SIZE]]
        assert f"max_message_size: the node's is {LIMIT} bytes, not above {LIMIT}: left alone" in out.stdout

        # A shared node: not even read.
        log.unlink()
        node.write_text(str(128 << 20))
        out = sealedsum("broker", "setup", "--config", str(path), "--out", str(tmp_path / "s"), "--rabbitmqctl", via,
                        "--keep-max-message-size")
        assert out.returncode == 0, out.stderr
        assert not [a for a in map(json.loads, log.read_text().splitlines()) if "eval" in a and a[-1] != "node()."]
        assert "max_message_size: left alone (--keep-max-message-size)" in out.stdout
        assert f"  max_message_size = {LIMIT}" in out.stdout.splitlines()
        assert node.read_text() == str(128 << 20)
    finally:
        sealedsum("broker", "teardown", "--config", str(path))


def test_a_publish_above_the_limit_is_refused_by_the_broker(ctl: Rabbitmqctl, amqp_url):  # noqa: F811
    limit = 96 << 20  # above the 64 MiB other tests on this node publish
    params = pika.URLParameters(amqp_url)
    body = b"x" * (limit + 1)
    queue = f"t-size-{new_prefix()}"
    admin = pika.BlockingConnection(params)
    admin.channel().queue_declare(queue, exclusive=True)
    before = ctl.max_message_size()
    assert before > limit, "the node's limit is already lower: this test would prove nothing"
    try:
        ctl.set_max_message_size(limit)
        started = time.monotonic()
        conn = pika.BlockingConnection(params)
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_publish("", queue, b"small")  # the limit refuses only what is larger
            with pytest.raises((pe.ChannelClosedByBroker, pe.UnroutableError, pe.NackError)) as err:
                ch.basic_publish("", queue, body)
                ch.basic_publish("", queue, b"after")  # surfaces a close that came after the confirm
        finally:
            if conn.is_open:
                conn.close()
    finally:
        ctl.run("eval", set_max_message_size_expr(before))  # not set_max_message_size: restore exactly
    assert time.monotonic() - started < 5  # the node had the lower limit for this long, at most
    assert ctl.max_message_size() == before
    assert isinstance(err.value, pe.ChannelClosedByBroker) and err.value.reply_code == 406, err.value
    assert "message size" in err.value.reply_text and str(limit) in err.value.reply_text
    ch = admin.channel()
    assert ch.queue_declare(queue, passive=True).method.message_count == 1  # only the small one
    admin.close()
