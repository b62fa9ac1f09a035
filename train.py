"""Train an Ape-X agent: the one place that builds and drives the distributed program.

    python train.py                       # local Ray, defaults sized for this machine
    python train.py --address auto        # join a running cluster (or set RAY_ADDRESS)
    ray submit deploy/cluster.yaml train.py -- --num-actors 64

Topology: ``replay_shards`` shard actors; one learner actor (on a GPU when there is
one); ``num_actors`` actors, actor i pushing to shard i % S and pulling weights from the
learner. The driver only watches: it logs progress to the console and TensorBoard,
checkpoints the learner every few minutes and on Ctrl-C, restarts actors that died,
and stops everything after ``total_frames`` environment frames.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import checkpoint
from common.config import Config, ConfigError, from_args, resolve_auto, validate


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
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
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
    ray.init(
        address="local",
        include_dashboard=False,
        runtime_env=runtime_env,
        num_cpus=max(cpus, needed),
    )


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


class Driver:
    def __init__(self, cfg: Config, resume: dict | None):
        import ray
        from torch.utils.tensorboard import SummaryWriter

        from actors.worker import ActorWorker
        from common.envs import num_actions
        from learner.worker import LearnerWorker
        from replay.worker import ReplayShardWorker

        self.cfg = cfg
        self.counters = Counters(**resume["counters"]) if resume else Counters()
        actions = num_actions(cfg.game)
        per_shard = cfg.replay_capacity // cfg.replay_shards
        shard_actor = ReplayShardWorker.options(
            num_cpus=0, max_restarts=-1, scheduling_strategy="SPREAD"
        )
        self.shards = [
            shard_actor.remote(per_shard, cfg.priority_alpha, seed=cfg.seed + i)
            for i in range(cfg.replay_shards)
        ]
        gpu = 1 if cfg.device == "cuda" else 0
        self._learner_actor = ray.remote(LearnerWorker).options(
            num_cpus=1, num_gpus=gpu, max_concurrency=4, max_restarts=0
        )
        self._actions = actions
        self.learner = self._learner_actor.remote(
            cfg, self.shards, actions, resume["learner"] if resume else None
        )
        self.learner_restarts = 0
        ray_actor = ray.remote(ActorWorker).options(
            num_cpus=cfg.actor_threads, max_concurrency=2, max_restarts=-1,
            scheduling_strategy="SPREAD",
        )  # fmt: skip
        self.actors = [
            ray_actor.remote(cfg, i, self.shards[i % cfg.replay_shards], self.learner, actions)
            for i in range(cfg.num_actors)
        ]
        self.learner_run = self.learner.run.remote()
        print(f"learner: {ray.get(self.learner.where.remote())}", flush=True)
        self.actor_runs = {a.run.remote(): i for i, a in enumerate(self.actors)}
        self._drains: dict = {}  # drain() call in flight -> actor index
        self.evaluator = None
        if cfg.eval_interval_s > 0:
            from actors.evaluate import EvaluatorWorker
            from common.video import gif_available

            # No CPU reserved: it plays a few episodes now and then, beside the actors.
            self.evaluator = (
                ray.remote(EvaluatorWorker)
                .options(num_cpus=0, max_restarts=-1)
                .remote(cfg, actions, epsilon=cfg.eval_epsilon,
                        video=cfg.eval_video and gif_available(), video_max_steps=2_700)
            )  # fmt: skip
        self._eval_ref, self._eval_step, self._evals = None, 0, 0
        self._last_eval = time.monotonic()
        self.writer = SummaryWriter(cfg.logdir)
        self.writer.add_text("config", _config_table(cfg), global_step=0)
        self.versions = np.full(cfg.num_actors, -1)
        self._ray = ray

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
            self._poll_evaluation(now)
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

    def _supervise(self) -> None:
        """Bring back what died: actors (Ray restarts them; we restart their loops) and
        the learner (we restart it from the last checkpoint and point actors at it)."""
        ray = self._ray
        done, _ = ray.wait([self.learner_run], timeout=0)
        if done:
            try:
                ray.get(done[0])
                raise RuntimeError("the learner stopped unexpectedly")
            except ray.exceptions.RayActorError:
                self._restart_learner()
        done, _ = ray.wait(list(self.actor_runs), num_returns=len(self.actor_runs), timeout=0)
        for ref in done:
            i = self.actor_runs.pop(ref)
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)
            print(f"actor {i} stopped; restarting its loop", flush=True)
            self.actor_runs[self.actors[i].run.remote()] = i

    def _poll_evaluation(self, now: float) -> None:
        """Log a finished evaluation; start the next one when it is due. Never waits."""
        if self.evaluator is None:
            return
        ray = self._ray
        if self._eval_ref is not None:
            if not ray.wait([self._eval_ref], timeout=0)[0]:
                return
            try:
                self._log_evaluation(ray.get(self._eval_ref))
            except ray.exceptions.RayError as exc:
                print(f"evaluation failed: {exc}", flush=True)
            self._eval_ref = None
        if now - self._last_eval < self.cfg.eval_interval_s:
            return
        try:
            latest = ray.get(self.learner.latest_weights.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if latest is None or latest[0] == 0:
            return  # nothing learnt yet
        version, (weights,) = latest
        video = self.cfg.eval_video and self._evals % 3 == 0
        self._eval_ref = self.evaluator.evaluate.remote(
            version, weights, self.cfg.eval_episodes, video
        )
        self._eval_step, self._last_eval = self.counters.env_frames, now
        self._evals += 1

    def _log_evaluation(self, result: dict) -> None:
        from common.video import log_video

        w, step = self.writer, self._eval_step  # frames when those weights were taken
        for key in ("mean", "std", "min", "max"):
            w.add_scalar(f"eval/episodic_return_{key}", result[key], step)
        w.add_scalar("eval/episodic_length_mean", result["mean_length"], step)
        w.add_scalar("eval/truncated_episodes", result["num_truncated"], step)
        w.add_scalar("eval/weights_version", result["weights_version"], step)
        if result["human_normalized"] is not None:
            w.add_scalar("eval/human_normalized_score", result["human_normalized"], step)
        if result["video_gif"] is not None:
            log_video(w, "eval/video", result["video_gif"], step)
        print(
            f"eval (weights v{result['weights_version']}): {result['mean']:.1f} "
            f"+/- {result['std']:.1f} over {result['episodes']} episodes",
            flush=True,
        )

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
        for a in self.actors:
            a.set_learner.remote(self.learner)
        self.learner_run = self.learner.run.remote()
        print(f"learner: {self._ray.get(self.learner.where.remote())}", flush=True)

    def _collect(self) -> dict[str, float]:
        ray, c, w = self._ray, self.counters, self.writer
        # One drain in flight per actor, kept until it answers: an actor that is slow,
        # still starting or waiting for a node delays nobody, and its counts are not lost.
        asked = set(self._drains.values())
        for i, a in enumerate(self.actors):
            if i not in asked:
                self._drains[a.drain.remote()] = i
        ready, _ = ray.wait(
            list(self._drains), num_returns=len(self._drains), timeout=self.cfg.log_interval_s
        )
        for ref in ready:
            del self._drains[ref]
            try:
                report = ray.get(ref)
            except ray.exceptions.RayError:
                continue
            i = report["index"]
            c.env_frames += report["env_steps"] * self.cfg.frame_skip
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
            c.recent_scores = (c.recent_scores + scores)[-100:]
        shard_refs = [s.stats.remote() for s in self.shards]
        for s, ref in enumerate(shard_refs):  # actor i pushes to shard i % S
            try:
                stats = ray.get(ref, timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            for key in ("size", "added", "dropped"):
                w.add_scalar(f"replay/{s}/{key}", stats[key], c.env_frames)
        try:
            return ray.get(self.learner.stats.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            return {}  # a dead learner is restarted by _supervise

    def _log(self, fps: float, ups: float | None, learner: dict[str, float]) -> None:
        c, w, cfg = self.counters, self.writer, self.cfg
        step = c.env_frames
        for key, value in learner.items():
            if "/" in key:
                w.add_scalar(key, value, step)
        version = learner.get("weights_version", -1)
        known = self.versions[self.versions >= 0]
        lag = float(version - known.mean()) if len(known) else float("nan")
        for i, v in enumerate(self.versions):
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
        w.flush()
        recent = f"{np.mean(c.recent_scores):.1f}" if c.recent_scores else "-"
        best = f"{c.best_score:.0f}" if c.episodes else "-"
        eta = max(0, cfg.total_frames - step) / fps if fps > 0 else float("inf")
        print(
            f"[{_hms(c.wall_time_s)}] frames {_si(step)}/{_si(cfg.total_frames)}"
            f"  fps {fps:,.0f}  upd/s {ups if ups is not None else 0:.1f}"
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
        for a in self.actors:
            a.stop.remote()
        self.learner.stop.remote()
        with contextlib.suppress(Exception):
            ray.wait(
                [self.learner_run, *self.actor_runs],
                num_returns=1 + len(self.actor_runs),
                timeout=10,
            )
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

    from actors.actor import Actor
    from common.networks import build_network, state_dict_to_numpy
    from common.schedules import actor_epsilons
    from learner.learning import Learner
    from learner.pipeline import LocalSampler, to_torch
    from replay.shard import ReplayShard

    torch.manual_seed(seed)
    shard = ReplayShard(cfg.replay_capacity, cfg.priority_alpha, seed=seed)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    learner = Learner(cfg, num_actions, device)
    sampler = LocalSampler([shard], cfg.batch_size, seed=seed)
    epsilons = actor_epsilons(0, 1, env.num_envs, cfg.epsilon_spread)
    net = build_network(num_actions, cfg.network, cfg.dueling)
    actor = Actor(
        cfg, 0, env, net, epsilons, shard.add,
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


def _raise_interrupt(signum, frame) -> None:
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
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(
        f"apex-dqn: {cfg.game}, {cfg.num_actors} actors x {cfg.envs_per_actor} envs, "
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
            if driver is not None:
                driver.save_checkpoint()
        finally:
            if driver is not None:
                driver.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
