"""Supervision: what runs where, bringing back what died, growing the actor population.

Every component (the learner, each replay shard, each actor) is in one of three phases:

* ``PLACING``: started or restarted; asked ``where()`` and waiting for the answer. Ray
  answers once the process runs, maybe on another node, maybe only once a node with
  room joins.
* ``WAITING``: ``where()`` failed (Ray is restarting it, or has no room for it yet); it
  is asked again ``REPROBE_S`` seconds later.
* ``RUNNING``: it answered; the driver printed where it runs and, for an actor, started
  its loop (``run()``), which ends only when the actor stops or dies.

What moves a component between phases:

* the learner's ``run()`` ends with its process: a new learner is started from the
  newest checkpoint (Ray does not restart it), and every actor is pointed at it;
* an actor's ``run()`` ends: the actor goes back to ``PLACING`` (Ray restarts it under
  the same name and index, so with the same epsilons) and its loop starts again once
  it answers; if Ray says it is dead for good, it is dropped and its index is free;
* a shard that restarted (it answers with a new incarnation, empty) is placed again.

Elastic actors. With ``--max-actors`` above ``--num-actors`` the population grows: every
``SCALE_CHECK_S`` seconds the supervisor reads the cluster's free CPUs and starts as
many more actors as fit, lowest free index first, but only once every learner and actor
it started before is ``RUNNING``: what Ray is still placing gets the room first.
Nothing here ever waits on a remote call.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from apex_dqn.common.config import Config
from apex_dqn.common.inflight import InFlight
from apex_dqn.common.messages import Placement

SCALE_CHECK_S = 5.0  # seconds between looks at the cluster's CPUs
REPROBE_S = 2.0  # seconds between asks whether a component that went down is back


class Phase(enum.Enum):
    PLACING = "placing"
    WAITING = "waiting"
    RUNNING = "running"


@dataclass(eq=False)  # compared by identity: a restarted learner is a new component
class Component:
    kind: str  # "learner", "shard" or "actor"
    index: int
    handle: Any
    phase: Phase = Phase.PLACING
    retry_at: float = 0.0  # when a WAITING component is asked again
    placement: Placement | None = None


NewLearner = Callable[[dict | None], Any]  # learner state (or None) -> learner handle
NewActor = Callable[[int, Any], Any]  # (index, learner handle) -> actor handle
Restore = Callable[[], "tuple[dict | None, str]"]  # -> (newest learner state, its source)


class Supervisor:
    """Starts the learner and actors, and keeps them, and the shards, running."""

    def __init__(
        self,
        cfg: Config,
        shards: list[Any],
        new_learner: NewLearner,
        new_actor: NewActor,
        restore: Restore,
        learner_state: dict | None,
    ):
        self.cfg = cfg
        self.population = max(cfg.max_actors, cfg.num_actors)
        self._new_learner, self._new_actor, self._restore = new_learner, new_actor, restore
        self.learner_restarts = 0
        self.cpus = float(ray.cluster_resources().get("CPU", 0.0))
        self._next_scale = time.monotonic() + SCALE_CHECK_S
        self._probes: InFlight[Component] = InFlight()  # where() in flight
        self._loops: InFlight[Component] = InFlight()  # actors' run() in flight
        self.shards = [Component("shard", s, handle) for s, handle in enumerate(shards)]
        self.learner = Component("learner", 0, new_learner(learner_state))
        self.learner_loop = self.learner.handle.run.remote()
        self.actors: dict[int, Component] = {}  # bounded by the population
        for c in [self.learner, *self.shards]:
            self._probe(c)
        for i in range(cfg.num_actors):
            self._add_actor(i)

    # -------------------------------------------------------------------------- views
    def running_actors(self) -> list[Component]:
        """Actors whose loop runs."""
        return [c for c in self.actors.values() if c.phase is Phase.RUNNING]

    # -------------------------------------------------------------------- supervision
    def supervise(self) -> None:
        """Bring back what died and grow the population; never waits."""
        now = time.monotonic()
        if ray.wait([self.learner_loop], timeout=0)[0]:
            try:
                ray.get(self.learner_loop)
                raise RuntimeError("the learner stopped unexpectedly")
            except ray.exceptions.RayActorError:
                self._restart_learner()
        for actor, ref in self._loops.take():
            if self.actors.get(actor.index) is actor:
                print(f"actor {actor.index} stopped ({_failure(ref)}); restarting its loop "
                      "when it is back", flush=True)  # fmt: skip
                self._probe(actor)
        for c, ref in self._probes.take():
            try:
                self._placed(c, ray.get(ref))
            except ray.exceptions.ActorDiedError as exc:
                self._gone(c, exc)
            except ray.exceptions.RayError:  # restarting, or waiting for room
                c.phase, c.retry_at = Phase.WAITING, now + REPROBE_S
        for c in [self.learner, *self.shards, *self.actors.values()]:
            if c.phase is Phase.WAITING and now >= c.retry_at:
                self._probe(c)
        if now >= self._next_scale:
            self._next_scale = now + SCALE_CHECK_S
            self._scale()

    def shard_restarted(self, s: int) -> None:
        """Shard ``s`` came back empty (seen by its new incarnation): place it again."""
        self._probe(self.shards[s])

    def _probe(self, c: Component) -> None:
        """Ask a component where it runs: its answer says it is up, its error why not."""
        c.phase = Phase.PLACING
        if c not in self._probes:
            self._probes.add(c.handle.where.remote(), c)

    def _placed(self, c: Component, where: Placement) -> None:
        """A component answered: say where it runs, and start an actor's loop."""
        c.placement = where
        if c.kind == "learner":
            c.phase = Phase.RUNNING
            print(f"learner: pid {where.pid} on {where.ip} node {where.node} ({where.device})",
                  flush=True)  # fmt: skip
        elif c.kind == "shard":
            c.phase = Phase.RUNNING
            print(f"shard {c.index}: {where}", flush=True)
        elif self.actors.get(c.index) is c and c not in self._loops:
            eps = where.epsilons
            spread = f"{eps[0]:.4g}" if len(set(eps)) == 1 else f"{eps[0]:.4g}..{eps[-1]:.4g}"
            print(f"actor {c.index}: {where} epsilon {spread}", flush=True)
            if self.learner_restarts:  # Ray restarts an actor with the learner it began with
                c.handle.set_learner.remote(self.learner.handle)
            c.phase = Phase.RUNNING
            self._loops.add(c.handle.run.remote(), c)

    def _gone(self, c: Component, exc: Exception) -> None:
        """Ray will not bring this component back."""
        lines = str(exc).strip().splitlines()
        why = lines[-1] if lines else type(exc).__name__
        if c.kind == "actor" and self.actors.get(c.index) is c:
            del self.actors[c.index]
            with contextlib.suppress(Exception):
                ray.kill(c.handle, no_restart=True)
            print(f"actor {c.index} is dead for good ({why}); dropped it, {len(self.actors)} "
                  "left", flush=True)  # fmt: skip
        elif c.kind == "shard":
            print(f"replay shard {c.index} is dead for good ({why}); the learner samples the "
                  "others", flush=True)  # fmt: skip
        # A dead learner is restarted by supervise() when its run() fails.

    def _restart_learner(self) -> None:
        """A new learner from the newest checkpoint (or from scratch if there is none)."""
        state, source = self._restore()
        self.learner_restarts += 1
        print(f"the learner died; restarting it from {source}", flush=True)
        self._probes.drop(lambda c: c is self.learner)  # asked the dead one
        self.learner = Component("learner", 0, self._new_learner(state))
        for a in self.actors.values():  # one that is down gets it when its loop restarts
            a.handle.set_learner.remote(self.learner.handle)
        self.learner_loop = self.learner.handle.run.remote()
        self._probe(self.learner)

    # ------------------------------------------------------------------ elastic actors
    def _add_actor(self, i: int) -> bool:
        """Start actor ``i``; False if Ray refused (its name still held by a dying one)."""
        try:
            handle = self._new_actor(i, self.learner.handle)
        except ValueError as exc:  # the name is still held by a dying actor i: next time
            print(f"actor {i} not started: {exc}", flush=True)
            return False
        self.actors[i] = c = Component("actor", i, handle)
        self._probe(c)
        return True

    def _scale(self) -> None:
        """Start more actors, up to the population, into the cluster's free CPUs."""
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if cpus != self.cpus:
            print(f"cluster: {cpus:g} CPUs (was {self.cpus:g})", flush=True)
            self.cpus = cpus
        if len(self.actors) >= self.population:
            return
        if any(c.phase is not Phase.RUNNING for c in [self.learner, *self.actors.values()]):
            return
        free = float(ray.available_resources().get("CPU", 0.0))
        room = min(int(free // self.cfg.actor_threads), self.population - len(self.actors))
        if room <= 0:
            return
        free_slots = [i for i in range(self.population) if i not in self.actors][:room]
        started = [i for i in free_slots if self._add_actor(i)]
        if started:
            print(f"{free:g} CPUs free: starting actor(s) {', '.join(map(str, started))} "
                  f"({len(self.actors)} of up to {self.population})", flush=True)  # fmt: skip

    # ------------------------------------------------------------------------ shutdown
    def stop(self, timeout: float = 10.0) -> None:
        """Ask the actors and the learner to stop; wait (bounded) for their loops."""
        for c in self.actors.values():
            c.handle.stop.remote()
        self.learner.handle.stop.remote()
        with contextlib.suppress(Exception):
            refs = [self.learner_loop, *self._loops.refs()]
            ray.wait(refs, num_returns=len(refs), timeout=timeout)


def _failure(ref: Any) -> str:
    """Why a call ended: its error's class and last line, or "returned"."""
    try:
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:200]
    return "returned"
