"""The baselines: plain pika, no sealedsum code, on the same broker with the same sizes.

Publishing mirrors what ``sealedsum.producers.transport.RecordPublisher`` asks of the broker (a
persistent message to a direct exchange, ``mandatory``, a publisher confirm per
message), two ways: :func:`publish` waits for each confirm on a ``BlockingChannel`` in
confirm mode (a round trip per message; the baseline the producer targets are stated
against), :func:`publish_pipelined` keeps up to ``window`` messages awaiting their
confirms on a ``SelectConnection``, as our publisher does. Consuming mirrors what
``sealedsum.sidecar.enclave_process.runtime.EnclaveRuntime`` asks of it (the same prefetch, one manual ack per
message, ``process_data_events`` loop). Only the work in between is left out.
"""

from __future__ import annotations

import time
from collections import deque

import pika
from pika.adapters.select_connection import SelectConnection

from sealedsum.common.topology import RECORD_ROUTING_KEY  # as the producer publishes
from sealedsum.sidecar.enclave_process.runtime import PREFETCH  # the runtime's prefetch for small records, so both consume alike


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.heartbeat = 30  # as sealedsum.common.amqp.connect
    params.blocked_connection_timeout = 60
    return pika.BlockingConnection(params)


def declare(url: str, exchange: str, queue: str, queue_type: str) -> None:
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, exchange_type="direct", durable=True)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": queue_type})
        ch.queue_bind(queue, exchange, routing_key=RECORD_ROUTING_KEY)
    finally:
        conn.close()


def publish(url: str, exchange: str, bodies: list[bytes]) -> float:
    """Publish each body persistent with a confirm per message; return the seconds it took."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                     content_type="application/octet-stream", type="record", app_id="sealedsum")
        t0 = time.perf_counter()
        for body in bodies:
            ch.basic_publish(exchange, RECORD_ROUTING_KEY, body, props, mandatory=True)
        return time.perf_counter() - t0
    finally:
        conn.close()


def publish_pipelined(url: str, exchange: str, bodies: list[bytes], window: int, timeout: float = 300.0, *,
                      routing_key: str = RECORD_ROUTING_KEY, properties=None) -> float:
    """Publish each body persistent, ``mandatory``, with up to ``window`` awaiting their confirms;
    return the seconds from the first publish to the last confirm.

    :param properties: ``body -> BasicProperties`` (default: a record's, the same for every body)."""
    fixed = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                 content_type="application/octet-stream", type="record", app_id="sealedsum")
    props = properties or (lambda _body: fixed)
    unconfirmed: deque[int] = deque()
    state = {"sent": 0, "confirmed": 0, "t0": None, "t1": None, "error": None, "channel": None}

    def pump():
        ch = state["channel"]
        while state["sent"] < len(bodies) and state["sent"] - state["confirmed"] < window:
            body = bodies[state["sent"]]
            ch.basic_publish(exchange, routing_key, body, props(body), mandatory=True)
            state["sent"] += 1
            unconfirmed.append(state["sent"])  # delivery tags count 1, 2, ... on this channel

    def on_confirm(frame):
        m = frame.method
        if isinstance(m, pika.spec.Basic.Nack):
            state["error"] = "nack"
        if m.multiple:
            while unconfirmed and unconfirmed[0] <= m.delivery_tag:
                unconfirmed.popleft()
                state["confirmed"] += 1
        elif m.delivery_tag in unconfirmed:
            unconfirmed.remove(m.delivery_tag)
            state["confirmed"] += 1
        if state["confirmed"] >= len(bodies):
            state["t1"] = time.perf_counter()
            conn.close()
        else:
            pump()

    def on_confirm_mode(_frame):
        state["t0"] = time.perf_counter()
        pump()

    def on_channel(ch):
        state["channel"] = ch
        ch.add_on_return_callback(lambda *_: state.update(error="returned"))
        ch.confirm_delivery(on_confirm, callback=on_confirm_mode)

    def on_closed(_conn, _err):
        conn.ioloop.stop()

    def on_open_error(_conn, err):
        state["error"] = repr(err)
        conn.ioloop.stop()

    params = pika.URLParameters(url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 60
    conn = SelectConnection(params, on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
                            on_open_error_callback=on_open_error, on_close_callback=on_closed)
    conn.ioloop.call_later(timeout, lambda: (state.update(error="timeout"), conn.close()))
    conn.ioloop.start()
    if state["error"] or state["t1"] is None:
        raise RuntimeError(f"plain pipelined publish failed: {state['error']}")
    return state["t1"] - state["t0"]


def consume(url: str, queue: str, n: int, timeout: float = 120.0, prefetch: int = PREFETCH) -> float:
    """Consume and ack ``n`` messages one by one; return the seconds from consume-ok to the last ack."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        seen = 0
        done_at = None

        def on_message(channel, method, _props, _body):
            nonlocal seen, done_at
            channel.basic_ack(method.delivery_tag)
            seen += 1
            if seen == n:
                done_at = time.perf_counter()

        tag = ch.basic_consume(queue, on_message, auto_ack=False)
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        while done_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"plain consume saw {seen} of {n} messages in {timeout:.0f} s")
            conn.process_data_events(time_limit=0.5)
        ch.basic_cancel(tag)
        return done_at - t0
    finally:
        conn.close()
