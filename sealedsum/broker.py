"""Least-privilege RabbitMQ accounts for one deployment (``sealedsum broker``).

One deployment is one broker prefix in one virtual host. ``broker setup`` gives it three
accounts, each allowed exactly what its role does on the broker and nothing else:

* the **sidecar** declares, reads and writes the deployment's own objects (the exchanges
  and queues of :class:`sealedsum.common.config.Topology`) and answers RPCs through the default
  exchange, which RabbitMQ's direct reply-to requires;
* a **producer** publishes to ``PREFIX.records`` and ``PREFIX.attest``, and declares, binds
  and reads only server-named queues (``amq.gen-*``), bound to ``PREFIX.announce``, where it
  hears of key rotations; it cannot bind to ``PREFIX.results`` or read records;
* a **consumer** declares, binds and reads its own queues (server-named ``amq.gen-*``, or
  named ``PREFIX.consumer.*``), binds them to ``PREFIX.results`` and sends requests to
  ``PREFIX.attest``.

RabbitMQ's rules (checked against a real broker by ``tests/integration/test_acl.py``):
``queue.declare`` needs *configure* on the queue; ``queue.bind`` needs *write* on the queue
and *read* on the exchange; ``basic.publish`` needs *write* on the exchange (the default
exchange is called ``amq.default`` for this); ``basic.consume`` and ``basic.get`` need
*read* on the queue. Consuming from the ``amq.rabbitmq.reply-to`` pseudo-queue needs no
permission at all, and a passive declare needs none either. Permissions are regular
expressions over names, matched unanchored, so every pattern here is anchored with ``^``
and ``$``; they cannot tell an exchange from a queue of the same name.

Two backends: ``rabbitmqctl`` (run as a subprocess, passwords on its standard input, never
on a command line), or a definitions file (``--definitions FILE``) that a broker loads at
boot (``load_definitions`` in rabbitmq.conf), with passwords stored as RabbitMQ's salted
SHA-256 hashes. docs/broker-accounts.md describes the table and what the tests prove.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sealedsum.common.config import Topology
from sealedsum.common.errors import ConfigError, SealedsumError

ROLES = ("sidecar", "producer", "consumer")
# Where a consumer's named queues must live: PREFIX.consumer.NAME.
CONSUMER_QUEUE_INFIX = "consumer"
DEFAULT_EXCHANGE = "amq.default"  # what RabbitMQ calls the default exchange ("") in permission checks
SERVER_NAMED_QUEUES = r"amq\.gen-.*"  # queue.declare with an empty name; clients cannot choose amq.* names
NOTHING = "^$"  # matches no exchange or queue name
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
RABBITMQCTL_ENV = "SEALEDSUM_RABBITMQCTL"
RABBITMQCTL_HINT = (
    "run this on the broker's host (rabbitmqctl ships with RabbitMQ and needs its Erlang cookie, so usually "
    "root or the rabbitmq user), or pass --rabbitmqctl 'docker compose exec -T rabbitmq rabbitmqctl', "
    "or write a definitions file with --definitions FILE for the broker to load at boot"
)
# PCRE metacharacters outside a character class (RabbitMQ uses Erlang's re, which is PCRE).
_REGEX_SPECIAL = set("\\^$.|?*+()[]{}")


class BrokerAdminError(SealedsumError):
    """rabbitmqctl is missing, cannot reach the node, or refused a change."""

    exit_code = 3


def password_env(role: str) -> str:
    return f"SEALEDSUM_{role.upper()}_PASSWORD"


def default_user(topology: Topology, role: str) -> str:
    return f"{topology.prefix}-{role}"


def consumer_queue_prefix(topology: Topology) -> str:
    """Named consumer queues (``sealedsum consume --queue``) must start with this."""
    return f"{topology.prefix}.{CONSUMER_QUEUE_INFIX}."


# --- permissions ------------------------------------------------------------------------

def escape(name: str) -> str:
    """``name`` as a PCRE literal (only the characters that are special outside a class)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name)


def _names(prefix: str, names) -> str:
    """An unanchored alternation matching exactly ``names``; shared ``PREFIX.`` factored out."""
    names = sorted(set(names))
    head = prefix + "."
    if len(names) > 1 and all(n.startswith(head) and len(n) > len(head) for n in names):
        return escape(head) + "(" + "|".join(escape(n[len(head):]) for n in names) + ")"
    if len(names) == 1:
        return escape(names[0])
    return "(" + "|".join(escape(n) for n in names) + ")"


def _anchored(*alternatives: str) -> str:
    if not alternatives:
        return NOTHING
    if len(alternatives) == 1:
        return f"^{alternatives[0]}$"
    return "^(" + "|".join(alternatives) + ")$"


@dataclass(frozen=True, slots=True)
class Permissions:
    configure: str
    write: str
    read: str

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.configure, self.write, self.read)


def role_permissions(topology: Topology) -> dict[str, Permissions]:
    """The configure/write/read patterns of each role, for one prefix."""
    p = topology.prefix
    own = _names(p, set(topology.exchanges) | set(topology.queues))
    mine = escape(consumer_queue_prefix(topology)) + ".*"
    return {
        # Declares and binds its objects (configure; write on the queues, read on the
        # exchanges), consumes records and requests (read), publishes dead letters and
        # results (write), answers RPCs on the default exchange (write amq.default). Declaring
        # PREFIX.records with a dead-letter exchange also needs read on it and write on
        # PREFIX.rejected, which "own" covers.
        "sidecar": Permissions(_anchored(own), _anchored(own, escape(DEFAULT_EXCHANGE)), _anchored(own)),
        # Publishes records and RPC requests; the reply comes through direct reply-to,
        # which needs no permission. Its one queue is server-named (configure; write on it
        # to bind, read to consume) and bound to PREFIX.announce (read on that exchange),
        # for key-rotation notices; it may read no other exchange, so it binds to nothing else.
        "producer": Permissions(_anchored(SERVER_NAMED_QUEUES),
                                _anchored(_names(p, (topology.records_exchange, topology.attest_exchange)),
                                          SERVER_NAMED_QUEUES),
                                _anchored(SERVER_NAMED_QUEUES, escape(topology.announce_exchange))),
        # Its own queues: declare (configure), bind (write on the queue, read on
        # PREFIX.results), consume (read). RPC requests: write on PREFIX.attest.
        "consumer": Permissions(_anchored(SERVER_NAMED_QUEUES, mine),
                                _anchored(SERVER_NAMED_QUEUES, mine, escape(topology.attest_exchange)),
                                _anchored(SERVER_NAMED_QUEUES, mine, escape(topology.results_exchange))),
    }


# --- passwords, URLs, definitions -------------------------------------------------------

def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt || sha256(salt || utf8 password)),
    with a random 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ's password salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def check_password_hash(password: str, encoded: str) -> bool:
    raw = base64.b64decode(encoded)
    return len(raw) == 36 and password_hash(password, raw[:4]) == encoded


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names, as pika reads it (``/`` when the path is empty)."""
    path = urlsplit(url).path
    if path and path != "/":
        return unquote(path.split("/")[1])
    return "/"


def account_url(base_url: str, user: str, password: str, vhost: str | None = None) -> str:
    """``base_url`` with these credentials (and this vhost, if given); host, port and query kept."""
    parts = urlsplit(base_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    path = parts.path if vhost is None else "/" + quote(vhost, safe="")
    return urlunsplit(parts._replace(netloc=netloc, path=path))


def _check_password(role: str, password: str, source: str) -> str:
    if not password:
        raise ConfigError(f"the {role} password from {source} is empty")
    if password != password.strip() or any(c in password for c in "\r\n\0"):
        raise ConfigError(f"the {role} password from {source} starts or ends with white space or holds a "
                          "line break or NUL", hint="rabbitmqctl reads passwords as one trimmed line")
    return password


@dataclass(slots=True)
class Account:
    role: str
    user: str
    permissions: Permissions
    password: str | None = None
    source: str = ""  # where the password came from: "$VAR", "FILE" or "generated"

    def url(self, base_url: str, vhost: str) -> str:
        return account_url(base_url, self.user, self.password or "", vhost)


def _password_from_file(path: Path, user: str) -> str | None:
    """The password in a URL file an earlier ``setup --out`` wrote, if it is for ``user``."""
    try:
        parts = urlsplit(path.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    if parts.username is None or parts.password is None or unquote(parts.username) != user:
        return None
    return unquote(parts.password)


def accounts(topology: Topology, users: dict[str, str | None] | None = None) -> list[Account]:
    users = users or {}
    perms = role_permissions(topology)
    out = []
    for role in ROLES:
        user = users.get(role) or default_user(topology, role)
        if not user or user != user.strip() or any(c in user for c in "\r\n\0"):
            raise ConfigError(f"bad {role} user name {user!r}")
        out.append(Account(role, user, perms[role]))
    if len({a.user for a in out}) != len(out):
        raise ConfigError("the sidecar, producer and consumer need three different user names")
    return out


def choose_passwords(accts: list[Account], env, out_dir: Path | None) -> None:
    """From ``SEALEDSUM_ROLE_PASSWORD``, else the URL file of an earlier run in ``out_dir``
    (so that running setup again keeps the passwords services already use), else new ones."""
    for a in accts:
        var = password_env(a.role)
        found = out_dir and _password_from_file(out_dir / f"{a.role}.url", a.user)
        if env.get(var):
            a.password, a.source = _check_password(a.role, env[var], f"${var}"), f"${var}"
        elif found:
            a.password, a.source = _check_password(a.role, found, str(out_dir / f"{a.role}.url")), \
                str(out_dir / f"{a.role}.url")
        else:
            a.password, a.source = secrets.token_urlsafe(24), "generated"


def definitions(accts: list[Account], vhost: str, *, with_guest: bool = False) -> dict:
    """A RabbitMQ definitions document: the vhost, the users (hashed passwords, no tags) and
    their permissions. A broker that loads definitions at boot does not create its default
    guest user or vhost; ``with_guest`` adds guest/guest as an administrator (demo only)."""
    users, permissions = [], []
    for a in accts:
        users.append({"name": a.user, "password_hash": password_hash(a.password or ""),
                      "hashing_algorithm": HASHING_ALGORITHM, "tags": []})
        c, w, r = a.permissions.as_tuple()
        permissions.append({"user": a.user, "vhost": vhost, "configure": c, "write": w, "read": r})
    if with_guest:
        users.append({"name": "guest", "password_hash": password_hash("guest"),
                      "hashing_algorithm": HASHING_ALGORITHM, "tags": ["administrator"]})
        permissions.append({"user": "guest", "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
    return {"vhosts": [{"name": vhost}], "users": users, "permissions": permissions}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- rabbitmqctl ------------------------------------------------------------------------

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

    def add_user(self, user: str, password: str) -> None:
        self.run("add_user", user, stdin=password + "\n")  # read from stdin: never on a command line

    def change_password(self, user: str, password: str) -> None:
        self.run("change_password", user, stdin=password + "\n")

    def set_permissions(self, vhost: str, user: str, p: Permissions) -> None:
        self.run("set_permissions", "-p", vhost, user, *p.as_tuple())

    def delete_user(self, user: str) -> None:
        self.run("delete_user", user)


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
