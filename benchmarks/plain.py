"""The baselines: plain pika, no sealedsum code, on the same broker with the same sizes.

Publishing mirrors what ``producers.transport.RecordPublisher`` asks of the broker
(a persistent message to a direct exchange, ``mandatory``, one publisher confirm per
message on a ``BlockingChannel`` in confirm mode). Consuming mirrors what
``sidecar.runtime.EnclaveRuntime`` asks of it (prefetch 64, one manual ack per
message, ``process_data_events`` loop). Only the work in between is left out.
"""

from __future__ import annotations

import time

import pika

from sidecar.runtime import PREFETCH  # the runtime's prefetch, so both consume alike


def connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.heartbeat = 30  # as common.amqp.connect
    params.blocked_connection_timeout = 60
    return pika.BlockingConnection(params)


def declare(url: str, exchange: str, queue: str, queue_type: str) -> None:
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange, exchange_type="direct", durable=True)
        ch.queue_declare(queue, durable=True, arguments={"x-queue-type": queue_type})
        ch.queue_bind(queue, exchange, routing_key="record")
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
            ch.basic_publish(exchange, "record", body, props, mandatory=True)
        return time.perf_counter() - t0
    finally:
        conn.close()


def consume(url: str, queue: str, n: int, timeout: float = 120.0) -> float:
    """Consume and ack ``n`` messages one by one; return the seconds from consume-ok to the last ack."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=PREFETCH)
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
