"""``sealedsum rejected``: the operator's view of the dead-letter queue."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import Counter

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import amqp
from sealedsum.common.errors import ExitCode

NO_STREAM = ""  # by_stream's key for dead letters whose envelope did not open


def entry(message: amqp.QueuedMessage) -> dict:
    """One dead letter as shown: the enclave's headers (docs/protocol.md section 11.4), or, for
    a message the broker dead-lettered itself (a delivery limit), ``broker:`` and its reason."""
    h = message.headers
    reason = h.get("x-sealedsum-reason")
    if reason is None:
        reason = f"broker:{h.get('x-first-death-reason', 'unknown')}"
    at = h.get("x-sealedsum-rejected-at")
    return {
        "reason": str(reason),
        "detail": h.get("x-sealedsum-detail", ""),
        "stream": h.get("x-sealedsum-stream"),
        "rejected_at_ms": at,
        "rejected_at": (datetime.datetime.fromtimestamp(at / 1000, datetime.timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z") if isinstance(at, int) else None),
        "bytes": message.size,
        "original_bytes": h.get("x-sealedsum-original-bytes"),
        "batch_index": h.get("x-sealedsum-batch-index"),
        "delivery_count": h.get("x-delivery-count"),
    }


def summarize(queue: str, total: int, messages: list[amqp.QueuedMessage], peek: int) -> dict:
    entries = [entry(m) for m in messages]
    return {
        "queue": queue,
        "total": total,
        "read": len(entries),
        "by_reason": dict(Counter(e["reason"] for e in entries).most_common()),
        "by_stream": dict(Counter(e["stream"] or NO_STREAM for e in entries).most_common()),
        "recent": entries[-peek:] if peek else [],
    }


def _table(counts: dict, label=lambda k: k) -> list[str]:
    width = max((len(label(k)) for k in counts), default=0)
    return [f"  {label(k):<{width}}  {n}" for k, n in counts.items()]


def describe(view: dict) -> str:
    lines = [f"{view['queue']}: {view['total']} dead letter(s)"
             + (f", the oldest {view['read']} read" if view["read"] < view["total"] else "")]
    if view["by_reason"]:
        lines += ["by reason:", *_table(view["by_reason"])]
        lines += ["by stream:", *_table(view["by_stream"], lambda k: k or "(none: the envelope did not open)")]
    if view["recent"]:
        lines.append(f"most recent {len(view['recent'])}:")
        for e in view["recent"]:
            size = f"{e['bytes']} bytes" + (f" of {e['original_bytes']}" if e["original_bytes"] else "")
            batch = f", record {e['batch_index']} of a batch" if e["batch_index"] is not None else ""
            lines.append(f"  {e['rejected_at'] or '-'}  {e['reason']}  stream {e['stream'] or '-'}  {size}{batch}: "
                         f"{e['detail']}")
    return "\n".join(lines)


def _rejected(args) -> int:
    if not 1 <= args.max <= amqp.MAX_PREFETCH:
        print(f"sealedsum rejected: --max must be 1..{amqp.MAX_PREFETCH}", file=sys.stderr)
        return ExitCode.USAGE
    cfg = load_config(args, read_trust=False)
    queue = cfg.broker.topology.rejected_queue
    total, messages = amqp.read_queue(cfg.broker, queue, args.max, acknowledge=args.drain)
    view = summarize(queue, total, messages, args.peek)
    if args.drain:
        view["drained"] = len(messages)
    if args.json:
        print(json.dumps(view))
    else:
        print(describe(view))
        print(f"acknowledged (removed) the {len(messages)} read" if args.drain
              else "nothing was removed (--drain acknowledges what is read)", file=sys.stderr)
    return ExitCode.OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rejected", help="show the dead-letter queue: counts by reason and stream, and the latest entries",
        description="Read the dead-letter queue PREFIX.rejected (records the enclave refused, each with "
                    "its reason: docs/protocol.md section 11.4) and print how many there are by reason and "
                    "by stream, and the most recent ones (reason, detail, stream, when, size). Needs an "
                    "account that may read the queue: the sidecar's (`sealedsum broker setup`), or an "
                    "administrator's.\n\n"
                    "By default nothing is removed: the messages are read without acknowledging them and go "
                    "back to the queue when the command closes its channel. Each read is a delivery to the "
                    "broker: it sets the messages' redelivered flag and, on a quorum queue, adds one to "
                    "their x-delivery-count. PREFIX.rejected has no delivery limit, so on RabbitMQ 3.x "
                    "reading never drops a dead letter (RabbitMQ 4 gives quorum queues a default limit of "
                    "20 deliveries: there, drain rather than read the same dead letters again and "
                    "again). --drain acknowledges what was read, which removes it.\n\n"
                    "The queue keeps at most 100000 dead letters (256 MiB), dropping the oldest beyond. "
                    "The sealed bodies stay sealed: this shows only what the headers say.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--peek", type=int, default=10, metavar="N",
                   help="show the N most recent dead letters read (default 10; 0: counts only)")
    p.add_argument("--max", type=int, default=amqp.MAX_PREFETCH, metavar="N",
                   help=f"read at most N dead letters, the oldest first (default and most: {amqp.MAX_PREFETCH})")
    p.add_argument("--drain", action="store_true",
                   help="acknowledge (remove) the dead letters read, after showing them")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=_rejected, role="operator", default_log_level="WARNING")
