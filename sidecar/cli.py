"""Subcommands of the sidecar role: ``sidecar``, ``platform``, ``measure``."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from common.attestation import encode_platform_key


def _sidecar(args) -> int:
    from sealedsum.cli import load_config
    from sidecar.supervisor import Sidecar

    sidecar = Sidecar(load_config(args), Path(args.state), args.log_level or "INFO")
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    return sidecar.run()


def _platform_init(args) -> int:
    from sidecar.platform.emulated import EmulatedPlatform

    platform = EmulatedPlatform.init(Path(args.state))
    print(encode_platform_key(platform.public_key()))
    return 0


def _platform_show(args) -> int:
    from sidecar.platform.emulated import EmulatedPlatform

    print(encode_platform_key(EmulatedPlatform.load(Path(args.state)).public_key()))
    return 0


def _measure(args) -> int:
    from sealedsum.cli import load_config
    from sidecar.platform import measure

    policy_bytes = load_config(args).require_policy().to_bytes()
    digest, measurement = measure.measure(policy_bytes)
    if args.json:
        print(json.dumps({"measurement": measurement.hex(), "code_digest": digest.hex(),
                          "runtime": measure.runtime_line(), "policy": json.loads(policy_bytes)}, indent=2))
    else:
        print(measurement.hex())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from sealedsum.cli import add_config_argument

    s = sub.add_parser("sidecar", help="run the platform and the enclave (until interrupted)",
                       description="Start the emulated platform, which measures the enclave code and policy, "
                                   "and launch the enclave as a separate, hardened process that consumes "
                                   "records and publishes signed, noised releases. Restarts the enclave "
                                   "if it dies. Stop with Ctrl-C or SIGTERM.")
    add_config_argument(s)
    s.add_argument("--state", metavar="DIR", required=True,
                   help="state directory holding platform.key and the enclave's sealed keys")
    s.set_defaults(func=_sidecar, role="platform", default_log_level="INFO")

    p = sub.add_parser("platform", help="manage the emulated platform's key (the root of trust)")
    psub = p.add_subparsers(dest="platform_command", metavar="ACTION", required=True)
    i = psub.add_parser("init", help="create the platform key and print its public key",
                        description="Create the emulated platform's signing key and sealing secret in DIR "
                                    "and print the public key. Put it in [trust] platform_key: clients pin it.")
    i.add_argument("--state", metavar="DIR", required=True)
    i.set_defaults(func=_platform_init, role="platform", default_log_level="WARNING")
    sh = psub.add_parser("show", help="print the platform's public key")
    sh.add_argument("--state", metavar="DIR", required=True)
    sh.set_defaults(func=_platform_show, role="platform", default_log_level="WARNING")

    m = sub.add_parser("measure", help="print the enclave measurement for this code and policy",
                       description="Compute the measurement the platform will quote for the installed enclave "
                                   "code and the config's policy ([enclave] and [streams.*]). Put it in "
                                   "[trust] measurements. Reproducible: only file contents and package "
                                   "versions count.")
    add_config_argument(m)
    m.add_argument("--json", action="store_true", help="also print the code digest, runtime and policy")
    m.set_defaults(func=_measure, role="platform", default_log_level="WARNING")
