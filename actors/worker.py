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
* Its Ray options are declared here (:func:`start_actor`): ``max_concurrency=2`` gives
  ``run()`` a thread of its own, so the driver can ``drain()`` its episodes and counters
  and ``stop()`` it while it runs (a lock keeps those between two steps).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray
import torch

from apex_dqn.actors.actor import Actor
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.common.config import Config
from apex_dqn.common.envs import make_lane_envs
from apex_dqn.common.inflight import InFlight
from apex_dqn.common.messages import ActorReport, Placement
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
        self.in_flight: InFlight[None] = InFlight()
        self.acked = 0  # pushes the shard answered
        self.failed = 0  # pushes lost to a dead or restarting shard

    def __call__(self, chunk) -> None:
        self.in_flight.add(self.shard.add.remote(chunk), None)
        excess = len(self.in_flight) - self.limit
        if excess > 0:
            self._settle(self.in_flight.take(timeout=None, num=excess))

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every push in flight to be answered (or ``timeout`` seconds)."""
        self._settle(self.in_flight.take(timeout=timeout))

    def _settle(self, done: list) -> None:
        for _, ref in done:
            try:
                ray.get(ref)
                self.acked += 1
            except ray.exceptions.RayError:
                self.failed += 1


class WeightPoller:
    """``weights_source`` for an :class:`Actor`: the learner's newest weights, never waiting.

    A two-stage poll, advanced one stage per call: ask the learner for its latest
    ``(version, [ref])``; when the answer is in and names a version newer than the
    actor's, fetch that ref; when the weights are in, return them. Every stage checks
    readiness with ``ray.wait(timeout=0)``, so a slow or busy learner delays the weights,
    never the actor. While the learner is dead each poll fails quietly and the actor acts
    with the weights it has, until :meth:`set_learner` names the restarted one.
    """

    def __init__(self, learner: Any, current_version: Any):
        self.learner = learner
        self._current = current_version  # () -> the version the actor acts with
        self._asked: Any = None  # latest_weights() in flight
        self._fetching: tuple[int, Any] | None = None  # (version, weights ref) in flight

    def set_learner(self, learner: Any) -> None:
        self.learner, self._asked, self._fetching = learner, None, None

    def __call__(self) -> tuple[int, dict] | None:
        if self._fetching is not None:
            version, ref = self._fetching
            if not ray.wait([ref], timeout=0)[0]:
                return None
            self._fetching = None
            try:
                return version, ray.get(ref)
            except ray.exceptions.RayError:  # its owner, the learner, died
                return None
        if self._asked is None:
            self._asked = self.learner.latest_weights.remote()
            return None
        if not ray.wait([self._asked], timeout=0)[0]:
            return None
        try:
            latest = ray.get(self._asked)
        except ray.exceptions.RayActorError:  # the learner died: act on until set_learner
            latest = None
        self._asked = None
        if latest is not None and latest[0] > self._current():
            self._fetching = (latest[0], latest[1][0])
        return None


class ActorWorker:
    def __init__(self, cfg: Config, index: int, shard: Any, learner: Any, num_actions: int):
        torch.set_num_threads(cfg.actor_threads)
        self.cfg, self.index = cfg, index
        seed = cfg.seed * 10_007 + index * 101 + int.from_bytes(os.urandom(2), "little")
        self.stream = int.from_bytes(os.urandom(7), "little")  # new for every incarnation
        envs = make_lane_envs(cfg)
        policy = InferenceNet(num_actions, cfg.network, cfg.dueling, cfg.actor_precision)
        epsilons = population_epsilons(
            index, cfg.num_actors, cfg.max_actors, cfg.envs_per_actor, cfg.epsilon_spread
        )
        self._push = BoundedPusher(shard, cfg.max_pushes_in_flight)
        self._weights = WeightPoller(learner, lambda: self.actor.weights_version)
        self.actor = Actor(cfg, index, envs, policy, epsilons, self._push, self._weights,
                           stream=self.stream, seed=seed)  # fmt: skip
        self._stop = threading.Event()
        self._reported_steps = self._reported_failed = 0
        self._lock = threading.Lock()

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

    def where(self) -> Placement:
        return Placement.here(epsilons=tuple(self.actor.epsilons.tolist()))

    def set_learner(self, learner: Any) -> None:
        """Pull weights from a new learner (the driver restarted it)."""
        with self._lock:
            self._weights.set_learner(learner)
            self.actor.weights_version = -1  # the new learner's versions start again

    def drain(self) -> ActorReport:
        """Episodes finished, agent steps taken and pushes lost since the last drain."""
        with self._lock:
            steps = self.actor.env_steps - self._reported_steps
            self._reported_steps = self.actor.env_steps
            failed = self._push.failed - self._reported_failed
            self._reported_failed = self._push.failed
            return ActorReport(
                index=self.index,
                episodes=self.actor.drain_episodes(),
                env_steps=steps,
                weights_version=self.actor.weights_version,
                pushes_in_flight=len(self._push.in_flight),
                pushes_failed=failed,
            )


def start_actor(cfg: Config, index: int, shard: Any, learner: Any, num_actions: int) -> Any:
    """Actor ``index`` as a Ray actor named ``actor-<index>``.

    ``actor_threads`` CPUs (its emulators and inference run on that many threads);
    SPREAD over nodes, so losing a node takes few of them; restarted by Ray on any node
    with room (``max_restarts=-1``), under the same index and so with the same epsilons.
    Raises ValueError while a dying actor still holds the name.
    """
    return (
        ray.remote(ActorWorker)
        .options(
            name=f"actor-{index}",
            num_cpus=cfg.actor_threads,
            max_concurrency=2,  # run() on one thread; drain(), stop(), where() on the other
            max_restarts=-1,
            scheduling_strategy="SPREAD",
        )
        .remote(cfg, index, shard, learner, num_actions)
    )
