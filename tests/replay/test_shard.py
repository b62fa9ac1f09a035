"""The replay shard: exact stacks, prioritized sampling, FIFO eviction, frame accounting,
compact batches that expand to the stacked ones."""

from __future__ import annotations

import numpy as np
import pytest

import apex_dqn.replay.shard as shard_module
from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import ZERO_FRAME, CompactBatch, TransitionChunk
from apex_dqn.replay.shard import ReplayShard
from tests.replay.recorder import RecordedStream, check_shard, live_keys, zero_padding

# Upper 0.1% point of the chi-square distribution with 19 degrees of freedom
# (scipy.stats.chi2.ppf(0.999, 19)).
CHI2_999_DF19 = 43.820


def check_invariants(shard: ReplayShard) -> None:
    """Reference counts are exact, no slot leaks, the tree holds only live items' mass,
    and the least priority it reports is the least of the live items'."""
    items = live_keys(shard) % shard.capacity
    tails = [t.slots for t in shard._tails.values()]
    refs = np.concatenate([shard.slots[items].ravel(), *tails])
    want = np.bincount(refs, minlength=shard.frame_capacity + 1)
    want[shard._zero_slot] = 0
    have = np.maximum(shard._refcount, 0)
    assert np.array_equal(have, want), "reference counts differ from the references"
    # A slot is in use exactly when something references it, and free exactly once.
    free = shard._free[: shard._num_free]
    assert len(np.unique(free)) == len(free)
    assert set(free.tolist()) == set(np.flatnonzero(shard._refcount == -1).tolist())
    assert shard.frames_used == int((want > 0).sum())
    # Tree mass: live items only.
    dead = np.ones(shard.capacity, dtype=bool)
    dead[items] = False
    assert not shard.tree.get(np.flatnonzero(dead)).any()
    live_mass = shard.tree.get(items).sum()
    assert shard.total_priority == pytest.approx(live_mass, rel=1e-9, abs=1e-12)
    assert shard.min_priority == (shard.tree.get(items).min() if len(items) else np.inf)


def synthetic_chunk(
    stream: int, first_frame: int, priorities: np.ndarray, rng: np.random.Generator
) -> TransitionChunk:
    """One frame per transition, each a one-frame episode: obs [0,0,0,f], next [0,0,f,f+1]."""
    t = len(priorities)
    frames = rng.integers(0, 256, (t + 1, *FRAME_SHAPE), dtype=np.uint8)
    f = first_frame + np.arange(t)
    z = np.full(t, ZERO_FRAME)
    return TransitionChunk(
        stream=stream,
        first_frame=first_frame,
        frames=frames,
        tail=0,
        obs=np.stack([z, z, z, f], axis=1),
        next_obs=np.stack([z, z, f, f + 1], axis=1),
        actions=rng.integers(0, 6, t).astype(np.uint8),
        returns=rng.random(t).astype(np.float32),
        discounts=np.full(t, 0.99**3, dtype=np.float32),
        priorities=np.asarray(priorities, dtype=np.float32),
    )


def run_streams(shard, streams, steps, check_every=1):
    """Step the streams in turn; push into the shard; check everything after each push.

    Returns ``emitted`` (key -> (stream, recorder, env, step)) and what was checked.
    """
    emitted, checked, pushes = [], [], 0
    for _ in range(steps):
        for rec in streams:
            before = len(rec.emitted)
            chunk = rec.step()
            if chunk is None:
                continue
            assert shard.add(chunk) == len(chunk)
            emitted.extend((chunk.stream, rec, e, s) for e, s in rec.emitted[before:])
            pushes += 1
            if pushes % check_every == 0:
                check_invariants(shard)
                checked.extend(check_shard(shard, emitted))
    assert shard.dropped == 0
    return emitted, checked


# ----------------------------------------------------------------- the stacks, exactly
CASES = {
    # Episodes of 1..6 steps, chunks shorter than their tail, tight frame pool.
    "short-episodes": dict(
        streams=3,
        num_envs=4,
        n=3,
        push_period=2,
        steps=150,
        capacity=150,
        frame_capacity=170,
        env=dict(max_steps=6, terminate_prob=0.2, life_loss_prob=0.0),
    ),
    # Longer episodes, lost lives cut the return, several pushes per episode.
    "lives": dict(
        streams=2,
        num_envs=3,
        n=3,
        push_period=7,
        steps=250,
        capacity=200,
        frame_capacity=None,
        terminal_on_life_loss=True,
        env=dict(max_steps=30, terminate_prob=0.03, life_loss_prob=0.06),
    ),
    # n = 5 and a push every step: the tail spans many chunks.
    "n5-push1": dict(
        streams=2,
        num_envs=2,
        n=5,
        push_period=1,
        steps=200,
        capacity=90,
        frame_capacity=None,
        check_every=4,
        env=dict(max_steps=8, terminate_prob=0.15, life_loss_prob=0.0),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rebuilt_stacks_equal_what_the_actor_saw(name):
    case = CASES[name]
    streams = []
    for i in range(case["streams"]):
        streams.append(
            RecordedStream(
                stream=1000 + i,
                num_envs=case["num_envs"],
                n=case["n"],
                push_period=case["push_period"],
                seed=7 * i + len(name),
                terminal_on_life_loss=case.get("terminal_on_life_loss", False),
                **case["env"],
            )
        )
    shard = ReplayShard(case["capacity"], frame_capacity=case["frame_capacity"], seed=1)
    emitted, checked = run_streams(shard, streams, case["steps"], case.get("check_every", 1))

    # It wrapped many times, and every transition ever pushed was stored.
    assert len(emitted) > 5 * case["capacity"]
    assert shard.next_key == len(emitted) and shard.oldest_key > 4 * case["capacity"]
    # The stacks checked crossed episode starts at every position, in obs and next_obs,
    # and windows ended in every way.
    assert {zero_padding(want.obs) for want, _ in checked} == {0, 1, 2, 3}
    assert {zero_padding(want.next_obs) for want, _ in checked} == {0, 1, 2}
    ends = {want.end for want, _ in checked}
    assert {"terminal", "truncated", ""} <= ends
    if case.get("terminal_on_life_loss"):
        assert "life" in ends
    lengths = set()
    for rec in streams:
        for e in range(rec.k):
            episode = np.asarray(rec.episode[e])
            lengths |= set(np.bincount(episode)[:-1] - 1)  # last episode may be unfinished
    if name == "short-episodes":
        assert lengths == {1, 2, 3, 4, 5, 6}


def test_a_stack_never_mixes_two_episodes():
    rec = RecordedStream(
        stream=5,
        num_envs=4,
        push_period=3,
        seed=11,
        max_steps=5,
        terminate_prob=0.3,
        life_loss_prob=0.0,
    )
    shard = ReplayShard(400)
    for _ in range(120):
        chunk = rec.step()
        if chunk is not None:
            shard.add(chunk)
    owner = {}  # the (env, episode) of every frame, by its bytes
    for e in range(rec.k):
        for s, stack in enumerate(rec.stacks[e]):
            owner[stack[-1].tobytes()] = (e, rec.episode[e][s])
    batch = shard.lookup(live_keys(shard))
    mixed_checked = 0
    for stacks in (batch.obs, batch.next_obs):
        for stack in stacks:
            pad = zero_padding(stack)
            episodes = {owner[frame.tobytes()] for frame in stack[pad:]}
            assert len(episodes) == 1
            mixed_checked += pad > 0
    assert mixed_checked > 50  # many stacks did start inside an episode's first steps


# ------------------------------------------------------------- n-step ends, in replay
@pytest.fixture(scope="module")
def short_run():
    rec = RecordedStream(
        stream=9,
        num_envs=4,
        push_period=4,
        seed=3,
        max_steps=7,
        terminate_prob=0.15,
        life_loss_prob=0.0,
    )
    shard = ReplayShard(2000)
    emitted, _ = run_streams(shard, [rec], 150, check_every=10)
    batch = shard.lookup(live_keys(shard))
    return rec, shard, emitted, batch


def test_next_observation_at_a_terminal_has_discount_zero(short_run):
    rec, shard, emitted, batch = short_run
    seen = 0
    for i, key in enumerate(live_keys(shard).tolist()):
        _, _, e, s = emitted[key]
        want = rec.expected(e, s)
        if want.end == "terminal":
            assert rec.terminated[e][s + want.h] and rec.final[e][s + want.h]
            assert np.array_equal(batch.next_obs[i], rec.stacks[e][s + want.h])
            assert batch.discounts[i] == 0.0
            seen += 1
    assert seen > 20


def test_truncated_episodes_still_bootstrap(short_run):
    rec, shard, emitted, batch = short_run
    by_h = {1: 0, 2: 0, 3: 0}
    for i, key in enumerate(live_keys(shard).tolist()):
        _, _, e, s = emitted[key]
        want = rec.expected(e, s)
        if want.end == "truncated":
            assert rec.truncated[e][s + want.h] and not rec.terminated[e][s + want.h]
            assert np.array_equal(batch.next_obs[i], rec.stacks[e][s + want.h])
            assert batch.discounts[i] == np.float32(0.99**want.h)
            by_h[want.h] += 1
    assert all(count > 0 for count in by_h.values()), by_h


# ------------------------------------------------------------------------- sampling
def test_sampling_frequencies_match_priorities():
    rng = np.random.default_rng(0)
    priorities = rng.uniform(0.05, 3.0, 20)
    shard = ReplayShard(20, alpha=0.6, seed=123)
    shard.add(synthetic_chunk(1, 0, priorities, rng))
    batch, rounds = 100, 400
    counts = np.zeros(20)
    for _ in range(rounds):
        b = shard.sample(batch, beta=0.4)
        counts += np.bincount(b.keys, minlength=20)
    scaled = (priorities.astype(np.float32).astype(np.float64) + 1e-6) ** 0.6
    expected = scaled / scaled.sum() * batch * rounds
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999_DF19
    # And the uniform distribution, a wrong answer, is far outside it.
    uniform = np.full(20, batch * rounds / 20)
    assert ((counts - uniform) ** 2 / uniform).sum() > 10 * CHI2_999_DF19


def test_importance_weights_and_probabilities():
    rng = np.random.default_rng(1)
    priorities = rng.uniform(0.0, 2.0, 300)
    shard = ReplayShard(1000, alpha=0.7, seed=5)
    for part in range(3):
        shard.add(synthetic_chunk(1, part * 1000, priorities[part * 100 : part * 100 + 100], rng))
    scaled = (priorities.astype(np.float32).astype(np.float64) + 1e-6) ** 0.7
    prob = scaled / scaled.sum()
    assert shard.min_priority == shard.stats().min_priority == scaled.min()
    for beta in (0.4, 1.0):
        b = shard.sample(256, beta)
        assert np.allclose(b.probs, prob[b.keys], rtol=1e-12)
        # Normalised by the largest weight of the shard, not of the batch: the same
        # constant for every batch.
        want = (300 * prob[b.keys]) ** -beta / (300 * prob.min()) ** -beta
        np.testing.assert_allclose(b.weights, want, rtol=3e-7)
        assert b.weights.max() < 1.0 and b.shard_size == 300
        assert b.shard_total == pytest.approx(scaled.sum(), rel=1e-12)
        assert b.shard_min == scaled.min()


def test_importance_weights_never_exceed_one():
    """A replay minimum seen at another moment may be above a probability drawn since:
    that item gets the largest weight, 1, not more."""
    probs = np.array([0.01, 0.02, 0.04])
    w = shard_module.importance_weights(probs, 100, 0.5, min_prob=0.02)
    np.testing.assert_allclose(w, [1.0, 1.0, (0.04 / 0.02) ** -0.5], rtol=1e-7)
    # Without the replay's minimum: relative to the batch's own least probability.
    w = shard_module.importance_weights(probs, 100, 0.5)
    np.testing.assert_allclose(w, [1.0, 2**-0.5, 0.5], rtol=1e-7)


def test_least_priority_follows_updates_and_eviction():
    rng = np.random.default_rng(11)
    shard = ReplayShard(40, alpha=1.0, eps=0.0)
    assert shard.min_priority == np.inf  # empty: no item bounds the weights
    shard.add(synthetic_chunk(1, 0, np.arange(1.0, 31.0), rng))  # keys 0..29: 1..30
    assert shard.min_priority == 1.0
    shard.update_priorities(np.array([0, 1]), np.array([50.0, 0.5]))
    assert shard.min_priority == 0.5
    shard.update_priorities(np.array([1]), np.array([60.0]))
    assert shard.min_priority == 3.0
    shard.add(synthetic_chunk(1, 100, np.full(20, 40.0), rng))  # evicts keys 0..9
    assert shard.oldest_key == 10 and shard.min_priority == 11.0
    check_invariants(shard)


def test_sample_returns_contiguous_uint8_batches():
    rng = np.random.default_rng(2)
    shard = ReplayShard(64)
    chunk = synthetic_chunk(1, 0, rng.random(50), rng)
    shard.add(chunk)
    b = shard.sample(32, 0.5)
    for stacks in (b.obs, b.next_obs):
        assert stacks.shape == (32, STACK, *FRAME_SHAPE) and stacks.dtype == np.uint8
        assert stacks.flags.c_contiguous
    assert b.actions.dtype == np.int64 and b.keys.dtype == np.int64
    # Rebuilt from the chunk's frames: obs [0,0,0,f_i], next [0,0,f_i,f_i+1].
    i = b.keys
    assert np.array_equal(b.obs[:, 3], chunk.frames[i]) and not b.obs[:, :3].any()
    assert np.array_equal(b.next_obs[:, 2], chunk.frames[i])
    assert np.array_equal(b.next_obs[:, 3], chunk.frames[i + 1])
    assert np.array_equal(b.actions, chunk.actions[i])
    with pytest.raises(ValueError):
        ReplayShard(8).sample(4, 0.4)


# ------------------------------------------------------------------ eviction, updates
def test_eviction_is_fifo_and_removes_tree_mass():
    rng = np.random.default_rng(3)
    shard = ReplayShard(50, alpha=0.5)
    reference: dict[int, float] = {}
    frame = 0
    for _ in range(25):
        p = rng.uniform(0, 5, int(rng.integers(1, 14)))
        first_key = shard.next_key
        shard.add(synthetic_chunk(2, frame, p, rng))
        frame += len(p) + 1
        for j, value in enumerate(p.astype(np.float32)):
            reference[first_key + j] = (float(value) + 1e-6) ** 0.5
        stored = len(reference)
        assert len(shard) == min(stored, 50)
        assert shard.oldest_key == stored - len(shard)  # the oldest went first
        live = live_keys(shard)
        assert shard.total_priority == pytest.approx(
            sum(reference[k] for k in live.tolist()), rel=1e-12
        )
        check_invariants(shard)
    assert shard.oldest_key > 100


def test_update_for_an_evicted_key_changes_nothing():
    rng = np.random.default_rng(4)
    shard = ReplayShard(40)
    for part in range(5):
        shard.add(synthetic_chunk(3, part * 100, rng.random(30), rng))
    assert shard.oldest_key == 110
    nodes = shard.tree._nodes.copy()
    # 100 and 109 were evicted, and their item slots (20, 29) now hold live keys 140, 149.
    evicted = np.array([0, 5, 100, 109, 150, 10**9])
    assert shard.update_priorities(evicted, np.full(6, 100.0)) == 0
    assert np.array_equal(shard.tree._nodes, nodes)
    # A live key does change.
    assert shard.update_priorities(np.array([140, 140]), np.array([7.0, 3.0])) == 2
    assert shard.tree.get(np.array([140 % 40]))[0] == pytest.approx((3.0 + 1e-6) ** 0.6)
    check_invariants(shard)


# --------------------------------------------------------------------- frame slots
def test_frame_slots_never_leak_with_many_streams(monkeypatch):
    monkeypatch.setattr(shard_module, "STREAM_TIMEOUT_CHUNKS", 40)
    shard = ReplayShard(120, frame_capacity=400)
    rng = np.random.default_rng(5)
    alive, next_stream, pushes = [], 0, 0
    for _ in range(500):
        # Streams come and go: an actor restarted is a new stream; its old one goes silent.
        if len(alive) < 4 or rng.random() < 0.02:
            alive.append(
                RecordedStream(
                    stream=next_stream,
                    num_envs=2,
                    push_period=3,
                    seed=next_stream,
                    max_steps=12,
                    terminate_prob=0.1,
                    life_loss_prob=0.0,
                )
            )
            next_stream += 1
        if rng.random() < 0.02:
            alive.pop(int(rng.integers(len(alive))))
        for rec in alive:
            chunk = rec.step()
            if chunk is not None:
                shard.add(chunk)
                pushes += 1
                check_invariants(shard)
                assert shard.frames_used <= shard.frame_capacity
    assert next_stream > 10
    # Silent streams were let go: only streams heard from in the last 40 chunks remain.
    assert len(shard._tails) <= len(alive) + 40
    assert all(t.last_chunk >= shard.chunks - 40 for t in shard._tails.values())
    # Drain: with every item evicted and every stream forgotten, no frame is in use.
    shard._evict(len(shard))
    while shard._tails:
        shard._forget_oldest_stream()
    assert shard.frames_used == 0 and shard.total_priority == 0.0
    check_invariants(shard)


def test_unknown_previous_chunk_drops_only_what_it_cannot_rebuild():
    rec = RecordedStream(
        stream=77,
        num_envs=3,
        push_period=12,
        seed=21,
        max_steps=20,
        terminate_prob=0.05,
        life_loss_prob=0.0,
    )
    chunks = []
    while len(chunks) < 4:
        before = len(rec.emitted)
        chunk = rec.step()
        if chunk is not None:
            chunks.append((chunk, rec.emitted[before:]))
    # A fresh shard (restarted) sees the stream from its second chunk on.
    shard = ReplayShard(500)
    emitted = []
    chunk, rows = chunks[1]
    refs = np.concatenate([chunk.obs, chunk.next_obs], axis=1)
    missing = ((refs < chunk.first_frame) & (refs != ZERO_FRAME)).any(axis=1)
    assert 0 < missing.sum() < len(chunk)
    assert shard.add(chunk) == len(chunk) - missing.sum()
    assert shard.dropped == missing.sum()
    emitted.extend((77, rec, e, s) for (e, s), m in zip(rows, missing, strict=True) if not m)
    for chunk, rows in chunks[2:]:  # from then on the tail is known: nothing is lost
        assert shard.add(chunk) == len(chunk)
        emitted.extend((77, rec, e, s) for e, s in rows)
    assert shard.dropped == missing.sum()
    assert len(check_shard(shard, emitted)) == len(shard)
    check_invariants(shard)


def test_oversized_chunks_are_refused_without_side_effects():
    rng = np.random.default_rng(6)
    shard = ReplayShard(10)
    shard.add(synthetic_chunk(1, 0, rng.random(5), rng))
    before = shard.stats()
    with pytest.raises(ValueError):
        shard.add(synthetic_chunk(1, 10, rng.random(11), rng))
    with pytest.raises(ValueError):
        shard.add(synthetic_chunk(2, 0, rng.random(shard.frame_capacity), rng))
    assert shard.stats() == before
    check_invariants(shard)
    with pytest.raises(KeyError):
        shard.lookup(np.array([5]))


# ------------------------------------------------------------------- compact batches
# Streams whose batches differ in how much their frames are shared and padded: short
# episodes (many zero-padded stacks), long ones (most windows full: 7 distinct frames of
# 8 at n = 3), n = 5 (a stack and its bootstrap stack share none), and a shard barely
# larger than the batch (transitions of one batch share many frames).
COMPACT_CASES = {
    "short-episodes": dict(num_envs=4, n=3, push_period=3, max_steps=5, terminate=0.3,
                           capacity=400, steps=120),
    "long-episodes": dict(num_envs=3, n=3, push_period=7, max_steps=80, terminate=0.01,
                          capacity=600, steps=260),
    "n5": dict(num_envs=2, n=5, push_period=9, max_steps=12, terminate=0.1,
               capacity=300, steps=200),
    "dense": dict(num_envs=2, n=3, push_period=4, max_steps=30, terminate=0.05,
                  capacity=130, steps=120),
}  # fmt: skip
METADATA = ("actions", "returns", "discounts", "weights", "keys", "probs",
            "shard_size", "shard_total", "shard_min")  # fmt: skip


def twin_shards(case: dict, seed: int = 9) -> tuple[ReplayShard, ReplayShard]:
    """Two shards of one seed given the same chunks: their draws are the same."""
    rec = RecordedStream(
        stream=3, num_envs=case["num_envs"], n=case["n"], push_period=case["push_period"],
        seed=5, max_steps=case["max_steps"], terminate_prob=case["terminate"],
        life_loss_prob=0.0,
    )  # fmt: skip
    twins = ReplayShard(case["capacity"], seed=seed), ReplayShard(case["capacity"], seed=seed)
    for _ in range(case["steps"]):
        chunk = rec.step()
        if chunk is not None:
            for shard in twins:
                assert shard.add(chunk) == len(chunk)
    return twins


@pytest.mark.parametrize("wire", ["frames", "zstd"])
@pytest.mark.parametrize("case", list(COMPACT_CASES))
def test_compact_batch_expands_to_the_stacked_batch_bit_for_bit(case, wire):
    stacked_shard, compact_shard = twin_shards(COMPACT_CASES[case])
    padded = shared = 0
    for _ in range(4):
        want = stacked_shard.sample(128, 0.4)
        got = compact_shard.sample(128, 0.4, wire)
        assert isinstance(got, CompactBatch) and got.wire == wire and len(got) == 128
        np.testing.assert_array_equal(got.keys, want.keys)  # the same draw
        batch = got.expand()
        for stacks, wanted in ((batch.obs, want.obs), (batch.next_obs, want.next_obs)):
            assert stacks.dtype == np.uint8 and stacks.shape == (128, STACK, *FRAME_SHAPE)
            assert stacks.flags.c_contiguous
            assert np.array_equal(stacks, wanted)
        for name in METADATA:
            np.testing.assert_array_equal(getattr(batch, name), getattr(want, name))
        # Each distinct slot of the batch is sent once, the zero frame among them when a
        # stack is padded with it, and nothing else.
        slots = compact_shard.slots[got.keys % compact_shard.capacity]
        assert got.num_frames == len(np.unique(slots))
        assert got.obs_index.dtype == got.next_index.dtype == np.int32
        assert got.obs_index.shape == got.next_index.shape == (128, STACK)
        if wire == "frames":
            assert got.frames.shape == (got.num_frames, *FRAME_SHAPE)
        else:
            assert got.frames.dtype == np.uint8 and got.frames.ndim == 1
        padded += sum(zero_padding(stack) > 0 for stack in want.obs)
        shared += 8 * 128 - got.num_frames
    assert padded > 0, "no stack padded at an episode start was checked"
    # A stack t-3..t and its bootstrap stack t+h-3..t+h (h <= n) share 4 - h frames.
    assert shared >= 4 * 128 * max(0, STACK - COMPACT_CASES[case]["n"])


@pytest.mark.parametrize("wire", ["frames", "zstd"])
def test_compact_lookup_equals_the_stacked_lookup(wire):
    shard, _ = twin_shards(COMPACT_CASES["short-episodes"])
    keys = live_keys(shard)
    want = shard.lookup(keys)
    got = shard.lookup(keys, wire)
    assert isinstance(got, CompactBatch)
    batch = got.expand()
    assert np.array_equal(batch.obs, want.obs) and np.array_equal(batch.next_obs, want.next_obs)
    assert sum(zero_padding(stack) > 0 for stack in want.next_obs) > 0
    for name in METADATA:
        np.testing.assert_array_equal(getattr(batch, name), getattr(want, name))


def test_zstd_shrinks_screen_like_frames_and_unknown_formats_are_refused():
    """Consecutive screens that differ by a moving sprite, as Atari's do: compressed
    together, a transition's seven distinct frames cost far less than one raw frame."""
    rng = np.random.default_rng(4)
    chunk = synthetic_chunk(1, 0, rng.random(300), rng)
    frames = np.zeros((301, *FRAME_SHAPE), dtype=np.uint8)
    frames[:, 70:74, :] = 90  # ground
    for f in range(301):  # a 6x8 sprite moving one pixel a frame
        frames[f, 20:26, f % 76 : f % 76 + 8] = 200
    chunk.frames = frames
    shard = ReplayShard(300, seed=2)
    shard.add(chunk)
    raw = shard.sample(64, 0.4, "frames")
    packed = shard.sample(64, 0.4, "zstd")
    assert packed.frames.nbytes * 10 < raw.frames.nbytes
    assert np.array_equal(packed.distinct_frames(), shard.lookup(packed.keys, "frames").frames)
    with pytest.raises(ValueError, match="wire format"):
        shard.sample(8, 0.4, "gzip")
    with pytest.raises(ValueError, match="wire format"):
        shard.lookup(packed.keys, "auto")
