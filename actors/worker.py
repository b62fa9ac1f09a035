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
* Replay ratio (``--samples-per-insert``): the shard answers a push the ratio does not
  allow yet with "not yet"; the pusher keeps the chunk and offers it again, and the
  actor stops stepping while ``max_pushes_in_flight`` pushes are pending
  (:class:`BoundedPusher`, paced).
* Epsilons come from the actor's index alone (``population_epsilons``), so an actor that
  Ray restarts, or that the driver re-creates under the same index, explores as before.
* Its Ray options are declared here (:func:`start_actor`): ``max_concurrency=2`` gives
  ``run()`` a thread of its own, so the driver can ``drain()`` its episodes and counters
  and ``stop()`` it while it runs (a lock keeps those between two steps).
"""

from __future__ import annotations

import os
import threading
import time
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

    ``paced`` (``--samples-per-insert``): the shard may answer a push "not yet" (None,
    ``HostedShard.offer``) when the replay ratio does not allow it. The chunk is kept,
    put in Ray's object store once (``ray.put``) so that offering it again sends only
    its reference, and offered again, with every later push refused behind it, in the
    order they were first sent, after a back-off that doubles from ``backoff[0]`` to
    ``backoff[1]`` seconds while refusals go on. Pushes unanswered or refused count
    against ``limit`` alike: :meth:`wait_for_room`, which the worker calls before each
    step, outside the actor's lock, is where the actor stops stepping its environments
    until the ratio lets its pushes in. Nothing is dropped.
    """

    def __init__(
        self, shard: Any, limit: int, paced: bool = False,
        backoff: tuple[float, float] = (0.005, 0.1),
    ):  # fmt: skip
        self.shard, self.limit, self.paced = shard, limit, paced
        self.in_flight: InFlight[None] = InFlight()
        self.acked = 0  # pushes the shard answered
        self.failed = 0  # pushes lost to a dead or restarting shard
        self.refused = 0  # "not yet" answers (paced): each refused push is offered again
        self.waited_s = 0.0  # seconds spent in wait_for_room
        self.backoff = backoff
        # Paced: [chunk ref, answer ref or None while refused], oldest first.
        self._pushes: list[list[Any]] = []
        self._delay = backoff[0]
        self._retry_at = 0.0

    def __len__(self) -> int:
        """Pushes not yet stored: unanswered, or (paced) refused and to be offered again."""
        return len(self._pushes) if self.paced else len(self.in_flight)

    def __call__(self, chunk) -> None:
        if self.paced:
            ref = ray.put(chunk)
            self._pushes.append([ref, self.shard.offer.remote(ref)])
            self._pump(block=False)
            return
        self.in_flight.add(self.shard.add.remote(chunk), None)
        excess = len(self.in_flight) - self.limit
        if excess > 0:
            self._settle(self.in_flight.take(timeout=None, num=excess))

    def wait_for_room(self, stop: threading.Event | None = None) -> None:
        """Paced: wait until fewer than ``limit`` pushes are pending, room for the next
        (or until ``stop`` is set), taking answers and offering refused pushes again
        meanwhile. A step pushes at most one chunk, so waiting before each step keeps
        ``limit`` pending at most, as the unpaced pusher does."""
        if not self.paced or len(self._pushes) < self.limit:
            return
        start = time.perf_counter()
        while len(self._pushes) >= self.limit and not (stop is not None and stop.is_set()):
            self._pump(block=True)
        self.waited_s += time.perf_counter() - start

    def _pump(self, block: bool) -> None:
        """Take the answers that are in, then offer the refused pushes again, oldest
        first, once their back-off is over. ``block``: first wait for an answer or for
        the back-off to end (at most 0.1 s)."""
        waiting = [answer for _, answer in self._pushes if answer is not None]
        if block:
            refused = len(waiting) < len(self._pushes)
            timeout = max(0.0, self._retry_at - time.monotonic()) if refused else 0.1
            if waiting:
                ray.wait(waiting, num_returns=1, timeout=min(timeout, 0.1))
            else:
                time.sleep(min(timeout, 0.1))
        if waiting:
            ready = set(ray.wait(waiting, num_returns=len(waiting), timeout=0)[0])
            kept = []
            for push in self._pushes:
                if push[1] is None or push[1] not in ready:
                    kept.append(push)
                    continue
                try:
                    stored = ray.get(push[1])
                except ray.exceptions.RayError:
                    self.failed += 1
                    continue
                if stored is None:  # not yet: keep it, offer it again after the back-off
                    self.refused += 1
                    push[1] = None
                    kept.append(push)
                    if self._retry_at <= time.monotonic():
                        self._retry_at = time.monotonic() + self._delay
                        self._delay = min(2 * self._delay, self.backoff[1])
                else:
                    self.acked += 1
                    self._delay = self.backoff[0]
            self._pushes = kept
        if time.monotonic() >= self._retry_at:
            for push in self._pushes:
                if push[1] is None:
                    push[1] = self.shard.offer.remote(push[0])

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every push in flight to be answered (or ``timeout`` seconds).

        Paced: until every push is stored or lost, offering refused ones again."""
        if self.paced:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._pushes and (deadline is None or time.monotonic() < deadline):
                self._pump(block=True)
            return
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
        self._push = BoundedPusher(shard, cfg.max_pushes_in_flight,
                                   paced=cfg.samples_per_insert > 0)  # fmt: skip
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
            # Paced pushes the replay ratio holds back stop the stepping here, between two
            # steps and outside the lock, so drain() and stop() still answer meanwhile.
            self._push.wait_for_room(self._stop)
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
                pushes_in_flight=len(self._push),
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
