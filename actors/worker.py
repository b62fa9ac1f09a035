"""The Ray actor hosting one :class:`Actor`: pushes and weight pulls over Ray, never blocking.

* Pushes: ``shard.add.remote(chunk)``; at most ``max_pushes_in_flight`` unacknowledged,
  beyond that the actor waits for the oldest (back-pressure, never an unbounded queue).
  A push to a shard that died never hangs: Ray answers a call to a dead actor with an
  error at once, and one to a restarting actor with an error or once it is back. A
  failed push's chunk is lost and counted; the actor goes on pushing, to the restarted
  shard once Ray has brought it back.
* Weights: every ``weight_sync_period`` steps the actor advances a two-stage poll, asking
  the learner for its latest (version, ref), then fetching the weights only when
  newer, and checking readiness with ``ray.wait(timeout=0)``: it never waits. While the
  learner is dead the poll fails quietly and the actor acts with the weights it has,
  until the driver points it at the restarted learner (``set_learner``).
* Epsilons come from the actor's index alone (``population_epsilons``), so an actor that
  Ray restarts, or that the driver re-creates under the same index, explores as before.
* It runs on a thread of its own (``max_concurrency=2``) so the driver can ``drain()``
  its episodes and counters and ``stop()`` it while it runs.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Any

import numpy as np
import ray
import torch
from apex_dqn.actors.actor import Actor
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.common.config import Config
from apex_dqn.common.envs import make_vector_env
from apex_dqn.common.schedules import population_epsilons


class BoundedPusher:
    """``sink`` for an :class:`Actor`: ``shard.add.remote(chunk)``, at most ``limit`` in flight.

    Beyond the limit it waits for the oldest pushes to be answered: back-pressure from a
    busy shard reaches the actor, and no queue grows without bound. An answer is either
    the count stored (``acked``) or an error: a dead or restarting shard fails a push at
    once, so the wait never hangs on one; such pushes are counted in ``failed``.
    """

    def __init__(self, shard: Any, limit: int):
        self.shard, self.limit = shard, limit
        self.in_flight: deque = deque()
        self.acked = 0  # pushes the shard answered
        self.failed = 0  # pushes lost to a dead or restarting shard

    def __call__(self, chunk) -> None:
        self.in_flight.append(self.shard.add.remote(chunk))
        excess = len(self.in_flight) - self.limit
        if excess > 0:
            done, _ = ray.wait(list(self.in_flight), num_returns=excess)
            self._settle(done)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every push in flight to be answered (or ``timeout`` seconds)."""
        if self.in_flight:
            done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight),
                               timeout=timeout)  # fmt: skip
            self._settle(done)

    def _settle(self, done: list) -> None:
        for ref in done:
            try:
                ray.get(ref)
                self.acked += 1
            except ray.exceptions.RayError:
                self.failed += 1
        done = set(done)
        self.in_flight = deque(r for r in self.in_flight if r not in done)


class ActorWorker:
    def __init__(self, cfg: Config, index: int, shard: Any, learner: Any, num_actions: int):
        torch.set_num_threads(cfg.actor_threads)
        self.cfg, self.index, self.shard, self.learner = cfg, index, shard, learner
        seed = cfg.seed * 10_007 + index * 101 + int.from_bytes(os.urandom(2), "little")
        self.stream = int.from_bytes(os.urandom(7), "little")  # new for every incarnation
        env = make_vector_env(cfg, cfg.envs_per_actor, cfg.actor_threads, cfg.actor_lanes)
        policy = InferenceNet(num_actions, cfg.network, cfg.dueling, cfg.actor_precision)
        epsilons = population_epsilons(
            index, cfg.num_actors, cfg.max_actors, cfg.envs_per_actor, cfg.epsilon_spread
        )
        self._push = BoundedPusher(shard, cfg.max_pushes_in_flight)
        self._version_ref: Any = None
        self._weights: tuple[int, Any] | None = None
        self.actor = Actor(cfg, index, env, policy, epsilons, self._push, self._poll_weights,
                           stream=self.stream, seed=seed)  # fmt: skip
        self._stop = threading.Event()
        self._reported_steps = self._reported_failed = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------- Ray plumbing
    def _poll_weights(self) -> tuple[int, dict] | None:
        """Advance the non-blocking weight poll; return weights once they are here."""
        if self._weights is not None:
            version, ref = self._weights
            if not ray.wait([ref], timeout=0)[0]:
                return None
            self._weights = None
            try:
                return version, ray.get(ref)
            except ray.exceptions.RayError:  # its owner, the learner, died
                return None
        if self._version_ref is None:
            self._version_ref = self.learner.latest_weights.remote()
            return None
        if not ray.wait([self._version_ref], timeout=0)[0]:
            return None
        try:
            latest = ray.get(self._version_ref)
        except ray.exceptions.RayActorError:  # the learner died: act on until set_learner
            latest = None
        self._version_ref = None
        if latest is not None and latest[0] > self.actor.weights_version:
            self._weights = (latest[0], latest[1][0])
        return None

    # ---------------------------------------------------------------------- remote API
    def run(self) -> None:
        """Step until ``stop()``; pulls the first weights before acting."""
        while self.actor.weights_version < 0 and not self._stop.is_set():
            if self.actor.sync_weights():
                break
            self._stop.wait(0.05)
        while not self._stop.is_set():
            with self._lock:
                self.actor.step()

    def stop(self) -> None:
        self._stop.set()

    def where(self) -> dict[str, Any]:
        """This actor's index, process, node and epsilons: for logs, and to find it."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "epsilons": self.actor.epsilons.tolist(),
        }

    def set_learner(self, learner: Any) -> None:
        """Pull weights from a new learner (the driver restarted it)."""
        with self._lock:
            self.learner = learner
            self._version_ref = None
            self._weights = None
            self.actor.weights_version = -1  # the new learner's versions start again

    def drain(self) -> dict[str, Any]:
        """Episodes finished, agent steps taken and pushes lost since the last drain, and
        gauges."""
        with self._lock:
            steps = self.actor.env_steps - self._reported_steps
            self._reported_steps = self.actor.env_steps
            failed = self._push.failed - self._reported_failed
            self._reported_failed = self._push.failed
            times = vars(self.actor.times).copy()
            return {
                "index": self.index,
                "episodes": self.actor.drain_episodes(),
                "env_steps": steps,
                "weights_version": self.actor.weights_version,
                "epsilons": np.asarray(self.actor.epsilons),
                "pushes_in_flight": len(self._push.in_flight),
                "pushes_failed": failed,
                "times": times,
            }
