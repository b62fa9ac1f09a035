"""The learner's input pipeline: sample requests in flight, batches ready on the device.

``LocalSampler`` draws from in-process ``ReplayShard`` objects (tests, benchmarks, a GPU
machine without Ray); ``RaySampler`` keeps ``prefetch`` sample requests in flight across
shard actors. Both pick a shard with probability proportional to its total priority
mass, so a batch drawn from shard s has items with marginal probability

    P(i) = P(s) * p_i / total_s = p_i / total          when P(s) = total_s / total,

the distribution of one unsharded replay. A whole batch comes from one shard (items of a
batch are correlated by shard, not biased). ``P(s)`` uses the shard totals last seen, so
the importance weights ``(N * P(s) * p_i / total_s) ** -beta`` are computed with the
P(s) actually used to choose the shard; N is the sum of the shard sizes last seen.

``Prefetcher`` runs the sampler on a background thread and turns batches into device
tensors (pinned memory and non-blocking copies on CUDA) into a small bounded queue, so
the train step finds its next batch ready.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from apex_dqn.common.messages import SampledBatch
from apex_dqn.learner.learning import TorchBatch
from apex_dqn.replay.shard import ReplayShard, importance_weights


@dataclass
class Drawn:
    """A batch, where it came from, and its importance weights over all shards."""

    shard: int
    batch: SampledBatch
    weights: np.ndarray


class Sampler(Protocol):
    def draw(self, beta: float) -> Drawn | None: ...
    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None: ...
    def replay_size(self) -> int: ...


def _choose(totals: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
    """Pick a shard in proportion to its priority mass; returns (shard, probability)."""
    p = totals / totals.sum()
    s = int(rng.choice(len(p), p=p))
    return s, float(p[s])


def _global_weights(batch: SampledBatch, shard_prob: float, size: int, beta: float) -> np.ndarray:
    return importance_weights(batch.probs * shard_prob, max(size, batch.shard_size), beta)


class LocalSampler:
    """Samples in-process shards synchronously."""

    def __init__(self, shards: list[ReplayShard], batch_size: int, seed: int = 0):
        self.shards, self.batch_size = shards, batch_size
        self.rng = np.random.default_rng(seed)

    def replay_size(self) -> int:
        return sum(len(s) for s in self.shards)

    def draw(self, beta: float) -> Drawn | None:
        totals = np.array([s.total_priority for s in self.shards])
        if totals.sum() <= 0:
            return None
        s, prob = _choose(totals, self.rng)
        batch = self.shards[s].sample(self.batch_size, beta)
        return Drawn(s, batch, _global_weights(batch, prob, self.replay_size(), beta))

    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.shards[shard].update_priorities(keys, priorities)


class RaySampler:
    """Keeps ``prefetch`` sample requests in flight over shard actors; never unbounded.

    Shards come and go: Ray restarts one that died, empty. A request to it fails, so its
    mass is set to 0 and it is not chosen, and the others serve every batch meanwhile;
    its priority updates are dropped while it is down (their items are gone, and their
    keys would name the restarted shard's new items). Every ``refresh_s`` seconds each
    shard is asked for its size and mass without waiting for the answer, so a restarted
    shard is sampled again once it holds data. Requests, stats calls and priority updates
    in flight are each bounded.
    """

    def __init__(self, shards: list[Any], batch_size: int, prefetch: int, seed: int = 0,
                 max_updates_in_flight: int = 64, refresh_s: float = 5.0):  # fmt: skip
        import ray

        self._ray = ray
        self.shards, self.batch_size, self.prefetch = shards, batch_size, prefetch
        self.refresh_s = refresh_s
        self.rng = np.random.default_rng(seed)
        self.totals = np.zeros(len(shards))
        self.sizes = np.zeros(len(shards), dtype=np.int64)
        self.failures = 0  # sample requests that failed: a shard died or was empty
        self._requests: dict[Any, tuple[int, float]] = {}
        self._stats: dict[Any, int] = {}  # stats call in flight -> shard, at most one each
        self._asked = float("-inf")
        self._updates: deque = deque()
        self._max_updates = max_updates_in_flight
        self.refresh()

    # ------------------------------------------------------------------ shard stats
    def _ask_stats(self) -> None:
        asking = set(self._stats.values())
        for s, shard in enumerate(self.shards):
            if s not in asking:
                self._stats[shard.stats.remote()] = s
        self._asked = time.monotonic()

    def _read_stats(self, ready: list) -> None:
        for ref in ready:
            s = self._stats.pop(ref)
            try:
                stats = self._ray.get(ref)
                self.totals[s], self.sizes[s] = stats["total_priority"], stats["size"]
            except self._ray.exceptions.RayError:  # down or restarting: not sampled
                self.totals[s], self.sizes[s] = 0.0, 0

    def _poll_stats(self) -> None:
        """Take the stats answers that are in, and ask again when due. Never waits."""
        if time.monotonic() - self._asked >= self.refresh_s:
            self._ask_stats()
        if self._stats:
            ready, _ = self._ray.wait(list(self._stats), num_returns=len(self._stats), timeout=0)
            self._read_stats(ready)

    def refresh(self, timeout: float = 30.0) -> None:
        """Ask every shard for its size and mass; wait up to ``timeout`` s for the answers.

        A shard that does not answer in time keeps its last known numbers; its answer is
        taken later by ``draw``.
        """
        self._ask_stats()
        ready, _ = self._ray.wait(list(self._stats), num_returns=len(self._stats), timeout=timeout)
        self._read_stats(ready)

    def replay_size(self) -> int:
        return int(self.sizes.sum())

    def in_flight(self) -> dict[str, int]:
        """Calls awaiting an answer, per kind: each is bounded."""
        return {
            "sample_requests": len(self._requests),
            "stats_requests": len(self._stats),
            "priority_updates": len(self._updates),
        }

    # --------------------------------------------------------------------- sampling
    def _fill(self, beta: float) -> None:
        while len(self._requests) < self.prefetch and self.totals.sum() > 0:
            s, prob = _choose(self.totals, self.rng)
            ref = self.shards[s].sample.remote(self.batch_size, beta)
            self._requests[ref] = (s, prob)

    def draw(self, beta: float, timeout: float = 1.0) -> Drawn | None:
        self._poll_stats()
        self._fill(beta)
        if not self._requests:
            return None
        ready, _ = self._ray.wait(list(self._requests), num_returns=1, timeout=timeout)
        if not ready:
            return None
        s, prob = self._requests.pop(ready[0])
        try:
            batch: SampledBatch = self._ray.get(ready[0])
        except self._ray.exceptions.RayError:
            # Shard down, restarting or empty: skip it until its stats show data again.
            self.totals[s], self.sizes[s] = 0.0, 0
            self.failures += 1
            return None
        self.totals[s], self.sizes[s] = batch.shard_total, batch.shard_size
        self._fill(beta)
        return Drawn(s, batch, _global_weights(batch, prob, self.replay_size(), beta))

    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Send and forget; only waits if ``max_updates_in_flight`` are unanswered.

        Dropped while the shard is marked down: its items are lost with it.
        """
        if self.totals[shard] <= 0:
            return
        self._updates.append(self.shards[shard].update_priorities.remote(keys, priorities))
        if len(self._updates) >= self._max_updates:
            done, _ = self._ray.wait(list(self._updates), num_returns=len(self._updates) // 2)
            done = set(done)
            self._updates = deque(r for r in self._updates if r not in done)


def to_torch(drawn: Drawn, device: torch.device) -> TorchBatch:
    """Device tensors for a batch; pinned, non-blocking copies when the device is CUDA."""
    b = drawn.batch
    cuda = device.type == "cuda"

    def t(array: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        if cuda:
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor

    return TorchBatch(
        obs=t(b.obs),
        actions=t(b.actions),
        returns=t(b.returns),
        discounts=t(b.discounts),
        next_obs=t(b.next_obs),
        weights=t(drawn.weights),
    )


class Prefetcher:
    """A background thread that keeps up to ``depth`` device batches ready."""

    def __init__(self, sampler: Sampler, device: torch.device, beta_fn, depth: int = 2):
        self.sampler, self.device, self.beta_fn = sampler, device, beta_fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prefetcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            while not self._stop.is_set():
                drawn = self.sampler.draw(self.beta_fn())
                if drawn is None:
                    self._stop.wait(0.05)
                    continue
                if stream is not None:
                    with torch.cuda.stream(stream):
                        tb = to_torch(drawn, self.device)
                    event = torch.cuda.Event()
                    event.record(stream)
                else:
                    tb, event = to_torch(drawn, self.device), None
                while not self._stop.is_set():
                    try:
                        self._queue.put((drawn, tb, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the consumer by get()
            self.error = exc

    def get(self, timeout: float = 1.0) -> tuple[Drawn, TorchBatch] | None:
        """The next ready batch, or None if none came within ``timeout`` seconds."""
        if self.error is not None:
            raise RuntimeError("the batch prefetcher failed") from self.error
        try:
            drawn, tb, event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return drawn, tb

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
