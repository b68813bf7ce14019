"""The one TOML file every subcommand reads (``--config FILE``).

``[broker]`` and ``[trust]`` are operational and client-side settings; ``[enclave]``
and ``[streams.*]`` are the measured policy (see :mod:`sealedsum.common.policy`). ``AMQP_URL``
in the environment overrides ``broker.url`` (and ``broker.urls``): several nodes of one
RabbitMQ cluster are given as ``broker.urls = [...]`` or a comma-separated ``AMQP_URL``.
Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

from sealedsum.common import nitro
from sealedsum.common.attestation import DEFAULT_MAX_QUOTE_AGE_SECONDS, TrustAnchors, decode_measurement, decode_platform_key
from sealedsum.common.errors import ConfigError
from sealedsum.common.policy import EnclavePolicy
from sealedsum.common.requirements import Requirements
from sealedsum.common.tables import number, take
from sealedsum.common.topology import Topology  # config.Topology stays importable: the protocol test vectors use it
from sealedsum.common.policy_parse import enclave_policy

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
TOP_KEYS = {"broker", "trust", "require", "producer", "consumer", "enclave", "streams", "identities", "budget_groups",
            "cluster",
            "platform"}
# What `sealedsum sidecar` runs on ([platform] kind).
PLATFORMS = ("emulated", "nitro")
CHAIN_STATE_FILE = "consumer-chains.json"


def default_chain_state(env: Mapping[str, str]) -> Path | None:
    """Where a consumer keeps the ledger chains it verified unless told otherwise:
    ``$XDG_STATE_HOME/sealedsum/consumer-chains.json``, ``XDG_STATE_HOME`` defaulting to
    ``~/.local/state`` (the XDG base directory rules); ``None`` when neither is set."""
    base = env.get("XDG_STATE_HOME") or (str(Path(env["HOME"]) / ".local" / "state") if env.get("HOME") else "")
    return Path(base) / "sealedsum" / CHAIN_STATE_FILE if base else None


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def redact_urls(urls) -> str:
    """Each URL with its password replaced, comma-separated (for logs and errors)."""
    return ", ".join(redact_url(u) for u in urls)


# A comma followed by a scheme (amqp://, or a wrong one, which is then refused) starts the
# next URL; any other comma (one in a password, say) belongs to the URL it is in.
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(value: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list such as ``AMQP_URL="amqp://...:5681/%2F,amqp://...:5682/%2F"``."""
    return tuple(u for u in _URL_SEPARATOR.split(value.strip()) if u)


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Where and how to reach the broker.

    ``urls`` are the nodes of one RabbitMQ cluster, tried in turn (:mod:`sealedsum.common.amqp`
    starts each new connection at the next one, so a reconnect moves on from a node that went
    away); ``url`` is the first of them, for everything that needs one URL (the vhost, the
    account, messages). Given only ``url``, ``urls`` is ``(url,)``; a ``url`` that ``urls``
    does not hold replaces them (``dataclasses.replace(settings, url=...)`` means one broker).
    """

    url: str = DEFAULT_AMQP_URL
    topology: Topology = Topology()
    queue_type: str = "quorum"
    attest_timeout_seconds: float = 10.0
    # How long clients keep reconnecting (capped exponential backoff) when the broker goes away.
    reconnect_seconds: float = 60.0
    # Back-pressure: the records queue holds at most this many; past it the broker nacks
    # new records (reject-publish) and producers wait and retry within reconnect_seconds.
    max_queued_records: int = 1_000_000
    urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        urls = tuple(self.urls)
        if self.url not in urls:
            urls = (self.url,)
        else:  # the same nodes, starting at url
            i = urls.index(self.url)
            urls = urls[i:] + urls[:i]
        object.__setattr__(self, "urls", urls)

    def __repr__(self) -> str:
        if len(self.urls) > 1:
            return (f"BrokerSettings(urls={[redact_url(u) for u in self.urls]!r}, "
                    f"prefix={self.topology.prefix!r})")
        return f"BrokerSettings(url={redact_url(self.url)!r}, prefix={self.topology.prefix!r})"


@dataclass(frozen=True, slots=True)
class Config:
    broker: BrokerSettings
    trust: TrustAnchors | None
    policy: EnclavePolicy | None
    path: Path | None = None
    require: Requirements = Requirements()
    require_streams: dict[str, Requirements] = field(default_factory=dict)
    identity_file: Path | None = None
    # Producers attest again this often, so they pick up rotated keys before the old
    # epoch retires (keep it well below the enclave's key_grace_seconds).
    reattest_seconds: float = 300.0
    # Where a consumer remembers each stream's verified ledger chain between runs (``None``: it
    # does not, and a restarted consumer accepts a ledger that started over; docs/protocol.md 15.5).
    chain_state: Path | None = None
    # The platform the sidecar runs on ([platform] kind): which Platform the supervisor builds.
    platform: str = "emulated"

    def with_broker_url(self, url: str) -> "Config":
        """This config, connecting to ``url`` instead: one process that produces and consumes
        with two broker accounts loads the file once and derives one config per account
        (``AMQP_URL`` would set the URL of every config the process loads). ``url`` may list
        several nodes, comma-separated, as ``AMQP_URL`` may.

        :raises ConfigError: ``url`` is not an amqp:// or amqps:// URL, or not a valid list of them.
        """
        urls = split_urls(url) if isinstance(url, str) else ()
        urls = _checked_urls(urls, "the URL") if urls else (_checked_url(url),)
        return dataclasses.replace(self, broker=dataclasses.replace(self.broker, url=urls[0], urls=urls))

    def requirements(self, stream: str) -> Requirements:
        """What this client demands of ``stream``: ``[require]`` with ``[require.streams.NAME]`` on top."""
        override = self.require_streams.get(stream)
        return self.require.merged(override) if override else self.require

    def require_trust(self) -> TrustAnchors:
        if self.trust is None:
            raise ConfigError(
                "the config has no [trust] table: a client cannot know which enclave to trust",
                hint="add platform_key (from `sealedsum platform init`) and measurements (from `sealedsum measure`)",
            )
        return self.trust

    def require_policy(self) -> EnclavePolicy:
        if self.policy is None:
            raise ConfigError("the config defines no [streams.NAME] table", hint="see the README's config section")
        return self.policy


def _checked_url(url: object) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in ("amqp", "amqps"):
        raise ConfigError("broker.url (or AMQP_URL) must be an amqp:// or amqps:// URL")
    return url


def _vhost(url: str) -> str:
    """The virtual host an AMQP URL names, as pika reads it (as ``sealedsum.accounts.vhost_of``)."""
    path = urlsplit(url).path
    return unquote(path.split("/")[1]) if path and path != "/" else "/"


def _checked_urls(urls: object, where: str) -> tuple[str, ...]:
    """Several nodes of one cluster: at least one URL, each amqp:// or amqps://, none twice,
    and all with the same account and virtual host (the topology and the consumers' chain
    state are per vhost; an account is the same on every node of a cluster)."""
    if isinstance(urls, str) or not isinstance(urls, (list, tuple)) or not urls:
        raise ConfigError(f"{where} must be a non-empty list of amqp:// or amqps:// URLs")
    if len(urls) == 1:
        return (_checked_url(urls[0]),)  # one broker: the message of old
    for u in urls:
        if not isinstance(u, str) or urlsplit(u).scheme not in ("amqp", "amqps"):
            raise ConfigError(f"{where} must hold only amqp:// or amqps:// URLs")
    urls = tuple(urls)
    if len(set(urls)) != len(urls):
        raise ConfigError(f"{where} lists a URL twice: {redact_urls(urls)}")
    first = urls[0]
    for u in urls[1:]:
        if _vhost(u) != _vhost(first) or urlsplit(u).username != urlsplit(first).username:
            raise ConfigError(f"{where} must name the same account and virtual host on every node: "
                              f"{redact_url(first)} and {redact_url(u)} do not",
                              hint="list the nodes of one RabbitMQ cluster, with one account")
    return urls


def _broker(raw: Mapping[str, Any], env: Mapping[str, str]) -> BrokerSettings:
    d = take(raw, {"url", "urls", "prefix", "queue_type", "attest_timeout_seconds", "reconnect_seconds",
                    "max_queued_records"}, "broker")
    if "url" in d and "urls" in d:
        raise ConfigError("set broker.url or broker.urls, not both",
                          hint="broker.urls = [...] lists the nodes of one cluster; its first is the url")
    if env.get("AMQP_URL"):
        urls = _checked_urls(split_urls(env["AMQP_URL"]), "AMQP_URL")
    elif "urls" in d:
        urls = _checked_urls(d["urls"], "broker.urls")
    else:
        urls = (_checked_url(d.get("url") or DEFAULT_AMQP_URL),)
    url = urls[0]
    prefix = d.get("prefix", "sealedsum")
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in " #*"):
        raise ConfigError("broker.prefix must be a non-empty name without spaces, # or *")
    queue_type = d.get("queue_type", "quorum")
    if queue_type not in ("quorum", "classic"):
        raise ConfigError("broker.queue_type must be 'quorum' or 'classic'")
    timeout = number(d.get("attest_timeout_seconds", 10.0), "broker.attest_timeout_seconds")
    if timeout <= 0:
        raise ConfigError("broker.attest_timeout_seconds must be a positive number")
    reconnect = number(d.get("reconnect_seconds", 60.0), "broker.reconnect_seconds")
    if reconnect < 0:
        raise ConfigError("broker.reconnect_seconds must be >= 0 (0: do not reconnect)")
    max_queued = d.get("max_queued_records", 1_000_000)
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
        raise ConfigError("broker.max_queued_records must be a positive integer")
    return BrokerSettings(url, Topology(prefix), queue_type, timeout, reconnect, max_queued, urls)


def _trust(raw: Mapping[str, Any], path: Path | None) -> TrustAnchors:
    d = take(raw, {"platform_key", "measurements", "max_quote_age_seconds", "nitro"}, "trust")
    # Each format a client accepts has its root here; one of them at least.
    if "platform_key" not in d and "nitro" not in d:
        raise ConfigError("trust.platform_key is missing", hint="paste the key printed by `sealedsum platform init` "
                          "(or add [trust.nitro] for a Nitro enclave, docs/nitro.md)")
    measurements = d.get("measurements", [])
    if not isinstance(measurements, list) or not all(isinstance(m, str) for m in measurements):
        raise ConfigError("trust.measurements must be a list of hex strings")
    age = number(d.get("max_quote_age_seconds", DEFAULT_MAX_QUOTE_AGE_SECONDS), "trust.max_quote_age_seconds")
    return TrustAnchors(
        decode_platform_key(d["platform_key"]) if "platform_key" in d else None,
        frozenset(decode_measurement(m) for m in measurements),
        age,
        _nitro_trust(d["nitro"], path) if "nitro" in d else None,
    )


def _nitro_trust(raw: Mapping[str, Any], path: Path | None) -> nitro.NitroTrust:
    """``[trust.nitro]``: the AWS root (``root_certificate``, a PEM file relative to the config
    file, or ``root_certificate_pem``, the PEM text), ``[[trust.nitro.pcrs]]`` tables of
    ``pcr0``, ``pcr1``, ``pcr2`` (hex), and ``allow_debug``."""
    d = take(raw, {"root_certificate", "root_certificate_pem", "pcrs", "allow_debug"}, "trust.nitro")
    if ("root_certificate" in d) == ("root_certificate_pem" in d):
        raise ConfigError("trust.nitro needs exactly one of root_certificate (a PEM file) and root_certificate_pem",
                          hint="the AWS Nitro Enclaves root G1 certificate (docs/nitro.md)")
    if "root_certificate" in d:
        value = d["root_certificate"]
        if not isinstance(value, str) or not value:
            raise ConfigError("trust.nitro.root_certificate must be a path")
        file = Path(value).expanduser()
        if not file.is_absolute() and path is not None:
            file = path.parent / file  # relative to the config file
        try:
            pem = file.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read trust.nitro.root_certificate {file}: {err.strerror or err}") from None
    else:
        if not isinstance(d["root_certificate_pem"], str):
            raise ConfigError("trust.nitro.root_certificate_pem must be the PEM text")
        pem = d["root_certificate_pem"].encode("ascii", "replace")
    allow_debug = d.get("allow_debug", False)
    if not isinstance(allow_debug, bool):
        raise ConfigError("trust.nitro.allow_debug must be true or false")
    tables = d.get("pcrs", [])
    if not isinstance(tables, list):
        raise ConfigError("trust.nitro.pcrs must be an array of tables ([[trust.nitro.pcrs]])")
    pcrs = set()
    for i, table in enumerate(tables):
        where = f"trust.nitro.pcrs[{i}]"
        t = take(table, {"pcr0", "pcr1", "pcr2"}, where)
        if set(t) != {"pcr0", "pcr1", "pcr2"}:
            raise ConfigError(f"{where} needs pcr0, pcr1 and pcr2")
        pcrs.add(tuple(nitro.decode_pcr(t[f"pcr{n}"], f"{where}.pcr{n}") for n in range(3)))
    return nitro.NitroTrust(nitro.load_root(pem), frozenset(pcrs), allow_debug)


def _platform(raw: Mapping[str, Any]) -> str:
    d = take(raw, {"kind"}, "platform")
    kind = d.get("kind", "emulated")
    if kind not in PLATFORMS:
        raise ConfigError(f"platform.kind must be one of {', '.join(PLATFORMS)}")
    return kind


def from_mapping(raw: Mapping[str, Any], env: Mapping[str, str] | None = None, path: Path | None = None, *,
                 read_trust: bool = True) -> Config:
    """The config in ``raw``; ``read_trust=False`` leaves ``[trust]`` unread (``trust`` is
    ``None``): `sealedsum measure` prints what goes into it, so a placeholder there must not stop it."""
    env = os.environ if env is None else env
    d = take(raw, TOP_KEYS, "config")
    broker = _broker(d.get("broker", {}), env)
    trust = _trust(d["trust"], path) if "trust" in d and read_trust else None
    policy = (enclave_policy(d.get("enclave", {}), d["streams"], d.get("identities"), d.get("budget_groups"),
                             d.get("cluster"))
              if "streams" in d else None)
    if policy is None and ("enclave" in d or "identities" in d or "budget_groups" in d or "cluster" in d):
        raise ConfigError("[enclave], [identities] or [budget_groups] is set but no [streams.NAME] table is defined")
    raw_require = dict(d.get("require", {}))
    per_stream = raw_require.pop("streams", {})
    if not isinstance(per_stream, Mapping):
        raise ConfigError("require.streams must hold one table per stream")
    require = Requirements.from_mapping(raw_require)
    require_streams = {name: Requirements.from_mapping(r, f"require.streams.{name}") for name, r in per_stream.items()}
    producer = take(d.get("producer", {}), {"identity_file", "reattest_seconds"}, "producer")
    reattest = number(producer.get("reattest_seconds", 300.0), "producer.reattest_seconds")
    if reattest <= 0:
        raise ConfigError("producer.reattest_seconds must be > 0")
    identity = env.get("SEALEDSUM_IDENTITY_FILE") or producer.get("identity_file")
    if identity is not None and not isinstance(identity, str):
        raise ConfigError("producer.identity_file must be a path")
    identity_path = None
    if identity:
        identity_path = Path(identity)
        if not identity_path.is_absolute() and path is not None:
            identity_path = path.parent / identity_path  # relative to the config file
    return Config(broker, trust, policy, path, require, require_streams, identity_path, reattest,
                  _chain_state(d.get("consumer", {}), env, path), _platform(d.get("platform", {})))


def _chain_state(raw: Mapping[str, Any], env: Mapping[str, str], path: Path | None) -> Path | None:
    """``[consumer] chain_state``: a path (relative to the config file), ``false`` for none;
    unset, :func:`default_chain_state`."""
    d = take(raw, {"chain_state"}, "consumer")
    value = d.get("chain_state", True)
    if value is False:
        return None
    if value is True:
        return default_chain_state(env)
    if not isinstance(value, str) or not value:
        raise ConfigError("consumer.chain_state must be a path, or false to keep no chain state")
    chain_path = Path(value).expanduser()
    if not chain_path.is_absolute() and path is not None:
        chain_path = path.parent / chain_path  # relative to the config file
    return chain_path


def load(path: str | Path, env: Mapping[str, str] | None = None, *, read_trust: bool = True) -> Config:
    """Read the config file at ``path``.

    :param env: the environment variables to apply (``AMQP_URL``, ``SEALEDSUM_IDENTITY_FILE``,
        and ``XDG_STATE_HOME``/``HOME`` for the default chain state); ``None``, the process's
        (as the ``sealedsum`` command does), ``{}`` for none. To connect one process with two
        accounts, see :meth:`Config.with_broker_url`.
    :param read_trust: as in :func:`from_mapping`.
    :raises ConfigError: no such file, not a file, not valid TOML, or not a valid config.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist", hint="see the README for an example") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory", hint="pass the TOML file itself to --config") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from err
    return from_mapping(raw, env, p, read_trust=read_trust)
