"""What ``RecordSealer.seal`` (and so ``Producer.send``) takes as one record's values."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sealedsum.common.errors import PolicyMismatch
from sealedsum.producers.client import RecordSealer
from tests.conftest import make_policy, make_world, now_ms, stream_table


@pytest.fixture
def sealer(small_keys):
    world = make_world(small_keys, make_policy({"one": stream_table(), "three": stream_table(dimension=3)}))
    return world, RecordSealer(world.attested, producer_id=b"A" * 16)


@pytest.mark.parametrize("value", [5.0, 5, np.float64(5.0), [5.0], (5,)])
def test_a_plain_number_is_one_value(sealer, value):
    world, alice = sealer
    record = alice.seal("one", value)
    assert world.enclave.on_record(record.body, now_ms()).rejection is None and record.clipped == 0


@pytest.mark.parametrize("values, message", [
    (5.0, "takes 3 value(s) per record, got 1"),
    ([1.0, 2.0], "takes 3 value(s) per record, got 2"),
    ("123", "not the text"),
    (None, "not NoneType"),
])
def test_a_wrong_count_or_type_is_a_policy_mismatch(sealer, values, message):
    _, alice = sealer
    with pytest.raises(PolicyMismatch, match=re.escape(message)):
        alice.seal("three", values)
