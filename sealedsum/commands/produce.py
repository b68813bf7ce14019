"""``sealedsum produce`` and ``sealedsum producer keygen``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import textwrap
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from sealedsum.commands.options import add_config_argument, load_config
from sealedsum.common import wire
from sealedsum.common.errors import ExitCode, InputError, PolicyMismatch, TransportError
from sealedsum.producers import encryption, identity
from sealedsum.producers.client import MessageGroup, Producer
from sealedsum.producers.inputs import RecordReader
from sealedsum.producers.resume import ResumeState, TrackedInput


RESUME_EVERY = 1000  # lines: how often --resume writes its file (and at exit)
INTERRUPT_WAIT_S = 5.0  # after Ctrl-C, how long outstanding records may take to be confirmed
# After the last confirm, how long to wait for the enclave to count or reject every record: it
# acknowledges within a fraction of a second once a record's batch is checkpointed, unless
# it is catching up with a backlog.
OUTCOME_WAIT_S = 20.0


class Progress:
    """A progress line on stderr every few seconds, when stderr is a terminal or asked for;
    with the input's size known, how far through it and when it should be done."""

    def __init__(self, enabled: bool, every_s: float = 2.0, total_bytes: int | None = None) -> None:
        self.enabled, self.every_s, self.total_bytes = enabled, every_s, total_bytes
        self.start = self.last = time.monotonic()
        self.start_bytes: int | None = None  # where this run started sending (after lines resumed past)

    def update(self, confirmed: int, bytes_read: int = 0) -> None:
        now = time.monotonic()
        if self.start_bytes is None:
            self.start, self.start_bytes = now, bytes_read
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            text = f"  {confirmed} records confirmed ({confirmed / elapsed:.0f}/s)"
            if self.total_bytes:
                done = bytes_read - self.start_bytes
                text += f", {100 * bytes_read / self.total_bytes:.0f}% of the input"
                if done > 0:
                    text += f", about {_duration((self.total_bytes - bytes_read) * elapsed / done)} to go"
            print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Interrupt:
    """SIGINT while producing. Raised as KeyboardInterrupt only where that cannot lose track
    of a record (reading input, waiting for confirms); elsewhere (between a submit and the
    bookkeeping of its line numbers) it is held until the step is done. A second Ctrl-C
    stops at once."""

    def __init__(self) -> None:
        self.count = 0
        self._allowed = True
        self._held = False

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if not self._allowed and self.count == 1:
            self._held = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def allowed(self):
        if self._held:
            self._held = False
            raise KeyboardInterrupt
        saved, self._allowed = self._allowed, True
        try:
            yield
        finally:
            self._allowed = saved

    def hold(self) -> None:
        self._allowed = False


def _interruptible(items, interrupt: _Interrupt):
    it = iter(items)
    while True:
        with interrupt.allowed():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def _open_input(path: str | None):
    """The input, its name for --resume, and its size for progress (also known for stdin
    redirected from a file)."""
    if path in (None, "-"):
        # Bytes that are not UTF-8 make a bad line, not a crash.
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")
        try:
            st = os.fstat(sys.stdin.fileno())
            total = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError, AttributeError):  # no descriptor (stdin replaced, closed)
            total = None
        return sys.stdin, "-", total
    try:
        source = open(path, encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as err:
        raise InputError(f"cannot read --input {path}: {err.strerror}") from None
    return source, os.path.abspath(path), os.fstat(source.fileno()).st_size


def _produce(args) -> int:
    if not 1 <= args.per_message <= wire.MAX_BATCH_RECORDS:
        print(f"sealedsum produce: --per-message must be 1..{wire.MAX_BATCH_RECORDS}", file=sys.stderr)
        return ExitCode.USAGE
    reader = RecordReader(args.format, columns=args.column, field=args.field,
                          header=args.header)
    cfg = load_config(args)
    if args.encrypt_workers is not None:
        os.environ[encryption.ENV_WORKERS] = str(args.encrypt_workers)
    source, input_name, total_bytes = _open_input(args.input)
    try:
        resume = None
        if args.resume:
            # No size: an input that grew since (a log appended to) resumes and sends what is new;
            # the hash of the lines already sent still proves they are the same lines.
            run = {"input": input_name, "stream": args.stream, "window": args.window,
                   "format": args.format, "column": args.column, "field": args.field,
                   # as files before --no-header wrote it: false was the automatic choice
                   "header": {None: False, True: True, False: "never"}[args.header]}
            resume = ResumeState.open(args.resume, run)
            if not resume.path.exists():
                resume.save()  # an unwritable place fails now, before anything is sent
        tracked = TrackedInput(source, resume.lines_done if resume else 0, resume.prefix_sha256 if resume else None,
                               hashing=resume is not None)
        return _produce_from(args, cfg, reader, tracked, resume, total_bytes)
    finally:
        if source is not sys.stdin:
            source.close()


def _produce_from(args, cfg, reader: RecordReader, tracked: TrackedInput, resume: ResumeState | None,
                  total_bytes: int | None) -> int:
    summary = {"stream": args.stream, "sent": 0, "confirmed": 0, "rejected_by_validation": 0, "clipped": 0}
    if resume:
        summary["resumed_after_line"], summary["skipped"] = resume.lines_done, 0
    started = time.monotonic()
    code = ExitCode.OK
    # (line number, PendingRecord), oldest first; None for a line rejected by validation
    pending: deque = deque()
    frontier = resume.lines_done if resume else 0  # every line up to it is confirmed or rejected
    broken = False  # a line was not confirmed: the frontier stays before it
    saved_at = frontier

    def save() -> None:
        nonlocal saved_at
        if resume is not None and frontier != saved_at:
            resume.lines_done, resume.prefix_sha256 = frontier, tracked.advance(frontier)
            resume.save()
            saved_at = frontier

    def settle() -> bool:
        """Count the records resolved so far, in order; False once one failed."""
        nonlocal frontier, broken
        ok = True
        while pending and (pending[0][1] is None or pending[0][1].done):
            number, p = pending.popleft()
            if p is None:
                pass
            elif p.confirmed:
                summary["confirmed"] += 1
                summary["clipped"] += p.record.clipped
                if resume and not broken:
                    resume.confirmed += 1
            else:
                print(f"line {number}: not confirmed: {p.error}", file=sys.stderr)
                ok, broken = False, True
            if not broken:
                frontier = max(frontier, number)
        if frontier - saved_at >= RESUME_EVERY:
            save()
        return ok

    group = MessageGroup(args.per_message)  # the records that go in the next message
    numbers: list[int] = []  # their line numbers
    # Lines rejected while the group was filling: done, but only once the group's records
    # before them are, so they follow it into `pending`.
    held_rejects: list[int] = []

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
        pending.extend((n, None) for n in held_rejects)
        held_rejects.clear()
        summary["sent"] += len(records)
        return settle()

    def rejected(number: int, why) -> None:
        nonlocal frontier
        summary["rejected_by_validation"] += 1
        print(f"line {number}: rejected: {why}", file=sys.stderr)
        if group:
            held_rejects.append(number)
        elif pending:
            pending.append((number, None))
        elif not broken:
            frontier = max(frontier, number)

    interrupt = _Interrupt()
    previous = signal.signal(signal.SIGINT, interrupt)
    producer = None
    interrupted = False
    outcomes = None
    unconfirmed = 0
    finished = False  # every input line was read
    try:
        interrupt.hold()
        try:
            with interrupt.allowed():
                producer = Producer(cfg)
                producer.sealer.stream(args.stream)  # fail before reading input if the stream is unknown
                producer.check_stream(args.stream)  # and if its budget is spent (StreamExhausted, exit 4)
            progress = Progress(args.progress or sys.stderr.isatty(), total_bytes=total_bytes)
            header_told = False
            for line in _interruptible(reader.read(tracked), interrupt):
                if reader.header is not None and not header_told:
                    header_told = True
                    print(f"line {reader.header_line}: header: {', '.join(reader.header)}", file=sys.stderr)
                if line.number <= tracked.skip_through:
                    summary["skipped"] += 1
                    continue
                values = line.values
                if values is None:
                    rejected(line.number, line.error)
                    continue
                try:
                    record = producer.seal_current(args.stream, values, window=args.window,
                                                   record_id=resume.record_id(line.number) if resume else None)
                except PolicyMismatch as err:
                    rejected(line.number, err)
                    continue
                if not group.fits(record) and not submit_group():
                    code = ExitCode.TRANSPORT
                    break
                group.add(record)
                numbers.append(line.number)
                if group.full and not submit_group():
                    code = ExitCode.TRANSPORT
                    break
                progress.update(summary["confirmed"], tracked.bytes_read)
            else:
                finished = True
            if code == ExitCode.OK and group and not submit_group():
                code = ExitCode.TRANSPORT
            try:
                with interrupt.allowed():
                    producer.flush()
            except TransportError:
                code = ExitCode.TRANSPORT
            outcomes = _await_outcomes(producer, args.outcome_wait, interrupt)
        except KeyboardInterrupt:
            interrupted, finished = True, False
            if producer is not None:
                if interrupt.count < 2:
                    _wait_briefly(producer, interrupt)
                settle()
                outcomes = producer.outcomes()  # what was heard so far: no waiting after Ctrl-C
            # Left for a rerun: the lines from the first one still unconfirmed on (the confirmed
            # among them are sent again, and the enclave drops them as duplicates), and the
            # records sealed for the next message.
            for _, p in pending:
                if p is not None and p.confirmed:
                    summary["confirmed"] += 1
                    summary["clipped"] += p.record.clipped
                elif p is not None:
                    unconfirmed += 1
            pending.clear()
        finally:
            if producer is not None:
                producer.close()
        if not settle():
            code = ExitCode.TRANSPORT
        for number, p in pending:  # unresolved at close (none after a flush)
            if p is not None:
                print(f"line {number}: not confirmed: {p.error or 'the producer stopped first'}", file=sys.stderr)
                code = ExitCode.TRANSPORT
        if finished and not broken and not pending:
            frontier = tracked.lines_read  # trailing blank and comment lines too
        save()
    finally:
        signal.signal(signal.SIGINT, previous)
    summary["seconds"] = round(time.monotonic() - started, 3)
    if resume:
        summary["resume_line"] = frontier
        summary["confirmed_all_runs"] = resume.confirmed
    if interrupted:
        summary["interrupted"] = True
        summary["unconfirmed"] = unconfirmed
    if outcomes is not None:
        summary.update(outcomes.to_json())
        summary["rejected_by_enclave"] = summary.pop("rejected")
        summary["hearing_enclave"] = outcomes.hearing
    if args.json:
        print(json.dumps(summary), flush=True)
    skipped = f", skipped {summary['skipped']} resumed past" if summary.get("skipped") else ""
    heard = "" if outcomes is None else (
        f"; counted {outcomes.counted}, rejected by the enclave {outcomes.rejected}, unknown {outcomes.unknown}")
    print(f"{summary['stream']}: sent {summary['sent']}, confirmed {summary['confirmed']}, "
          f"rejected by validation {summary['rejected_by_validation']}, clipped values {summary['clipped']}"
          f"{skipped}{heard} ({summary['seconds']:.1f} s)", file=sys.stderr)
    if outcomes is not None:
        _tell_outcomes(outcomes, interrupted)
    if interrupted:
        print(f"interrupted: {summary['confirmed']} of {summary['sent']} records sent were confirmed"
              + (f", {unconfirmed} not within {INTERRUPT_WAIT_S:g} s (they may count or not)" if unconfirmed else "")
              + (f"; rerun with --resume {args.resume} to go on after line {frontier}" if resume
                 else "; without --resume FILE a rerun sends every line again"),
              file=sys.stderr)
        return ExitCode.INTERRUPTED
    if code == ExitCode.OK and (summary["rejected_by_validation"] or (outcomes is not None and outcomes.rejected)):
        code = ExitCode.PARTIAL
    return code


def _await_outcomes(producer: Producer, seconds: float, interrupt: _Interrupt):
    """After the last confirm: wait up to ``seconds`` for the enclave to count or reject every
    record sent (a Ctrl-C stops waiting, as an interrupt)."""
    out = producer.outcomes()
    if out.unknown and out.hearing and seconds > 0:
        print(f"waiting up to {seconds:g} s for the enclave to count or reject {out.unknown} record(s)...",
              file=sys.stderr, flush=True)
        with interrupt.allowed():
            out = producer.wait_outcomes(seconds)
    return out


def _tell_outcomes(outcomes, interrupted: bool) -> None:
    """One line per fact a producer can act on: what the enclave rejected and why, and what it
    did not say."""
    if outcomes.rejected:
        print(f"error: the enclave rejected {outcomes.rejected} record(s): {outcomes.reasons_text()}"
              f"{_REASON_HINT.get(max(outcomes.by_reason, key=outcomes.by_reason.get), '')}", file=sys.stderr)
        for r in outcomes.rejections[:5]:
            print(f"  {r.reason}: {r.detail}" + (f" (record {r.record_id})" if r.record_id else ""), file=sys.stderr)
    if outcomes.unknown and not interrupted:
        why = ("no word from the enclave in time (it may be catching up; the records may still count)"
               if outcomes.hearing else "the enclave's notices could not be heard (an older sidecar or broker "
                                        "account; `sealedsum broker setup` grants them)")
        print(f"{outcomes.unknown} record(s) confirmed by the broker but neither counted nor rejected yet: {why}",
              file=sys.stderr)


# What to do about the most frequent reason, where there is something to do.
_REASON_HINT = {
    "budget_exhausted": "; the stream has spent its privacy budget: nothing more will count",
    "future_window": "; --window names a window that is not open yet (leave it at 0, the open window)",
    "late_window": "; --window names a window that is closed already (leave it at 0, the open window)",
    "wrong_epoch": "; the enclave rotated its keys: run again to attest the new ones",
    "expired": "; the records were older than the enclave accepts: check this host's clock",
    "from_future": "; the records were dated ahead of the enclave's clock: check this host's clock",
    "out_of_range": "; the values are not ones an honest producer of this stream could send",
}


def _wait_briefly(producer: Producer, interrupt: _Interrupt) -> None:
    """After Ctrl-C: give the records already sent a few seconds to be confirmed (another
    Ctrl-C stops waiting)."""
    deadline = time.monotonic() + INTERRUPT_WAIT_S
    try:
        with interrupt.allowed():
            while producer.outstanding and time.monotonic() < deadline:
                try:
                    producer.flush(timeout=max(deadline - time.monotonic(), 0.01))
                except TransportError:
                    pass  # a failed record (its ticket says so) or the time is up
    except KeyboardInterrupt:
        pass


def _keygen(args) -> int:
    key = identity.generate(Path(args.out))
    text = identity.public_key_text(key)
    print(text)
    print(f"enroll it in the enclave's policy (this changes the measurement):\n\n"
          f"  [identities.enrolled]\n  {args.name} = \"{text}\"\n\n"
          f"and point this producer at the key file:  [producer] identity_file = \"{args.out}\"",
          file=sys.stderr)
    return 0


def _paragraphs(text: str) -> str:
    return "\n\n".join(textwrap.fill(p, 88) for p in text.split("\n\n"))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "produce", help="attest the enclave, then encrypt, seal and publish records",
        description=_paragraphs("Read one record per line, attest the enclave, clip each value to the stream's "
                    "bounds, encrypt it under the enclave's Paillier key, seal the record to the "
                    "enclave and publish it with a publisher confirm (pipelined: up to 256 records "
                    "await their confirms at once). Nothing is sent if attestation fails.\n\n"
                    "input: CSV (`1.5,2.0`: one value per column) or JSON lines (`1.5`, `[1.5, 2.0]`, "
                    '`{"values": [...]}`, or any object with --field). Blank lines and # comments are '
                    "skipped. A CSV header row is skipped too: the first row, when none of its cells is a "
                    "number and the next row has as many cells, some of them numbers (always with "
                    "--header, never with --no-header). Numbers are plain decimals "
                    "(`-1.5`, `2e3`): `1_000`, `nan` and `inf` are refused. A line that cannot be read, or "
                    "does not fit the stream (its dimension), is reported on stderr as `line N: rejected: "
                    "why` and skipped; the rest is sent.\n\n"
                    "Before sending, asks the enclave for the stream's signed budget report and sends "
                    "nothing to a stream that has spent its budget (exit 4). After the last confirm, waits "
                    "(--outcome-wait) for the enclave's signed word on each record: counted, or rejected "
                    "with a reason (budget spent, window not open, value out of range...); records with "
                    "neither are reported unknown.\n\n"
                    "Prints a summary at the end (on stdout as JSON with --json): exit 4 if some lines "
                    "were rejected or the enclave rejected some records (the reasons on stderr), 3 if some "
                    "were not confirmed.\n\n"
                    "Ctrl-C: stops reading, waits up to 5 s for the records sent to be confirmed, prints "
                    "the summary and exits 130 (a second Ctrl-C stops at once). With --resume FILE a "
                    "rerun goes on where the interrupted run stopped: every line is sent once over both."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--stream", required=True, help="the stream name, as in the attested policy")
    p.add_argument("--input", metavar="FILE", help="input file, or - for stdin (the default)")
    p.add_argument("--format", choices=("auto", "csv", "jsonl"), default="auto",
                   help="input format (default: auto, per line)")
    p.add_argument("--column", action="append", metavar="NAME",
                   help="CSV: read this column, by header name or number (1 is the first); give it once "
                        "per value of a multi-value stream, in order (default: every column)")
    p.add_argument("--field", metavar="NAME",
                   help='JSON lines: read this field of each object (`{"order_id": 7, "amount": 12.5}` '
                        "with --field amount); a list of numbers for a multi-value stream")
    header = p.add_mutually_exclusive_group()
    header.add_argument("--header", action="store_true", default=None,
                        help="CSV: the first line is a header, whatever it looks like")
    header.add_argument("--no-header", dest="header", action="store_false",
                        help="CSV: the first line is a record, even when it looks like a header (then it "
                             "is reported as rejected rather than skipped)")
    p.add_argument("--resume", metavar="FILE",
                   help="record in FILE how far the input was confirmed (written atomically every "
                        f"{RESUME_EVERY} lines and at exit); a rerun with the same FILE, input and options "
                        "skips those lines (confirmed, or rejected: those are not tried again). Refused if the "
                        "input or options changed. Lines the broker did "
                        "not confirm are sent again; the enclave drops a line it already counted as a "
                        "duplicate (within its replay horizon)")
    p.add_argument("--window", type=int, default=0,
                   help="window number the records belong to (default 0: the open window)")
    p.add_argument("--per-message", type=int, default=1, metavar="N",
                   help="records per broker message (default 1). With N > 1 up to N sealed records "
                        f"share one message (at most {wire.MAX_BATCH_BYTES // 1024} KiB) and one confirm; "
                        "the enclave still counts or rejects each on its own")
    p.add_argument("--encrypt-workers", type=int, metavar="N",
                   help="helper processes precomputing Paillier randomizers (default 0, or "
                        "$SEALEDSUM_ENCRYPT_WORKERS); worth it for records of many values")
    p.add_argument("--progress", action="store_true",
                   help="print progress (rate, and for a file how far through it and the time left) even "
                        "when stderr is not a terminal")
    p.add_argument("--outcome-wait", type=float, default=OUTCOME_WAIT_S, metavar="SECONDS",
                   help="after the last confirm, wait up to this long for the enclave to say which records it "
                        f"counted and which it rejected (default {OUTCOME_WAIT_S:g}; 0: do not wait)")
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
