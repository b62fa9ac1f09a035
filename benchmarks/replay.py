"""Replay benchmark: memory, insert rate, sample and update latency, sharded throughput.

    python -m apex_dqn.benchmarks.replay            # capacity 200k, naive 20k, Ray shards of 50k
    python -m apex_dqn.benchmarks.replay --quick    # a small smoke run

Chunks are made the way actors make them: ``NStepAccumulator`` over ``--streams`` actors of
``--envs`` envs each, pushing every ``--push-period`` steps, episodes ending at random
(geometric, mean ``--episode-steps`` steps), chunks of the streams interleaved. Frame
*contents* come from a shared pool of random frames (they change none of the storage
figures, only the wire figures below, which take real frames), so making the chunks
costs little and is not timed.

Measured, on one shard in this process:

* ``bytes_per_transition``: ``ReplayShard.nbytes / len`` on a full shard;
* ``insert_per_s``: transitions stored per second by ``add`` into a full shard (each
  chunk evicts the oldest items), and ``insert_fill_per_s`` for the first fill (it also
  pays the first touch of every page of the frame pool);
* ``sample512_ms`` and ``update512_ms``: median latency of ``sample(512)`` on a full shard
  (contiguous uint8 obs and next_obs, actions, returns, discounts, weights, keys) and of
  ``update_priorities`` for 512 sampled keys.

Shared machines are noisy, so next to each wall-clock figure (which the targets are
checked against) come the fastest call (``*_min_ms``) and the median CPU time of this
process (``*_cpu_ms``, ``*_cpu_per_s``: the work itself, whatever else runs), and the
1-minute load average when the run ended.

The same figures for ``NaiveStackedReplay``, a straightforward buffer storing obs and
next_obs stacks (2 x 4 x 84 x 84 uint8) per transition with the same sum tree, measured
in the same run on the same chunks (with a smaller capacity: its bytes per transition do
not depend on capacity), and the ratios.

Then what a sampled batch costs on the wire, the bytes that cross the network when the
learner is on another node than the shard, for each ``--replay-wire`` format: ``raw``
(stacked obs and next_obs), ``frames`` (a ``CompactBatch``: the batch's distinct frames
once, stacks as rows of them) and ``zstd`` (those frames compressed as one zstd frame):

* ``wire_bytes_per_sampled_transition``: the batch as Ray moves it, pickled with protocol
  5, the pickle stream plus its out-of-band buffers (Ray sends numpy arrays as such
  buffers, so ``len(pickle.dumps(batch))`` alone would leave them out), per transition.
  The standard ``pickle`` makes the same stream as Ray's cloudpickle for these classes,
  which are importable, and needs no Ray (``--no-ray``);
* ``wire_encode512_ms``: the shard's side of one request of 512, ``sample`` in that
  format, the pickling, and the copy of the stream and buffers into one block of memory
  mapped beforehand (Ray copies them into its object store, shared memory it maps once);
* ``wire_decode512_ms``: the learner's side, unpickling (zero-copy) and ``to_torch`` on
  the CPU, which expands a compact batch with one gather (and decompresses it first);
* ``wire_zstd_by_level``: zstd levels 1, 2 and 3 on the distinct frames of one batch,
  bytes per transition and compression time (``ZSTD_LEVEL`` is the one used).

Compressibility depends on what the frames show, so this shard (``--wire-capacity``) is
filled from the real emulator, Space Invaders under random play, with ``--real-frames``
(the default; ``wire_frames`` in the JSON says which frames were used), and from the
random-byte pool above (incompressible: zstd then saves nothing) without.

Then the learner's view over Ray: ``--ray-shards`` (default 1 and 2) ``ReplayShardWorker``
processes (``num_cpus=0``, as ``train.py`` makes them), filled, sampled by
``learner.pipeline.RaySampler`` with ``--prefetch`` requests in flight, a priority
update sent back for every batch as the learner does; ``shards_S_samples_per_s`` is the
transitions per second the driver receives. The driver only receives the batches (they
are not copied further). On a machine of few cores the shards, the driver and Ray's own
processes share them, which limits how far this grows with S: it reports what it
measures, with the CPU count.

Then what the replay ratio's limiter costs (:func:`measure_limiter`): transitions per
second pushed into the first shard by an actor's ``BoundedPusher`` and sampled from it by
a ``RaySampler``, limiter off (``limiter_*_off_per_s``: ``--samples-per-insert 0``, the
free-running path) against on with a band too wide to ever bind
(``limiter_*_on_per_s``: its bookkeeping alone), and the ratios ``*_on_over_off``.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import time
from collections.abc import Callable

import numpy as np

from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import (
    WIRE_FORMATS,
    ZERO_FRAME,
    ZSTD_LEVEL,
    CompactBatch,
    SampledBatch,
    TransitionChunk,
    compress_frames,
)
from apex_dqn.replay.shard import ReplayShard, importance_weights
from apex_dqn.replay.sum_tree import SumTree

BATCH = 512
BETA = 0.4
ALPHA = 0.6
GAME = "space_invaders"  # the real frames of the wire measurement

TARGETS = {
    "bytes_per_transition": 7_500,  # at most
    "insert_per_s": 20_000,  # at least
    "sample512_ms": 10.0,  # at most
    "update512_ms": 2.0,  # at most
    "wire_zstd_bytes_per_transition": 12_000,  # at most, on real frames
}


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- chunks
def make_chunks(
    transitions: int,
    streams: int,
    envs: int,
    push_period: int,
    episode_steps: float,
    seed: int,
    n: int = 3,
    gamma: float = 0.99,
) -> list[TransitionChunk]:
    """Chunks as actors push them, interleaved across streams, ``transitions`` in all."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (4096, *FRAME_SHAPE), dtype=np.uint8)
    obs = np.zeros((envs, STACK, *FRAME_SHAPE), dtype=np.uint8)
    accs = [NStepAccumulator(envs, n, gamma, stream, False) for stream in range(streams)]
    for acc in accs:
        acc.start(obs)
    no = np.zeros(envs, dtype=bool)
    chunks: list[TransitionChunk] = []
    total, step = 0, 0
    while total < transitions:
        step += 1
        for acc in accs:
            q = rng.normal(size=envs).astype(np.float32)
            acc.bootstrap(q)
            acc.record(rng.integers(0, 6, envs), q + rng.normal(size=envs).astype(np.float32))
            ended = rng.random(envs) < 1.0 / episode_steps
            rewards = (rng.random(envs) < 0.1).astype(np.float64)
            acc.observe(obs, rewards, ended, no, no)
            if step % push_period == 0:
                chunk = acc.flush()
                start = int(rng.integers(0, len(pool) - len(chunk.frames) + 1))
                chunk.frames = pool[start : start + len(chunk.frames)]
                chunks.append(chunk)
                total += len(chunk)
    return chunks


def real_chunks(
    transitions: int, envs: int, push_period: int, seed: int, n: int = 3, gamma: float = 0.99
) -> list[TransitionChunk]:
    """Chunks of ``GAME`` under random play, made as an actor makes them: ale-py's vector
    env with the run's preprocessing (``make_vector_env``) through ``NStepAccumulator``."""
    from apex_dqn.common.config import Config
    from apex_dqn.common.envs import make_vector_env

    env = make_vector_env(Config(game=GAME), envs, threads=1)
    try:
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        actions = int(env.single_action_space.n)
        acc = NStepAccumulator(envs, n, gamma, 0, False)
        acc.start(obs)
        no = np.zeros(envs, dtype=bool)
        chunks: list[TransitionChunk] = []
        total, step = 0, 0
        while total < transitions:
            step += 1
            q = rng.normal(size=envs).astype(np.float32)
            acc.bootstrap(q)
            action = rng.integers(0, actions, envs)
            acc.record(action, q)
            env.send(action)
            obs, reward, terminated, truncated, _ = env.recv()
            acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, no)
            if step % push_period == 0:
                chunk = acc.flush()
                chunks.append(chunk)
                total += len(chunk)
        return chunks
    finally:
        env.close()


# ------------------------------------------------------------------------- baseline
class NaiveStackedReplay:
    """Baseline: obs and next_obs stacks stored whole per transition (56,448 B of frames).

    The layout of Stable-Baselines3's default replay buffer, with ours' sum tree and key
    scheme, so that only the storage differs. Stacks are rebuilt from a chunk's frame
    numbers when it arrives (from the chunk's frames and the stream's previous tail).
    """

    def __init__(self, capacity: int, alpha: float = ALPHA, seed: int = 0, eps: float = 1e-6):
        self.capacity, self.alpha, self.eps = capacity, alpha, eps
        self.obs = np.zeros((capacity, STACK, *FRAME_SHAPE), dtype=np.uint8)
        self.next_obs = np.zeros((capacity, STACK, *FRAME_SHAPE), dtype=np.uint8)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.tree = SumTree(capacity)
        self.oldest_key = self.next_key = 0
        self._tails: dict[int, tuple[int, np.ndarray]] = {}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.next_key - self.oldest_key

    @property
    def nbytes(self) -> int:
        arrays = (self.obs, self.next_obs, self.actions, self.returns, self.discounts)
        tails = sum(frames.nbytes for _, frames in self._tails.values())
        return sum(a.nbytes for a in arrays) + self.tree.nbytes + tails

    def add(self, chunk: TransitionChunk) -> int:
        tail_first, tail = self._tails.get(
            chunk.stream, (chunk.first_frame, np.zeros((0, *FRAME_SHAPE), np.uint8))
        )
        if tail_first + len(tail) != chunk.first_frame:
            tail_first, tail = chunk.first_frame, tail[:0]
        zero = np.zeros((1, *FRAME_SHAPE), dtype=np.uint8)
        table = np.concatenate([tail, chunk.frames, zero])
        refs = np.concatenate([chunk.obs, chunk.next_obs], axis=1)
        index = np.where(refs == ZERO_FRAME, len(table) - 1, refs - tail_first)
        inside = (index >= 0) & (index < len(table) - 1)
        valid = (inside | (refs == ZERO_FRAME)).all(axis=1)
        index = index[valid]
        count = len(index)
        evict = len(self) + count - self.capacity
        if evict > 0:
            self.tree.set((self.oldest_key + np.arange(evict)) % self.capacity, np.zeros(evict))
            self.oldest_key += evict
        items = (self.next_key + np.arange(count)) % self.capacity
        self.obs[items] = table[index[:, :STACK]]
        self.next_obs[items] = table[index[:, STACK:]]
        self.actions[items] = chunk.actions[valid]
        self.returns[items] = chunk.returns[valid]
        self.discounts[items] = chunk.discounts[valid]
        priorities = (np.abs(chunk.priorities[valid].astype(np.float64)) + self.eps) ** self.alpha
        self.tree.set(items, priorities)
        self.next_key += count
        keep = min(chunk.tail, len(table) - 1)
        self._tails[chunk.stream] = (
            tail_first + len(table) - 1 - keep,
            table[len(table) - 1 - keep : len(table) - 1].copy(),
        )
        return count

    def sample(self, batch_size: int, beta: float) -> SampledBatch:
        total = self.tree.total
        items = self.tree.sample(batch_size, self._rng)
        probs = self.tree.get(items) / total
        return SampledBatch(
            obs=self.obs[items],
            actions=self.actions[items].astype(np.int64),
            returns=self.returns[items],
            discounts=self.discounts[items],
            next_obs=self.next_obs[items],
            weights=importance_weights(probs, len(self), beta),
            keys=self.oldest_key + (items - self.oldest_key) % self.capacity,
            probs=probs,
            shard_size=len(self),
            shard_total=total,
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        keys = np.asarray(keys, dtype=np.int64)
        live = (keys >= self.oldest_key) & (keys < self.next_key)
        scaled = (np.abs(np.asarray(priorities, dtype=np.float64)[live]) + self.eps) ** self.alpha
        self.tree.set(keys[live] % self.capacity, scaled)
        return int(live.sum())


# ------------------------------------------------------------------- measurements
def latency_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time, fastest wall time and median CPU time (this process) of ``fn``."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {
        "ms": float(np.median(wall) * 1e3),
        "min_ms": float(np.min(wall) * 1e3),
        "cpu_ms": float(np.median(cpu) * 1e3),
    }


def insert_rate(buffer, chunks: list[TransitionChunk]) -> tuple[int, float, float]:
    """Transitions stored, per wall second and per CPU second of this process."""
    stored = 0
    w0, c0 = time.perf_counter(), time.process_time()
    for chunk in chunks:
        stored += buffer.add(chunk)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return stored, stored / wall, stored / max(cpu, 1e-9)


def measure_buffer(buffer, chunks: list[TransitionChunk], capacity: int, reps: int, seed: int):
    """Fill ``buffer`` to capacity, keep inserting into it full, then time sample/update."""
    # The chunks that fill it, then the rest: inserted into a full buffer, each chunk
    # evicting as many items as it stores.
    total, split = 0, len(chunks)
    for i, chunk in enumerate(chunks):
        total += len(chunk)
        if total >= capacity:
            split = i + 1
            break
    if split >= len(chunks):
        raise RuntimeError("not enough chunks to fill the buffer and insert more; make more")
    _, fill_rate, fill_cpu_rate = insert_rate(buffer, chunks[:split])
    if len(buffer) < capacity:
        raise RuntimeError(f"filled to {len(buffer)} of {capacity}: frame slots ran short")
    _, steady_rate, steady_cpu_rate = insert_rate(buffer, chunks[split:])
    assert len(buffer) == capacity, (len(buffer), capacity)

    rng = np.random.default_rng(seed)
    sample = latency_ms(lambda: buffer.sample(BATCH, BETA), reps)
    batch = buffer.sample(BATCH, BETA)
    assert batch.obs.flags.c_contiguous and batch.next_obs.flags.c_contiguous
    assert batch.obs.dtype == np.uint8 and batch.obs.shape == (BATCH, STACK, *FRAME_SHAPE)
    keys = batch.keys
    update = latency_ms(lambda: buffer.update_priorities(keys, rng.random(BATCH) * 2), reps)
    return {
        "bytes_per_transition": buffer.nbytes / len(buffer),
        "insert_per_s": steady_rate,
        "insert_cpu_per_s": steady_cpu_rate,
        "insert_fill_per_s": fill_rate,
        "insert_fill_cpu_per_s": fill_cpu_rate,
        "sample512_ms": sample["ms"],
        "sample512_min_ms": sample["min_ms"],
        "sample512_cpu_ms": sample["cpu_ms"],
        "update512_ms": update["ms"],
        "update512_min_ms": update["min_ms"],
        "update512_cpu_ms": update["cpu_ms"],
    }


def serialize(batch: SampledBatch | CompactBatch) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``batch`` as Ray serializes it: pickled with protocol 5, numpy arrays out of band."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
    return data, buffers


def wire_bytes(data: bytes, buffers: list[pickle.PickleBuffer]) -> int:
    """The bytes that travel: the pickle stream and every out-of-band buffer."""
    return len(data) + sum(b.raw().nbytes for b in buffers)


def measure_wire(shard: ReplayShard, reps: int) -> dict:
    """Bytes per sampled transition, the shard's encoding and the learner's decoding
    time per batch of 512, for each format of :data:`WIRE_FORMATS`, on one full shard."""
    import torch

    from apex_dqn.learner.pipeline import Drawn, to_torch

    cpu = torch.device("cpu")
    # The object store's memory: mapped once and reused, as Ray's is.
    store = memoryview(bytearray(2 * wire_bytes(*serialize(shard.sample(BATCH, BETA)))))

    def encode(wire: str) -> int:
        data, buffers = serialize(shard.sample(BATCH, BETA, wire))
        view, at = store, len(data)
        view[:at] = data
        for b in buffers:
            raw = b.raw()
            view[at : at + raw.nbytes] = raw
            at += raw.nbytes
        return at

    out: dict[str, dict] = {k: {} for k in ("bytes", "enc", "enc_cpu", "dec", "dec_cpu")}
    distinct = []
    for wire in WIRE_FORMATS:
        enc = latency_ms(lambda wire=wire: encode(wire), reps)
        sizes = []
        for _ in range(5):
            batch = shard.sample(BATCH, BETA, wire)
            sizes.append(wire_bytes(*serialize(batch)) / BATCH)
            if isinstance(batch, CompactBatch):
                distinct.append(batch.num_frames / BATCH)
        data, buffers = serialize(batch)
        weights = np.ones(BATCH, dtype=np.float32)

        def decode(data=data, buffers=buffers, weights=weights) -> None:
            tb = to_torch(Drawn(0, pickle.loads(data, buffers=buffers), weights), cpu)
            assert tb.obs.shape == (BATCH, STACK, *FRAME_SHAPE)

        dec = latency_ms(decode, reps)
        out["bytes"][wire] = float(np.mean(sizes))
        out["enc"][wire], out["enc_cpu"][wire] = enc["ms"], enc["cpu_ms"]
        out["dec"][wire], out["dec_cpu"][wire] = dec["ms"], dec["cpu_ms"]
    # zstd levels 1-3 on the distinct frames of one batch: what each saves, and costs.
    frames = shard.sample(BATCH, BETA, "frames").frames
    levels = {}
    for level in (1, 2, 3):
        size = len(compress_frames(frames, level)) / BATCH
        timed = latency_ms(lambda level=level: compress_frames(frames, level), reps)
        levels[str(level)] = {"bytes_per_transition": size, "encode_ms": timed["ms"],
                              "encode_cpu_ms": timed["cpu_ms"]}  # fmt: skip
    return {
        "wire_bytes_per_sampled_transition": out["bytes"],
        "wire_encode512_ms": out["enc"],
        "wire_encode512_cpu_ms": out["enc_cpu"],
        "wire_decode512_ms": out["dec"],
        "wire_decode512_cpu_ms": out["dec_cpu"],
        "wire_distinct_frames_per_transition": float(np.mean(distinct)),
        "wire_zstd_level": ZSTD_LEVEL,
        "wire_zstd_by_level": levels,
    }


def measure_ray(chunks, capacity: int, shard_counts: list[int], prefetch: int, seconds: float):
    """Samples/s the learner's RaySampler receives from S shard processes, S in shard_counts."""
    import ray

    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.worker import ReplayShardWorker

    # "local": a Ray of our own, never a cluster someone else on this machine started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shards = [
            ReplayShardWorker.options(num_cpus=0).remote(capacity, ALPHA, seed=i)
            for i in range(max(shard_counts))
        ]
        # Every shard gets the same chunks, each put in the object store once.
        needed, total = [], 0
        for chunk in chunks:
            needed.append(chunk)
            total += len(chunk)
            if total >= capacity:
                break
        t0 = time.perf_counter()
        pending = []
        for chunk in needed:
            ref = ray.put(chunk)
            pending += [shard.add.remote(ref) for shard in shards]
            if len(pending) > 8 * len(shards):
                ray.get(pending)
                pending = []
        ray.get(pending)
        sizes = [s.size for s in ray.get([shard.stats.remote() for shard in shards])]
        log(f"  ray: {len(shards)} shards filled to {sizes} in {time.perf_counter() - t0:.1f}s")
        results = {}
        for count in shard_counts:
            sampler = RaySampler(shards[:count], BATCH, prefetch=prefetch, seed=count)
            rng = np.random.default_rng(count)

            def run(duration: float, sampler=sampler, rng=rng) -> int:
                got, end = 0, time.perf_counter() + duration
                while time.perf_counter() < end:
                    drawn = sampler.draw(BETA, timeout=5.0)
                    if drawn is None:
                        continue
                    sampler.update_priorities(drawn.shard, drawn.batch.keys, rng.random(BATCH))
                    got += len(drawn.batch)
                return got

            run(min(2.0, seconds / 4))  # warm up: workers, object store, first pages
            t0 = time.perf_counter()
            got = run(seconds)
            rate = got / (time.perf_counter() - t0)
            results[count] = rate
            log(f"  ray: {count} shard(s): {rate:,.0f} samples/s ({rate / BATCH:.1f} batches/s)")
            del sampler  # its requests still in flight finish during the next warm-up
        results["limiter"] = measure_limiter(shards[0], needed, seconds)
        return results
    finally:
        ray.shutdown()


def measure_limiter(shard, chunks: list[TransitionChunk], seconds: float) -> dict[str, float]:
    """What the replay ratio (``--samples-per-insert``) costs: transitions per second
    pushed into a full Ray shard by an actor's ``BoundedPusher`` and sampled from it by
    the learner's ``RaySampler``, with the limiter off (``--samples-per-insert 0``,
    today's path: ``add`` and unpaced requests) and on with a band so wide it never
    binds (``ray.put`` once and ``offer``; the sampler's counts and a ``pace`` call per
    shard every 20 ms): the bookkeeping alone. Off and on alternate in rounds of a
    quarter of ``seconds``, so load changes hit both alike."""
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.rate_limiter import SampleToInsertRatio

    never = SampleToInsertRatio(1.0, 1e15, push=max(len(c) for c in chunks), batch=BATCH)
    rng = np.random.default_rng(0)

    def pushes(paced: bool, duration: float) -> float:
        pusher, done, end = BoundedPusher(shard, 4, paced=paced), 0, time.perf_counter() + duration
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            chunk = chunks[int(rng.integers(len(chunks)))]
            pusher(chunk)
            pusher.wait_for_room()
            done += len(chunk)
        pusher.flush()
        return done / (time.perf_counter() - t0)

    def samples(ratio, duration: float) -> float:
        sampler = RaySampler([shard], BATCH, prefetch=4, seed=1, ratio=ratio)
        got, end = 0, time.perf_counter() + duration
        t0 = time.perf_counter()
        while time.perf_counter() < end:
            drawn = sampler.draw(BETA, timeout=5.0)
            if drawn is not None:
                sampler.update_priorities(drawn.shard, drawn.batch.keys, rng.random(BATCH))
                got += len(drawn.batch)
        return got / (time.perf_counter() - t0)

    rounds = {"insert_off": [], "insert_on": [], "sample_off": [], "sample_on": []}
    pushes(False, 0.5)  # warm up
    samples(None, 0.5)
    for _ in range(4):
        rounds["insert_off"].append(pushes(False, seconds / 8))
        rounds["insert_on"].append(pushes(True, seconds / 8))
        rounds["sample_off"].append(samples(None, seconds / 8))
        rounds["sample_on"].append(samples(never, seconds / 8))
    out = {f"limiter_{k}_per_s": float(np.median(v)) for k, v in rounds.items()}
    for side in ("insert", "sample"):
        on, off = out[f"limiter_{side}_on_per_s"], out[f"limiter_{side}_off_per_s"]
        out[f"limiter_{side}_on_over_off"] = on / off
    log(f"  ray: limiter off / on unbound: {json.dumps(_rounded(out))}")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small capacities, short runs")
    parser.add_argument("--capacity", type=int, default=200_000, help="our shard's capacity")
    parser.add_argument("--naive-capacity", type=int, default=20_000)
    parser.add_argument("--ray-capacity", type=int, default=50_000, help="per Ray shard")
    parser.add_argument("--ray-shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-seconds", type=float, default=8.0)
    parser.add_argument("--prefetch", type=int, default=4, help="sample requests in flight")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    parser.add_argument("--wire-capacity", type=int, default=50_000,
                        help="the shard the wire formats are measured on")  # fmt: skip
    parser.add_argument(
        "--real-frames", action=argparse.BooleanOptionalAction, default=True,
        help=f"fill the wire measurement's shard from {GAME} under random play",
    )  # fmt: skip
    parser.add_argument("--streams", type=int, default=4, help="actors pushing, interleaved")
    parser.add_argument("--envs", type=int, default=8, help="envs per actor")
    parser.add_argument("--push-period", type=int, default=50, help="actor steps per chunk")
    parser.add_argument("--episode-steps", type=float, default=500.0, help="mean length")
    parser.add_argument("--reps", type=int, default=50, help="timed sample/update calls")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.capacity, args.naive_capacity, args.ray_capacity = 20_000, 4_000, 8_000
        args.wire_capacity = 4_000
        args.ray_seconds, args.reps = 3.0, 20

    # Enough chunks to fill each buffer and then insert a quarter more into it full.
    need = int(max(args.capacity, args.naive_capacity, args.ray_capacity) * 1.25) + 2_000
    t0 = time.perf_counter()
    chunks = make_chunks(
        need, args.streams, args.envs, args.push_period, args.episode_steps, args.seed
    )
    log(f"made {len(chunks)} chunks, {sum(len(c) for c in chunks):,} transitions "
        f"in {time.perf_counter() - t0:.1f}s")  # fmt: skip

    def enough(capacity: int) -> list[TransitionChunk]:
        out, total = [], 0
        for chunk in chunks:
            out.append(chunk)
            total += len(chunk)
            if total >= capacity * 1.25:
                break
        return out

    shard = ReplayShard(args.capacity, ALPHA, seed=args.seed)
    ours = measure_buffer(shard, enough(args.capacity), args.capacity, args.reps, args.seed)
    stats = shard.stats()
    frames_per_transition = stats.frames_used / len(shard)
    log(f"ours  (capacity {args.capacity:,}): {json.dumps(_rounded(ours))}")
    del shard
    gc.collect()

    naive_buffer = NaiveStackedReplay(args.naive_capacity, ALPHA, seed=args.seed)
    naive = measure_buffer(
        naive_buffer, enough(args.naive_capacity), args.naive_capacity, args.reps, args.seed
    )
    log(f"naive (capacity {args.naive_capacity:,}): {json.dumps(_rounded(naive))}")
    del naive_buffer
    gc.collect()

    if args.real_frames:
        t0 = time.perf_counter()
        wire_chunks = real_chunks(int(args.wire_capacity * 1.1), args.envs, args.push_period,
                                  args.seed)  # fmt: skip
        frames_used = f"{GAME} random play"
        log(f"made {len(wire_chunks)} chunks of {frames_used} in {time.perf_counter() - t0:.1f}s")
    else:
        wire_chunks, frames_used = enough(args.wire_capacity), "synthetic random bytes"
    wire_shard = ReplayShard(args.wire_capacity, ALPHA, seed=args.seed)
    for chunk in wire_chunks:
        wire_shard.add(chunk)
    wire = measure_wire(wire_shard, args.reps)
    wire["wire_frames"] = frames_used
    log(f"wire  (capacity {len(wire_shard):,}, {frames_used}): {json.dumps(_rounded(wire))}")
    del wire_shard, wire_chunks
    gc.collect()

    result: dict = dict(ours)
    result.update({f"naive_{k}": v for k, v in naive.items()})
    result.update(
        {
            "memory_ratio_naive_over_ours": naive["bytes_per_transition"]
            / ours["bytes_per_transition"],
            "insert_ratio_ours_over_naive": ours["insert_per_s"] / naive["insert_per_s"],
            "sample_ratio_naive_over_ours": naive["sample512_ms"] / ours["sample512_ms"],
            "update_ratio_naive_over_ours": naive["update512_ms"] / ours["update512_ms"],
        }
    )
    if not args.no_ray:
        rates = measure_ray(
            enough(args.ray_capacity), args.ray_capacity, args.ray_shards, args.prefetch,
            args.ray_seconds,
        )  # fmt: skip
        result.update(rates.pop("limiter"))
        for count, rate in rates.items():
            result[f"shards_{count}_samples_per_s"] = rate
        if 1 in rates and 2 in rates:
            result["shards_2_over_1"] = rates[2] / rates[1]
    result.update(wire)
    result["meets_targets"] = {
        "bytes_per_transition": ours["bytes_per_transition"] <= TARGETS["bytes_per_transition"],
        "insert_per_s": ours["insert_per_s"] >= TARGETS["insert_per_s"],
        "sample512_ms": ours["sample512_ms"] <= TARGETS["sample512_ms"],
        "update512_ms": ours["update512_ms"] <= TARGETS["update512_ms"],
    }
    if args.real_frames:  # random bytes do not compress: no target for them
        result["meets_targets"]["wire_zstd_bytes_per_transition"] = (
            wire["wire_bytes_per_sampled_transition"]["zstd"]
            <= TARGETS["wire_zstd_bytes_per_transition"]
        )
    result.update(
        {
            "capacity": args.capacity,
            "naive_capacity": args.naive_capacity,
            "ray_capacity_per_shard": args.ray_capacity,
            "wire_capacity": args.wire_capacity,
            "frames_per_transition": frames_per_transition,
            "dropped": stats.dropped,
            "streams": args.streams,
            "envs_per_stream": args.envs,
            "push_period": args.push_period,
            "mean_episode_steps": args.episode_steps,
            "prefetch": args.prefetch,
            "cpus": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "quick": args.quick,
        }
    )
    print(json.dumps(_rounded(result)), flush=True)
    return result


def _rounded(d: dict) -> dict:
    return {
        k: round(v, 4) if isinstance(v, float) else _rounded(v) if isinstance(v, dict) else v
        for k, v in d.items()
    }


if __name__ == "__main__":
    main()
