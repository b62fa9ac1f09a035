"""The shard as a Ray actor: add, sample and update priorities across processes."""

from __future__ import annotations

import numpy as np
import pytest

from apex_dqn.common.envs import FRAME_SHAPE, STACK
from tests.replay.recorder import RecordedStream

pytestmark = pytest.mark.ray


def test_shard_worker_add_sample_update(ray_local):
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    shard = ReplayShardWorker.options(num_cpus=0).remote(300, 0.6, seed=3)
    rec = RecordedStream(
        stream=42,
        num_envs=4,
        push_period=10,
        seed=8,
        max_steps=25,
        terminate_prob=0.05,
        life_loss_prob=0.0,
    )
    emitted, stored = [], 0
    for _ in range(100):
        before = len(rec.emitted)
        chunk = rec.step()
        if chunk is not None:
            stored += ray.get(shard.add.remote(chunk))
            emitted.extend(rec.emitted[before:])
    stats = ray.get(shard.stats.remote())
    assert stored == len(emitted) and stats.dropped == 0
    assert stats.size == 300 and stats.added == len(emitted) > 300

    batch = ray.get(shard.sample.remote(64, 0.4))
    assert batch.obs.shape == batch.next_obs.shape == (64, STACK, *FRAME_SHAPE)
    assert batch.obs.dtype == np.uint8
    base = stats.first_key  # keys of each shard incarnation start at their own offset
    keys = batch.keys - base
    assert (keys >= len(emitted) - 300).all() and (keys < len(emitted)).all()
    for i, key in enumerate(keys.tolist()):  # what the actor saw, through Ray
        e, s = emitted[key]
        want = rec.expected(e, s)
        assert np.array_equal(batch.obs[i], want.obs)
        assert np.array_equal(batch.next_obs[i], want.next_obs)
        assert batch.discounts[i] == pytest.approx(want.discount)

    # New priorities: one key gets all the mass; evicted keys are ignored.
    keys = np.unique(batch.keys)
    new = np.full(len(keys), 1e-6)
    new[0] = 1e8
    assert ray.get(shard.update_priorities.remote(keys, new)) == len(keys)
    evicted = base + np.array([0, 1, 2])
    assert ray.get(shard.update_priorities.remote(evicted, np.ones(3))) == 0
    assert ray.get(shard.update_priorities.remote(np.array([0, 1, 2]), np.ones(3))) == 0
    again = ray.get(shard.sample.remote(64, 0.4))
    assert (again.keys == keys[0]).mean() > 0.95

    # The learner's sampler, with requests in flight, draws from it too.
    sampler = RaySampler([shard], batch_size=32, prefetch=2, seed=0)
    drawn = None
    for _ in range(20):
        drawn = sampler.draw(0.4, timeout=10.0)
        if drawn is not None:
            break
    assert drawn is not None and drawn.shard == 0 and len(drawn.batch) == 32
    # Normalised by the replay's largest weight, that of its least priority.
    least = ray.get(shard.stats.remote()).min_priority
    priorities = drawn.batch.probs * drawn.batch.shard_total
    np.testing.assert_allclose(drawn.weights, (priorities / least) ** -0.4, rtol=1e-6)
    sampler.update_priorities(0, drawn.batch.keys, np.ones(32))
    ray.kill(shard)
