"""The shard as a Ray actor: add, sample and update priorities across processes; where
shards go, and the wire format of their batches."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from apex_dqn.common.config import Config, ConfigError, validate
from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import CompactBatch, SampledBatch
from apex_dqn.replay.worker import choose_placement, learner_node, wire_for
from tests.replay.recorder import RecordedStream

GiB = 2**30


@pytest.mark.ray
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


# ------------------------------------------------------------------------- placement
@pytest.mark.parametrize(
    ("setting", "memory", "shards", "shard_gib", "on_learner_node", "strict", "says"),
    [
        # auto: the learner's node when its memory holds every shard, else spread.
        ("auto", 20 * GiB, 2, 0.15, True, True, "2 shard(s) on the learner's node (auto: it "
                                                "has 20.0 GiB for 0.3 GiB)"),
        ("auto", 8 * GiB, 4, 2.0, True, True, "on the learner's node (auto: it has 8.0 GiB"),
        ("auto", 8 * GiB, 4, 2.5, False, False, "spread over the nodes (auto: the learner's "
                                                "node has 8.0 GiB for 10.0 GiB)"),
        # learner: there whatever; a hard pin only when it all fits.
        ("learner", 20 * GiB, 2, 1.0, True, True, "on the learner's node (learner: it has"),
        ("learner", 4 * GiB, 8, 1.0, True, False, "pinned softly"),
        # spread: always.
        ("spread", 500 * GiB, 1, 1.0, False, False, "spread over the nodes (spread)"),
    ],
)  # fmt: skip
def test_placement_follows_the_learner_node_memory(
    setting, memory, shards, shard_gib, on_learner_node, strict, says
):
    p = choose_placement(setting, "n1", memory, shards, int(shard_gib * GiB))
    assert (p.on_learner_node, p.strict) == (on_learner_node, strict)
    assert p.learner_node == "n1"
    assert says in p.message and p.message.startswith("replay: ")


@pytest.mark.parametrize("setting", ["auto", "learner"])
def test_placement_spreads_when_no_node_can_host_the_learner(setting):
    p = choose_placement(setting, None, 0, 2, GiB)
    assert p.learner_node is None and not p.on_learner_node and not p.strict
    assert "no node can host the learner" in p.message
    with pytest.raises(ValueError, match="placement"):
        choose_placement("everywhere", "n1", 100 * GiB, 2, GiB)


def _node(node_id: str, cpus: float, gpus: float = 0, memory: float = 8 * GiB, alive=True):
    resources = {"CPU": cpus, "memory": memory, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


@pytest.mark.parametrize(
    ("nodes", "gpu", "want"),
    [
        ([_node("head", 4), _node("w1", 8)], False, "head"),  # the driver's node can
        ([_node("head", 4), _node("g1", 8, 1, 4 * GiB), _node("g2", 8, 1, 9 * GiB)], True,
         "g2"),  # the driver's node has no GPU: the GPU node with the most memory
        ([_node("head", 4, 1), _node("g1", 8, 1, 64 * GiB)], True, "head"),
        ([_node("head", 0), _node("w1", 2, memory=GiB)], False, "w1"),  # a head without CPUs
        ([_node("head", 4), _node("g1", 8, 1, alive=False)], True, None),  # none can yet
    ],
)  # fmt: skip
def test_learner_node_is_the_drivers_when_it_can_host_the_learner(nodes, gpu, want):
    assert learner_node(nodes, "head", gpu) == want


@pytest.mark.parametrize(
    ("setting", "shard_node", "reader_node", "want"),
    [
        ("auto", "a", "a", "raw"),  # shared memory: nothing to save
        ("auto", "a", "b", "zstd"),  # across the network
        ("auto", "a", None, "raw"),  # a reader that does not say where it is
        ("raw", "a", "b", "raw"),
        ("frames", "a", "a", "frames"),
        ("zstd", "a", "a", "zstd"),
    ],
)
def test_wire_for(setting, shard_node, reader_node, want):
    assert wire_for(setting, shard_node, reader_node) == want


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("replay_placement", "nowhere",
         "--replay-placement='nowhere' is unknown: choose one of auto, learner, spread"),
        ("replay_wire", "gzip",
         "--replay-wire='gzip' is unknown: choose one of auto, raw, frames, zstd"),
    ],
)  # fmt: skip
def test_replay_placement_and_wire_flags_are_validated(flag, value, message):
    with pytest.raises(ConfigError) as caught:
        validate(Config(**{flag: value}))
    assert str(caught.value) == message
    for good in {"replay_placement": ("auto", "learner", "spread"),
                 "replay_wire": ("auto", "raw", "frames", "zstd")}[flag]:  # fmt: skip
        validate(Config(**{flag: good}))


@pytest.mark.ray
def test_shard_worker_answers_in_the_format_for_the_readers_node(ray_local):
    """``auto`` sends a stacked batch to a reader on the shard's node and a compressed
    one to a reader elsewhere; the learner's sampler expands either to the same stacks."""
    from apex_dqn.learner.pipeline import RaySampler, to_torch
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    here = ray.get_runtime_context().get_node_id()
    shards = {
        wire: ReplayShardWorker.options(num_cpus=0).remote(300, 0.6, seed=3, wire=wire)
        for wire in ("auto", "zstd")
    }
    try:
        rec = RecordedStream(stream=7, num_envs=4, push_period=6, seed=2, max_steps=9,
                             terminate_prob=0.2, life_loss_prob=0.0)  # fmt: skip
        for _ in range(60):
            chunk = rec.step()
            if chunk is not None:
                ray.get([shard.add.remote(chunk) for shard in shards.values()])
        auto = shards["auto"]
        assert isinstance(ray.get(auto.sample.remote(16, 0.4, reader=here)), SampledBatch)
        far = ray.get(auto.sample.remote(16, 0.4, reader="f" * 56))
        assert isinstance(far, CompactBatch) and far.wire == "zstd"
        frames = ray.get(auto.sample.remote(16, 0.4, wire="frames", reader="f" * 56))
        assert frames.wire == "frames"  # a format asked for wins over the shard's own
        stacked = ray.get(auto.lookup.remote(far.keys))
        assert np.array_equal(far.expand().obs, stacked.obs)
        assert np.array_equal(far.expand().next_obs, stacked.next_obs)

        sampler = RaySampler([shards["zstd"]], batch_size=32, prefetch=2, seed=0)
        drawn = None
        for _ in range(20):
            drawn = sampler.draw(0.4, timeout=10.0)
            if drawn is not None:
                break
        assert drawn is not None and isinstance(drawn.batch, CompactBatch)
        tb = to_torch(drawn, torch.device("cpu"))
        want = ray.get(shards["zstd"].lookup.remote(drawn.batch.keys))
        assert np.array_equal(tb.obs.numpy(), want.obs)
        assert np.array_equal(tb.next_obs.numpy(), want.next_obs)
    finally:
        for shard in shards.values():
            ray.kill(shard)


@pytest.mark.ray
def test_a_shard_worker_saves_and_a_new_one_restores_it(ray_local, tmp_path):
    """Saved by one shard process and loaded by another at its start: same keys (its
    first key too), same draws; a file that is not there leaves the shard empty with one
    line; and once Ray restarts a restored shard, it starts empty as any restart does."""
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    saved = ReplayShardWorker.options(num_cpus=0).remote(300, 0.6, seed=3)
    restored = missing = None
    try:
        rec = RecordedStream(stream=9, num_envs=4, push_period=6, seed=4, max_steps=12,
                             terminate_prob=0.1, life_loss_prob=0.0)  # fmt: skip
        for _ in range(150):
            chunk = rec.step()
            if chunk is not None:
                ray.get(saved.add.remote(chunk))
        path = tmp_path / "checkpoint-0000000001.pt.replay-0.npz"
        count, size, seconds = ray.get(saved.save_replay.remote(str(path)))
        before = ray.get(saved.stats.remote())
        assert count == before.size == 300 and size == path.stat().st_size and seconds >= 0

        options = ReplayShardWorker.options(num_cpus=0, max_restarts=1)
        restored = options.remote(300, 0.6, seed=77, restore=str(path))
        missing = options.remote(300, 0.6, seed=77, restore=str(tmp_path / "none.npz"))
        assert ray.get(restored.restored.remote()) == (300, None)
        count, error = ray.get(missing.restored.remote())
        assert count == 0 and error == f"replay file {tmp_path / 'none.npz'} does not exist"
        after = ray.get(restored.stats.remote())
        assert after.first_key == before.first_key and after.added == before.added
        assert after.incarnation != before.incarnation and after.size == 300
        for _ in range(3):
            a, b = ray.get([saved.sample.remote(32, 0.4), restored.sample.remote(32, 0.4)])
            assert np.array_equal(a.keys, b.keys) and np.array_equal(a.weights, b.weights)
            assert np.array_equal(a.obs, b.obs) and np.array_equal(a.next_obs, b.next_obs)

        ray.kill(restored, no_restart=False)  # Ray brings it back: empty, the file unread
        stats = after
        for _ in range(120):  # the kill is asynchronous: wait for the new incarnation
            with contextlib.suppress(ray.exceptions.RayActorError):
                stats = ray.get(restored.stats.remote(), timeout=30)
            if stats.incarnation != after.incarnation:
                break
            time.sleep(0.5)
        assert stats.incarnation != after.incarnation and stats.size == 0
        count, error = ray.get(restored.restored.remote())
        assert count == 0 and error == "Ray restarted it, and a restarted shard starts empty"
    finally:
        for shard in (saved, restored, missing):
            if shard is not None:
                ray.kill(shard)


@pytest.mark.ray
def test_paced_pushes_and_samples_wait_for_the_ratio_and_nothing_is_lost(ray_local):
    """With a replay ratio, past the band the shard answers pushes "not yet" and the
    pusher keeps them (the actor would stop stepping), and the learner's sampler sends
    no request; each side goes on as the other catches up, and every transition pushed
    is stored, in its stream's order (none dropped for frames it could not resolve)."""
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.rate_limiter import SampleToInsertRatio
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    shard = ReplayShardWorker.options(num_cpus=0).remote(5_000, 0.6, seed=0)
    streams = [RecordedStream(stream=s, num_envs=4, push_period=10, seed=s) for s in (1, 2)]

    def chunks(count: int) -> list:
        out = []
        while len(out) < count:
            out.extend(c for c in (rec.step() for rec in streams) if c is not None)
        return out

    # X = 0.5, band +-60; pushes of up to (10 + 3) * 4 = 52, batches of 16.
    ratio = SampleToInsertRatio(0.5, 60, push=52, batch=16)
    pusher = BoundedPusher(shard, limit=2, paced=True, backoff=(0.002, 0.01))
    pushed = chunks(8)  # before learning begins every push goes in
    for chunk in pushed:
        pusher(chunk)
    pusher.flush(timeout=30)
    assert pusher.acked == 8 and pusher.refused == 0
    try:
        sampler = RaySampler([shard], batch_size=16, prefetch=2, seed=0, ratio=ratio, pace_s=0)
        # Learning begins; no insert yet: the learner may run 60 samples ahead, 3 batches.
        batches = 0
        for _ in range(20):
            batches += sampler.draw(0.4, timeout=10.0) is not None
        assert batches == 3 and sampler.sampled == 48 and sampler.owed() == -48
        assert sampler.ratio_metrics()["learner/ratio_wait_fraction"] > 0  # it waits

        # Actors push 12 chunks (~600 transitions): the shard takes (60 + 48) / 0.5 = 216.
        more = chunks(12)
        pushed += more
        for chunk in more:
            pusher(chunk)
        for _ in range(50):  # the learner paces the shard but samples nothing more
            sampler.pace()
            pusher.flush(timeout=0.01)
        stats = ray.get(shard.stats.remote())
        base = sum(len(c) for c in pushed[:8])
        assert 216 - 52 < stats.added - base <= 216 and pusher.refused > 0
        assert len(pusher) > 0  # kept, to be offered again

        # The learner samples again, the pushes go in, and the ratio holds throughout.
        for _ in range(400):
            if not len(pusher):
                break
            sampler.draw(0.4, timeout=0.05)
            pusher.flush(timeout=0.01)
            assert -60 <= sampler.owed() <= 60
        stats = ray.get(shard.stats.remote())
        assert len(pusher) == 0 and pusher.acked == len(pushed) and pusher.failed == 0
        assert stats.dropped == 0 and stats.added == sum(len(c) for c in pushed)
        sampler.refresh()  # the sampler's count, once it has heard from the shard
        assert sampler.inserted() == stats.added - base
    finally:
        ray.kill(shard)
