"""Train an Ape-X agent: the one place that builds and drives the distributed program.

    python train.py                       # local Ray, defaults sized for this machine
    python train.py --address auto        # join a running cluster (or set RAY_ADDRESS)
    ray submit deploy/cluster.yaml train.py -- --num-actors 64 --max-actors 256

The program (:func:`build_program`): ``replay_shards`` replay shards; one learner (on a
GPU when there is one) sampling them; ``num_actors`` actors, more up to ``max_actors``
as CPUs become free, actor i pushing to shard i % S and pulling weights from the
learner; an evaluator now and then. What each asks of Ray is declared beside its class
(``start_shard``, ``start_learner``, ``start_actor``, ``start_evaluator``).

The driver (:class:`Driver`) only watches: every second the supervisor brings back what
died and grows the actor population (``driver/supervisor.py``); every log interval the
run metrics are collected and written to the console and TensorBoard
(``driver/metrics.py``); every few minutes, and when the run stops (frame budget,
Ctrl-C or SIGTERM), the learner is checkpointed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

try:
    from apex_dqn.common import checkpoint
    from apex_dqn.common.cli import fail
    from apex_dqn.common.config import Config, ConfigError, from_args, resolve_auto, validate
    from apex_dqn.driver import session
except ModuleNotFoundError as exc:  # run from a checkout that was never installed
    if exc.name != "apex_dqn":
        raise
    print("train.py: error: the apex_dqn package is not installed: run `pip install "
          "torch==2.13.0 && pip install -e .` in the repository first", file=sys.stderr)
    sys.exit(2)

PROG = "train.py"


def prepare(argv: list[str] | None) -> tuple[Config, dict | None, str | None]:
    """Parse and validate everything that can be checked before Ray starts.

    Returns the config (autos resolved from this machine when Ray will be local), the
    checkpoint to resume from, and the address of the cluster to join, if any.
    """
    try:
        cfg = from_args(argv)
    except ConfigError as exc:
        fail(PROG, str(exc))
    resume = None
    address = session.cluster_address(cfg)
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
        fail(PROG, str(exc))
    return cfg, resume, address


def _local_resources() -> tuple[int, int, int]:
    import psutil
    import torch

    return os.cpu_count() or 1, int(torch.cuda.is_available()), psutil.virtual_memory().total


def resolve_on_cluster(cfg: Config) -> Config:
    """Resolve the autos from the cluster joined (or started), and check them there."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    resolved = resolve_auto(
        cfg,
        cpus=int(resources.get("CPU", 1)),
        gpus=gpus,
        memory_bytes=int(resources.get("memory", 8 << 30)),
    )
    validate(resolved, gpus=gpus)
    return resolved


def build_program(cfg: Config, learner_state: dict | None, writer: Any) -> tuple[Any, Any]:
    """The whole distributed program, started: (supervisor, periodic evaluation or None)."""
    from apex_dqn.actors.worker import start_actor
    from apex_dqn.common.envs import num_actions
    from apex_dqn.driver.supervisor import Supervisor
    from apex_dqn.evaluation.periodic import PeriodicEvaluation
    from apex_dqn.learner.worker import start_learner
    from apex_dqn.replay.worker import reserved_memory, start_shard

    actions = num_actions(cfg.game)
    per_shard = cfg.replay_capacity // cfg.replay_shards
    memory = reserved_memory(per_shard)
    shards = [
        start_shard(s, per_shard, cfg.priority_alpha, seed=cfg.seed + s, memory=memory)
        for s in range(cfg.replay_shards)
    ]

    def new_learner(state: dict | None) -> Any:
        return start_learner(cfg, shards, actions, state)

    def new_actor(i: int, learner: Any) -> Any:  # actor i pushes to shard i % S
        return start_actor(cfg, i, shards[i % len(shards)], learner, actions)

    supervisor = Supervisor(
        cfg, shards, new_learner, new_actor,
        restore=lambda: _newest_learner_state(cfg.logdir),
        learner_state=learner_state,
    )  # fmt: skip
    evaluation = None
    if cfg.eval_interval_s > 0:
        import ray

        evaluation = PeriodicEvaluation(ray, cfg, actions, writer)
    return supervisor, evaluation


def _newest_learner_state(logdir: str) -> tuple[dict | None, str]:
    """The learner's state in the newest checkpoint, and where it came from."""
    try:
        saved = checkpoint.load(logdir)
    except checkpoint.CheckpointError as exc:
        return None, f"scratch ({exc})"
    return saved["learner"], saved["path"]


class Driver:
    """Runs the program until the frame budget is spent; checkpoints; shuts it down."""

    def __init__(self, cfg: Config, resume: dict | None):
        from torch.utils.tensorboard import SummaryWriter

        from apex_dqn.driver.metrics import (
            Counters,
            RunMetrics,
            config_table,
            custom_scalars_layout,
            write_hparams,
        )

        self.cfg = cfg
        self.writer = SummaryWriter(cfg.logdir)
        self.writer.add_text("config", config_table(cfg), global_step=0)
        self.writer.add_custom_scalars(custom_scalars_layout())
        write_hparams(self.writer, cfg)
        counters = Counters(**resume["counters"]) if resume else Counters()
        self.metrics = RunMetrics(cfg, self.writer, counters)
        self.supervisor, self.evaluation = build_program(
            cfg, resume["learner"] if resume else None, self.writer
        )

    def run(self) -> None:
        cfg, c = self.cfg, self.metrics.counters
        start = time.monotonic() - c.wall_time_s
        last_log = last_ckpt = time.monotonic()
        last_frames, last_updates = c.env_frames, None
        print(f"logging to {cfg.logdir}  (tensorboard --logdir {cfg.logdir})", flush=True)
        while c.env_frames < cfg.total_frames:
            time.sleep(min(1.0, cfg.log_interval_s))
            self.supervisor.supervise()
            if self.evaluation is not None:
                self.evaluation.poll(self.supervisor.learner.handle, c.env_frames)
            now = time.monotonic()
            if now - last_log >= cfg.log_interval_s:
                c.wall_time_s = now - start
                learner = self.metrics.collect(self.supervisor)
                fps = (c.env_frames - last_frames) / (now - last_log)
                ups = None
                if learner is not None and last_updates is not None:
                    ups = (learner.updates - last_updates) / (now - last_log)
                if learner is not None:
                    last_updates = learner.updates
                self.metrics.log(fps, ups, learner, self.supervisor)
                last_log, last_frames = now, c.env_frames
            if now - last_ckpt >= cfg.checkpoint_interval_s:
                self.save_checkpoint()
                last_ckpt = now
        c.wall_time_s = time.monotonic() - start
        print(f"reached {c.env_frames:,} frames", flush=True)
        if self.evaluation is not None:
            self.evaluation.finish()

    def save_checkpoint(self) -> Path | None:
        """The learner's state and the driver's counters, written atomically."""
        import ray

        try:
            state = ray.get(self.supervisor.learner.handle.state.remote(), timeout=300)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"no checkpoint: the learner did not answer ({type(exc).__name__})", flush=True)
            return None
        path = checkpoint.save(
            self.cfg.logdir,
            {"config": self.cfg.to_dict(), "learner": state,
             "counters": vars(self.metrics.counters).copy()},
            step=int(state["updates"]),
            keep=self.cfg.keep_checkpoints,
        )  # fmt: skip
        print(f"checkpoint {path}", flush=True)
        return path

    def final_checkpoint(self) -> None:
        """Save a last checkpoint; if the learner is gone, say which one the run has."""
        if self.save_checkpoint() is None:  # a signal reached Ray's processes too
            kept = checkpoint.list_checkpoints(self.cfg.logdir)
            print(f"the run continues from {kept[-1] if kept else 'nothing: no checkpoint'}"
                  " with --resume", flush=True)  # fmt: skip

    def shutdown(self) -> None:
        self.supervisor.stop()
        self.writer.close()


def main(argv: list[str] | None = None) -> int:
    cfg, resume, address = prepare(argv)
    import ray

    session.start_ray(cfg, address)
    try:
        cfg = resolve_on_cluster(cfg)
    except ConfigError as exc:
        ray.shutdown()
        fail(PROG, str(exc))
    session.stop_on_first_signal()
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
        session.ignore_signals()  # neither a second Ctrl-C nor a SIGTERM cuts the checkpoint
        try:
            if driver is not None:
                driver.final_checkpoint()
        finally:
            if driver is not None:
                driver.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
