"""``sealedsum consume`` and ``sealedsum budget``."""

from __future__ import annotations

import argparse
import json
import math
import sys

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import amqp
from sealedsum.common.errors import ChainContradiction, ExitCode, PolicyMismatch
from sealedsum.common.policy import StreamKind
from sealedsum.common.privacy import Mechanism
from sealedsum.common.results import BudgetExhausted
from sealedsum.consumers.client import Consumer, parse_start
from sealedsum.consumers.postprocess import post_process


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return "[" + ", ".join(f"{x:.4g}" for x in v[:6]) + (", ..." if len(v) > 6 else "") + "]"
    return f"{v:.6g}"


# The enclave signs float sums (0.1 spent ten times is 1.0000000000000016 epsilon) and noised
# histogram counts as floats. Printing rounds them; the signed values are left as they are.
# A release's sum and mean keep every digit: their precision is the stream's fixed point.
KEEP_DIGITS = {"sum", "mean"}


def _tidy(v, key: str = ""):
    if isinstance(v, dict):
        return {k: x if k in KEEP_DIGITS else _tidy(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [_tidy(x, key) for x in v]
    if isinstance(v, float) and math.isfinite(v):
        if key == "buckets" and v.is_integer():
            return int(v)
        return float(f"{v:.15g}")
    return v


def to_display_json(view: dict) -> str:
    """One line of ``--json`` output for a verified message's view."""
    return json.dumps(_tidy(view))


def describe(view: dict) -> str:
    """One human-readable line for a verified release."""
    privacy = f"eps={view['epsilon']:g}" + (f", delta={view['delta']:g}" if view["mechanism"] == Mechanism.GAUSSIAN else "")
    privacy += f"; budget spent eps={view['budget_spent_epsilon']:.4g}"
    if view["aggregate"] == StreamKind.HISTOGRAM:
        values = f"buckets {_fmt(view['buckets'])}"
    else:
        values = f"sum {_fmt(view['sum'])}, mean {_fmt(view['mean'])}"
    verified = "post-processed from the verified release" if view.get("post_processed") else "verified"
    return (f"{view['stream']} window {view['window']}: count {view['count']}, {values}  "
            f"[{view['mechanism']}, {privacy}; {verified}]")


def _consume(args) -> int:
    cfg = load_config(args)
    chain_state = None if args.no_chain_state else (args.chain_state or cfg.chain_state)
    start = None if args.start is None else parse_start(args.start)
    received = 0
    interrupted = False
    with Consumer(cfg, args.stream, queue=args.queue, chain_state=chain_state, start=start) as consumer:
        where = consumer.source
        if start is None and isinstance(consumer.start, int):
            where += " (after the offset the chain state read last)"
        elif start is None and consumer.start == "next":
            where += " (the chain state has read none of it)"
        print(f"attested enclave {consumer.enclave.measurement.hex()[:16]}...; waiting for releases "
              f"of {', '.join(args.stream)} ({where})", file=sys.stderr)
        open_streams = set(args.stream)
        gaps = 0
        # Without --count or --idle-timeout this runs until interrupted: Ctrl-C must still say
        # whether forged results were seen, and exit 1 if so.
        try:
            for message in consumer.releases(idle_timeout=args.idle_timeout):
                for stream, gap in consumer.gaps[gaps:]:
                    print(f"warning: {gap.describe(stream)}", file=sys.stderr, flush=True)
                gaps = len(consumer.gaps)
                view = message.to_json()
                if isinstance(message, BudgetExhausted):
                    print(to_display_json(view) if args.json else
                          f"{message.stream}: privacy budget exhausted after {view['releases']} release(s) "
                          f"(epsilon spent {view['spent_epsilon']:.6g} of {view['budget_epsilon']:g}); "
                          "no further releases  [verified]", flush=True)
                    open_streams.discard(message.stream)
                    if not open_streams:
                        break
                    continue
                if args.post_process:  # only what is printed: the verified release stays as signed
                    view = post_process(message, consumer.enclave.policy.stream(message.stream)).to_json(message)
                print(to_display_json(view) if args.json else describe(view), flush=True)
                received += 1
                if args.count and received >= args.count:
                    break
        except KeyboardInterrupt:
            interrupted = True
        except ChainContradiction:
            # The releases printed before it stay verified; the main loop prints the error
            # and its hint, and exits 1.
            print(f"received {received} verified release(s) before the one refused", file=sys.stderr)
            raise
        rejected = consumer.verifier.rejected
        repeats = consumer.repeats
    # Repeats are dropped quietly: the enclave republishes after reconnects, so they are no error.
    print(f"{'interrupted; ' if interrupted else ''}received {received} verified release(s), rejected {rejected}"
          + (f", dropped {repeats} received again" if repeats else ""), file=sys.stderr)
    if rejected:
        print(f"error: {rejected} result(s) failed verification (forged, altered, or contradicting the stream's "
              "ledger) and were rejected; only the releases printed above are verified", file=sys.stderr)
        return ExitCode.VERIFICATION
    return ExitCode.INTERRUPTED if interrupted else ExitCode.OK


def _budget(args) -> int:
    cfg = load_config(args)
    with amqp.attested(cfg.broker, cfg.require_trust()) as (connection, enclave):
        if args.stream not in enclave.policy.streams:
            raise PolicyMismatch(f"the attested enclave has no stream {args.stream!r}",
                                 hint=f"its streams: {', '.join(sorted(enclave.policy.streams))}")
        report = amqp.budget(connection, cfg.broker, enclave, args.stream)
    view = report.to_json()
    if args.json:
        print(to_display_json(view))
    else:
        b = report.budget
        rho = f", rho {b['spent_rho']:.6g}" if b["spent_rho"] is not None else ""
        delta = f", delta {b['budget_delta']:g}" if b["budget_delta"] else ""
        state = "exhausted: no further releases" if report.exhausted else f"{b['remaining_releases']} release(s) left"
        # A grouped stream's spend is the whole group's: say whose releases it adds up.
        group = ("" if "budget_group" not in b else f" (budget group {b['budget_group']}: "
                 + ", ".join(f"{s} {n}" for s, n in b["group_releases"].items()) + " releases)")
        print(f"{report.stream}: spent epsilon {b['spent_epsilon']:.6g}{rho} of {b['budget_epsilon']:g}{delta}"
              f"{group} in {b['releases']} release(s); {state}  [signed by the attested enclave; ledger head "
              f"{b['ledger_head'][:16]}...]")
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "consume", help="attest the enclave and print its verified releases for a stream",
        description="Attest the enclave, read STREAM's releases from the release stream PREFIX.releases "
                    "(which takes nothing away from other consumers), verify every result's signature "
                    "against the attested key and print it. Forged or altered results are reported on "
                    "stderr and skipped; the exit code is then 1. Each stream's ledger chain is remembered "
                    "between runs (--chain-state), with the stream offset read last: by default a run reads "
                    "on from there, and releases that never arrived are named on stderr with the windows "
                    "around them. A release that contradicts the chain (the sidecar's ledger forked, started "
                    "over, or released a window again with other noise) stops the command with exit code 1.",
    )
    add_config_argument(c)
    c.add_argument("--stream", required=True, action="append", help="stream name (repeat for several)")
    c.add_argument("--count", type=int, default=0, help="stop after N releases (default: run until interrupted)")
    c.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                   help="stop after S seconds without a release")
    c.add_argument("--from", dest="start", metavar="WHERE",
                   help="where to start in the release stream: 'first' (everything it holds), 'last' (each "
                        "stream's newest release, then what follows), 'next' (only releases published from now "
                        "on) or an OFFSET (a whole number). Default: after the offset the chain state read last, "
                        "or 'next' when it has none (or with --no-chain-state)")
    c.add_argument("--queue", metavar="NAME",
                   help="read the durable queue NAME (a consumer account may use names starting "
                        "PREFIX.consumer.), bound to the results exchange for each --stream, instead of the release "
                        "stream: for clients that cannot read streams. It holds what was routed to it since it was "
                        "first bound, and what one reader of it takes, other readers of it do not get")
    c.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    c.add_argument("--post-process", action="store_true",
                   help="print feasible figures: counts and histogram buckets rounded to integers >= 0, sums "
                        "and means clamped to what count records within the bounds allow (costs no budget; "
                        "the signed release is verified as received)")
    chain = c.add_mutually_exclusive_group()
    chain.add_argument("--chain-state", metavar="PATH",
                       help="remember each stream's verified ledger chain in this file (default: [consumer] "
                            "chain_state, else $XDG_STATE_HOME/sealedsum/consumer-chains.json)")
    chain.add_argument("--no-chain-state", action="store_true",
                       help="remember nothing between runs (a ledger that started over is not noticed)")
    c.set_defaults(func=_consume, role="consumer", default_log_level="WARNING")

    b = sub.add_parser(
        "budget", help="show a stream's privacy budget: spent and remaining, signed by the enclave",
        description="Attest the enclave, ask it for STREAM's privacy ledger with a fresh nonce, verify the "
                    "signed answer against the attested key and print what was spent and what remains. "
                    "Laplace streams spend epsilon per release; Gaussian streams add up rho (zCDP) and "
                    "report the epsilon it implies at the stream's budget_delta.",
    )
    add_config_argument(b)
    b.add_argument("--stream", required=True)
    b.add_argument("--json", action="store_true", help="print the report as one JSON object")
    b.set_defaults(func=_budget, role="consumer", default_log_level="WARNING")
