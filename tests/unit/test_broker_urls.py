"""Several nodes of one RabbitMQ cluster: ``broker.urls = [...]`` or a comma-separated
``AMQP_URL``; ``settings.url`` stays the first; connections try every node, starting one node
further each time; passwords never show."""

from __future__ import annotations

import dataclasses
import socket

import pika
import pytest

from sealedsum.common import amqp
from sealedsum.common import config as config_mod
from sealedsum.common.config import BrokerSettings, split_urls
from sealedsum.common.errors import ConfigError, TransportError

N1, N2, N3 = (f"amqp://guest:s3cret@127.0.0.1:{p}/%2F" for p in (5681, 5682, 5683))


def broker(raw: dict | None = None, env: dict | None = None) -> BrokerSettings:
    return config_mod.from_mapping({"broker": raw or {}}, env=env or {}).broker


def test_one_url_is_what_it_always_was():
    b = broker({"url": N1})
    assert b.url == N1 and b.urls == (N1,)
    assert broker().urls == (config_mod.DEFAULT_AMQP_URL,)
    assert BrokerSettings(N2).urls == (N2,)
    assert repr(b) == "BrokerSettings(url='amqp://guest:***@127.0.0.1:5681/%2F', prefix='sealedsum')"


def test_broker_urls_in_toml_lists_the_nodes_and_url_is_the_first():
    b = broker({"urls": [N1, N2, N3]})
    assert b.urls == (N1, N2, N3) and b.url == N1


def test_a_comma_separated_amqp_url_lists_the_nodes_and_overrides_the_file():
    b = broker({"urls": [N1, N2]}, env={"AMQP_URL": f"{N3}, {N2},{N1}"})
    assert b.urls == (N3, N2, N1) and b.url == N3
    assert broker({"url": N1}, env={"AMQP_URL": f"{N2},{N3}"}).urls == (N2, N3)
    assert broker({"urls": [N1, N2]}, env={"AMQP_URL": N3}).urls == (N3,)


def test_a_comma_inside_a_url_does_not_split_it():
    odd = "amqp://guest:pa,ss@127.0.0.1:5681/%2F"
    assert split_urls(f"{odd},{N2}") == (odd, N2)
    assert broker(env={"AMQP_URL": odd}).urls == (odd,)


def test_the_loaded_file_parses(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(f'[broker]\nurls = ["{N1}", "{N2}", "{N3}"]\nprefix = "p"\n')
    cfg = config_mod.load(path, env={})
    assert cfg.broker.urls == (N1, N2, N3) and cfg.broker.topology.prefix == "p"


@pytest.mark.parametrize("raw, env, match", [
    ({"url": N1, "urls": [N2]}, {}, "not both"),
    ({"urls": []}, {}, "non-empty list"),
    ({"urls": N1}, {}, "non-empty list"),
    ({"urls": [N1, 5]}, {}, "only amqp"),
    ({"urls": [N1, "http://127.0.0.1:5682/"]}, {}, "only amqp"),
    ({"urls": ["http://127.0.0.1:5682/"]}, {}, "must be an amqp:// or amqps:// URL"),
    ({"urls": [N1, N1]}, {}, "twice"),
    ({"urls": [N1, "amqp://guest:s3cret@127.0.0.1:5682/other"]}, {}, "same account and virtual host"),
    ({"urls": [N1, "amqp://admin:s3cret@127.0.0.1:5682/%2F"]}, {}, "same account and virtual host"),
    ({}, {"AMQP_URL": f"{N1},http://x/"}, "AMQP_URL must hold only"),
    ({}, {"AMQP_URL": "http://x/"}, "must be an amqp:// or amqps:// URL"),
])
def test_bad_url_lists_are_refused_without_showing_a_password(raw, env, match):
    with pytest.raises(ConfigError, match=match) as info:
        broker(raw, env)
    assert "s3cret" not in info.value.diagnostics()


def test_with_broker_url_takes_one_url_or_several():
    cfg = config_mod.from_mapping({"broker": {"urls": [N1, N2]}}, env={})
    assert cfg.with_broker_url(N3).broker.urls == (N3,)
    assert cfg.with_broker_url(f"{N2},{N3}").broker.urls == (N2, N3)
    with pytest.raises(ConfigError, match="must be an amqp:// or amqps:// URL"):
        cfg.with_broker_url("")


def test_replacing_url_keeps_its_nodes_or_means_one_broker():
    b = broker({"urls": [N1, N2, N3]})
    assert dataclasses.replace(b, url=N2).urls == (N2, N3, N1)  # the same nodes, starting there
    assert dataclasses.replace(b, url="amqp://guest:x@elsewhere/%2F").urls == ("amqp://guest:x@elsewhere/%2F",)
    assert dataclasses.replace(b, queue_type="classic").urls == b.urls


def test_repr_redacts_every_url():
    text = repr(broker({"urls": [N1, N2, N3]}))
    assert "s3cret" not in text and text.count("***") == 3


def test_each_connection_starts_one_node_further(monkeypatch):
    monkeypatch.setattr(amqp, "_next_node", {})
    b = broker({"urls": [N1, N2, N3]})
    ports = [[p.port for p in amqp.all_parameters(b)] for _ in range(4)]
    assert ports == [[5681, 5682, 5683], [5682, 5683, 5681], [5683, 5681, 5682], [5681, 5682, 5683]]
    # A connection that reconnects by itself (pika.SelectConnection) takes the next single node.
    assert [amqp.parameters(b).port for _ in range(3)] == [5682, 5683, 5681]
    # An explicit url, and a single-URL broker, are always that one.
    assert amqp.parameters(b, url=N3).port == 5683
    one = broker({"url": N1})
    assert {amqp.parameters(one).port for _ in range(3)} == {5681}
    # Every node gets our heartbeat, name and blocked-connection timeout.
    for p in amqp.all_parameters(b, heartbeat=7, name="x"):
        assert isinstance(p, pika.URLParameters) and p.heartbeat == 7 and p.blocked_connection_timeout == 60
        assert p.client_properties == {"connection_name": "x"}


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_tries_every_node_and_names_them_all_redacted(monkeypatch):
    monkeypatch.setattr(amqp, "_next_node", {})
    urls = [f"amqp://guest:s3cret@127.0.0.1:{_dead_port()}/%2F" for _ in range(3)]
    b = broker({"urls": urls})
    tried = []
    real = pika.BlockingConnection

    def spy(params):
        tried.append([p.port for p in params] if isinstance(params, list) else [params.port])
        return real(params)

    monkeypatch.setattr(pika, "BlockingConnection", spy)
    with pytest.raises(TransportError, match="cannot reach the broker at any node of") as info:
        amqp.connect(b)
    assert tried == [[pika.URLParameters(u).port for u in urls]]
    text = info.value.diagnostics()
    assert "s3cret" not in text and all(f":{pika.URLParameters(u).port}/" in text for u in urls)


def test_connect_to_one_node_passes_pika_one_parameters_object(monkeypatch):
    seen = []

    class Fake:
        def __init__(self, params):
            seen.append(params)

    monkeypatch.setattr(pika, "BlockingConnection", Fake)
    amqp.connect(broker({"url": N1}))
    assert len(seen) == 1 and isinstance(seen[0], pika.URLParameters) and seen[0].port == 5681
