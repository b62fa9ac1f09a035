"""The Ray actor hosting the :class:`Learner`: trains on a thread, answers on others.

``run()`` trains until ``stop()``: it waits for ``replay_min_size`` transitions (or
``min_replay``, 1 when the run resumed with its replay restored: that replay is the
one the learner was learning from, however small), then
runs :class:`TrainLoop` steps (ready batches in, priorities back to their shards), and
every ``publish_period`` updates puts a CPU copy of the weights in Ray's object store
as ``(version, [ref])``. ``latest_weights()``, ``stats()`` and ``state()``
are served concurrently (``max_concurrency``, declared in :func:`start_learner`), so
actors and the driver never wait for a training step, and a checkpoint's state is taken
between two updates, under a lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
import torch

from apex_dqn.common.config import Config
from apex_dqn.common.messages import LearnerStats, Placement
from apex_dqn.common.networks import state_dict_to_numpy
from apex_dqn.learner.learning import Learner
from apex_dqn.learner.loop import TrainLoop
from apex_dqn.learner.pipeline import RaySampler
from apex_dqn.replay.rate_limiter import SampleToInsertRatio


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class LearnerWorker:
    def __init__(
        self, cfg: Config, shards: list[Any], num_actions: int, state: dict | None = None,
        min_replay: int | None = None,
    ):  # fmt: skip
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device=cuda but the learner's node has no usable GPU")
        self.cfg = cfg
        self.min_replay = cfg.replay_min_size if min_replay is None else min_replay
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)  # --seed fixes the initial networks
        self.learner = Learner(cfg, num_actions, self.device)
        if state is not None:
            self.learner.load_state_dict(state)
        self.sampler = RaySampler(shards, cfg.batch_size, cfg.prefetch_batches, seed=cfg.seed,
                                  ratio=SampleToInsertRatio.from_config(cfg))  # fmt: skip
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._published: tuple[int, list] | None = None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self._loop: TrainLoop | None = None
        self._started = time.monotonic()
        self._publish()

    def _publish(self) -> None:
        ref = ray.put(state_dict_to_numpy(self.learner.online))
        self._published = (self.learner.updates, [ref])

    def run(self) -> None:
        cfg = self.cfg
        while not self._stop.is_set() and self.sampler.replay_size() < self.min_replay:
            self.sampler.refresh()
            self._stop.wait(1.0)
        self._loop = loop = TrainLoop(self.learner, self.sampler, lock=self._lock)
        try:
            while not self._stop.is_set():
                metrics = loop.step()
                if metrics is None:
                    continue
                with self._lock:
                    for k, v in metrics.items():
                        self._sums[k] = self._sums.get(k, 0.0) + v
                    self._count += 1
                if self.learner.updates % cfg.publish_period == 0:
                    self._publish()
        finally:
            loop.close()

    def stop(self) -> None:
        self._stop.set()

    def where(self) -> Placement:
        return Placement.here(str(self.device))

    def latest_weights(self) -> tuple[int, list] | None:
        return self._published

    def stats(self) -> LearnerStats:
        """Means of the train metrics since the last call, and counters."""
        with self._lock:
            sums, count = self._sums, self._count
            self._sums, self._count = {}, 0
        metrics = {k: float(v) / count for k, v in sums.items()} if count else {}
        metrics.update({f"sampler/{k}_in_flight": v for k, v in self.sampler.in_flight().items()})
        metrics["sampler/failed_requests"] = self.sampler.failures
        metrics.update(self.sampler.ratio_metrics())
        return LearnerStats(
            updates=self.learner.updates,
            updates_since=count,
            beta=self.learner.beta,
            replay_size=self.sampler.replay_size(),
            weights_version=self._published[0] if self._published else -1,
            input_wait_s=self._loop.waiting_s if self._loop else 0.0,
            metrics=metrics,
        )

    def state(self) -> dict:
        """The learner's full state on the CPU, taken between two updates."""
        with self._lock:
            return _to_cpu(self.learner.state_dict())


def start_learner(
    cfg: Config, shards: list[Any], num_actions: int, state: dict | None,
    node: str | None = None, min_replay: int | None = None,
) -> Any:  # fmt: skip
    """The learner as a Ray actor, from ``state`` (a checkpoint's) or from scratch; it
    starts learning at ``min_replay`` transitions (None: ``--replay-min-size``).

    1 CPU (its train loop keeps a core busy) and 1 GPU with ``--device cuda``; pinned,
    softly, to ``node`` (the driver's, when it can host the learner:
    ``replay.worker.learner_node``), the node the replay shards are placed relative to;
    elsewhere only if that node has no room. Ray does not restart it (``max_restarts=0``):
    the driver does, from the newest checkpoint, because a blank learner would throw the
    run's learning away.
    """
    strategy: Any = "DEFAULT"
    if node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
    return (
        ray.remote(LearnerWorker)
        .options(
            num_cpus=1,
            num_gpus=1 if cfg.device == "cuda" else 0,
            max_concurrency=4,  # run() trains; latest_weights(), stats(), state() answer
            max_restarts=0,
            scheduling_strategy=strategy,
        )
        .remote(cfg, shards, num_actions, state, min_replay)
    )
