"""The actor's weight poll over Ray: newer weights in stages, never waiting, never failing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from apex_dqn.actors.worker import WeightPoller

pytestmark = pytest.mark.ray


def _learner_class(ray):
    @ray.remote(max_concurrency=2)
    class FakeLearner:
        """Publishes ``(version, [ref])`` like LearnerWorker; can hold its answers back."""

        def __init__(self) -> None:
            self.latest = None
            self.open = threading.Event()
            self.open.set()

        def publish(self, version: int, value: float) -> None:
            self.latest = (version, [ray.put({"w": np.full(3, value, np.float32)})])

        def hold(self) -> None:
            self.open.clear()

        def release(self) -> None:
            self.open.set()

        def latest_weights(self):
            self.open.wait()
            return self.latest

    return FakeLearner


def _poll_until(poller: WeightPoller, polls: int = 500):
    """Poll like the actor does (one stage per call) until weights come, or give up."""
    import time

    for _ in range(polls):
        got = poller()
        if got is not None:
            return got
        time.sleep(0.01)
    return None


def test_newer_weights_arrive_once_and_older_never(ray_local):
    ray = ray_local
    learner = _learner_class(ray).remote()
    ray.get(learner.publish.remote(3, 1.5))
    current = {"version": -1}
    poller = WeightPoller(learner, lambda: current["version"])
    assert poller() is None  # the first call only asks
    version, weights = _poll_until(poller)
    assert version == 3 and np.array_equal(weights["w"], np.full(3, 1.5, np.float32))
    current["version"] = 3
    assert all(poller() is None for _ in range(50))  # nothing newer: nothing fetched
    ray.get(learner.publish.remote(4, 2.5))
    version, weights = _poll_until(poller)
    assert version == 4 and weights["w"][0] == 2.5


def test_a_learner_that_does_not_answer_never_blocks_the_poll(ray_local):
    ray = ray_local
    learner = _learner_class(ray).remote()
    ray.get([learner.publish.remote(1, 1.0), learner.hold.remote()])
    poller = WeightPoller(learner, lambda: -1)
    for _ in range(20):  # the learner holds every answer back: each poll returns at once
        assert poller() is None
    ray.get(learner.release.remote())
    assert _poll_until(poller)[0] == 1


def test_a_dead_learner_fails_quietly_until_a_new_one_is_named(ray_local):
    ray = ray_local
    cls = _learner_class(ray)
    old, new = cls.remote(), cls.remote()
    ray.get([old.publish.remote(7, 7.0), new.publish.remote(1, 1.0)])
    current = {"version": -1}
    poller = WeightPoller(old, lambda: current["version"])
    assert _poll_until(poller)[0] == 7
    current["version"] = 7
    ray.kill(old, no_restart=True)
    assert _poll_until(poller, polls=50) is None  # no error reaches the actor
    poller.set_learner(new)
    current["version"] = -1  # the actor restarts its versions with a new learner
    version, weights = _poll_until(poller)
    assert version == 1 and weights["w"][0] == 1.0


def test_a_paced_pusher_keeps_refused_pushes_waits_and_stops_when_told(ray_local):
    """A shard whose replay ratio allows nothing answers "not yet": the pusher keeps the
    chunks, offers them again and waits (the actor would stop stepping) until the limit
    rises, then every chunk is stored in order; a stop ends the wait. ~2 s."""
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.replay.worker import ReplayShardWorker
    from tests.replay.recorder import RecordedStream

    ray = ray_local
    shard = ReplayShardWorker.options(num_cpus=0).remote(2_000, 0.6, seed=0)
    rec = RecordedStream(stream=5, num_envs=2, push_period=8, seed=0)
    chunks = (c for c in iter(rec.step, object()) if c is not None)
    try:
        ray.get(shard.pace.remote(None, 0))  # the limit: nothing more
        pusher = BoundedPusher(shard, limit=1, paced=True, backoff=(0.002, 0.02))
        sent = [next(chunks), next(chunks)]
        for chunk in sent:
            pusher(chunk)
        waiter = threading.Thread(target=pusher.wait_for_room)
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and len(pusher) == 2 and pusher.refused > 0
        assert ray.get(shard.stats.remote()).added == 0
        ray.get(shard.pace.remote(None, 10_000))  # the learner caught up
        waiter.join(timeout=10)
        assert not waiter.is_alive() and len(pusher) == 0  # room for the next push
        pusher.flush(timeout=10)
        stats = ray.get(shard.stats.remote())
        assert stats.added == sum(len(c) for c in sent) and stats.dropped == 0

        ray.get(shard.pace.remote((stats.incarnation, stats.added), 0))  # nothing more again
        stop = threading.Event()
        for _ in range(2):
            pusher(next(chunks))
        waiter = threading.Thread(target=pusher.wait_for_room, args=(stop,))
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive()
        stop.set()
        waiter.join(timeout=2)
        assert not waiter.is_alive() and len(pusher) == 2 and pusher.failed == 0
    finally:
        ray.kill(shard)
