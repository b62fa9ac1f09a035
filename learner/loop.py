"""The train loop body, without Ray: batch in, update, priorities back, never waiting.

Shared by the Ray-hosted learner (``learner/worker.py``) and the benchmarks, so what is
measured is what trains.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from apex_dqn.learner.learning import Learner
from apex_dqn.learner.pipeline import Prefetcher, Sampler


class TrainLoop:
    """One ``step()``: take the next ready batch, update, and send the previous step's
    priorities back to their shard (one step late, so the device is never synchronised
    to read them)."""

    def __init__(
        self,
        learner: Learner,
        sampler: Sampler,
        prefetch_depth: int = 2,
        lock: threading.Lock | None = None,
    ):
        self.learner, self.sampler = learner, sampler
        self.lock = lock or contextlib.nullcontext()  # held around each update
        self.device = learner.device
        self.prefetcher = Prefetcher(sampler, self.device, lambda: learner.beta, prefetch_depth)
        self.waiting_s = 0.0  # time spent waiting for a batch: the pipeline's shortfall
        self._pending: tuple | None = None

    def step(self, timeout: float = 0.5) -> dict[str, torch.Tensor] | None:
        """One update, or None if no batch was ready within ``timeout`` seconds."""
        t0 = time.perf_counter()
        got = self.prefetcher.get(timeout=timeout)
        self.waiting_s += time.perf_counter() - t0
        if got is None:
            return None
        drawn, batch = got
        with self.lock:
            priorities, metrics = self.learner.update(batch)
        self.flush()
        self._pending = (drawn.shard, drawn.batch.keys, *self._to_host(priorities))
        return metrics

    def _to_host(self, priorities: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if self.device.type != "cuda":
            return priorities, None
        host = priorities.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def flush(self) -> None:
        """Send the priorities still held back."""
        if self._pending is None:
            return
        shard, keys, priorities, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        self.sampler.update_priorities(shard, keys, priorities.numpy())

    def close(self) -> None:
        self.flush()
        self.prefetcher.close()
