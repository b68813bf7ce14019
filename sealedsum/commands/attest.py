"""``sealedsum attest``."""

from __future__ import annotations

import argparse
import json

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import amqp
from sealedsum.common.errors import ExitCode


def _attest(args) -> int:
    cfg = load_config(args)
    with amqp.attested(cfg.broker, cfg.require_trust()) as (_, enclave):
        print(json.dumps(enclave.to_json(), indent=2, sort_keys=True))
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("attest", help="attest the running enclave and print what was verified",
                       description="Send a fresh nonce to the enclave, verify its quote against [trust] "
                                   "and print the verified keys and policy as JSON. Exits 1 with a "
                                   "one-line reason if any check fails.")
    add_config_argument(a)
    a.set_defaults(func=_attest, role="client", default_log_level="WARNING")
