"""The largest message a deployment puts on its broker, and the ``max_message_size`` that
follows from it (``sealedsum broker setup``; docs/broker-accounts.md).

RabbitMQ refuses a publish whose body is larger than ``max_message_size`` (it closes the
channel with 406 PRECONDITION_FAILED) before the message reaches a queue. Left at RabbitMQ's
default (128 MiB) a producer account can fill the broker's memory and disk with a few
messages the enclave then refuses as ``too_large``. Every bound below is computed from the
policy alone (the enclave's keys do not exist yet when the broker is set up), and is never
below what the real code produces for any key of the policy's ``paillier_bits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sealedsum.common import signing, wire
from sealedsum.common.policy import EnclavePolicy, StreamKind
from sealedsum.common.results import BudgetReport, Release
from sealedsum.sidecar.enclave.records import record_bytes_bound

__all__ = ["FLOOR", "RABBITMQ_DEFAULT", "MessageLimit", "conf_line", "largest_messages", "message_limit"]

RABBITMQ_DEFAULT = 128 << 20  # RabbitMQ's own max_message_size (3.8 and later)
FLOOR = 1 << 20
MiB = 1 << 20

# The longest JSON texts a number in a signed payload can take: a float's repr
# (-2.2250738585072014e-308) and an integer of the 64-bit noise domain, sign included.
_LONGEST_FLOAT = -2.2250738585072014e-308
_LONGEST_INT = -(1 << 64) + 1
_HEAD = "f" * 64


def _budget(policy: EnclavePolicy) -> dict:
    """The longest budget object a stream of ``policy`` can carry (with every stream as a group member)."""
    return {"releases": _LONGEST_INT, "spent_epsilon": _LONGEST_FLOAT, "spent_rho": _LONGEST_FLOAT,
            "budget_epsilon": _LONGEST_FLOAT, "budget_delta": _LONGEST_FLOAT, "remaining_releases": _LONGEST_INT,
            "ledger_head": _HEAD, "budget_group": "g" * wire.MAX_STREAM_NAME,
            "group_releases": {name: _LONGEST_INT for name in policy.streams}}


def _signed(payload: bytes) -> int:
    return len(wire.SignedMessage(payload, bytes(signing.SIGNATURE_SIZE)).to_bytes())


def _release_bytes(policy: EnclavePolicy) -> int:
    """The longest signed release: the stream with the most values, each at its longest."""
    s = max(policy.streams.values(), key=lambda s: s.dimension)
    d = s.dimension
    release = Release(
        stream=s.name, window=_LONGEST_INT, aggregate=StreamKind.HISTOGRAM, count=_LONGEST_INT,
        sum=[_LONGEST_FLOAT] * d, sum_fixed=[_LONGEST_INT] * d, mean=[_LONGEST_FLOAT] * d, dimension=d,
        fraction_bits=_LONGEST_INT, mechanism="gaussian", epsilon=_LONGEST_FLOAT, delta=_LONGEST_FLOAT,
        rho=_LONGEST_FLOAT, sum_noise_scale=_LONGEST_FLOAT, count_noise_scale=_LONGEST_FLOAT,
        key_epoch=_LONGEST_INT, measurement=_HEAD, closed_at_ms=_LONGEST_INT, budget=_budget(policy))
    return _signed(release.to_payload())


def _budget_reply_bytes(policy: EnclavePolicy) -> int:
    report = BudgetReport("s" * wire.MAX_STREAM_NAME, "f" * 2 * wire.NONCE_SIZE, False, _budget(policy),
                          _LONGEST_INT, _HEAD, _LONGEST_INT)
    return _signed(report.to_payload())


def _attestation_reply_bytes(policy: EnclavePolicy) -> int:
    """The reply carries the policy itself, so a policy with many streams or identities is long."""
    keys = wire.KeyBundle((1 << 32) - 1, bytes(wire.X25519_KEY_SIZE), bytes(signing.PUBLIC_KEY_SIZE),
                          (1 << policy.paillier_bits) - 1)
    return len(wire.AttestReply(bytes(wire.NONCE_SIZE), bytes(wire.DIGEST_SIZE), keys.to_bytes(),
                                policy.to_bytes(), bytes(wire.Quote.SIZE)).to_bytes())


def largest_messages(policy: EnclavePolicy) -> dict[str, int]:
    """Each kind of message the deployment publishes, and the most bytes one can have.

    Dead letters carry the record they refuse (at most a record or a batch); budget requests,
    attestation requests and key-rotation notices are a few hundred bytes.
    """
    return {
        "record": record_bytes_bound(policy),
        "record batch": wire.MAX_BATCH_BYTES,
        "attestation reply": _attestation_reply_bytes(policy),
        "release": _release_bytes(policy),
        "budget reply": _budget_reply_bytes(policy),
    }


@dataclass(frozen=True, slots=True)
class MessageLimit:
    """The ``max_message_size`` for a deployment, and why."""

    value: int          # bytes
    largest: int        # the largest legitimate message
    largest_kind: str   # which kind of message that is


def message_limit(policy: EnclavePolicy) -> MessageLimit:
    """The largest legitimate message with a quarter on top, in whole MiB, at least :data:`FLOOR`
    and at most :data:`RABBITMQ_DEFAULT` (a limit that raised RabbitMQ's own would let more in,
    not less; the policy's own limits keep its largest message far below it, about 16 MiB)."""
    sizes = largest_messages(policy)
    kind = max(sizes, key=sizes.__getitem__)
    largest = sizes[kind]
    return MessageLimit(min(RABBITMQ_DEFAULT, max(FLOOR, math.ceil(largest * 5 / 4 / MiB) * MiB)), largest, kind)


def conf_line(value: int) -> str:
    """The rabbitmq.conf line that sets ``value`` at every boot."""
    return f"max_message_size = {value}"
