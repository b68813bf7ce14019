"""``sealedsum broker``: least-privilege RabbitMQ accounts for one deployment.

One deployment is one broker prefix in one virtual host. ``broker setup`` gives it three
accounts, each allowed exactly what its role does on the broker and nothing else:

* the **sidecar** declares, reads and writes the deployment's own objects (the exchanges
  and queues of :class:`sealedsum.common.topology.Topology`) and answers RPCs through the default
  exchange, which RabbitMQ's direct reply-to requires;
* a **producer** publishes to ``PREFIX.records`` and ``PREFIX.attest``, and declares, binds
  and reads only server-named queues (``amq.gen-*``), bound to ``PREFIX.announce``, where it
  hears of key rotations; it cannot bind to ``PREFIX.results`` or read records;
* a **consumer** declares, binds and reads its own queues (server-named ``amq.gen-*``, or
  named ``PREFIX.consumer.*``), binds them to ``PREFIX.results`` and sends requests to
  ``PREFIX.attest``.

The patterns themselves, and RabbitMQ's rules behind them, are in
:func:`sealedsum.common.topology.role_permissions`, next to the names they are made of.

Two backends: ``rabbitmqctl`` (run as a subprocess, passwords on its standard input, never
on a command line), or a definitions file (``--definitions FILE``) that a broker loads at
boot (``load_definitions`` in rabbitmq.conf), with passwords stored as RabbitMQ's salted
SHA-256 hashes. docs/broker-accounts.md describes the table and what the tests prove.
"""

from __future__ import annotations

import argparse
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

from sealedsum.common.config import Config, redact_url
from sealedsum.common.errors import ConfigError, SealedsumError
from sealedsum.common.topology import ROLES, Permissions, Topology, role_permissions

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
RABBITMQCTL_ENV = "SEALEDSUM_RABBITMQCTL"
RABBITMQCTL_HINT = (
    "run this on the broker's host (rabbitmqctl ships with RabbitMQ and needs its Erlang cookie, so usually "
    "root or the rabbitmq user), or pass --rabbitmqctl 'docker compose exec -T rabbitmq rabbitmqctl', "
    "or write a definitions file with --definitions FILE for the broker to load at boot"
)


class BrokerAdminError(SealedsumError):
    """rabbitmqctl is missing, cannot reach the node, or refused a change."""

    exit_code = 3


def password_env(role: str) -> str:
    return f"SEALEDSUM_{role.upper()}_PASSWORD"


def default_user(topology: Topology, role: str) -> str:
    return f"{topology.prefix}-{role}"


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


# --- the commands -----------------------------------------------------------------------

def _load(args: argparse.Namespace) -> tuple[Config, list[Account], str]:
    from sealedsum.cli import load_config

    cfg = load_config(args)
    vhost = args.vhost or vhost_of(cfg.broker.url)
    users = {role: getattr(args, f"{role}_user") for role in ROLES}
    return cfg, accounts(cfg.broker.topology, users), vhost


def _print_table(accts: list[Account], vhost: str, prefix: str) -> None:
    print(f"vhost {vhost!r}, prefix {prefix!r}")
    for a in accts:
        print(f"  {a.role:<8} {a.user}")
        for kind, pattern in zip(("configure", "write", "read"), a.permissions.as_tuple()):
            print(f"    {kind:<9} {pattern}")


def _setup(args: argparse.Namespace) -> int:
    cfg, accts, vhost = _load(args)
    out_dir = Path(args.out) if args.out else None
    if args.with_guest and not args.definitions:
        raise ConfigError("--with-guest only applies to --definitions")
    if args.apply and not args.definitions:
        raise ConfigError("--apply only applies to --definitions (without it, setup always applies)")
    choose_passwords(accts, os.environ, out_dir)
    generated = [a.role for a in accts if a.source == "generated"]
    if generated and not out_dir and not args.show:
        raise ConfigError(
            f"no password given for {', '.join(generated)}, and a generated one would be lost",
            hint="pass --out DIR (writes ROLE.url files, mode 0600) or --show, "
                 f"or set {', '.join('$' + password_env(r) for r in generated)}")
    live = not args.definitions or args.apply
    ctl = Rabbitmqctl(args.rabbitmqctl) if live else None  # fail early if it is missing

    if args.definitions:
        doc = definitions(accts, vhost, with_guest=args.with_guest)
        _write_private(Path(args.definitions), json.dumps(doc, indent=2) + "\n")
    done = apply(ctl, accts, vhost) if ctl else {}
    if out_dir:
        for a in accts:
            _write_private(out_dir / f"{a.role}.url", a.url(cfg.broker.url, vhost) + "\n")

    _print_table(accts, vhost, cfg.broker.topology.prefix)
    for a in accts:
        state = done.get(a.user, "in the definitions file only")
        print(f"  {a.user}: {state}; password {a.source}")
    if args.definitions:
        print(f"wrote {args.definitions} (password hashes only; load it with load_definitions or "
              f"`rabbitmqctl import_definitions`)")
    if out_dir:
        print(f"wrote {', '.join(str(out_dir / (a.role + '.url')) for a in accts)} (mode 0600, with passwords)")
    if args.show:
        for a in accts:
            print(f"{a.role} {a.url(cfg.broker.url, vhost)}")
    else:
        print("URLs without passwords: " + ", ".join(
            redact_url(a.url(cfg.broker.url, vhost)) for a in accts))
    return 0


def _teardown(args: argparse.Namespace) -> int:
    _, accts, _ = _load(args)
    done = remove(Rabbitmqctl(args.rabbitmqctl), accts)
    for user, state in done.items():
        print(f"{user}: {state}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from sealedsum.cli import add_config_argument

    b = sub.add_parser("broker", help="create least-privilege RabbitMQ accounts for the sidecar, producers "
                                      "and consumers",
                       description="Manage the three RabbitMQ accounts of one deployment (the config's "
                                   "broker.prefix and virtual host). See docs/broker-accounts.md.")
    bsub = b.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_config_argument(p)
        p.add_argument("--vhost", help="virtual host (default: the one in broker.url or AMQP_URL)")
        for role in ROLES:
            p.add_argument(f"--{role}-user", metavar="NAME", help=f"the {role}'s user name (default: PREFIX-{role})")
        p.add_argument("--rabbitmqctl", metavar="CMD",
                       help=f"how to run rabbitmqctl, e.g. 'docker compose exec -T rabbitmq rabbitmqctl' "
                            f"(default: ${RABBITMQCTL_ENV} or rabbitmqctl)")

    s = bsub.add_parser(
        "setup", help="create or update the sidecar, producer and consumer users and their permissions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Create (or update: running it again is safe) three users for the config's prefix and\n"
                    "virtual host, with no tags and only the permissions their role needs, through\n"
                    "rabbitmqctl. Passwords come from $SEALEDSUM_SIDECAR_PASSWORD,\n"
                    "$SEALEDSUM_PRODUCER_PASSWORD and $SEALEDSUM_CONSUMER_PASSWORD, else from the URL\n"
                    "files of an earlier run in --out DIR, else they are generated. They are never\n"
                    "printed unless --show is given.",
        epilog="examples:\n"
               "  sealedsum broker setup --config sealedsum.toml --out ./secrets   # ./secrets/producer.url ...\n"
               "  SEALEDSUM_SIDECAR_PASSWORD=... SEALEDSUM_PRODUCER_PASSWORD=... SEALEDSUM_CONSUMER_PASSWORD=... \\\n"
               "    sealedsum broker setup --config sealedsum.toml --definitions definitions.json\n"
               "  sealedsum broker teardown --config sealedsum.toml")
    common(s)
    s.add_argument("--out", metavar="DIR",
                   help="write sidecar.url, producer.url and consumer.url (ready AMQP URLs, mode 0600) here")
    s.add_argument("--show", action="store_true", help="print the URLs with their passwords on stdout")
    s.add_argument("--definitions", metavar="FILE",
                   help="write a RabbitMQ definitions file (vhost, users with password hashes, permissions) "
                        "for load_definitions at broker boot, instead of changing the running broker")
    s.add_argument("--apply", action="store_true", help="with --definitions: also apply with rabbitmqctl")
    s.add_argument("--with-guest", action="store_true",
                   help="with --definitions: also define guest/guest as an administrator, as a fresh broker "
                        "would have it (a broker loading definitions creates no default user). Demo only")
    s.set_defaults(func=_setup, role="admin", default_log_level="WARNING")

    t = bsub.add_parser("teardown", help="delete the sidecar, producer and consumer users",
                        description="Delete the three users setup created (missing ones are fine). Users "
                                    "with tags are never deleted. Exchanges and queues are left alone.")
    common(t)
    t.set_defaults(func=_teardown, role="admin", default_log_level="WARNING")
