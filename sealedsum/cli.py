"""``sealedsum``: attested private aggregation over RabbitMQ.

Exit codes: 0 success; 1 attestation or verification failure; 2 usage or
configuration error; 3 broker unreachable or refusing; 4 finished, but some input
was rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sealedsum.common import config as config_mod
from sealedsum.common import logs
from sealedsum.common.errors import SealedsumError

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_TRANSPORT, EXIT_PARTIAL = 0, 1, 2, 3, 4

EPILOG = """\
typical session:
  sealedsum platform init --state ./state          # once: prints the platform key to pin
  sealedsum measure --config sealedsum.toml        # the enclave measurement to allow
  sealedsum sidecar --config sealedsum.toml --state ./state
  sealedsum attest  --config sealedsum.toml
  seq 1 100 | sealedsum produce --config sealedsum.toml --stream purchases
  sealedsum consume --config sealedsum.toml --stream purchases --json
  sealedsum demo                                   # all of the above, on the local broker

exit codes: 0 ok, 1 attestation/verification failure, 2 usage/config error,
            3 broker unreachable, 4 done but some input rejected
environment: AMQP_URL overrides broker.url; SEALEDSUM_CONFIG and SEALEDSUM_LOG_LEVEL
             give defaults for --config and --log-level."""


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    default = os.environ.get("SEALEDSUM_CONFIG")
    parser.add_argument("--config", metavar="FILE", default=default, required=required and default is None,
                        help="the TOML config file (default: $SEALEDSUM_CONFIG)")


def load_config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


def _attest(args: argparse.Namespace) -> int:
    from sealedsum.common import amqp

    cfg = load_config(args)
    connection = amqp.connect(cfg.broker)
    try:
        enclave = amqp.attest(connection, cfg.broker, cfg.require_trust())
    finally:
        connection.close()
    print(json.dumps(enclave.to_json(), indent=2, sort_keys=True))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from sealedsum.consumers import cli as consumer_cli
    from sealedsum.producers import cli as producer_cli
    from sealedsum import broker as broker_cli
    from sealedsum import demo
    from sealedsum.sidecar import cli as sidecar_cli

    parser = argparse.ArgumentParser(
        prog="sealedsum",
        description="Private aggregation over RabbitMQ: producers seal Paillier-encrypted records to an "
                    "attested enclave (an emulated TEE), which releases only signed, differentially "
                    "private totals.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_options(parser, os.environ.get("SEALEDSUM_LOG_LEVEL"), False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sidecar_cli.register(sub)
    a = sub.add_parser("attest", help="attest the running enclave and print what was verified",
                       description="Send a fresh nonce to the enclave, verify its quote against [trust] "
                                   "and print the verified keys and policy as JSON. Exits 1 with a "
                                   "one-line reason if any check fails.")
    add_config_argument(a)
    a.set_defaults(func=_attest, role="client", default_log_level="WARNING")
    producer_cli.register(sub)
    consumer_cli.register(sub)
    demo.register(sub)
    broker_cli.register(sub)
    _add_common_options_everywhere(sub)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, level_default, verbose_default) -> None:
    parser.add_argument("--log-level", default=level_default, metavar="LEVEL",
                        help="debug, info, warning or error (logs are JSON lines on stderr)")
    parser.add_argument("--verbose", action="store_true", default=verbose_default,
                        help="show tracebacks instead of one-line errors")


def _add_common_options_everywhere(sub: argparse._SubParsersAction) -> None:
    """Accept the global options after the subcommand too (``sealedsum sidecar --log-level debug``)."""
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_common_options_everywhere(nested[0])
        if not nested or not nested[0].required:  # a parser that runs by itself takes them too
            _add_common_options(parser, argparse.SUPPRESS, argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logs.setup(args.role, args.log_level or args.default_log_level)
    try:
        return args.func(args)
    except SealedsumError as err:
        if args.verbose:
            raise
        print(err.diagnostics(), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
