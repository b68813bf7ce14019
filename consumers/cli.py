"""``sealedsum consume``."""

from __future__ import annotations

import argparse
import json
import sys


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.4g}" for x in v[:6]) + (", ..." if len(v) > 6 else "") + "]"
    return f"{v:.6g}"


def describe(view: dict) -> str:
    """One human-readable line for a verified release."""
    privacy = f"eps={view['epsilon']:g}" + (f", delta={view['delta']:g}" if view["mechanism"] == "gaussian" else "")
    return (f"{view['stream']} window {view['window']}: count {view['count']}, sum {_fmt(view['sum'])}, "
            f"mean {_fmt(view['mean'])}  [{view['mechanism']}, {privacy}; verified]")


def _consume(args) -> int:
    from consumers.client import Consumer
    from sealedsum.cli import EXIT_OK, EXIT_VERIFY, load_config

    cfg = load_config(args)
    received = 0
    with Consumer(cfg, args.stream, queue=args.queue) as consumer:
        print(f"attested enclave {consumer.enclave.measurement.hex()[:16]}...; waiting for releases "
              f"of {', '.join(args.stream)}", file=sys.stderr)
        for release in consumer.releases(idle_timeout=args.idle_timeout):
            view = release.to_json()
            print(json.dumps(view) if args.json else describe(view), flush=True)
            received += 1
            if args.count and received >= args.count:
                break
        rejected = consumer.verifier.rejected
    print(f"received {received} verified release(s), rejected {rejected}", file=sys.stderr)
    return EXIT_VERIFY if rejected else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    from sealedsum.cli import add_config_argument

    c = sub.add_parser(
        "consume", help="attest the enclave and print its verified releases for a stream",
        description="Attest the enclave, bind a private queue to the results exchange for STREAM, "
                    "verify every result's signature against the attested key and print it. Forged or "
                    "altered results are reported on stderr and skipped; the exit code is then 1.",
    )
    add_config_argument(c)
    c.add_argument("--stream", required=True, action="append", help="stream name (repeat for several)")
    c.add_argument("--count", type=int, default=0, help="stop after N releases (default: run until interrupted)")
    c.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds without a release")
    c.add_argument("--queue", help="a durable queue name to use instead of a private temporary one")
    c.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    c.set_defaults(func=_consume, role="consumer", default_log_level="WARNING")
