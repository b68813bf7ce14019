"""Subcommands of the sidecar role: ``sidecar``, ``platform``, ``measure``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common.attestation import encode_platform_key
from sealedsum.common.errors import ConfigError, ExitCode
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from sealedsum.sidecar.platform.process import PlatformProcess
from sealedsum.sidecar.platform.statelock import running_sidecar
from sealedsum.testbed import write_client_config


def _sidecar(args) -> int:
    if getattr(args, "sidecar_command", None) == "rotate":
        return _rotate(args)
    if not args.config or not args.state:
        raise ConfigError("sealedsum sidecar needs --config FILE and --state DIR",
                          hint="--config may also come from SEALEDSUM_CONFIG")
    sidecar = PlatformProcess(load_config(args), Path(args.state), args.log_level or "INFO")
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    signal.signal(signal.SIGUSR1, sidecar.forward_rotation)
    return sidecar.run()


def _rotate(args) -> int:
    pid = running_sidecar(Path(args.state))
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:  # it died since we looked
        raise ConfigError(f"the sidecar on {args.state} (pid {pid}) is not running") from None
    print(f"asked the sidecar (pid {pid}) to rotate its keys; producers pick up the new epoch when they "
          "next attest", file=sys.stderr)
    return ExitCode.OK


def _platform_init(args) -> int:
    platform = EmulatedPlatform.init(Path(args.state))
    print(encode_platform_key(platform.public_key()))
    return ExitCode.OK


def _platform_show(args) -> int:
    print(encode_platform_key(EmulatedPlatform.load(Path(args.state)).public_key()))
    return ExitCode.OK


def _client_config(args) -> int:
    base = Path(args.config)
    if not base.is_file():
        raise ConfigError(f"base config {base} is missing or unreadable")
    key, measurement = write_client_config(base, Path(args.state), Path(args.out))
    print(f"platform key {encode_platform_key(key)}\nmeasurement  {measurement.hex()}\nwrote {args.out}",
          file=sys.stderr)
    return ExitCode.OK


def _measure(args) -> int:
    policy_bytes = load_config(args, read_trust=False).require_policy().to_bytes()
    digest, measurement = measure.measure(policy_bytes)
    if args.json:
        print(json.dumps({"measurement": measurement.hex(), "code_digest": digest.hex(),
                          "runtime": measure.runtime_line(), "policy": json.loads(policy_bytes)}, indent=2))
    else:
        print(measurement.hex())
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sidecar", help="run the platform and the enclave (until interrupted); `sidecar rotate`",
                       description="Start the emulated platform, which measures the enclave code and policy, "
                                   "and launch the enclave as a separate, hardened process that consumes "
                                   "records and publishes signed, noised releases. Restarts the enclave "
                                   "if it dies. Stop with Ctrl-C or SIGTERM.")
    add_config_argument(s, required=False)
    s.add_argument("--state", metavar="DIR",
                   help="state directory holding platform.key and the enclave's sealed keys (required)")
    s.set_defaults(func=_sidecar, role="platform", default_log_level="INFO")
    ssub = s.add_subparsers(dest="sidecar_command", metavar="ACTION")
    r = ssub.add_parser("rotate", help="rotate the running enclave's encryption keys",
                        description="Ask the running sidecar (the one holding STATE/sidecar.lock) to rotate the "
                                    "enclave's encryption keys: a new key epoch is attested from now on; records "
                                    "sealed to the old epoch are still counted for enclave.key_grace_seconds, "
                                    "then refused with reason wrong_epoch. The result-signing key is kept.")
    r.add_argument("--state", metavar="DIR", required=True, help="the running sidecar's state directory")
    r.set_defaults(func=_sidecar, role="platform", default_log_level="WARNING")

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
    cc = psub.add_parser(
        "client-config", help="write a client config trusting this platform and measurement (demo deployments)",
        description="Write OUT: the base config plus a [trust] table pinning this platform's key (created in "
                    "DIR on first use) and the measurement of the base config's policy, atomically. For a demo "
                    "deployment only (docker-compose uses it): clients that take their trust anchors from the "
                    "machine they check prove nothing against whoever controls it. Real clients pin the "
                    "platform key out of band and review the measurements they allow.")
    cc.add_argument("--config", metavar="FILE", required=True, help="the base config (without a [trust] table)")
    cc.add_argument("--state", metavar="DIR", required=True)
    cc.add_argument("--out", metavar="FILE", required=True, help="where to write the client config")
    cc.set_defaults(func=_client_config, role="platform", default_log_level="WARNING")

    m = sub.add_parser("measure", help="print the enclave measurement for this code and policy",
                       description="Compute the measurement the platform will quote for the installed enclave "
                                   "code and the config's policy ([enclave] and [streams.*]). Put it in "
                                   "[trust] measurements. Reproducible: only file contents and package "
                                   "versions count.")
    add_config_argument(m)
    m.add_argument("--json", action="store_true", help="also print the code digest, runtime and policy")
    m.set_defaults(func=_measure, role="platform", default_log_level="WARNING")
