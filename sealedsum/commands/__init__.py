"""The ``sealedsum`` command: parsing and exit codes only. Each subcommand module builds
a config and calls the libraries (``sealedsum.producers``, ``sealedsum.consumers``,
``sealedsum.sidecar``...); no library imports a command."""

from __future__ import annotations

import argparse
import os
import sys

from sealedsum import __version__
from sealedsum.commands import attest, broker, consume, demo, plan, produce, rejected, sidecar
from sealedsum.commands.options import add_logging_options, add_logging_options_everywhere
from sealedsum.common import logs
from sealedsum.common.errors import ExitCode, SealedsumError

EPILOG = """\
typical session:
  sealedsum platform init --state ./state          # once: prints the platform key to pin
  sealedsum plan --config sealedsum.toml           # preview the noise and budget of each stream
  sealedsum measure --config sealedsum.toml        # the enclave measurement to allow
  sealedsum sidecar --config sealedsum.toml --state ./state
  sealedsum attest  --config sealedsum.toml
  seq 1 100 | sealedsum produce --config sealedsum.toml --stream purchases
  sealedsum consume --config sealedsum.toml --stream purchases --json
  sealedsum rejected --config sealedsum.toml       # the dead letters, by reason and stream
  sealedsum demo                                   # all of the above, on the local broker

exit codes:
{codes}
environment: AMQP_URL overrides broker.url; SEALEDSUM_CONFIG and SEALEDSUM_LOG_LEVEL
             give defaults for --config and --log-level."""


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {int(c):>3}  {c.meaning}" for c in ExitCode)
    parser = argparse.ArgumentParser(
        prog="sealedsum",
        description="Private aggregation over RabbitMQ: producers seal Paillier-encrypted records to an "
                    "attested enclave (an emulated TEE), which releases only signed, differentially "
                    "private totals.",
        epilog=EPILOG.format(codes=codes), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_logging_options(parser, os.environ.get("SEALEDSUM_LOG_LEVEL"), False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (sidecar, attest, produce, consume, plan, demo, broker, rejected):
        module.register(sub)
    add_logging_options_everywhere(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    logs.setup(args.role, args.log_level or args.default_log_level)
    try:
        return int(args.func(args))
    except SealedsumError as err:
        if args.verbose:
            raise
        print(err.diagnostics(), file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
