"""``rabbitmqctl`` as a subprocess, and the accounts of :mod:`sealedsum.accounts` applied
with it to a running broker (idempotent) or removed from it.

Passwords reach rabbitmqctl on its standard input, never on a command line. A user of the
same name that has tags belongs to somebody else and is neither taken over nor deleted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import uuid

from sealedsum.accounts import Account, vhost_of
from sealedsum.common import amqp
from sealedsum.common.config import BrokerSettings, redact_url
from sealedsum.common.errors import BrokerAdminError, ConfigError, TransportError
from sealedsum.common.topology import Permissions
from sealedsum.message_limits import RABBITMQ_DEFAULT

RABBITMQCTL_ENV = "SEALEDSUM_RABBITMQCTL"

# Both places a node may keep it: the rabbit application's environment, which 3.10 reads when
# a channel opens (the version tested), and a persistent term newer releases copy it into at boot.
READ_MAX_MESSAGE_SIZE = ("{application:get_env(rabbit, max_message_size), "
                         "persistent_term:get(max_message_size, undefined)}.")
_READ_ANSWER = re.compile(r"\{(?:\{ok,(?P<env>\d+)\}|undefined),(?:(?P<term>\d+)|undefined)\}")


def set_max_message_size_expr(value: int) -> str:
    """The Erlang expression ``rabbitmqctl eval`` runs to set the node's max_message_size."""
    value = int(value)
    return (f"ok = application:set_env(rabbit, max_message_size, {value}), "
            f"case persistent_term:get(max_message_size, undefined) of undefined -> ok; "
            f"_ -> persistent_term:put(max_message_size, {value}) end.")
RABBITMQCTL_HINT = (
    "run this on the broker's host (rabbitmqctl ships with RabbitMQ and needs its Erlang cookie, so usually "
    "root or the rabbitmq user), or pass --rabbitmqctl 'docker compose exec -T rabbitmq rabbitmqctl', "
    "or write a definitions file with --definitions FILE for the broker to load at boot"
)


class Rabbitmqctl:
    """rabbitmqctl as a subprocess. ``command`` may be a wrapper, e.g.
    ``docker compose exec -T rabbitmq rabbitmqctl``."""

    def __init__(self, command: str | None = None, timeout: float = 60.0) -> None:
        command = command or os.environ.get(RABBITMQCTL_ENV) or "rabbitmqctl"
        try:
            self.argv = shlex.split(command)
        except ValueError as err:
            raise ConfigError(f"--rabbitmqctl {command!r}: {err}") from None
        if not self.argv:
            raise ConfigError("--rabbitmqctl is empty")
        if shutil.which(self.argv[0]) is None:
            raise BrokerAdminError(f"{self.argv[0]!r} was not found", hint=RABBITMQCTL_HINT)
        self.timeout = timeout

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([*self.argv, "-q", *args], input=stdin if stdin is not None else "",
                                    capture_output=True, text=True, timeout=self.timeout)
        except OSError as err:
            raise BrokerAdminError(f"cannot run {self.argv[0]!r}: {err.strerror}", hint=RABBITMQCTL_HINT) from err
        except subprocess.TimeoutExpired as err:
            raise BrokerAdminError(f"`rabbitmqctl {args[0]}` did not finish within {self.timeout:.0f} s",
                                   hint="is the RabbitMQ node running? `rabbitmqctl status` tells") from err
        if result.returncode != 0:
            # rabbitmqctl never echoes a password it read from stdin; keep only its error text.
            detail = " ".join(line.strip() for line in (result.stderr or result.stdout).splitlines()
                              if line.strip() and not line.startswith("Usage"))[:300]
            raise BrokerAdminError(f"`rabbitmqctl {args[0]}` failed (exit {result.returncode}): {detail}",
                                   hint="is the RabbitMQ node running, and may this user run rabbitmqctl "
                                        "(root or the rabbitmq user, with its Erlang cookie)? "
                                        "`rabbitmqctl status` tells")
        return result

    def _json(self, *args: str) -> list:
        out = self.run(*args, "--formatter", "json").stdout.strip()
        try:
            return json.loads(out) if out else []
        except ValueError as err:
            raise BrokerAdminError(f"`rabbitmqctl {args[0]}` printed no JSON: {out[:200]!r}",
                                   hint="RabbitMQ 3.8 or newer is needed") from err

    def users(self) -> dict[str, list[str]]:
        """User name -> tags."""
        out = {}
        for row in self._json("list_users"):
            tags = row.get("tags", [])
            if isinstance(tags, str):  # older releases print "[administrator]"-like strings
                tags = [t for t in tags.strip("[]").replace(",", " ").split() if t]
            out[row["user"]] = list(tags)
        return out

    def vhosts(self) -> set[str]:
        return {row["name"] for row in self._json("list_vhosts", "name")}

    def permissions(self, vhost: str) -> dict[str, Permissions]:
        return {row["user"]: Permissions(row["configure"], row["write"], row["read"])
                for row in self._json("list_permissions", "-p", vhost)}

    def queues(self, vhost: str) -> set[str]:
        return {row["name"] for row in self._json("list_queues", "-p", vhost, "name")}

    def node(self) -> str:
        """The name of the node rabbitmqctl talks to, e.g. ``rabbit@host``."""
        return self.run("eval", "node().").stdout.strip()

    def add_user(self, user: str, password: str) -> None:
        self.run("add_user", user, stdin=password + "\n")  # read from stdin: never on a command line

    def change_password(self, user: str, password: str) -> None:
        self.run("change_password", user, stdin=password + "\n")

    def set_permissions(self, vhost: str, user: str, p: Permissions) -> None:
        self.run("set_permissions", "-p", vhost, user, *p.as_tuple())

    def delete_user(self, user: str) -> None:
        self.run("delete_user", user)

    def max_message_size(self) -> int:
        """The node's ``max_message_size`` in bytes, as its channels apply it."""
        out = self.run("eval", READ_MAX_MESSAGE_SIZE).stdout.strip()
        m = _READ_ANSWER.fullmatch(out)
        if m is None:
            raise BrokerAdminError(f"`rabbitmqctl eval` printed {out[:200]!r} for max_message_size",
                                   hint="RabbitMQ 3.8 or newer is needed")
        env, term = m.group("env"), m.group("term")
        # Where a node has the persistent term, that is what its channels read.
        return int(term) if term is not None else int(env) if env is not None else RABBITMQ_DEFAULT

    def set_max_message_size(self, value: int) -> None:
        """Set the node's ``max_message_size`` until it restarts; channels opened afterwards apply it.

        :raises BrokerAdminError: the node reports another value afterwards.
        """
        if not isinstance(value, int) or not 0 < value <= RABBITMQ_DEFAULT:
            raise ValueError(f"max_message_size must be 1..{RABBITMQ_DEFAULT} bytes, not {value!r}")
        self.run("eval", set_max_message_size_expr(value))
        now = self.max_message_size()
        if now != value:
            raise BrokerAdminError(f"max_message_size is {now} bytes after setting it to {value}",
                                   hint=f"put `max_message_size = {value}` in rabbitmq.conf and restart the node")


SAME_BROKER_HINT = ("point --rabbitmqctl (or $" + RABBITMQCTL_ENV + ") at the URL's node, e.g. "
                    "'docker compose exec -T rabbitmq rabbitmqctl', or fix broker.url / AMQP_URL")


def check_same_broker(ctl: Rabbitmqctl, settings: BrokerSettings) -> None:
    """Refuse unless the node ``ctl`` manages is the broker ``settings.url`` names: a queue
    declared over AMQP must show up in ``rabbitmqctl list_queues``. Otherwise setup would
    print URLs for one broker after creating the users on another.

    :raises ConfigError: the URL's broker cannot be reached, or is another one.
    :raises BrokerAdminError: rabbitmqctl itself fails.
    """
    node = ctl.node()
    url = redact_url(settings.url)
    vhost = vhost_of(settings.url)
    marker = f"sealedsum.setup-probe.{uuid.uuid4().hex}"
    try:
        with amqp.marker_queue(settings, marker) as cluster:
            seen = vhost in ctl.vhosts() and marker in ctl.queues(vhost)
    except TransportError as err:
        reason = str(err).replace(f" at {url}", "")
        hint = SAME_BROKER_HINT
        if vhost not in ctl.vhosts():  # the login is refused for a vhost that does not exist
            hint = (f"{node} has no virtual host {vhost!r}: if it is the URL's broker, create it with "
                    f"`rabbitmqctl add_vhost {shlex.quote(vhost)}`; otherwise {SAME_BROKER_HINT}")
        raise ConfigError(f"rabbitmqctl manages node {node}, but broker.url (or AMQP_URL) names {url}, where "
                          f"setup cannot check it is that node ({reason}); nothing was changed",
                          hint=hint) from err
    if not seen:
        raise ConfigError(f"rabbitmqctl manages node {node}, but broker.url (or AMQP_URL) names {url}, another "
                          f"broker (cluster {cluster or '?'}): a queue declared there is not on {node}; "
                          "nothing was changed", hint=SAME_BROKER_HINT)


def _refuse_tagged(existing: dict[str, list[str]], accts: list[Account], action: str) -> None:
    """Our accounts carry no tags (no management UI, no policies, no administration): a
    tagged user of that name is somebody else's (an administrator, a monitoring account)
    and is left alone rather than stripped of its tags."""
    for a in accts:
        if existing.get(a.user):
            raise ConfigError(
                f"user {a.user!r} already exists with tags {existing[a.user]}; refusing to {action} it",
                hint=f"choose another name with --{a.role}-user")


def apply(ctl: Rabbitmqctl, accts: list[Account], vhost: str) -> dict[str, str]:
    """Create or update the users (idempotent); return user -> "created" | "updated"."""
    if vhost not in ctl.vhosts():
        raise ConfigError(f"the virtual host {vhost!r} does not exist on the broker",
                          hint=f"create it first: rabbitmqctl add_vhost {shlex.quote(vhost)}")
    existing = ctl.users()
    _refuse_tagged(existing, accts, "take over")
    done = {}
    for a in accts:
        if a.user in existing:
            ctl.change_password(a.user, a.password or "")
            done[a.user] = "updated"
        else:
            ctl.add_user(a.user, a.password or "")  # a new user has no tags
            done[a.user] = "created"
        ctl.set_permissions(vhost, a.user, a.permissions)
    return done


def remove(ctl: Rabbitmqctl, accts: list[Account]) -> dict[str, str]:
    """Delete the users; a missing one is fine. Return user -> "deleted" | "absent"."""
    existing = ctl.users()
    _refuse_tagged(existing, accts, "delete")
    done = {}
    for a in accts:
        if a.user in existing:
            ctl.delete_user(a.user)
            done[a.user] = "deleted"
        else:
            done[a.user] = "absent"
    return done
