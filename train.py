"""Train an Ape-X agent: the one place that builds and drives the distributed program.

    python train.py                       # local Ray, defaults sized for this machine
    python train.py --address auto        # join a running cluster (or set RAY_ADDRESS)
    ray submit deploy/cluster.yaml train.py -- --num-actors 64 --max-actors 256

Topology: ``replay_shards`` shard actors; one learner actor (on a GPU when there is
one); ``num_actors`` actors, more up to ``max_actors`` as CPUs become free, actor i
pushing to shard i % S and pulling weights from the learner. The driver only watches:
it logs progress to the console and TensorBoard, checkpoints the learner every few
minutes and on Ctrl-C, brings back what died, grows the actor population into free
CPUs, and stops everything after ``total_frames`` environment frames.

What each component asks Ray for, and why:

* learner: 1 CPU (its train loop keeps a core busy), and 1 GPU with ``--device cuda``;
  default placement, so it sits on the driver's node when that node has room. Ray does
  not restart it: the driver does, from the newest checkpoint, because a blank learner
  would throw the run's learning away.
* actor: ``--actor-threads`` CPUs (its emulators and inference run on that many
  threads); SPREAD over nodes, so losing a node takes few of them. Ray restarts a dead
  actor (``max_restarts=-1``) on any node with room, under the same index and so with
  the same epsilons; the driver then restarts its loop.
* replay shard: no CPU (it answers short calls), but the memory a full shard takes
  (``replay.worker.shard_memory_bytes``), so no node is given more shards than it can
  hold (none, with a note, if no node offers that much); SPREAD. Ray restarts it, empty;
  the driver counts the transitions lost.
* evaluator: no CPU (a few episodes now and then, beside the actors); Ray restarts it.

Elastic actors. With ``--max-actors`` above ``--num-actors`` the population grows: every
few seconds the driver reads the cluster's free CPUs (``ray.available_resources``) and
starts as many more actors as fit, lowest free index first, once everything it started
before has been placed. Epsilons are laid over ``max_actors`` slots in an order whose
every prefix spans the whole Ape-X range (``common.schedules.population_epsilons``), so
each actor's epsilons are its own and fixed for life, and nothing is re-sent to anyone
as the population changes. When nodes leave, their actors wait for Ray to restart them
where there is room, and training goes on with the others; an actor that Ray will not
restart (dead for good) is dropped, and its index is started again when CPUs allow.

The driver prints where each component runs as it starts or comes back: ``learner: pid
N ...``, ``actor i: pid N node ID ...``, ``shard s: pid N node ID ...``. Actors and
shards are named ``actor-<i>`` and ``shard-<s>`` in the Ray namespace printed at start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config, ConfigError, from_args, resolve_auto, validate


@dataclass
class Counters:
    """What the driver counts; saved in every checkpoint and restored on resume."""

    env_frames: int = 0
    episodes: int = 0
    best_score: float = float("-inf")
    wall_time_s: float = 0.0
    recent_scores: list[float] = field(default_factory=list)


def _die(message: str) -> None:
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _local_resources() -> tuple[int, int, int]:
    import psutil
    import torch

    return os.cpu_count() or 1, int(torch.cuda.is_available()), psutil.virtual_memory().total


def _cluster_address(cfg: Config) -> str | None:
    """The Ray cluster to join: ``--address``, else RAY_ADDRESS, else one running here
    (as on a cluster's head node under ``ray submit``); None means start a local Ray."""
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return cfg.address or os.environ["RAY_ADDRESS"]
    try:  # the cluster `ray start` last started here, if its GCS still runs
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address

        started = read_ray_address()
        return started if started and started in find_gcs_addresses() else None
    except Exception:  # Ray's lookup changed: start a local Ray
        return None


def _start_ray(cfg: Config, address: str | None) -> None:
    import ray

    runtime_env = {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent)}}
    # A namespace of its own: two runs on one cluster never share actor names.
    namespace = f"apex-dqn-{uuid.uuid4().hex[:8]}"
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True,
                 namespace=namespace)  # fmt: skip
        return
    # Ask for the CPUs the topology reserves (learner + actors), even on a smaller
    # machine: there they share cores, where Ray would leave actors pending forever.
    cpus, needed = os.cpu_count() or 1, 1 + cfg.num_actors * cfg.actor_threads
    if needed > cpus:
        print(
            f"note: the learner and {cfg.num_actors} actors reserve {needed} CPUs; "
            f"this machine has {cpus}, so they will share cores",
            flush=True,
        )
    # "local": a new Ray even where /tmp/ray/ray_current_cluster names another cluster
    # (`ray start`, ray.cluster_utils.Cluster), live or stale, which ray.init() would join.
    with _own_process_group():
        ray.init(
            address="local",
            include_dashboard=False,
            runtime_env=runtime_env,
            num_cpus=max(cpus, needed),
            namespace=namespace,
        )


@contextlib.contextmanager
def _own_process_group():
    """Start the processes made inside in a process group of their own.

    A signal sent to this run's whole process group (Ctrl-C; SIGTERM from `timeout`,
    a batch scheduler or a container stop) must reach only this driver, which then
    saves a checkpoint through the local Ray; Ray's processes must still be running
    for that. Ray blocks SIGINT in them, not SIGTERM. So the driver leads a new group
    while Ray starts its processes (they inherit it), then rejoins its own group.
    They still end with the driver: ``ray.shutdown()``, or Ray's own fate sharing if
    the driver is killed. A driver that already leads its group (a shell's job) cannot
    hand its children another one this way; there nothing changes.
    """
    original = os.getpgrp()
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader cannot change its group: nothing to isolate from
        yield
        return
    try:
        yield
    finally:
        os.setpgid(0, original)


def prepare(argv: list[str] | None) -> tuple[Config, dict | None, str | None]:
    """Parse and validate everything that can be checked before Ray starts.

    Returns the config (autos resolved from this machine when Ray will be local), the
    checkpoint to resume from, and the address of the cluster to join, if any.
    """
    try:
        cfg = from_args(argv)
    except ConfigError as exc:
        _die(str(exc))
    resume = None
    address = _cluster_address(cfg)
    try:
        validate(cfg)
        if cfg.resume:
            resume = checkpoint.load(cfg.resume)
        if address is None:
            cpus, gpus, memory = _local_resources()
            cfg = resolve_auto(cfg, cpus=cpus, gpus=gpus, memory_bytes=memory)
            validate(cfg, gpus=gpus)
        if resume is not None:
            checkpoint.check_compatible(resume["config"], cfg.to_dict(), resume["path"])
            if not cfg.logdir or cfg.logdir.startswith("runs" + os.sep):
                cfg = cfg.replace(logdir=str(Path(resume["path"]).parent))
    except (ConfigError, checkpoint.CheckpointError) as exc:
        _die(str(exc))
    return cfg, resume, address


SCALE_CHECK_S = 5.0  # seconds between looks at the cluster's CPUs
REPROBE_S = 2.0  # seconds between asks whether a component that went down is back


class Driver:
    def __init__(self, cfg: Config, resume: dict | None):
        import ray
        from apex_dqn.actors.worker import ActorWorker
        from apex_dqn.common.envs import num_actions
        from apex_dqn.learner.worker import LearnerWorker
        from apex_dqn.replay.worker import ReplayShardWorker
        from torch.utils.tensorboard import SummaryWriter

        self._ray = ray
        self.cfg = cfg
        self.counters = Counters(**resume["counters"]) if resume else Counters()
        self.population = max(cfg.max_actors, cfg.num_actors)
        self._actions = actions = num_actions(cfg.game)
        per_shard = cfg.replay_capacity // cfg.replay_shards
        shard_options = dict(
            num_cpus=0, memory=_shard_memory(ray, per_shard), max_restarts=-1,
            scheduling_strategy="SPREAD",
        )  # fmt: skip
        self.shards = [
            ReplayShardWorker.options(name=f"shard-{i}", **shard_options).remote(
                per_shard, cfg.priority_alpha, seed=cfg.seed + i
            )
            for i in range(cfg.replay_shards)
        ]
        gpu = 1 if cfg.device == "cuda" else 0
        self._learner_actor = ray.remote(LearnerWorker).options(
            num_cpus=1, num_gpus=gpu, max_concurrency=4, max_restarts=0
        )
        self.learner = self._learner_actor.remote(
            cfg, self.shards, actions, resume["learner"] if resume else None
        )
        self.learner_restarts = 0
        self._actor_cls = ray.remote(ActorWorker)
        self._actor_options = dict(
            num_cpus=cfg.actor_threads, max_concurrency=2, max_restarts=-1,
            scheduling_strategy="SPREAD",
        )  # fmt: skip
        # Each collection below is bounded by the population (max_actors) or the shards.
        self.actors: dict[int, Any] = {}  # index -> handle, while it is ours
        self._runs: dict[Any, int] = {}  # run() in flight -> actor index: its loop runs
        self._probes: dict[Any, tuple[str, int]] = {}  # where() in flight -> component
        self._retry: dict[tuple[str, int], float] = {}  # component down -> when to ask again
        self._drains: dict[Any, int] = {}  # drain() in flight -> actor index
        self._shard_stats: dict[Any, int] = {}  # stats() in flight -> shard index
        self._shard_last: dict[int, dict] = {}  # the last stats of each shard
        self.versions: dict[int, int] = {}  # actor index -> weights version it acts with
        self.lost_transitions = self.shard_restarts = self.failed_pushes = 0
        self._cpus = float(ray.cluster_resources().get("CPU", 0.0))
        self._next_scale = time.monotonic() + SCALE_CHECK_S
        self.learner_run = self.learner.run.remote()
        self._probe("learner", 0)
        for s in range(cfg.replay_shards):
            self._probe("shard", s)
        for i in range(cfg.num_actors):
            self._add_actor(i)
        self.writer = SummaryWriter(cfg.logdir)
        self.writer.add_text("config", _config_table(cfg), global_step=0)
        self.evaluation = None
        if cfg.eval_interval_s > 0:
            from apex_dqn.actors.periodic import PeriodicEvaluation

            self.evaluation = PeriodicEvaluation(ray, cfg, actions, self.writer)

    # ------------------------------------------------------------------------ the loop
    def run(self) -> None:
        cfg, c = self.cfg, self.counters
        start = time.monotonic() - c.wall_time_s
        last_log = last_ckpt = time.monotonic()
        last_frames, last_updates = c.env_frames, None
        print(f"logging to {cfg.logdir}  (tensorboard --logdir {cfg.logdir})", flush=True)
        while c.env_frames < cfg.total_frames:
            time.sleep(min(1.0, cfg.log_interval_s))
            self._supervise()
            now = time.monotonic()
            if self.evaluation is not None:
                self.evaluation.poll(self.learner, c.env_frames)
            if now - last_log >= cfg.log_interval_s:
                c.wall_time_s = now - start
                learner = self._collect()
                fps = (c.env_frames - last_frames) / (now - last_log)
                ups = (
                    None
                    if last_updates is None
                    else (learner.get("updates", 0) - last_updates) / (now - last_log)
                )
                last_updates = learner.get("updates", last_updates)
                self._log(fps, ups, learner)
                last_log, last_frames = now, c.env_frames
            if now - last_ckpt >= cfg.checkpoint_interval_s:
                self.save_checkpoint()
                last_ckpt = now
        c.wall_time_s = time.monotonic() - start
        print(f"reached {c.env_frames:,} frames", flush=True)
        if self.evaluation is not None:
            self.evaluation.finish()

    # ------------------------------------------------------------------- supervision
    def _supervise(self) -> None:
        """Bring back what died, never waiting on anything.

        The learner is restarted from the last checkpoint. An actor whose loop stopped is
        asked ``where()`` until it answers (Ray restarts it, maybe on another node, maybe
        only once a node with room joins), and then its loop is restarted; if Ray says it
        is dead for good, it is dropped. Every few seconds :meth:`_scale` looks for room
        for more actors.
        """
        ray, now = self._ray, time.monotonic()
        done, _ = ray.wait([self.learner_run], timeout=0)
        if done:
            try:
                ray.get(done[0])
                raise RuntimeError("the learner stopped unexpectedly")
            except ray.exceptions.RayActorError:
                self._restart_learner()
        if self._runs:
            done, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0)
            for ref in done:
                i = self._runs.pop(ref)
                if i in self.actors:
                    print(f"actor {i} stopped ({_failure(ray, ref)}); restarting its loop "
                          "when it is back", flush=True)  # fmt: skip
                    self._probe("actor", i)
        if self._probes:
            done, _ = ray.wait(list(self._probes), num_returns=len(self._probes), timeout=0)
            for ref in done:
                kind, i = self._probes.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.ActorDiedError as exc:
                    self._gone(kind, i, exc)
                except ray.exceptions.RayError:  # restarting, or waiting for room
                    self._retry[(kind, i)] = now + REPROBE_S
                else:
                    self._placed(kind, i, info)
        for key, due in list(self._retry.items()):
            if now >= due:
                del self._retry[key]
                self._probe(*key)
        if now >= self._next_scale:
            self._next_scale = now + SCALE_CHECK_S
            self._scale()

    def _handle(self, kind: str, i: int) -> Any:
        if kind == "actor":
            return self.actors.get(i)
        return self.shards[i] if kind == "shard" else self.learner

    def _probe(self, kind: str, i: int) -> None:
        """Ask a component where it runs: its answer says it is up, its error why not."""
        handle = self._handle(kind, i)
        if handle is not None and (kind, i) not in self._probes.values():
            self._probes[handle.where.remote()] = (kind, i)

    def _placed(self, kind: str, i: int, info: Any) -> None:
        """A component answered: say where it runs, and start an actor's loop."""
        if kind == "learner":
            print(f"learner: {info}", flush=True)
        elif kind == "shard":
            print(f"shard {i}: pid {info['pid']} node {info['node']} ip {info['ip']}", flush=True)
        elif i in self.actors and i not in self._runs.values():
            eps = info["epsilons"]
            spread = f"{eps[0]:.4g}" if len(set(eps)) == 1 else f"{eps[0]:.4g}..{eps[-1]:.4g}"
            print(f"actor {i}: pid {info['pid']} node {info['node']} ip {info['ip']} "
                  f"epsilon {spread}", flush=True)  # fmt: skip
            actor = self.actors[i]
            if self.learner_restarts:  # Ray restarts an actor with the learner it began with
                actor.set_learner.remote(self.learner)
            self._runs[actor.run.remote()] = i

    def _gone(self, kind: str, i: int, exc: Exception) -> None:
        """Ray will not bring this component back."""
        lines = str(exc).strip().splitlines()
        why = lines[-1] if lines else type(exc).__name__
        if kind == "actor" and i in self.actors:
            actor = self.actors.pop(i)
            with contextlib.suppress(Exception):
                self._ray.kill(actor, no_restart=True)
            self.versions.pop(i, None)
            for ref in [r for r, j in self._drains.items() if j == i]:
                del self._drains[ref]
            print(f"actor {i} is dead for good ({why}); dropped it, {len(self.actors)} left",
                  flush=True)  # fmt: skip
        elif kind == "shard":
            print(f"replay shard {i} is dead for good ({why}); the learner samples the "
                  "others", flush=True)  # fmt: skip
        # A dead learner is restarted by _supervise when its run() fails.

    def _scale(self) -> None:
        """Start more actors, up to ``max_actors``, into the cluster's free CPUs.

        Only once every actor and learner started or restarting has been placed: what Ray
        is still placing gets the room first, so a new actor never takes the CPUs that a
        restarting learner or actor waits for.
        """
        ray = self._ray
        cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if cpus != self._cpus:
            print(f"cluster: {cpus:g} CPUs (was {self._cpus:g})", flush=True)
            self._cpus = cpus
        if len(self.actors) >= self.population:
            return
        if any(kind != "shard" for kind, _ in [*self._probes.values(), *self._retry]):
            return
        free = float(ray.available_resources().get("CPU", 0.0))
        room = min(int(free // self.cfg.actor_threads), self.population - len(self.actors))
        if room <= 0:
            return
        free_slots = [i for i in range(self.population) if i not in self.actors][:room]
        started = [i for i in free_slots if self._add_actor(i)]
        if not started:
            return
        print(f"{free:g} CPUs free: starting actor(s) {', '.join(map(str, started))} "
              f"({len(self.actors)} of up to {self.population})", flush=True)  # fmt: skip

    def _add_actor(self, i: int) -> bool:
        """Start actor ``i``; False if Ray refused (its name still held by a dying one)."""
        shard = self.shards[i % self.cfg.replay_shards]
        try:
            self.actors[i] = self._actor_cls.options(
                name=f"actor-{i}", **self._actor_options
            ).remote(self.cfg, i, shard, self.learner, self._actions)
        except ValueError as exc:  # the name is still held by a dying actor i: next time
            print(f"actor {i} not started: {exc}", flush=True)
            return False
        self._probe("actor", i)
        return True

    def _restart_learner(self) -> None:
        """A new learner from the newest checkpoint on disk (or fresh if there is none)."""
        try:
            saved = checkpoint.load(self.cfg.logdir)
            state, source = saved["learner"], saved["path"]
        except checkpoint.CheckpointError as exc:
            state, source = None, f"scratch ({exc})"
        self.learner_restarts += 1
        print(f"the learner died; restarting it from {source}", flush=True)
        self.learner = self._learner_actor.remote(self.cfg, self.shards, self._actions, state)
        for a in self.actors.values():  # one that is down gets it when its loop restarts
            a.set_learner.remote(self.learner)
        self.learner_run = self.learner.run.remote()
        self._retry.pop(("learner", 0), None)
        for ref in [r for r, key in self._probes.items() if key == ("learner", 0)]:
            del self._probes[ref]  # asked the dead one
        self._probe("learner", 0)

    def _collect(self) -> dict[str, float]:
        ray, c, w = self._ray, self.counters, self.writer
        # One drain in flight per running actor and one stats call per shard, kept until
        # answered: one that is slow, restarting or unplaced delays nobody, loses nothing.
        asked = set(self._drains.values())
        for i in set(self._runs.values()) - asked:
            if i in self.actors:
                self._drains[self.actors[i].drain.remote()] = i
        asked = set(self._shard_stats.values())
        for s, shard in enumerate(self.shards):
            if s not in asked:
                self._shard_stats[shard.stats.remote()] = s
        pending = [*self._drains, *self._shard_stats]
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=self.cfg.log_interval_s)
        for ref in ready:
            if ref in self._shard_stats:
                s = self._shard_stats.pop(ref)
                with contextlib.suppress(ray.exceptions.RayError):
                    self._shard_seen(s, ray.get(ref))
                continue
            del self._drains[ref]
            try:
                report = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            i = report["index"]
            c.env_frames += report["env_steps"] * self.cfg.frame_skip
            self.failed_pushes += report["pushes_failed"]
            if i in self.actors:
                self.versions[i] = report["weights_version"]
            scores = []
            for ep in report["episodes"]:
                c.episodes += 1
                c.best_score = max(c.best_score, ep.score)
                scores.append(ep.score)
                w.add_scalar("charts/episodic_return", ep.score, c.env_frames)
                w.add_scalar("charts/episodic_length", ep.length, c.env_frames)
                w.add_scalar("charts/episodic_return_vs_epsilon", ep.score, int(ep.epsilon * 1e6))
            if scores:
                w.add_scalar(f"actors/{i}/episodic_return", float(np.mean(scores)), c.env_frames)
            w.add_scalar(f"actors/{i}/pushes_in_flight", report["pushes_in_flight"], c.env_frames)
            c.recent_scores = (c.recent_scores + scores)[-100:]
        try:
            return ray.get(self.learner.stats.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return {}  # a dead learner is restarted by _supervise

    def _shard_seen(self, s: int, stats: dict) -> None:
        """Log a shard's counters; a new incarnation means it restarted, empty."""
        last = self._shard_last.get(s)
        if last is not None and stats["incarnation"] != last["incarnation"]:
            lost = int(last["size"])  # at least: what it held when last seen
            self.lost_transitions += lost
            self.shard_restarts += 1
            print(f"replay shard {s} restarted empty: {lost:,} transitions lost "
                  f"({self.lost_transitions:,} in all)", flush=True)  # fmt: skip
            self._probe("shard", s)
        self._shard_last[s] = stats
        step = self.counters.env_frames
        for key in ("size", "added", "dropped", "samples", "total_priority"):
            self.writer.add_scalar(f"replay/{s}/{key}", stats[key], step)  # actor i -> i % S
        if stats["size"]:  # mean p^alpha of the items held
            mean = stats["total_priority"] / stats["size"]
            self.writer.add_scalar(f"replay/{s}/mean_priority", mean, step)

    def _log(self, fps: float, ups: float | None, learner: dict[str, float]) -> None:
        c, w, cfg = self.counters, self.writer, self.cfg
        step = c.env_frames
        for key, value in learner.items():
            if "/" in key:
                w.add_scalar(key, value, step)
        version = learner.get("weights_version", -1)
        known = np.array([v for v in self.versions.values() if v >= 0])
        lag = float(version - known.mean()) if len(known) else float("nan")
        for i, v in self.versions.items():
            if v >= 0:
                w.add_scalar(f"actors/{i}/weights_version", v, step)
                w.add_scalar(f"actors/{i}/weight_version_lag", version - v, step)
        w.add_scalar("charts/weight_version_lag", lag, step)
        w.add_scalar("charts/env_frames_per_s", fps, step)
        w.add_scalar("charts/SPS", fps / cfg.frame_skip, step)
        if ups is not None:
            w.add_scalar("charts/updates_per_s", ups, step)
            w.add_scalar("charts/samples_per_s", ups * cfg.batch_size, step)
        w.add_scalar("replay/size", learner.get("replay_size", 0), step)
        w.add_scalar("charts/learner_updates", learner.get("updates", 0), step)
        w.add_scalar("charts/episodes", c.episodes, step)
        w.add_scalar("charts/learner_restarts", self.learner_restarts, step)
        w.add_scalar("charts/actors", len(self.actors), step)
        w.add_scalar("charts/actors_running", len(self._runs), step)
        w.add_scalar("cluster/cpus", self._cpus, step)
        w.add_scalar("replay/lost_transitions", self.lost_transitions, step)
        w.add_scalar("replay/shard_restarts", self.shard_restarts, step)
        w.add_scalar("replay/failed_pushes", self.failed_pushes, step)
        w.flush()
        recent = f"{np.mean(c.recent_scores):.1f}" if c.recent_scores else "-"
        best = f"{c.best_score:.0f}" if c.episodes else "-"
        eta = max(0, cfg.total_frames - step) / fps if fps > 0 else float("inf")
        print(
            f"[{_hms(c.wall_time_s)}] frames {_si(step)}/{_si(cfg.total_frames)}"
            f"  fps {fps:,.0f}  upd/s {ups if ups is not None else 0:.1f}"
            f"  actors {len(self._runs)}"
            f"  score {recent} (best {best}, {c.episodes} eps)"
            f"  replay {learner.get('replay_size', 0):,}"
            f"  loss {learner.get('losses/td_loss', float('nan')):.4f}"
            f"  lag {lag:.0f}  ETA {_hms(eta)}",
            flush=True,
        )

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        try:
            state = self._ray.get(self.learner.state.remote(), timeout=300)
        except (self._ray.exceptions.RayError, TimeoutError) as exc:
            print(f"no checkpoint: the learner did not answer ({type(exc).__name__})", flush=True)
            return None
        counters = vars(self.counters).copy()
        path = checkpoint.save(
            self.cfg.logdir,
            {"config": self.cfg.to_dict(), "learner": state, "counters": counters},
            step=int(state["updates"]),
            keep=self.cfg.keep_checkpoints,
        )
        print(f"checkpoint {path}", flush=True)
        return path

    def shutdown(self) -> None:
        ray = self._ray
        for a in self.actors.values():
            a.stop.remote()
        self.learner.stop.remote()
        with contextlib.suppress(Exception):
            ray.wait([self.learner_run, *self._runs], num_returns=1 + len(self._runs), timeout=10)
        self.writer.close()


def run_serial(cfg: Config, env, num_actions: int, steps: int, updates_per_step: int = 1,
               seed: int = 0):  # fmt: skip
    """The same components in one process, no Ray: for tests and debugging.

    One actor steps ``env``, one replay shard stores its chunks, the learner trains
    ``updates_per_step`` batches after each actor step once ``replay_min_size``
    transitions are in, and the actor takes the learner's weights every
    ``weight_sync_period`` steps. Returns the learner and the actor.
    """
    import torch
    from apex_dqn.actors.actor import Actor
    from apex_dqn.actors.inference import InferenceNet
    from apex_dqn.common.networks import state_dict_to_numpy
    from apex_dqn.common.schedules import actor_epsilons
    from apex_dqn.learner.learning import Learner
    from apex_dqn.learner.pipeline import LocalSampler, to_torch
    from apex_dqn.replay.shard import ReplayShard

    torch.manual_seed(seed)
    shard = ReplayShard(cfg.replay_capacity, cfg.priority_alpha, seed=seed)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    learner = Learner(cfg, num_actions, device)
    sampler = LocalSampler([shard], cfg.batch_size, seed=seed)
    epsilons = actor_epsilons(0, 1, env.num_envs, cfg.epsilon_spread)
    policy = InferenceNet(num_actions, cfg.network, cfg.dueling, cfg.actor_precision)
    actor = Actor(
        cfg, 0, env, policy, epsilons, shard.add,
        lambda: (learner.updates, state_dict_to_numpy(learner.online)),
        stream=0, seed=seed,
    )  # fmt: skip
    actor.sync_weights()
    for _ in range(steps):
        actor.run(1)
        if len(shard) < cfg.replay_min_size:
            continue
        for _ in range(updates_per_step):
            drawn = sampler.draw(learner.beta)
            priorities, _ = learner.update(to_torch(drawn, learner.device))
            sampler.update_priorities(drawn.shard, drawn.batch.keys, priorities.numpy())
    return learner, actor


def _failure(ray, ref) -> str:
    """Why a call ended: its error's class and last line, or "returned"."""
    try:
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:200]
    return "returned"


def _config_table(cfg: Config) -> str:
    rows = "\n".join(f"|{k}|{v}|" for k, v in cfg.to_dict().items())
    return "|setting|value|\n|-|-|\n" + rows


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _hms(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _shard_memory(ray, per_shard: int) -> int:
    """The memory a shard reserves: what a full one takes, or 0 if no node offers that
    much (a reservation nothing can meet would leave the shards waiting forever)."""
    from apex_dqn.replay.worker import shard_memory_bytes

    need = shard_memory_bytes(per_shard)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
    if need <= largest:
        return need
    print(
        f"note: a full replay shard takes {need / 2**30:.1f} GiB and no node offers Ray that "
        f"much ({largest / 2**30:.1f} GiB at most): shards reserve none, so Ray may put "
        "more on a node than it can hold (more --replay-shards make them smaller)",
        flush=True,
    )
    return 0


def _interrupt_once(signum, frame) -> None:
    """Stop the run on the first SIGINT or SIGTERM and ignore the ones after it: the same
    signal often arrives twice (``timeout`` sends it to its child and to the group), and
    a second KeyboardInterrupt must not cut into the final checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    cfg, resume, address = prepare(argv)
    import ray

    _start_ray(cfg, address)
    try:
        resources = ray.cluster_resources()
        resolved = resolve_auto(
            cfg,
            cpus=int(resources.get("CPU", 1)),
            gpus=int(resources.get("GPU", 0)),
            memory_bytes=int(resources.get("memory", 8 << 30)),
        )
        validate(resolved, gpus=int(resources.get("GPU", 0)))
    except ConfigError as exc:
        ray.shutdown()
        _die(str(exc))
    cfg = resolved
    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)
    print(f"ray namespace: {ray.get_runtime_context().namespace}", flush=True)
    elastic = f" (up to {cfg.max_actors})" if cfg.max_actors > cfg.num_actors else ""
    print(
        f"apex-dqn: {cfg.game}, {cfg.num_actors} actors{elastic} x {cfg.envs_per_actor} envs, "
        f"{cfg.replay_shards} replay shard(s) of {cfg.replay_capacity // cfg.replay_shards:,}, "
        f"learner on {cfg.device}, batch {cfg.batch_size}",
        flush=True,
    )
    driver = None
    try:
        driver = Driver(cfg, resume)
        driver.run()
    except KeyboardInterrupt:
        print("\ninterrupted: saving a checkpoint before stopping", flush=True)
    finally:
        # Let the checkpoint finish: neither a second Ctrl-C nor a SIGTERM interrupts it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if driver is not None and driver.save_checkpoint() is None:
                # The learner is gone (a signal to Ray's processes too): say what is kept.
                kept = checkpoint.list_checkpoints(cfg.logdir)
                print(f"the run continues from {kept[-1] if kept else 'nothing: no checkpoint'}"
                      " with --resume", flush=True)  # fmt: skip
        finally:
            if driver is not None:
                driver.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
