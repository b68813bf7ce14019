"""Stopping and starting without a broker: SIGTERM ends the sidecar within 10 s whatever it is
doing (here: waiting for a broker it lost), and a sidecar that finds no broker at start gives up
with exit 3 after ``broker.reconnect_seconds`` instead of retrying forever."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from sealedsum import testbed
from tests.integration.conftest import launch, relaunch, streams_toml

pytestmark = pytest.mark.integration

STREAM = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 5, "min_batch": 1,
          "mechanism": "laplace", "epsilon": 1e7, "budget_epsilon": 1e12}


def url_on_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Proxy:
    """A TCP forwarder to the broker: the sidecar's only way to it, cut off by :meth:`cut`
    (the listener closes and every forwarded connection with it)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone would not)
        except OSError:
            pass
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_sigterm_stops_the_sidecar_within_10_s_while_it_waits_for_a_lost_broker(tmp_path, amqp_url):
    target = urlsplit(amqp_url)
    proxy = Proxy((target.hostname or "127.0.0.1", target.port or 5672))
    sc = testbed.Testbed(tmp_path, amqp_url, streams_toml({"s": STREAM}), bits=1024,
                         process_url=url_on_port(amqp_url, proxy.port))
    try:
        relaunch(sc)
        proxy.cut()
        deadline = time.monotonic() + 30
        # Into its backoff's 16 s wait (1, 2, 4 and 8 s before it), which once held SIGTERM up.
        while len(sc.events("broker connection lost; reconnecting")) < 5:
            assert time.monotonic() < deadline and sc.alive(), sc.log_tail()
            time.sleep(0.2)
        started = time.monotonic()
        code = sc.stop(timeout=30)
        took = time.monotonic() - started
        print(f"\nSIGTERM while reconnecting: exit {code} after {took:.1f} s")
        assert code == 0 and took < 10
    finally:
        sc.stop()
        proxy.cut()


def test_with_no_broker_at_start_the_sidecar_exits_3_after_reconnect_seconds(tmp_path, amqp_url):
    nothing = socket.create_server(("127.0.0.1", 0))
    port = nothing.getsockname()[1]
    nothing.close()  # a port where nothing listens
    sc = testbed.Testbed(tmp_path, amqp_url, streams_toml({"s": STREAM}), bits=1024,
                         process_url=url_on_port(amqp_url, port), broker_extra="reconnect_seconds = 3")
    try:
        started = time.monotonic()
        proc = launch(sc)
        code = proc.wait(timeout=60)
        took = time.monotonic() - started
        assert code == 3, sc.log_tail()
        assert 3 <= took < 20
        (gave_up,) = sc.events("no broker since the start; giving up")
        assert "reconnect_seconds" in gave_up["hint"]
        assert sc.events("the enclave reached no broker; not restarting")
        assert not sc.events("enclave exited; restarting")
    finally:
        sc.stop()
