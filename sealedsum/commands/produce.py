"""``sealedsum produce`` and ``sealedsum producer keygen``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import wire
from sealedsum.common.errors import ExitCode, PolicyMismatch, TransportError
from sealedsum.producers import encryption, identity
from sealedsum.producers.client import MessageGroup, Producer
from sealedsum.producers.inputs import read_records


class Progress:
    """A progress line on stderr every few seconds, when stderr is a terminal or asked for."""

    def __init__(self, enabled: bool, every_s: float = 2.0) -> None:
        self.enabled, self.every_s = enabled, every_s
        self.start = self.last = time.monotonic()

    def update(self, confirmed: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = confirmed / max(now - self.start, 1e-9)
            print(f"  {confirmed} records confirmed ({rate:.0f}/s)", file=sys.stderr, flush=True)


def _produce(args) -> int:
    if not 1 <= args.per_message <= wire.MAX_BATCH_RECORDS:
        print(f"sealedsum produce: --per-message must be 1..{wire.MAX_BATCH_RECORDS}", file=sys.stderr)
        return ExitCode.USAGE
    cfg = load_config(args)
    if args.encrypt_workers is not None:
        os.environ[encryption.ENV_WORKERS] = str(args.encrypt_workers)
    source = sys.stdin if args.input in (None, "-") else open(args.input, encoding="utf-8")
    summary = {"stream": args.stream, "sent": 0, "confirmed": 0, "rejected_by_validation": 0, "clipped": 0}
    started = time.monotonic()
    code = ExitCode.OK
    pending: deque = deque()  # (line number, PendingRecord), oldest first

    def settle() -> bool:
        """Count the records resolved so far, in order; False once one failed."""
        ok = True
        while pending and pending[0][1].done:
            number, p = pending.popleft()
            if p.confirmed:
                summary["confirmed"] += 1
                summary["clipped"] += p.record.clipped
            else:
                print(f"line {number}: not confirmed: {p.error}", file=sys.stderr)
                ok = False
        return ok

    group = MessageGroup(args.per_message)  # the records that go in the next message
    numbers: list[int] = []  # their line numbers

    def submit_group() -> bool:
        """Publish the grouped records, one message for all (pipelined: up to the producer's
        window of messages await their confirms at once); False once one failed."""
        records, lines = group.take(), numbers[:]
        numbers.clear()
        try:
            submitted = producer.submit_batch(records)
        except TransportError:
            return False  # an earlier record failed: its line is reported below
        pending.extend(zip(lines, submitted))
        summary["sent"] += len(records)
        return settle()

    try:
        producer = Producer(cfg)
        try:
            producer.sealer.stream(args.stream)  # fail before reading input if the stream is unknown
            progress = Progress(args.progress or sys.stderr.isatty())
            for line in read_records(source, args.format):
                values = line.values
                if values is None:
                    summary["rejected_by_validation"] += 1
                    print(f"line {line.number}: rejected: {line.error}", file=sys.stderr)
                    continue
                try:
                    record = producer.seal_current(args.stream, values, window=args.window)
                except PolicyMismatch as err:
                    summary["rejected_by_validation"] += 1
                    print(f"line {line.number}: rejected: {err}", file=sys.stderr)
                    continue
                if not group.fits(record) and not submit_group():
                    code = ExitCode.TRANSPORT
                    break
                group.add(record)
                numbers.append(line.number)
                if group.full and not submit_group():
                    code = ExitCode.TRANSPORT
                    break
                progress.update(summary["confirmed"])
            if code == ExitCode.OK and group and not submit_group():
                code = ExitCode.TRANSPORT
            try:
                producer.flush()
            except TransportError:
                code = ExitCode.TRANSPORT
        finally:
            producer.close()
        if not settle():
            code = ExitCode.TRANSPORT
        for number, p in pending:  # unresolved at close (none after a flush)
            print(f"line {number}: not confirmed: {p.error or 'the producer stopped first'}", file=sys.stderr)
            code = ExitCode.TRANSPORT
    finally:
        if source is not sys.stdin:
            source.close()
    summary["seconds"] = round(time.monotonic() - started, 3)
    if args.json:
        print(json.dumps(summary))
    print(f"{summary['stream']}: sent {summary['sent']}, confirmed {summary['confirmed']}, "
          f"rejected by validation {summary['rejected_by_validation']}, clipped values {summary['clipped']} "
          f"({summary['seconds']:.1f} s)", file=sys.stderr)
    if code == ExitCode.OK and summary["rejected_by_validation"]:
        code = ExitCode.PARTIAL
    return code


def _keygen(args) -> int:
    key = identity.generate(Path(args.out))
    text = identity.public_key_text(key)
    print(text)
    print(f"enroll it in the enclave's policy (this changes the measurement):\n\n"
          f"  [identities.enrolled]\n  {args.name} = \"{text}\"\n\n"
          f"and point this producer at the key file:  [producer] identity_file = \"{args.out}\"",
          file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "produce", help="attest the enclave, then encrypt, seal and publish records",
        description="Read one record per line (CSV: `1.5,2.0`; JSON: `1.5`, `[1.5, 2.0]` or "
                    '`{"values": [...]}`), attest the enclave, clip each value to the stream\'s '
                    "bounds, encrypt it under the enclave's Paillier key, seal the record to the "
                    "enclave and publish it with a publisher confirm (pipelined: up to 256 records "
                    "await their confirms at once). Nothing is sent if attestation fails. Prints a "
                    "summary at the end; exit 4 if some lines were rejected, 3 if some were not confirmed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--stream", required=True, help="the stream name, as in the attested policy")
    p.add_argument("--input", metavar="FILE", help="input file, or - for stdin (the default)")
    p.add_argument("--format", choices=("auto", "csv", "jsonl"), default="auto",
                   help="input format (default: auto, per line)")
    p.add_argument("--window", type=int, default=0,
                   help="window number the records belong to (default 0: the open window)")
    p.add_argument("--per-message", type=int, default=1, metavar="N",
                   help="records per broker message (default 1). With N > 1 up to N sealed records "
                        f"share one message (at most {wire.MAX_BATCH_BYTES // 1024} KiB) and one confirm; "
                        "the enclave still counts or rejects each on its own")
    p.add_argument("--encrypt-workers", type=int, metavar="N",
                   help="helper processes precomputing Paillier randomizers (default 0, or "
                        "$SEALEDSUM_ENCRYPT_WORKERS); worth it for records of many values")
    p.add_argument("--progress", action="store_true", help="print progress even when stderr is not a terminal")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=_produce, role="producer", default_log_level="WARNING")

    ident = sub.add_parser("producer", help="manage a producer's identity key",
                           description="A producer can sign its records with an Ed25519 identity key enrolled in "
                                       "the enclave's policy ([identities]); the enclave then refuses records "
                                       "from unknown or revoked keys and can bound contributions per producer.")
    isub = ident.add_subparsers(dest="producer_command", metavar="ACTION", required=True)
    k = isub.add_parser("keygen", help="create an identity key file and print its public key")
    k.add_argument("--out", required=True, metavar="FILE", help="where to write the key (mode 0600; never overwritten)")
    k.add_argument("--name", default="my-producer", help="the name to enroll it under (shown in the snippet)")
    k.set_defaults(func=_keygen, role="producer", default_log_level="WARNING")
