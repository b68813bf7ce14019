"""Least privilege on the broker (`sealedsum broker setup`), against the real RabbitMQ.

The accounts are made by the real command through rabbitmqctl, the sidecar runs as its
own account, and every refusal below is a 403 ACCESS_REFUSED naming the account, on a
topology the running sidecar declared: it is the permissions that refuse, not a missing
object. Each test uses its own prefix and deletes the users it created.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions as pe
import pytest

from sealedsum.accounts import account_url, check_password_hash, password_env, vhost_of
from sealedsum.common import config as config_mod
from sealedsum.common.topology import ALL_RESULTS_KEY, RECORD_ROUTING_KEY, ROLES, Topology, escape, role_permissions
from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from sealedsum.common.errors import BrokerAdminError, TransportError
from sealedsum.rabbitmqctl import Rabbitmqctl
from tests.integration.conftest import REPO, RunningSidecar, _no_broker

STREAM = {"dimension": 1, "lower": 0.0, "upper": 100.0, "window_records": 20, "min_batch": 5,
          "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 1e6}
PASSWORD_VARS = [password_env(role) for role in ROLES]


def sealedsum(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in PASSWORD_VARS}
    return subprocess.run([sys.executable, "-m", "sealedsum", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(base, **(env or {})), timeout=120)


def broker_config(tmp: Path, url: str, prefix: str) -> Path:
    """A config with only [broker]: all `broker setup` needs."""
    path = tmp / f"{prefix}.toml"
    path.write_text(f'[broker]\nurl = "{url}"\nprefix = "{prefix}"\n')
    return path


def new_prefix() -> str:
    # A dot inside the prefix: the patterns must escape it.
    return f"t.acl-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ctl(amqp_url) -> Rabbitmqctl:
    """rabbitmqctl for the broker at amqp_url (skips, or fails in CI, without one)."""
    try:
        c = Rabbitmqctl()
        vhosts = c.vhosts()
    except BrokerAdminError as err:
        _no_broker(f"these tests manage users with rabbitmqctl: {err}")
    if vhost_of(amqp_url) not in vhosts:
        _no_broker("rabbitmqctl manages a broker without the vhost of AMQP_URL")
    return c


@dataclass
class Accounts:
    prefix: str
    config_path: Path
    out: Path
    urls: dict[str, str]
    setup: subprocess.CompletedProcess

    def config(self, role: str, path: Path | None = None) -> config_mod.Config:
        """A config (``path``, default the broker-only one) that connects as ``role``."""
        return config_mod.load(path or self.config_path, env={"AMQP_URL": self.urls[role]})

    def user(self, role: str) -> str:
        return f"{self.prefix}-{role}"


@pytest.fixture
def accounts(ctl, amqp_url, tmp_path):
    prefix = new_prefix()
    path = broker_config(tmp_path, amqp_url, prefix)
    out = tmp_path / "secrets"
    result = sealedsum("broker", "setup", "--config", str(path), "--out", str(out))
    try:
        if result.returncode == 2 and "another broker" in result.stderr:
            _no_broker("rabbitmqctl manages a different broker than AMQP_URL")
        assert result.returncode == 0, result.stderr
        urls = {role: (out / f"{role}.url").read_text().strip() for role in ROLES}
        try:
            pika.BlockingConnection(pika.URLParameters(urls["producer"])).close()
        except pe.ProbableAuthenticationError:
            _no_broker("rabbitmqctl manages a different broker than AMQP_URL")
        yield Accounts(prefix, path, out, urls, result)
    finally:
        sealedsum("broker", "teardown", "--config", str(path))


@pytest.fixture
def deployment(accounts, sidecar_factory) -> tuple[RunningSidecar, Accounts]:
    """A sidecar running as the sidecar account (users outlive it: set up first, torn down last)."""
    sc = sidecar_factory({"s": STREAM}, prefix=accounts.prefix, process_url=accounts.urls["sidecar"])
    return sc, accounts


def refused(url: str, action) -> str:
    """Run ``action(channel)`` as the account of ``url``; it must be refused with 403."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        with pytest.raises(pe.ChannelClosedByBroker) as info:
            action(ch)
        assert info.value.reply_code == 403 and info.value.reply_text.startswith("ACCESS_REFUSED"), info.value
        return info.value.reply_text
    finally:
        if conn.is_open:
            conn.close()


def publish(exchange: str, key: str):
    def action(ch):
        ch.confirm_delivery()  # the refusal then surfaces here, not on a later call
        ch.basic_publish(exchange, key, b"forged", mandatory=False)
    return action


def take(consumer: Consumer, n: int, timeout: float = 30) -> list:
    out = []
    for release in consumer.releases(idle_timeout=timeout):
        out.append(release)
        if len(out) >= n:
            break
    return out


# --- the command ---------------------------------------------------------------------------

def test_patterns_are_anchored_and_escape_the_prefix():
    """Python's re agrees with RabbitMQ's PCRE on these constructs; the broker tests below
    check the same patterns for real."""
    t = Topology("a.b+c")
    p = role_permissions(t)
    ok = lambda pattern, name: re.search(pattern, name) is not None  # noqa: E731 - unanchored, as RabbitMQ
    for name in ("a.b+c.records", "a.b+c.rejected", "a.b+c.attest", "a.b+c.results", "a.b+c.announce",
                 "a.b+c.releases", "a.b+c.notices"):
        assert ok(p["sidecar"].configure, name) and ok(p["sidecar"].read, name) and ok(p["sidecar"].write, name)
    for name in ("aXb+c.records", "a.bbc.records", "a.b+c.records2", "xa.b+c.records", "a.b+c.consumer.q", "other"):
        assert not ok(p["sidecar"].configure, name), name
    assert ok(p["sidecar"].write, "amq.default") and not ok(p["producer"].write, "amq.default")
    assert [ok(p["producer"].write, n) for n in ("a.b+c.records", "a.b+c.attest", "a.b+c.results",
                                                 "a.b+c.announce", "a.b+c.notices")] == [True, True, False, False, False]
    # Its own server-named queue, bound to the announce exchange: nothing else to declare or read.
    assert ok(p["producer"].configure, "amq.gen-Xq1") and ok(p["producer"].write, "amq.gen-Xq1")
    assert ok(p["producer"].read, "amq.gen-Xq1") and ok(p["producer"].read, "a.b+c.announce")
    assert ok(p["producer"].read, "a.b+c.notices")  # and to the notices exchange, for its records' fate
    for name in ("a.b+c.records", "a.b+c.rejected", "a.b+c.attest", "a.b+c.results", "a.b+c.announce",
                 "a.b+c.notices", "a.b+c.consumer.q", "amq.default", "xamq.gen-1", "a.bbc.announce", "a.bbc.notices",
                 "a.b+c.releases"):
        assert not ok(p["producer"].configure, name), name
        if name not in ("a.b+c.announce", "a.b+c.notices"):
            assert not ok(p["producer"].read, name), name
    for name in ("amq.gen-Xq1", "a.b+c.consumer.mine"):
        assert ok(p["consumer"].configure, name) and ok(p["consumer"].write, name) and ok(p["consumer"].read, name)
    for name in ("a.b+c.records", "a.b+c.rejected", "a.b+c.consumer", "amq.default", "b.consumer.x"):
        assert not ok(p["consumer"].configure, name) and not ok(p["consumer"].read, name), name
    assert ok(p["consumer"].read, "a.b+c.results") and ok(p["consumer"].write, "a.b+c.attest")
    # The release stream: read (consume) only; declaring, binding or publishing into it is the sidecar's.
    assert ok(p["consumer"].read, "a.b+c.releases") and not ok(p["consumer"].configure, "a.b+c.releases")
    assert not ok(p["consumer"].write, "a.b+c.releases") and not ok(p["consumer"].read, "a.bbc.releases")
    assert not ok(p["consumer"].read, "a.b+c.notices") and not ok(p["consumer"].write, "a.b+c.notices")
    assert not ok(p["consumer"].write, "a.b+c.results") and not ok(p["consumer"].write, "a.b+c.records")


def test_setup_creates_untagged_users_with_the_role_patterns_and_is_idempotent(accounts, ctl, amqp_url):
    vhost = vhost_of(amqp_url)
    expected = role_permissions(Topology(accounts.prefix))
    users = ctl.users()
    granted = ctl.permissions(vhost)
    for role in ROLES:
        user = accounts.user(role)
        assert users[user] == [], "no tags: no management UI, no policies, no administration"
        assert granted[user] == expected[role]
        path = accounts.out / f"{role}.url"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        url = pika.URLParameters(accounts.urls[role])
        assert url.credentials.username == user and url.virtual_host == vhost
        assert url.credentials.password not in accounts.setup.stdout, "a password was printed"
    # Again: the same passwords (taken from the URL files), the same permissions.
    again = sealedsum("broker", "setup", "--config", str(accounts.config_path), "--out", str(accounts.out))
    assert again.returncode == 0, again.stderr
    assert {r: (accounts.out / f"{r}.url").read_text().strip() for r in ROLES} == accounts.urls
    assert f"{accounts.user('producer')}: updated" in again.stdout
    assert ctl.permissions(vhost)[accounts.user("producer")] == expected["producer"]
    shown = sealedsum("broker", "setup", "--config", str(accounts.config_path), "--out", str(accounts.out), "--show")
    assert shown.returncode == 0 and accounts.urls["consumer"] in shown.stdout


# --- the happy paths --------------------------------------------------------------------------

def test_the_system_runs_with_each_role_on_its_own_account(deployment, ctl):
    sc, acc = deployment
    connections = json.loads(ctl.run("list_connections", "user", "--formatter", "json").stdout or "[]")
    assert acc.user("sidecar") in {c["user"] for c in connections}, "the sidecar does not run as its account"
    # The producer may read only its own server-named queue and the announce and notices
    # exchanges, yet attests: consuming amq.rabbitmq.reply-to needs no permission.
    assert role_permissions(Topology(acc.prefix))["producer"].read == \
        rf"^(amq\.gen-.*|{escape(acc.prefix)}\.(announce|notices))$"
    named = f"{acc.prefix}.consumer.acl"
    as_consumer = acc.config("consumer", sc.config_path)
    try:
        with Consumer(as_consumer, "s") as private, Consumer(as_consumer, "s", queue=named) as durable:
            assert private._transport.queue == f"{acc.prefix}.releases"  # the release stream, which it may read
            with Producer(acc.config("producer", sc.config_path)) as producer:
                assert producer.listening and producer.hearing  # bound to PREFIX.announce and PREFIX.notices
                for i in range(10):
                    producer.send("s", [float(10 + i)])
                # The sidecar account announces a rotation; the producer account hears it.
                rotate = sealedsum("sidecar", "rotate", "--state", str(sc.state))
                assert rotate.returncode == 0, rotate.stderr
                deadline = time.monotonic() + 20
                while not sc.events("key rotation announced"):
                    assert time.monotonic() < deadline, "no key rotation announced"
                    time.sleep(0.1)
                time.sleep(0.3)  # the notice reaches the producer's queue
                for i in range(10, 20):
                    producer.send("s", [float(10 + i)])
                assert producer.enclave.keys.epoch == 2 and producer.notices_refused == 0
                outcomes = producer.wait_outcomes(20)  # the sidecar account tells the producer account
                assert (outcomes.counted, outcomes.rejected, outcomes.unknown) == (20, 0, 0)
            for consumer in (private, durable):
                (release,) = take(consumer, 1)
                assert release.stream == "s" and release.window == 1
                assert consumer.verifier.rejected == 0
            assert private.budget("s").budget["releases"] == 1
        # The sidecar's account is the operator's view of the dead letters.
        shown = sealedsum("rejected", "--config", str(sc.config_path), "--json",
                          env={"AMQP_URL": acc.urls["sidecar"]})
        assert shown.returncode == 0 and json.loads(shown.stdout)["total"] == 0, shown.stderr
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
        conn.channel().queue_delete(named)
        conn.close()


# --- what each account may not do -------------------------------------------------------------

def test_a_consumer_account_cannot_read_or_inject_records(deployment):
    sc, acc = deployment
    t, url, user = sc.config.broker.topology, acc.urls["consumer"], acc.user("consumer")
    texts = [
        refused(url, lambda ch: ch.basic_consume(t.records_queue, lambda *a: None)),
        refused(url, lambda ch: ch.basic_get(t.records_queue)),
        refused(url, lambda ch: ch.basic_get(t.rejected_queue)),
        refused(url, lambda ch: ch.queue_bind(ch.queue_declare("", exclusive=True).method.queue,
                                              t.records_exchange, RECORD_ROUTING_KEY)),
        refused(url, lambda ch: ch.queue_declare(f"{acc.prefix}.not-mine", durable=True)),
        refused(url, lambda ch: ch.queue_purge(t.records_queue)),
        refused(url, lambda ch: ch.queue_delete(t.records_queue)),
        refused(url, publish(t.records_exchange, RECORD_ROUTING_KEY)),
        refused(url, publish(t.results_exchange, "s")),  # forging results
        # The release stream: read, nothing else (it keeps every release for every consumer; a
        # stream cannot be purged by anyone).
        refused(url, lambda ch: ch.queue_delete(t.releases_stream)),
        refused(url, lambda ch: ch.queue_bind(t.releases_stream, t.records_exchange, RECORD_ROUTING_KEY)),
        refused(url, publish(t.notices_exchange, "0" * 32)),  # forging notices to a producer
        refused(url, lambda ch: ch.queue_bind(ch.queue_declare("", exclusive=True).method.queue,
                                              t.notices_exchange, "0" * 32)),  # hearing a producer's notices
        refused(url, publish("", t.records_queue)),  # the default exchange, straight into the queue
    ]
    assert all(f"refused for user '{user}'" in text for text in texts), texts
    assert "access to exchange 'amq.default'" in texts[-1]
    # The producer library, on the consumer's account, says it lacks the permission.
    with pytest.raises(TransportError) as info:
        with Producer(sc.config.with_broker_url(url)) as producer:
            producer.send("s", 5.0)
    text = info.value.diagnostics()
    assert "ACCESS_REFUSED" in text and "lacks this permission" in text and "sidecar running" not in text, text


def test_a_producer_account_cannot_read_results_or_anything_else(deployment):
    sc, acc = deployment
    t, url, user = sc.config.broker.topology, acc.urls["producer"], acc.user("producer")
    # What it may do: a server-named queue of its own, bound to PREFIX.announce, consumed.
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        mine = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        assert mine.startswith("amq.gen-")
        ch.queue_bind(mine, t.announce_exchange)
        ch.queue_bind(mine, t.notices_exchange, "0" * 32)  # with a notice token
        ch.basic_consume(mine, lambda *a: None, auto_ack=True)
    finally:
        conn.close()
    # A consumer's named queue, bound to the results, for the producer to try to read.
    admin = pika.BlockingConnection(pika.URLParameters(sc.config.broker.url))
    victim = f"{acc.prefix}.consumer.victim"
    admin.channel().queue_declare(victim, durable=True)
    admin.channel().queue_bind(victim, t.results_exchange, ALL_RESULTS_KEY)

    def read_release_stream(ch):
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(t.releases_stream, lambda *a: None, arguments={"x-stream-offset": "first"})

    def own_queue_bound_to(exchange, key):
        return lambda ch: ch.queue_bind(ch.queue_declare("", exclusive=True).method.queue, exchange, key)

    try:
        texts = [
            refused(url, lambda ch: ch.queue_declare(f"{acc.prefix}.consumer.sneaky", durable=True)),
            refused(url, lambda ch: ch.queue_declare(t.announce_exchange, exclusive=True)),  # named, not server-named
            refused(url, lambda ch: ch.exchange_declare(f"{acc.prefix}.mine", "fanout")),
            # Its own queue, bound to anything but the announce exchange: results, records, dead letters.
            refused(url, own_queue_bound_to(t.results_exchange, ALL_RESULTS_KEY)),
            refused(url, own_queue_bound_to(t.records_exchange, RECORD_ROUTING_KEY)),
            refused(url, own_queue_bound_to(t.rejected_exchange, "")),
            # It may write to the queues named like its exchanges, but read no exchange to bind from.
            refused(url, lambda ch: ch.queue_bind(t.records_queue, t.results_exchange, ALL_RESULTS_KEY)),
            refused(url, lambda ch: ch.queue_bind(t.attest_queue, t.results_exchange, ALL_RESULTS_KEY)),
            # (Binding those two queues to PREFIX.announce or PREFIX.notices is not refused:
            # docs/broker-accounts.md.)
            refused(url, lambda ch: ch.basic_consume(t.records_queue, lambda *a: None)),
            refused(url, lambda ch: ch.basic_consume(t.attest_queue, lambda *a: None)),
            refused(url, lambda ch: ch.basic_consume(victim, lambda *a: None)),  # results, through a consumer's queue
            refused(url, lambda ch: ch.basic_get(victim)),
            refused(url, lambda ch: ch.basic_get(t.rejected_queue)),
            refused(url, read_release_stream),
            refused(url, publish(t.announce_exchange, "")),  # forging key-rotation notices
            refused(url, publish(t.notices_exchange, "0" * 32)),  # forging notices about records
            refused(url, publish(t.results_exchange, "s")),
            refused(url, publish(t.rejected_exchange, "")),
            refused(url, publish("", t.records_queue)),
        ]
    finally:
        admin.channel().queue_delete(victim)
        admin.close()
    assert all(f"refused for user '{user}'" in text for text in texts), texts
    assert "access to exchange 'amq.default'" in texts[-1]
    # The consumer library, on the producer's account, says so: the sidecar is running.
    with pytest.raises(TransportError) as info:
        Consumer(sc.config.with_broker_url(url), "s", chain_state=None).close()
    text = info.value.diagnostics()
    assert "ACCESS_REFUSED" in text and "lacks this permission" in text and "broker setup" in text, text
    assert "sidecar running" not in text


# --- definitions for a broker to load at boot ------------------------------------------------

def test_the_definitions_file_creates_the_same_accounts(ctl, amqp_url, tmp_path):
    prefix = new_prefix()
    path = broker_config(tmp_path, amqp_url, prefix)
    passwords = {role: f"p@ss:{role}/wörd%{uuid.uuid4().hex[:6]}" for role in ROLES}
    env = {password_env(role): pw for role, pw in passwords.items()}
    defs = tmp_path / "definitions.json"
    result = sealedsum("broker", "setup", "--config", str(path), "--definitions", str(defs), env=env)
    try:
        assert result.returncode == 0, result.stderr
        assert not any(pw in result.stdout for pw in passwords.values())
        assert stat.S_IMODE(defs.stat().st_mode) == 0o600
        assert not {f"{prefix}-{r}" for r in ROLES} & set(ctl.users()), "--definitions changed the broker"
        doc = json.loads(defs.read_text())
        vhost = vhost_of(amqp_url)
        assert doc["vhosts"] == [{"name": vhost}]
        hashes = {u["name"]: u for u in doc["users"]}
        for role, pw in passwords.items():
            u = hashes[f"{prefix}-{role}"]
            assert u["hashing_algorithm"] == "rabbit_password_hashing_sha256" and u["tags"] == []
            assert check_password_hash(pw, u["password_hash"])

        # Load it the way a booting broker does (the vhost exists already: leave it alone).
        subprocess.run(ctl.argv + ["-q", "import_definitions", "--format", "json"], check=True, timeout=60,
                       input=json.dumps({"users": doc["users"], "permissions": doc["permissions"]}), text=True)
        expected = role_permissions(Topology(prefix))
        deadline = time.monotonic() + 20
        while True:  # the import is asynchronous
            granted = ctl.permissions(vhost)
            if all(f"{prefix}-{r}" in granted for r in ROLES) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for role, pw in passwords.items():
            assert granted[f"{prefix}-{role}"] == expected[role]
            # The hash is RabbitMQ's: the password logs in (quoted into the URL as setup writes it).
            pika.BlockingConnection(pika.URLParameters(
                account_url(amqp_url, f"{prefix}-{role}", pw))).close()
    finally:
        sealedsum("broker", "teardown", "--config", str(path))


# --- errors ---------------------------------------------------------------------------------

def test_errors_have_exit_codes_and_change_nothing(ctl, amqp_url, tmp_path):
    prefix = new_prefix()
    path = broker_config(tmp_path, amqp_url, prefix)
    ours = {f"{prefix}-{r}" for r in ROLES}

    lost = sealedsum("broker", "setup", "--config", str(path))
    assert lost.returncode == 2 and "--out" in lost.stderr and not lost.stdout

    missing = sealedsum("broker", "setup", "--config", str(path), "--show", "--rabbitmqctl", "/nonexistent/rabbitmqctl")
    assert missing.returncode == 3 and "hint:" in missing.stderr and "--definitions" in missing.stderr

    failing = sealedsum("broker", "setup", "--config", str(path), "--show",
                        "--rabbitmqctl", "sh -c 'echo Error: unable to reach the node >&2; exit 69' rabbitmqctl")
    assert failing.returncode == 3 and "unable to reach the node" in failing.stderr and "hint:" in failing.stderr

    no_vhost = sealedsum("broker", "setup", "--config", str(path), "--show", "--vhost", f"{prefix}-no-such-vhost")
    assert no_vhost.returncode == 2 and "add_vhost" in no_vhost.stderr

    # A user that has tags belongs to somebody else: never taken over, never deleted.
    tagged = f"{prefix}-someone-else"
    ctl.add_user(tagged, uuid.uuid4().hex)
    try:
        ctl.run("set_user_tags", tagged, "monitoring")
        taken = sealedsum("broker", "setup", "--config", str(path), "--show", "--producer-user", tagged)
        assert taken.returncode == 2 and "refusing" in taken.stderr
        deleted = sealedsum("broker", "teardown", "--config", str(path), "--producer-user", tagged)
        assert deleted.returncode == 2
        assert ctl.users()[tagged] == ["monitoring"]
        assert not ours & set(ctl.users())
    finally:
        ctl.delete_user(tagged)

    # teardown is idempotent.
    gone = sealedsum("broker", "teardown", "--config", str(path))
    assert gone.returncode == 0 and gone.stdout.count(": absent") == 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def not_a_broker():
    """A port that accepts connections and hangs up at once: something, but not RabbitMQ."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def test_setup_refuses_a_url_whose_broker_rabbitmqctl_does_not_manage(ctl, amqp_url, tmp_path, not_a_broker):
    """Acceptance 4: the users would land on rabbitmqctl's node while the URLs printed name
    another broker. Setup and teardown refuse with exit 2, one line naming both, and change nothing."""
    real = urlsplit(amqp_url)
    node = ctl.node()
    for port in (_closed_port(), not_a_broker):
        prefix = new_prefix()
        elsewhere = urlunsplit(real._replace(netloc=f"{real.username}:{real.password}@127.0.0.1:{port}"))
        path = broker_config(tmp_path, elsewhere, prefix)
        out = tmp_path / f"{prefix}-secrets"
        env = {"AMQP_URL": elsewhere}  # else this process's AMQP_URL would name the real broker
        result = sealedsum("broker", "setup", "--config", str(path), "--out", str(out), env=env)
        assert result.returncode == 2, result.stderr
        line, = result.stderr.strip().splitlines()
        assert node in line and f"127.0.0.1:{port}" in line and f":{real.password}@" not in line, line
        assert not out.exists() and not result.stdout
        assert not {f"{prefix}-{r}" for r in ROLES} & set(ctl.users())
        assert not [q for q in ctl.queues(vhost_of(amqp_url)) if q.startswith("sealedsum.setup-probe.")]
        teardown = sealedsum("broker", "teardown", "--config", str(path), env=env)
        assert teardown.returncode == 2 and node in teardown.stderr

    # The real URL still works.
    prefix = new_prefix()
    path = broker_config(tmp_path, amqp_url, prefix)
    env = {"AMQP_URL": amqp_url}
    try:
        ok = sealedsum("broker", "setup", "--config", str(path), "--show", "--keep-max-message-size", env=env)
        assert ok.returncode == 0, ok.stderr
        assert {f"{prefix}-{r}" for r in ROLES} <= set(ctl.users())
    finally:
        assert sealedsum("broker", "teardown", "--config", str(path), env=env).returncode == 0
