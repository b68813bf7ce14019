"""The platform process (``sealedsum sidecar``): measures the enclave, launches it as a
child process, answers its quote and counter requests over the private channel, and
restarts it (with backoff) if it dies."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sealedsum.common.backoff import Backoff
from sealedsum.common.config import Config
from sealedsum.common.errors import ChannelClosed, ExitCode, FrameError
from sealedsum.sidecar.channel import (BrokerLink, CounterAdvance, CounterRead, CounterValue, Launch,
                                       LedgerCounterAdvance, LedgerCounterRead, PipeChannel, QuoteReply, QuoteRequest,
                                       Ready)
from sealedsum.sidecar import measurement as measure
from sealedsum.sidecar.platform.base import Platform
from sealedsum.sidecar.platform import nitro
from sealedsum.sidecar.platform.emulated import EmulatedPlatform
from sealedsum.sidecar.platform.statelock import StateLock

log = logging.getLogger("sealedsum.platform")

# The child imports the installed tree the platform measured, in isolated mode (no
# PYTHONPATH, no user site, no working directory on sys.path).
BOOT = "import sys; from sealedsum.sidecar.enclave_process.__main__ import main; sys.exit(main(sys.argv[1:]))"
MAX_BACKOFF_S = 30.0
# The enclave exits with this when restarting cannot help (its sealed state or keys do
# not open, or do not fit the code): the platform gives up with it too.
EXIT_CONFIG = ExitCode.USAGE


def platform_for(config: Config, state_dir: Path) -> Platform:
    """The platform ``[platform] kind`` names: the emulated one of ``state_dir`` (the default)
    or AWS Nitro Enclaves."""
    if config.platform == "nitro":
        return nitro.from_config(state_dir)
    return EmulatedPlatform.load(state_dir)


class PlatformProcess:
    """:param platform: the root of trust (default: :func:`platform_for` the config)."""

    def __init__(self, config: Config, state_dir: Path, log_level: str = "INFO",
                 platform: Platform | None = None) -> None:
        self.config = config
        self.state_dir = state_dir
        self.log_level = log_level
        self.platform: Platform = platform if platform is not None else platform_for(config, state_dir)
        self.policy_bytes = config.require_policy().to_bytes()
        self.code_digest, self.measurement = measure.measure(self.policy_bytes)
        self.stopping = False
        self.child: subprocess.Popen | None = None
        self.restarts = 0

    def check_trust(self) -> list[str]:
        """Warnings when the config's own trust anchors would make clients refuse this enclave."""
        warnings = []
        trust = self.config.trust
        if trust is not None:
            if isinstance(self.platform, EmulatedPlatform) and trust.platform_key != self.platform.public_key():
                warnings.append("trust.platform_key is not this platform's key: clients using this config will refuse")
            if self.platform.kind == "nitro" and trust.nitro is None:
                warnings.append("the config has no [trust.nitro]: clients using it will refuse this Nitro enclave")
            if self.measurement not in trust.measurements:
                warnings.append(f"measurement {self.measurement.hex()} is not in trust.measurements: "
                                "clients using this config will refuse (run `sealedsum measure`)")
        return warnings

    def forward_rotation(self, *_args) -> None:
        """SIGUSR1 (from `sealedsum sidecar rotate`): ask the enclave to rotate its keys."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGUSR1)

    def stop(self, *_args) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """Run until stopped; return the exit code.

        :raises StateDirectoryLocked: another sidecar runs on this state directory (before
            anything is logged or written).
        """
        with StateLock(self.state_dir) as lock:
            return self._run(lock)

    def _run(self, lock: StateLock) -> int:
        log.info("enclave measured", extra={"fields": {
            "measurement": self.measurement.hex(), "code_digest": self.code_digest.hex()}})
        for w in self.check_trust():
            log.warning(w)
        recorded = False
        backoff = Backoff(first=1.0, cap=MAX_BACKOFF_S)
        while not self.stopping:
            if not recorded:
                try:
                    lock.record_pid()
                    recorded = True
                except OSError as err:  # `sidecar rotate` cannot find it yet; tried again at the next start
                    log.warning("cannot record the pid in the lock file", extra={"fields": {
                        "path": str(lock.path), "error": type(err).__name__, "detail": str(err)}})
            started = time.monotonic()
            try:
                code = self._run_once()
            except OSError as err:  # the enclave could not even be started (no memory, no pipes)
                log.error("cannot start the enclave", extra={"fields": {
                    "error": type(err).__name__, "detail": str(err)}})
                if self.child is not None and self.child.poll() is None:
                    self.child.kill()  # never two enclaves on one state
                    self.child.wait()
                code = None
            if self.stopping:
                return 0
            if code == EXIT_CONFIG:
                log.error("the enclave refused to start; not restarting", extra={"fields": {"exit_code": code}})
                return EXIT_CONFIG
            if code == ExitCode.TRANSPORT:  # it found no broker since it started (it retries one lost later)
                log.error("the enclave reached no broker; not restarting", extra={"fields": {"exit_code": code}})
                return ExitCode.TRANSPORT
            if time.monotonic() - started > 60:
                backoff.reset()  # it ran a good while: this is a new failure, not the same one
            self.restarts += 1
            delay = backoff.next_delay()
            log.warning("enclave exited; restarting", extra={"fields": {
                "exit_code": code, "restart_in_s": delay, "restarts": self.restarts}})
            self._pause(delay)
        return 0

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake within 0.1 s of :meth:`stop`: SIGTERM must end the platform within
        seconds, even during a 30 s backoff."""
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _run_once(self) -> int:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.child = subprocess.Popen(
            [sys.executable, "-I", "-c", BOOT, str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w), close_fds=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        channel = PipeChannel(from_child_r, to_child_w)
        b = self.config.broker
        try:
            channel.send(Launch(self.platform.sealing_key(self.measurement), self.measurement, self.code_digest,
                                self.policy_bytes, str(self.state_dir.resolve()),
                                # Every node of a cluster, comma-separated (split_urls reads them back).
                                BrokerLink(",".join(b.urls), b.topology.prefix, b.queue_type, b.max_queued_records,
                                           int(b.reconnect_seconds * 1000)),
                                self.log_level, self.platform.ledger_key(self.code_digest)))
            while True:
                self._answer(channel, channel.recv())
        except FrameError as err:
            # Only the measured enclave writes here: a frame outside the protocol means it is
            # not the code the platform launched, or it is broken. Nothing more is answered.
            log.error("malformed frame from the enclave; stopping it", extra={"fields": {"detail": str(err)}})
            if self.child.poll() is None:
                self.child.kill()
        except ChannelClosed:
            pass  # the enclave exited (its exit code says how)
        finally:
            channel.close()
        return self.child.wait()

    def _answer(self, channel: PipeChannel, frame) -> None:
        if isinstance(frame, QuoteRequest):
            channel.send(QuoteReply(self.platform.quote(self.measurement, frame.report_data)))
        elif isinstance(frame, CounterRead):
            channel.send(CounterValue(self.platform.counter_read(self.measurement)))
        elif isinstance(frame, CounterAdvance):
            channel.send(CounterValue(self.platform.counter_advance(self.measurement, frame.value)))
        elif isinstance(frame, LedgerCounterRead):
            channel.send(CounterValue(self.platform.ledger_counter_read(self.code_digest)))
        elif isinstance(frame, LedgerCounterAdvance):
            channel.send(CounterValue(self.platform.ledger_counter_advance(self.code_digest, frame.value)))
        elif isinstance(frame, Ready):
            log.info("enclave running", extra={"fields": {
                "pid": frame.pid, "platform_pid": os.getpid(), "hardening": frame.hardening}})
        else:
            raise FrameError(f"the enclave sent a {frame.OP} frame, which only the platform sends")
