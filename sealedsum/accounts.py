"""The RabbitMQ accounts of one deployment (``sealedsum broker``): one user per role of
:data:`sealedsum.common.topology.ROLES`, with that role's permissions, a password and the
AMQP URL its service connects with.

Passwords come from ``SEALEDSUM_ROLE_PASSWORD``, else from the URL files an earlier run
wrote, else they are generated. A broker gets them either from :mod:`sealedsum.rabbitmqctl`
(a running broker) or from a definitions file it loads at boot (``load_definitions`` in
rabbitmq.conf), which holds them as RabbitMQ's salted SHA-256 hashes (:func:`definitions`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from sealedsum.common.errors import ConfigError
from sealedsum.common.topology import ROLES, Permissions, Topology, role_permissions

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


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


def write_private(path: Path, text: str) -> None:
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
