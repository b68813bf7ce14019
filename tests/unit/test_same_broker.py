"""`broker setup` manages the broker the config names, or refuses (acceptance 4). The broker
side is faked here; tests/integration/test_acl.py runs it against the real node."""

from __future__ import annotations

import contextlib

import pytest

from sealedsum import rabbitmqctl
from sealedsum.common.config import BrokerSettings
from sealedsum.common.errors import ConfigError, ExitCode, TransportError

URL = "amqp://admin:s3cret@elsewhere:5673/%2F"


class FakeCtl:
    """rabbitmqctl on a node that holds the queues in ``queues``."""

    def __init__(self, queues: set[str] | None = None, vhosts: set[str] = frozenset({"/"})) -> None:
        self.queue_set = set() if queues is None else queues
        self.vhost_set = set(vhosts)

    def node(self) -> str:
        return "rabbit@here"

    def vhosts(self) -> set[str]:
        return self.vhost_set

    def queues(self, vhost: str) -> set[str]:
        return set(self.queue_set)


def broker_with(ctl_queues: set[str] | None, *, same: bool):
    """A fake marker_queue: the declared queue lands on rabbitmqctl's node only if ``same``."""
    @contextlib.contextmanager
    def marker_queue(settings, name):
        if same:
            ctl_queues.add(name)
        try:
            yield "rabbit@there"
        finally:
            ctl_queues.discard(name)
    return marker_queue


def test_the_same_node_passes(monkeypatch):
    queues: set[str] = set()
    monkeypatch.setattr(rabbitmqctl.amqp, "marker_queue", broker_with(queues, same=True))
    rabbitmqctl.check_same_broker(FakeCtl(queues), BrokerSettings(URL))
    assert queues == set()


@pytest.mark.parametrize("vhosts", [{"/"}, {"other"}])
def test_another_broker_is_refused_naming_both(monkeypatch, vhosts):
    queues: set[str] = set()
    monkeypatch.setattr(rabbitmqctl.amqp, "marker_queue", broker_with(queues, same=False))
    with pytest.raises(ConfigError) as info:
        rabbitmqctl.check_same_broker(FakeCtl(queues, vhosts), BrokerSettings(URL))
    text = info.value.diagnostics()
    assert info.value.exit_code == ExitCode.USAGE
    assert "rabbit@here" in text and "elsewhere:5673" in text and "another broker" in text
    assert "s3cret" not in text and "\n" not in text


def test_an_unreachable_url_is_refused(monkeypatch):
    @contextlib.contextmanager
    def unreachable(settings, name):
        raise TransportError(f"cannot reach the broker at {rabbitmqctl.redact_url(settings.url)}")
        yield  # pragma: no cover
    monkeypatch.setattr(rabbitmqctl.amqp, "marker_queue", unreachable)
    with pytest.raises(ConfigError) as info:
        rabbitmqctl.check_same_broker(FakeCtl(), BrokerSettings(URL))
    text = info.value.diagnostics()
    assert "rabbit@here" in text and "elsewhere:5673" in text and "cannot reach the broker" in text
    assert "s3cret" not in text and text.count("elsewhere") == 1


def test_a_missing_vhost_says_how_to_create_it(monkeypatch):
    @contextlib.contextmanager
    def no_access(settings, name):
        raise TransportError(f"no access to the vhost at {rabbitmqctl.redact_url(settings.url)}")
        yield  # pragma: no cover
    monkeypatch.setattr(rabbitmqctl.amqp, "marker_queue", no_access)
    with pytest.raises(ConfigError) as info:
        rabbitmqctl.check_same_broker(FakeCtl(vhosts={"/"}), BrokerSettings("amqp://admin:s3cret@here/team-a"))
    assert "rabbitmqctl add_vhost team-a" in info.value.hint and "no access to the vhost" in str(info.value)
