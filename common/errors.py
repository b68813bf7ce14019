"""The error tree. Every failure a user can meet is one of these types.

Library exceptions (pynacl's ``CryptoError``, cryptography's ``InvalidSignature``,
phe's ``OverflowError``, pika's ``AMQPError``) are wrapped at the module boundary
and never escape. Messages never contain keys, plaintexts, totals or passwords.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What a ``sealedsum`` command's exit status means. Each error class below carries
    the code a command exits with when it stops on that error."""

    OK = 0
    VERIFICATION = 1
    USAGE = 2
    TRANSPORT = 3
    PARTIAL = 4
    STORAGE = 5
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.VERIFICATION: "attestation or verification failure (nothing was sent; or forged results were seen)",
    ExitCode.USAGE: "usage or configuration error",
    ExitCode.TRANSPORT: "broker unreachable or refusing",
    ExitCode.PARTIAL: "finished, but some input lines or records were rejected, or the stream's budget is spent "
                      "(`produce`)",
    ExitCode.STORAGE: "the state directory could not be written (disk full or failing)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class SealedsumError(Exception):
    """Base of every error sealedsum raises on purpose.

    ``exit_code`` is what the CLI exits with; ``hint`` says what to do next.
    """

    exit_code = ExitCode.VERIFICATION
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """One line for a terminal: what failed, and what to do about it."""
        text = f"error: {self}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text


class ConfigError(SealedsumError):
    """The configuration file or a command-line value is wrong."""

    exit_code = ExitCode.USAGE


class AttestationError(SealedsumError):
    """The enclave could not prove what it is. Nothing may be sent to it."""

    exit_code = ExitCode.VERIFICATION


class UntrustedPlatform(AttestationError):
    """The quote is not signed by the pinned platform key."""

    hint = ("the quote is not signed by trust.platform_key: pin the key `sealedsum platform show --state DIR` "
            "prints on the sidecar's machine (or this is not the enclave you meant to reach)")


class MalformedQuote(AttestationError):
    """The quote field is no quote of a format this client knows, or a Nitro attestation
    document breaks AWS's syntactic rules (a field missing, of the wrong type or size)."""


class CertificateChainError(AttestationError):
    """A Nitro document's certificates do not chain from the pinned root to its signing
    certificate (another root, a bad certificate signature, constraints or key usage)."""

    hint = ("the document is not signed under trust.nitro's root: pin the AWS Nitro Enclaves root "
            "(or this is not the enclave you meant to reach)")


class CertificateExpired(CertificateChainError):
    """A certificate of a Nitro document's chain is not valid at the verification time."""

    hint = "a replayed or old document, or this client's clock is wrong; attest again"


class QuoteSignatureError(AttestationError):
    """The Nitro document's COSE signature does not verify under its signing certificate."""


class DebugEnclave(AttestationError):
    """A Nitro document from an enclave in debug mode (PCR0, PCR1 and PCR2 all zero): the
    parent instance can read its memory. Refused unless ``trust.nitro.allow_debug``."""

    hint = "run the enclave without --debug-mode, or set trust.nitro.allow_debug = true for a test deployment"


class UnknownMeasurement(AttestationError):
    """The quote vouches for code or policy that is not in the allow-list."""


class ReportDataMismatch(AttestationError):
    """The keys, policy or nonce received are not the ones the quote covers."""


class NonceMismatch(AttestationError):
    """The reply answers somebody else's nonce (a replayed attestation)."""


class StaleQuote(AttestationError):
    """The quote is older than the allowed age, or dated in the future."""


class KeySizeMismatch(AttestationError):
    """The attested Paillier modulus does not have exactly the policy's ``paillier_bits`` bits."""


class PolicyTooWeak(AttestationError):
    """The attested policy promises less privacy than this client requires."""


class InvalidMessage(SealedsumError):
    """Bytes that do not decode as the message they claim to be."""


class InvalidResultSignature(SealedsumError):
    """A result whose signature does not verify under the attested key."""


class LedgerChainError(SealedsumError):
    """A stream's verified releases do not form its ledger's hash chain (docs/protocol.md 15.4)."""


class MissingRelease(LedgerChainError):
    """A release of the stream's ledger is not among those received."""


class ReleaseOutOfOrder(LedgerChainError):
    """A release came after a later one of its stream."""


class LedgerHeadMismatch(LedgerChainError):
    """A release's ledger head is not the one its charge and the previous head give: the
    enclave signed two ledgers that disagree, or a release is not the one charged."""


class ChainContradiction(LedgerChainError):
    """A verified release contradicts the chain this consumer verified before, and kept in its
    chain-state file (docs/protocol.md section 15.5). Each release is signed by the attested
    enclave, so this is no forgery: the sidecar's ledger went back or started over. A consumer
    stops on it, since averaging two draws of one window reveals the total."""

    hint = ("the sidecar's sealed state was rolled back, or replaced by a fresh one started with a copy of "
            "platform.key; do not use releases of this stream until the operator has investigated. To "
            "accept a new chain deliberately (e.g. after approving a new measurement), delete the "
            "consumer's chain-state file")


class ChainRestarted(ChainContradiction):
    """Release 1 of a chain again, after other releases were verified: the ledger started over
    from genesis (a fresh state directory, and with it a fresh budget)."""


class ChainForked(ChainContradiction):
    """A release that names another ledger than the one verified: a different head at a position
    already verified, a position passed long ago, or a next release that does not link."""


class WindowRepeated(ChainContradiction):
    """A window released before, released again with a different body: a second noise draw
    of one total (the sealed state was rolled back)."""


class ChainStateError(SealedsumError):
    """The consumer's chain-state file cannot be read (damaged, or not one) or written."""

    exit_code = ExitCode.USAGE


class InputError(ConfigError):
    """The producer's input does not fit its options as a whole (``--column amount`` and no
    such column in the header). A single bad line is no error: it is reported and skipped."""


class ResumeError(ConfigError):
    """A ``produce --resume`` state file does not fit this run (another input, stream or
    options, or the input changed), or cannot be read or written. Nothing was sent."""

    hint = ("resume with the same input and options as the interrupted run; to start over, "
            "delete the state file (records it counted would then be counted again)")


class PolicyMismatch(SealedsumError):
    """A value does not fit the stream's policy (dimension, bounds, stream name)."""

    exit_code = ExitCode.USAGE


class TransportError(SealedsumError):
    """The broker could not be reached or refused an operation."""

    exit_code = ExitCode.TRANSPORT

    def __init__(self, message: str, *, retryable: bool = True, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable


class StreamExhausted(SealedsumError):
    """The stream's signed budget report says it has spent its privacy budget: the enclave would
    dead-letter every record (``budget_exhausted``), so nothing is sent."""

    exit_code = ExitCode.PARTIAL


class Unroutable(TransportError):
    """The broker took the message but no queue is bound to receive it."""


class AnotherReleaser(TransportError):
    """Another enclave's connection holds the prefix's release lock: this one stands by."""


class SealingError(SealedsumError):
    """Sealed state could not be opened: other code, other platform, or tampering.

    The enclave refuses to start on it, and restarting cannot help: its exit code is the
    one the platform does not retry."""

    exit_code = ExitCode.USAGE


class RollbackDetected(SealingError):
    """The sealed state on disk is older than the platform's counter says it must be."""


class StateIncompatible(SealingError):
    """The sealed state opens but is not one this code can read (an unknown version)."""


class InheritedSpendMismatch(ConfigError):
    """The sealed ledger holds a stream's spend charged under other privacy parameters than
    the policy now gives it: carrying the spend over would mix two accountings, starting
    afresh would reset a budget. The enclave refuses to start (exit 2, not retried)."""

    hint = ("keep the stream's privacy parameters as they were, or give the new parameters a new "
            "stream name (the old name's spend stays in the ledger)")


class StateDirectoryLocked(ConfigError):
    """Another sidecar holds the state directory's lock (``STATE/sidecar.lock``): two
    sidecars on one state would release windows twice with different noise."""

    hint = "stop the other sidecar first, or give this one a state directory of its own"


class StorageError(SealedsumError):
    """The state directory could not be written (disk full, an I/O error), or the platform
    could not persist a counter step. Nothing that waits on the write is acknowledged or
    published; the running enclave tries again, and an enclave that meets it at start-up
    exits for the platform to restart it (not a refusal: space may come back)."""

    exit_code = ExitCode.STORAGE
    hint = "free space on the state directory's filesystem; the sidecar goes on by itself"


class ChannelClosed(SealedsumError):
    """The private channel between the platform and the enclave is closed or broken."""


class FrameError(ChannelClosed):
    """A frame on the private channel is not one of the protocol's (malformed, unknown, oversized)."""


class BrokerAdminError(SealedsumError):
    """rabbitmqctl is missing, cannot reach the node, or refused a change (``sealedsum broker``)."""

    exit_code = ExitCode.TRANSPORT


class CalibrationError(SealedsumError):
    """OpenDP says a noise measurement spends more than the plan allows: a bug, never input.
    The window is withheld rather than released with too little noise."""


class LayoutError(SealedsumError, ValueError):
    """No packing layout fits the policy (the policy parser turns it into a ``ConfigError``)."""

    exit_code = ExitCode.USAGE


class RejectReason(str, enum.Enum):
    """Why the enclave dead-lettered a record. The value is the ``x-sealedsum-reason`` header."""

    TOO_LARGE = "too_large"
    UNDECRYPTABLE = "undecryptable"
    MALFORMED = "malformed"
    UNKNOWN_STREAM = "unknown_stream"
    WRONG_DIMENSION = "wrong_dimension"
    WRONG_EPOCH = "wrong_epoch"
    BAD_CIPHERTEXT = "bad_ciphertext"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"
    FROM_FUTURE = "from_future"
    LATE_WINDOW = "late_window"
    FUTURE_WINDOW = "future_window"
    BUDGET_EXHAUSTED = "budget_exhausted"
    CONTRIBUTION_LIMIT = "contribution_limit"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_PRODUCER = "unknown_producer"
    REVOKED_PRODUCER = "revoked_producer"
    # A plaintext no honest producer could send, or a ciphertext that does not encrypt
    # the plaintext the record states.
    OUT_OF_RANGE = "out_of_range"


class RecordRejected(SealedsumError):
    """The enclave refuses a record. Turned into a dead-letter message, never raised past the runtime."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail
        # (stream, record id) once the envelope was read: what the producer's notice names.
        self.record: tuple[str, bytes] | None = None
