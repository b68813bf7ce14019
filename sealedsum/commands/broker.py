"""``sealedsum broker setup`` and ``sealedsum broker teardown``: least-privilege RabbitMQ
accounts for one deployment (one broker prefix in one virtual host).

The permission patterns, and RabbitMQ's rules behind them, are in
:func:`sealedsum.common.topology.role_permissions`; the accounts, their passwords and the
definitions file in :mod:`sealedsum.accounts`; applying them to a running broker in
:mod:`sealedsum.rabbitmqctl`. docs/broker-accounts.md describes the table and what the
tests prove.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sealedsum.accounts import (Account, accounts, choose_passwords, definitions, password_env, vhost_of,
                                write_private)
from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common.config import Config, redact_url
from sealedsum.common.errors import ConfigError, ExitCode
from sealedsum.common.topology import ROLES
from sealedsum.message_limits import MessageLimit, conf_line, message_limit
from sealedsum.rabbitmqctl import RABBITMQCTL_ENV, Rabbitmqctl, apply, check_same_broker, remove


def _load(args: argparse.Namespace) -> tuple[Config, list[Account], str]:
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
    if ctl:
        check_same_broker(ctl, cfg.broker)

    if args.definitions:
        doc = definitions(accts, vhost, with_guest=args.with_guest)
        write_private(Path(args.definitions), json.dumps(doc, indent=2) + "\n")
    done = apply(ctl, accts, vhost) if ctl else {}
    if out_dir:
        for a in accts:
            write_private(out_dir / f"{a.role}.url", a.url(cfg.broker.url, vhost) + "\n")

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
    _limit_message_size(cfg, ctl, keep=args.keep_max_message_size)
    return ExitCode.OK


def _limit_message_size(cfg: Config, ctl: Rabbitmqctl | None, *, keep: bool) -> None:
    """Lower the node's max_message_size to what the policy needs, and say so: it is node-wide
    (RabbitMQ 3.x has no per-vhost or per-user limit), so it limits every application on
    the node, and it lasts only until the node restarts."""
    if cfg.policy is None:
        print("max_message_size: left alone (the config has no [streams], so the largest message is unknown)")
        return
    limit = message_limit(cfg.policy)
    print(_explain(limit))
    keep_it = f"put this line in rabbitmq.conf (a restart forgets anything else):\n  {conf_line(limit.value)}"
    if ctl is None:
        print(f"max_message_size: a definitions file cannot set it; {keep_it}")
        return
    if keep:
        print(f"max_message_size: left alone (--keep-max-message-size); to limit it, {keep_it}")
        return
    current = ctl.max_message_size()
    if current <= limit.value:
        print(f"max_message_size: the node's is {current} bytes, not above {limit.value}: left alone")
        return
    ctl.set_max_message_size(limit.value)
    print(f"max_message_size: set from {current} to {limit.value} bytes NODE-WIDE, for every vhost, user and "
          "application on this RabbitMQ node, for channels opened from now on (channels already open may keep "
          f"the old limit until they are reopened). It is lost when the node restarts: {keep_it}")


def _explain(limit: MessageLimit) -> str:
    return (f"largest legitimate message: {limit.largest} bytes ({limit.largest_kind}); "
            f"max_message_size for this deployment: {limit.value} bytes")


def _teardown(args: argparse.Namespace) -> int:
    cfg, accts, _ = _load(args)
    ctl = Rabbitmqctl(args.rabbitmqctl)
    check_same_broker(ctl, cfg.broker)
    done = remove(ctl, accts)
    for user, state in done.items():
        print(f"{user}: {state}")
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
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
                    "printed unless --show is given. It also lowers the node's max_message_size (node-wide,\n"
                    "until the node restarts) to the largest message the config's policy produces, with\n"
                    "headroom, and prints the rabbitmq.conf line that keeps it (--keep-max-message-size: not).\n"
                    "Before changing anything it checks that rabbitmqctl's node is the broker the URL names\n"
                    "(a marker queue declared over AMQP must show in `rabbitmqctl list_queues`), and exits 2\n"
                    "if not.",
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
    s.add_argument("--keep-max-message-size", action="store_true",
                   help="leave the broker's node-wide max_message_size alone (for a node shared with other "
                        "applications); by default setup lowers it to what the config's policy needs, until the "
                        "node restarts, and prints the rabbitmq.conf line that keeps it")
    s.add_argument("--with-guest", action="store_true",
                   help="with --definitions: also define guest/guest as an administrator, as a fresh broker "
                        "would have it (a broker loading definitions creates no default user). Demo only")
    s.set_defaults(func=_setup, role="admin", default_log_level="WARNING")

    t = bsub.add_parser("teardown", help="delete the sidecar, producer and consumer users",
                        description="Delete the three users setup created (missing ones are fine). Users "
                                    "with tags are never deleted. Exchanges and queues are left alone. Like "
                                    "setup, it refuses (exit 2) unless rabbitmqctl's node is the URL's broker.")
    common(t)
    t.set_defaults(func=_teardown, role="admin", default_log_level="WARNING")
