"""The learner's input pipeline: importance weights over shards, compact batches made
into the tensors of stacked ones, the prefetch thread's hand-over of device batches and
its error path, the Ray sampler's calls in flight."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import fields

import numpy as np
import pytest
import torch

import apex_dqn.learner.pipeline as pipeline
from apex_dqn.common.messages import CompactBatch, SampledBatch
from apex_dqn.learner.learning import TorchBatch
from apex_dqn.learner.pipeline import Drawn, LocalSampler, Prefetcher, to_torch
from apex_dqn.replay.shard import ReplayShard
from tests.replay.test_shard import COMPACT_CASES, synthetic_chunk, twin_shards

ALPHA = 0.6
EPS = 1e-6
# Priority ranges of three shards, far apart, so that P(s) differs a lot between shards.
SCALES = [(0.05, 0.5), (2.0, 20.0), (100.0, 400.0)]


def _scaled(priorities: np.ndarray) -> np.ndarray:
    """The sum-tree priority of |TD| ``priorities`` as a shard stores them (float32 in)."""
    return (np.abs(priorities.astype(np.float32).astype(np.float64)) + EPS) ** ALPHA


def _priorities(rng: np.random.Generator, sizes: list[int]) -> list[np.ndarray]:
    return [rng.uniform(lo, hi, n) for (lo, hi), n in zip(SCALES[: len(sizes)], sizes, strict=True)]


def _unsharded_weights(scaled: list[np.ndarray], shard: int, keys: np.ndarray, beta: float):
    """``(N * p_i / total) ** -beta / (N * p_min / total) ** -beta`` of one replay holding
    every item of every shard."""
    everything = np.concatenate(scaled)
    n, total = len(everything), everything.sum()
    p = scaled[shard][keys]
    return (n * p / total) ** -beta / (n * everything.min() / total) ** -beta


def _assert_float32_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)  # ~2 float32 ulps


# ------------------------------------------------------------------ weights over shards
@pytest.mark.parametrize("beta", [0.4, 1.0])
def test_local_sampler_weights_equal_those_of_one_unsharded_replay(beta):
    rng = np.random.default_rng(0)
    sizes = [150, 90, 60]
    priorities = _priorities(rng, sizes)
    shards = [ReplayShard(200, alpha=ALPHA, eps=EPS, seed=s) for s in range(3)]
    for s, shard in enumerate(shards):
        shard.add(synthetic_chunk(s, 0, priorities[s], rng))
    scaled = [_scaled(p) for p in priorities]
    sampler = LocalSampler(shards, batch_size=32, seed=1)
    seen = set()
    for _ in range(60):
        drawn = sampler.draw(beta)
        seen.add(drawn.shard)
        want = _unsharded_weights(scaled, drawn.shard, drawn.batch.keys, beta)
        _assert_float32_equal(drawn.weights, want)
        assert drawn.weights.max() <= 1.0
    assert seen == {0, 1, 2}


def test_local_sampler_ignores_the_least_priority_of_an_empty_shard():
    rng = np.random.default_rng(1)
    priorities = _priorities(rng, [40, 40, 40])
    shards = [ReplayShard(64, alpha=ALPHA, eps=EPS, seed=s) for s in range(3)]
    for s in (1, 2):  # shard 0 stays empty: it holds no item, it sets no bound
        shards[s].add(synthetic_chunk(s, 0, priorities[s], rng))
    scaled = [np.zeros(0), _scaled(priorities[1]), _scaled(priorities[2])]
    sampler = LocalSampler(shards, batch_size=16, seed=2)
    for _ in range(20):
        drawn = sampler.draw(0.5)
        assert drawn.shard in (1, 2)
        _assert_float32_equal(
            drawn.weights, _unsharded_weights(scaled, drawn.shard, drawn.batch.keys, 0.5)
        )


def test_least_priority_of_a_batch_is_bounded_by_its_items():
    """A producer that does not report its shard's least priority still gives a sound
    bound: the least priority among the items it returned."""
    probs = np.array([0.5, 0.25, 0.25])
    batch = SampledBatch(
        obs=np.zeros((3, 4, 84, 84), np.uint8), actions=np.zeros(3, np.int64),
        returns=np.zeros(3, np.float32), discounts=np.zeros(3, np.float32),
        next_obs=np.zeros((3, 4, 84, 84), np.uint8), weights=np.ones(3, np.float32),
        keys=np.arange(3), probs=probs, shard_size=10, shard_total=8.0,
    )  # fmt: skip
    assert batch.shard_min == np.inf
    assert pipeline._least_priority(batch) == 2.0
    batch.shard_min = 0.5
    assert pipeline._least_priority(batch) == 0.5


# -------------------------------------------------------------------------- prefetcher
class FakeStream:
    """Stands for a CUDA stream: remembers the events it was told to wait for."""

    def __init__(self, name: str):
        self.name = name
        self.waited: list[FakeEvent] = []

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)


class FakeEvent:
    def __init__(self) -> None:
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        self.stream = stream


def _drawn(k: int, batch_size: int = 4) -> Drawn:
    """A batch whose every observation byte is ``k`` (mod 256) and every weight ``k``."""
    b = batch_size
    batch = SampledBatch(
        obs=np.full((b, 4, 84, 84), k % 256, np.uint8), actions=np.full(b, k, np.int64),
        returns=np.full(b, k, np.float32), discounts=np.full(b, 0.97, np.float32),
        next_obs=np.full((b, 4, 84, 84), (k + 1) % 256, np.uint8),
        weights=np.ones(b, np.float32), keys=np.arange(b) + k * b,
        probs=np.full(b, 1.0 / b), shard_size=b, shard_total=1.0,
    )  # fmt: skip
    return Drawn(0, batch, np.full(b, float(k), np.float32))


class CountingSampler:
    """Batch k on the k-th draw; after ``fail_after`` draws, every draw raises."""

    def __init__(self, fail_after: int | None = None):
        self.draws = 0
        self.fail_after = fail_after

    def draw(self, beta: float) -> Drawn | None:
        if self.fail_after is not None and self.draws >= self.fail_after:
            raise ValueError("replay unreachable")
        self.draws += 1
        return _drawn(self.draws - 1)

    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None:
        pass

    def replay_size(self) -> int:
        return 0


def _tensors(tb: TorchBatch) -> list[torch.Tensor]:
    return [getattr(tb, f.name) for f in fields(tb)]


def test_each_device_batch_is_recorded_on_the_stream_that_takes_it(monkeypatch):
    """The CUDA path without a GPU: streams, events and copies stand in for CUDA's.

    The batch is copied on the prefetcher's side stream; when the train loop takes it,
    the train loop's stream must wait for the copies *and* every tensor of the batch must
    be recorded on the train loop's stream, or the caching allocator may give its memory
    to the next copy while the train step still reads it.
    """
    side, consumer = FakeStream("side"), FakeStream("consumer")
    recorded: list[tuple[torch.Tensor, FakeStream]] = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: side)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: consumer)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: recorded.append((t, s)))
    cpu = torch.device("cpu")
    to_torch = pipeline.to_torch  # the copies themselves stay on the host
    monkeypatch.setattr(pipeline, "to_torch", lambda drawn, device: to_torch(drawn, cpu))

    prefetcher = Prefetcher(CountingSampler(), torch.device("cuda"), lambda: 0.4, depth=2)
    try:
        for k in range(3):
            got = prefetcher.get(timeout=5.0)
            assert got is not None
            _, tb = got
            assert tb.obs[0, 0, 0, 0].item() == k and tb.weights[0].item() == k
            assert len(consumer.waited) == k + 1 and consumer.waited[-1].stream is side
            mine = [(t, s) for t, s in recorded if any(t is u for u in _tensors(tb))]
            assert len(mine) == len(_tensors(tb)) == 6
            assert all(s is consumer for _, s in mine)
        assert len(recorded) == 18 and not side.waited
    finally:
        prefetcher.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_batches_stay_intact_while_a_slow_train_step_reads_them():
    """A consumer whose stream runs far behind the copies: each batch must still read
    what was copied into it, never the bytes of a later batch copied into reused memory."""
    device = torch.device("cuda")
    prefetcher = Prefetcher(CountingSampler(), device, lambda: 0.4, depth=2)
    read: list[tuple[int, torch.Tensor]] = []
    try:
        for k in range(40):
            got = prefetcher.get(timeout=10.0)
            assert got is not None
            drawn, tb = got
            torch.cuda._sleep(5_000_000)  # the slow train step, queued on this stream
            read.append((k, torch.stack([tb.obs.float().mean(), tb.weights.mean()])))
            del got, drawn, tb  # freed while the GPU has not yet read them
        torch.cuda.synchronize(device)
        for k, values in read:
            assert values.tolist() == [float(k % 256), float(k)], f"batch {k}"
    finally:
        prefetcher.close()


def test_a_failing_sampler_stops_the_prefetcher_and_get_raises_from_its_error():
    sampler = CountingSampler(fail_after=2)
    prefetcher = Prefetcher(sampler, torch.device("cpu"), lambda: 0.4, depth=4)
    prefetcher._thread.join(timeout=5.0)
    assert not prefetcher._thread.is_alive()
    assert isinstance(prefetcher.error, ValueError)
    with pytest.raises(RuntimeError, match="prefetcher failed") as raised:
        prefetcher.get(timeout=5.0)
    assert isinstance(raised.value.__cause__, ValueError)
    t0 = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - t0 < 1.0


def test_get_wakes_at_once_when_the_prefetcher_fails_while_it_waits():
    release = threading.Event()

    class LateFailure:
        def draw(self, beta: float) -> Drawn | None:
            release.wait(5.0)
            raise OSError("shard connection lost")

    prefetcher = Prefetcher(LateFailure(), torch.device("cpu"), lambda: 0.4)
    threading.Timer(0.2, release.set).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        prefetcher.get(timeout=30.0)
    assert time.monotonic() - t0 < 5.0
    assert isinstance(raised.value.__cause__, OSError)
    prefetcher.close()
    assert not prefetcher._thread.is_alive()


# -------------------------------------------------------------------- compact batches
@pytest.mark.parametrize("wire", ["frames", "zstd"])
def test_to_torch_gives_a_compact_batch_the_tensors_of_the_stacked_one(wire):
    stacked_shard, compact_shard = twin_shards(COMPACT_CASES["short-episodes"])
    stacked = LocalSampler([stacked_shard], batch_size=64, seed=4)
    compact = LocalSampler([compact_shard], batch_size=64, seed=4, wire=wire)
    cpu = torch.device("cpu")
    for _ in range(3):
        want, got = stacked.draw(0.4), compact.draw(0.4)
        assert isinstance(want.batch, SampledBatch) and isinstance(got.batch, CompactBatch)
        a, b = to_torch(want, cpu), to_torch(got, cpu)
        for name in ("obs", "next_obs", "actions", "returns", "discounts", "weights"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert b.obs.is_contiguous() and b.next_obs.is_contiguous()


def test_expand_on_device_equals_the_host_expansion():
    """The GPU path's gather, in torch ops, run here on the CPU: the same stacks as
    ``CompactBatch.expand``, zero-padded ones included."""
    _, shard = twin_shards(COMPACT_CASES["short-episodes"])
    batch = shard.sample(96, 0.4, "zstd")
    want = batch.expand()
    frames = torch.from_numpy(batch.distinct_frames().copy())
    obs, next_obs = pipeline.expand_on_device(
        frames, torch.from_numpy(batch.obs_index), torch.from_numpy(batch.next_index)
    )
    assert obs.shape == next_obs.shape == (96, 4, 84, 84) and obs.dtype == torch.uint8
    assert np.array_equal(obs.numpy(), want.obs) and np.array_equal(next_obs.numpy(), want.next_obs)
    assert (~want.obs[:, 0].any(axis=(1, 2))).any()  # some stacks start with zero padding


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("wire", ["frames", "zstd"])
def test_compact_batches_expand_on_the_gpu_as_on_the_host(wire):
    stacked_shard, compact_shard = twin_shards(COMPACT_CASES["long-episodes"])
    want = LocalSampler([stacked_shard], batch_size=128, seed=6).draw(0.4)
    got = LocalSampler([compact_shard], batch_size=128, seed=6, wire=wire).draw(0.4)
    device = torch.device("cuda")
    tb = to_torch(got, device)
    torch.cuda.synchronize(device)
    assert tb.obs.device.type == "cuda"
    assert np.array_equal(tb.obs.cpu().numpy(), want.batch.obs)
    assert np.array_equal(tb.next_obs.cpu().numpy(), want.batch.next_obs)
    assert np.array_equal(tb.actions.cpu().numpy(), want.batch.actions)


# ----------------------------------------------------------------------- Ray sampler
@pytest.mark.ray
def test_ray_sampler_weights_equal_one_unsharded_replay_and_calls_stay_bounded(ray_local):
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    rng = np.random.default_rng(3)
    sizes = [80, 50]
    priorities = _priorities(rng, sizes)
    shards = [
        ReplayShardWorker.options(num_cpus=0).remote(100, ALPHA, seed=s, eps=EPS) for s in range(2)
    ]
    try:
        for s, shard in enumerate(shards):
            ray.get(shard.add.remote(synthetic_chunk(s, 0, priorities[s], rng)))
        first_keys = [ray.get(shard.stats.remote()).first_key for shard in shards]
        scaled = [_scaled(p) for p in priorities]
        sampler = RaySampler(shards, batch_size=16, prefetch=3, seed=0, refresh_s=0.0)
        assert sampler.in_flight()["stats_requests"] == 0  # refresh() took every answer
        assert sampler.replay_size() == sum(sizes)
        seen = set()
        for _ in range(30):
            drawn = sampler.draw(0.4, timeout=10.0)
            assert drawn is not None
            seen.add(drawn.shard)
            keys = drawn.batch.keys - first_keys[drawn.shard]
            want = _unsharded_weights(scaled, drawn.shard, keys, 0.4)
            _assert_float32_equal(drawn.weights, want)
            flight = sampler.in_flight()
            assert flight["sample_requests"] == 3 and flight["stats_requests"] <= 2
        assert seen == {0, 1}
        assert sampler.mins.tolist() == [scaled[0].min(), scaled[1].min()]
    finally:
        for shard in shards:
            ray.kill(shard)


# ------------------------------------------------------------------------ replay ratio
def test_local_sampler_holds_the_ratio_and_says_when_a_push_may_go_in():
    """X = 2, band +-40, batches of 16: from the first draw on, a batch goes out only
    while D = 2 * inserts - samples stays >= -40, a push only while D <= 40."""
    from apex_dqn.replay.rate_limiter import SampleToInsertRatio

    rng = np.random.default_rng(0)
    shard = ReplayShard(1_000, ALPHA, seed=0)
    shard.add(synthetic_chunk(1, 0, rng.uniform(0.1, 1.0, 30), rng))
    ratio = SampleToInsertRatio(2.0, 40, push=30, batch=16)
    sampler = LocalSampler([shard], batch_size=16, seed=0, ratio=ratio)
    assert sampler.may_insert(10_000)  # learning has not begun: no limit
    assert [sampler.draw(0.4) is not None for _ in range(3)] == [True, True, False]
    assert sampler.sampled == 32 and sampler.inserted() == 0
    assert sampler.may_insert(36) and not sampler.may_insert(37)  # -32 + 2 * 36 = 40
    shard.add(synthetic_chunk(1, 30, rng.uniform(0.1, 1.0, 20), rng))  # D = 8
    assert sampler.inserted() == 20 and not sampler.may_insert(17)
    assert [sampler.draw(0.4) is not None for _ in range(4)] == [True, True, True, False]
    assert ratio.owed(sampler.inserted(), sampler.sampled) == -40  # 8 - 3 * 16: the edge
    free = LocalSampler([shard], batch_size=16, seed=0)
    assert all(free.draw(0.4) is not None for _ in range(20)) and free.may_insert(10**9)


@pytest.mark.ray
def test_paced_pushers_and_the_ray_sampler_over_two_shards_never_both_wait(ray_local):
    """Two shards, an actor thread pushing to each as the actor worker does (one stops
    early, leaving its shard unfed but still sampled), and the learner's sampler drawing
    as the prefetch thread does, with the narrowest band allowed: neither side is ever
    stuck, D stays within the band (with two shards, at most one push above it), and
    every transition pushed is stored. ~2 s."""
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.rate_limiter import SampleToInsertRatio, least_error_buffer
    from apex_dqn.replay.worker import ReplayShardWorker
    from tests.replay.recorder import RecordedStream

    ray = ray_local
    push, batch = (10 + 3) * 4, 16
    ratio = SampleToInsertRatio(0.5, least_error_buffer(0.5, push, batch), push, batch)
    over = ratio.samples_per_insert * push  # (shards - 1) pushes above the band at most
    shards = [ReplayShardWorker.options(num_cpus=0).remote(20_000, ALPHA, seed=s) for s in (0, 1)]
    pushers = [BoundedPusher(s, limit=2, paced=True, backoff=(0.002, 0.01)) for s in shards]
    pushed: list[list[int]] = [[], []]
    stop = threading.Event()

    def actor(i: int, chunks: int) -> None:
        rec = RecordedStream(stream=10 + i, num_envs=4, push_period=10, seed=i)
        while len(pushed[i]) < chunks and not stop.is_set():
            chunk = rec.step()
            if chunk is not None:
                pushers[i](chunk)
                pushed[i].append(len(chunk))
                pushers[i].wait_for_room(stop)
        while len(pushers[i]) and not stop.is_set():
            pushers[i].flush(timeout=0.1)

    threads = [threading.Thread(target=actor, args=(i, n)) for i, n in ((0, 24), (1, 6))]
    try:
        sampler = RaySampler(shards, batch, prefetch=3, seed=0, refresh_s=0.05, ratio=ratio,
                             pace_s=0.005)  # fmt: skip
        assert sampler.draw(0.4, timeout=0.05) is None  # learning begins, on empty shards
        for thread in threads:
            thread.start()
        draws, deadline = 0, time.monotonic() + 120
        while any(t.is_alive() for t in threads):
            assert time.monotonic() < deadline, f"stuck: {pushed}, {sampler.sampled} sampled"
            if sampler.draw(0.4, timeout=0.05) is not None:
                draws += 1
                if draws < 15:  # a slow learner at first: the actors wait for it
                    time.sleep(0.03)
            assert -ratio.error_buffer <= sampler.owed() <= ratio.error_buffer + over
        stats = ray.get([s.stats.remote() for s in shards])
        assert all(s.dropped == 0 for s in stats) and all(p.failed == 0 for p in pushers)
        assert [s.added for s in stats] == [sum(p) for p in pushed] and len(pushed[0]) == 24
        assert sum(p.refused for p in pushers) > 0 and sampler.limited_s > 0  # both waited
        assert draws > 15  # past the slow start
        sampler.refresh()
        assert -ratio.error_buffer <= sampler.owed() <= ratio.error_buffer + over
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        for shard in shards:
            ray.kill(shard)
