"""What every subcommand shares: ``--config``, ``--log-level`` and ``--verbose``."""

from __future__ import annotations

import argparse
import os

from sealedsum.common import config as config_mod


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    default = os.environ.get("SEALEDSUM_CONFIG")
    parser.add_argument("--config", metavar="FILE", default=default, required=required and default is None,
                        help="the TOML config file (default: $SEALEDSUM_CONFIG)")


def load_config(args: argparse.Namespace, *, read_trust: bool = True) -> config_mod.Config:
    return config_mod.load(args.config, read_trust=read_trust)


def add_logging_options(parser: argparse.ArgumentParser, level_default, verbose_default) -> None:
    parser.add_argument("--log-level", default=level_default, metavar="LEVEL",
                        help="debug, info, warning or error (logs are JSON lines on stderr)")
    parser.add_argument("--verbose", action="store_true", default=verbose_default,
                        help="show tracebacks instead of one-line errors")


def add_logging_options_everywhere(sub: argparse._SubParsersAction) -> None:
    """Accept the global options after the subcommand too (``sealedsum sidecar --log-level debug``)."""
    for parser in sub.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            add_logging_options_everywhere(nested[0])
        if not nested or not nested[0].required:  # a parser that runs by itself takes them too
            add_logging_options(parser, argparse.SUPPRESS, argparse.SUPPRESS)
