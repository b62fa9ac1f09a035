"""The Ray actor hosting the :class:`Learner`: trains on a thread, answers on others.

``run()`` trains until ``stop()``: it waits for ``replay_min_size`` transitions, then
takes ready batches from the :class:`Prefetcher`, updates, sends the new priorities back
to the shard each batch came from (one step late, so a GPU step is never synchronised
for them), and every ``publish_period`` updates puts a CPU copy of the weights in Ray's
object store as ``(version, [ref])``. ``latest_weights()``, ``stats()`` and ``state()``
are served concurrently (``max_concurrency``), so actors and the driver never wait for a
training step, and a checkpoint's state is taken between two updates, under a lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
import torch

from common.config import Config
from common.networks import state_dict_to_numpy
from learner.learning import Learner
from learner.pipeline import Prefetcher, RaySampler


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class LearnerWorker:
    def __init__(self, cfg: Config, shards: list[Any], num_actions: int, state: dict | None = None):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device=cuda but the learner's node has no usable GPU")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.learner = Learner(cfg, num_actions, self.device)
        if state is not None:
            self.learner.load_state_dict(state)
        self.sampler = RaySampler(shards, cfg.batch_size, cfg.prefetch_batches, seed=cfg.seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._published: tuple[int, list] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._waiting_s = 0.0
        self._started = time.monotonic()
        self._publish()

    def _publish(self) -> None:
        ref = ray.put(state_dict_to_numpy(self.learner.online))
        self._published = (self.learner.updates, [ref])

    def run(self) -> None:
        cfg, learner = self.cfg, self.learner
        while not self._stop.is_set() and self.sampler.replay_size() < cfg.replay_min_size:
            self.sampler.refresh()
            self._stop.wait(1.0)
        prefetcher = Prefetcher(self.sampler, self.device, lambda: learner.beta)
        pending = None
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                got = prefetcher.get(timeout=0.5)
                self._waiting_s += time.perf_counter() - t0
                if got is None:
                    continue
                drawn, batch = got
                with self._lock:
                    priorities, metrics = learner.update(batch)
                    for k, v in metrics.items():
                        self._sums[k] = self._sums.get(k, 0.0) + v
                    self._count += 1
                if pending is not None:
                    self._send_priorities(*pending)
                pending = self._copy_priorities(drawn.shard, drawn.batch.keys, priorities)
                if learner.updates % cfg.publish_period == 0:
                    self._publish()
            if pending is not None:
                self._send_priorities(*pending)
        finally:
            prefetcher.close()

    def _copy_priorities(self, shard: int, keys, priorities: torch.Tensor) -> tuple:
        """Start the device-to-host copy now; it is waited for one step later."""
        if self.device.type != "cuda":
            return shard, keys, priorities, None
        host = priorities.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return shard, keys, host, event

    def _send_priorities(self, shard: int, keys, priorities: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        self.sampler.update_priorities(shard, keys, priorities.numpy())

    def stop(self) -> None:
        self._stop.set()

    def latest_weights(self) -> tuple[int, list] | None:
        return self._published

    def stats(self) -> dict[str, float]:
        """Means of the train metrics since the last call, and counters."""
        with self._lock:
            sums, count = self._sums, self._count
            self._sums, self._count = {}, 0
            waiting, self._waiting_s = self._waiting_s, 0.0
        out = {k: float(v) / count for k, v in sums.items()} if count else {}
        out.update(
            updates=self.learner.updates,
            updates_since=count,
            beta=self.learner.beta,
            replay_size=self.sampler.replay_size(),
            weights_version=self._published[0] if self._published else -1,
            input_wait_s=waiting,
        )
        return out

    def state(self) -> dict:
        """The learner's full state on the CPU, taken between two updates."""
        with self._lock:
            return _to_cpu(self.learner.state_dict())
