"""The private channel between the platform and the enclave: typed frames, checked field
by field, and nothing else."""

from __future__ import annotations

import json
import os
import struct

import pytest

from sealedsum.common.errors import ChannelClosed, FrameError
from sealedsum.sidecar import channel as ch

FRAMES = [
    ch.Launch(b"k" * 32, b"m" * 32, b"d" * 32, b'{"streams":{}}', "/state",
              ch.BrokerLink("amqp://u:p@h/%2F", "pfx", "quorum", 10, 60_000), "INFO", b"l" * 32),
    ch.QuoteRequest(b"r" * 32), ch.QuoteReply(b"quote bytes"), ch.CounterRead(), ch.CounterAdvance(7),
    ch.LedgerCounterRead(), ch.LedgerCounterAdvance(3),
    ch.CounterValue(7), ch.Ready(1234, {"dumpable": False}, 2),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.OP)
def test_every_frame_goes_through_a_pipe_unchanged(frame):
    r1, w1 = os.pipe()
    a, b = ch.PipeChannel(r1, w1), ch.PipeChannel(r1, w1)
    try:
        a.send(frame)
        assert b.recv() == frame
    finally:
        a.close()


@pytest.mark.parametrize("doc", [
    [], "launch", {}, {"op": "nonsense"}, {"op": "quote"}, {"op": "quote", "report_data": "zz"},
    {"op": "quote", "report_data": "00", "extra": 1}, {"op": "counter_advance", "value": True},
    {"op": "counter_advance", "value": "7"}, {"op": "ready", "pid": 1, "hardening": [], "key_epoch": 1},
    {"op": "launch", **{**FRAMES[0].to_json(), "broker": {"url": "x"}}},
    {"op": "launch", **{**FRAMES[0].to_json(), "broker": "amqp://x"}},
])
def test_anything_outside_the_protocol_is_a_frame_error(doc):
    with pytest.raises(FrameError):
        ch.decode(json.dumps(doc).encode())
    with pytest.raises(FrameError):
        ch.decode(b"\xff not json")


def test_an_oversized_frame_and_a_closed_pipe_are_refused():
    r, w = os.pipe()
    reader = ch.PipeChannel(r, os.dup(w))
    os.write(w, struct.pack(">I", ch.MAX_FRAME + 1))
    with pytest.raises(FrameError):
        reader.recv()
    os.close(w)
    reader.close()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ChannelClosed):
        ch.PipeChannel(r, os.dup(r)).recv()


def test_a_request_gets_the_reply_type_it_asked_for():
    r, w = os.pipe()
    c = ch.PipeChannel(r, w)
    os.write(w, ch.encode(ch.QuoteReply(b"q")))
    with pytest.raises(FrameError):
        c.request(ch.CounterRead(), ch.CounterValue)  # the answer to it is read first: a QuoteReply
    c.close()
