"""Consumer-side post-processing (issue 12): counts and buckets rounded to integers >= 0, sums and
means clamped to what the bounds allow, the signed release untouched."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from sealedsum.commands import consume, main
from sealedsum.common.errors import ExitCode
from sealedsum.consumers.postprocess import post_process
from sealedsum.producers.client import RecordSealer
from tests.conftest import make_policy, make_world, now_ms, stream_table

STREAMS = {
    "box": stream_table(kind="mean", dimension=2, lower=0.0, upper=10.0, window_records=3, min_batch=1),
    "ball": stream_table(kind="vector", dimension=2, lower=None, upper=None, l2_bound=1.0, window_records=3,
                         min_batch=1),
    "hist": stream_table(kind="histogram", dimension=None, edges=[0, 1, 2, 3], lower=None, upper=None,
                         window_records=3, min_batch=1),
}
VALUES = {"box": [5.0, 5.0], "ball": [0.5, 0.5], "hist": [1.5]}


@pytest.fixture(scope="module")
def signed(small_keys):
    world = make_world(small_keys, make_policy(STREAMS))
    out = {}
    for name in STREAMS:
        for i in range(3):
            sealer = RecordSealer(world.attested, producer_id=bytes([i + 1]) * 16)
            effects = world.enclave.on_record(sealer.seal(name, VALUES[name]).body, now_ms())
        (pub,) = effects.publish
        out[name] = pub
    return world.enclave.policy, out


def test_sums_and_means_are_clamped_to_the_feasible_range(signed):
    policy, pubs = signed
    release = dataclasses.replace(pubs["box"].message, count=3, sum=[-4.0, 45.0], mean=[-4 / 3, 15.0])
    pp = post_process(release, policy.stream("box"))
    assert pp.count == 3 and pp.sum == (0.0, 30.0) and pp.mean == (0.0, 10.0)
    inside = dataclasses.replace(release, sum=[12.5, 3.0], mean=[12.5 / 3, 1.0])
    assert post_process(inside, policy.stream("box")).sum == (12.5, 3.0)  # feasible: unchanged


def test_negative_count_becomes_zero_with_no_mean(signed):
    policy, pubs = signed
    release = dataclasses.replace(pubs["box"].message, count=-2, sum=[7.0, -1.0], mean=[-3.5, 0.5])
    pp = post_process(release, policy.stream("box"))
    assert pp.count == 0 and pp.sum == (0.0, 0.0) and pp.mean is None


def test_l2_ball_sums_are_scaled_into_the_ball(signed):
    policy, pubs = signed
    release = dataclasses.replace(pubs["ball"].message, count=2, sum=[3.0, 4.0], mean=[1.5, 2.0])
    pp = post_process(release, policy.stream("ball"))
    assert math.isclose(math.hypot(*pp.sum), 2.0) and math.isclose(pp.sum[0] / pp.sum[1], 0.75)
    assert math.isclose(math.hypot(*pp.mean), 1.0)


def test_histogram_buckets_become_non_negative_integers_and_the_count_their_sum(signed):
    policy, pubs = signed
    release = dataclasses.replace(pubs["hist"].message, sum=[-3.0, 5.0, 2.0], count=4)
    pp = post_process(release, policy.stream("hist"))
    assert pp.sum == (0, 5, 2) and all(type(b) is int for b in pp.sum) and pp.count == 7 and pp.mean is None
    view = pp.to_json(release)
    assert view["buckets"] == [0, 5, 2] and view["count"] == 7 and view["post_processed"] is True


def test_the_signed_release_is_left_as_it_is(signed):
    policy, pubs = signed
    for name, pub in pubs.items():
        before = copy.deepcopy(pub.message)
        body = pub.body
        payload = pub.message.to_payload()
        post_process(pub.message, policy.stream(name)).to_json(pub.message)
        assert pub.message == before and pub.message.to_payload() == payload and pub.body == body
    with pytest.raises(ValueError):
        post_process(pubs["box"].message, policy.stream("hist"))


def test_consume_post_process_changes_only_what_is_printed(signed, monkeypatch, capsys):
    policy, pubs = signed
    noisy = dataclasses.replace(pubs["box"].message, count=3, sum=[-4.0, 45.0], mean=[-4 / 3, 15.0])
    seen = []

    class FakeConsumer:
        def __init__(self, *args, **kwargs):
            self.enclave = SimpleNamespace(policy=policy, measurement=b"\0" * 32)
            self.verifier = SimpleNamespace(rejected=0)
            self.repeats = 0
            self.start, self.source, self.gaps = "next", "release stream p.releases from next", []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def releases(self, idle_timeout=None):
            seen.append(noisy)
            yield noisy

    monkeypatch.setattr(consume, "Consumer", FakeConsumer)
    monkeypatch.setattr(consume, "load_config", lambda args: SimpleNamespace(chain_state=None))
    args = ["consume", "--config", "unused.toml", "--stream", "box", "--count", "1", "--no-chain-state"]
    assert main(args + ["--json", "--post-process"]) == ExitCode.OK
    view = json.loads(capsys.readouterr().out)
    assert view["sum"] == [0.0, 30.0] and view["mean"] == [0.0, 10.0] and view["post_processed"] is True
    assert seen[0].sum == [-4.0, 45.0]  # the verified release as received
    assert main(args + ["--post-process"]) == ExitCode.OK
    assert "post-processed from the verified release" in capsys.readouterr().out
    assert main(args + ["--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["sum"] == [-4.0, 45.0]
