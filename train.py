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
(``driver/metrics.py``), and near the frame budget the actors' frames every second;
every few minutes, and when the run stops (frame budget,
Ctrl-C or SIGTERM), the learner is checkpointed. After the last checkpoint, once the
program has stopped, the final weights are evaluated (``evaluation/final.py``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

try:
    from apex_dqn.common.cli import fail
    from apex_dqn.common.config import Config, ConfigError
    from apex_dqn.driver import rundir, session
    from apex_dqn.driver.prepare import PROG, prepare, resolve_on_cluster
    from apex_dqn.replay import rate_limiter as replay_ratio
except ModuleNotFoundError as exc:  # run from a checkout that was never installed
    if exc.name != "apex_dqn":
        raise
    print(
        "train.py: error: the apex_dqn package is not installed: run `pip install "
        "torch==2.13.0 && pip install -e .` in the repository first",
        file=sys.stderr,
    )
    sys.exit(2)


def build_program(
    cfg: Config, learner_state: dict | None, writer: Any, replay_from: str | None = None
) -> tuple[Any, Any]:
    """The whole distributed program, started: (supervisor, periodic evaluation or None).

    ``replay_from``: the checkpoint whose saved replay the shards start from (``--resume``
    of a run with ``--save-replay``): each shard loads its own file before the learner
    starts, and the learner then does not wait for ``--replay-min-size`` (the replay is
    the one it was learning from). Shards whose file is missing or unreadable start
    empty, one line each; with no transition restored at all, the learner waits as usual.
    """
    from apex_dqn.actors.worker import start_actor
    from apex_dqn.common.envs import num_actions
    from apex_dqn.driver.checkpoints import newest_learner_state, replay_files, restored_replay
    from apex_dqn.driver.supervisor import Supervisor
    from apex_dqn.evaluation.periodic import PeriodicEvaluation
    from apex_dqn.learner.worker import start_learner
    from apex_dqn.replay.worker import plan_placement, reserved_memory, start_shard

    actions = num_actions(cfg.game)
    per_shard = cfg.replay_capacity // cfg.replay_shards
    memory = reserved_memory(per_shard)
    placement = plan_placement(
        cfg.replay_placement, cfg.replay_shards, per_shard, gpu=cfg.device == "cuda"
    )
    print(placement.message, flush=True)
    files = replay_files(replay_from, cfg.replay_shards)
    shards = [
        start_shard(
            s, per_shard, cfg.priority_alpha, seed=cfg.seed + s, memory=memory,
            placement=placement, wire=cfg.replay_wire, restore=files[s],
        )
        for s in range(cfg.replay_shards)
    ]  # fmt: skip
    min_replay = 1 if restored_replay(shards, files) > 0 else None

    def new_learner(state: dict | None) -> Any:
        return start_learner(
            cfg, shards, actions, state, node=placement.learner_node, min_replay=min_replay
        )

    def new_actor(i: int, learner: Any) -> Any:  # actor i pushes to shard i % S
        return start_actor(cfg, i, shards[i % len(shards)], learner, actions)

    supervisor = Supervisor(
        cfg, shards, new_learner, new_actor,
        restore=lambda: newest_learner_state(cfg.logdir),
        learner_state=learner_state,
    )  # fmt: skip
    evaluation = None
    if cfg.eval_interval_s > 0:
        import ray

        evaluation = PeriodicEvaluation(ray, cfg, actions, writer)
    return supervisor, evaluation


class Driver:
    """Runs the program until the frame budget is spent; checkpoints; shuts it down.

    ``run_id`` is the run's id: stored in each checkpoint, whose pruning touches only the
    run's own files (:class:`~apex_dqn.driver.checkpoints.RunCheckpoints`).
    """

    def __init__(self, cfg: Config, resume: dict | None, run_id: str):
        from torch.utils.tensorboard import SummaryWriter

        from apex_dqn.common import checkpoint
        from apex_dqn.driver.checkpoints import RunCheckpoints
        from apex_dqn.driver.metrics import (
            Counters,
            RunMetrics,
            config_table,
            custom_scalars_layout,
            write_hparams,
        )
        from apex_dqn.driver.mirror import start_copy

        self.cfg, self.run_id = cfg, run_id
        self.writer = SummaryWriter(cfg.logdir)
        self.writer.add_text("config", config_table(cfg), global_step=0)
        self.writer.add_custom_scalars(custom_scalars_layout())
        write_hparams(self.writer, cfg)
        counters = Counters(**resume["counters"]) if resume else Counters()
        self.metrics = RunMetrics(cfg, self.writer, counters)
        replay_from = None  # the checkpoint whose saved replay the shards load, if any
        if resume is not None:
            saved = resume["config"].get("save_replay") or checkpoint.replay_files(resume["path"])
            replay_from = resume["path"] if saved else None
        self.supervisor, self.evaluation = build_program(
            cfg, resume["learner"] if resume else None, self.writer, replay_from
        )
        # With --storage, a thread copies the run there after each checkpoint.
        self.storage = start_copy(cfg, run_id, flush=self.writer.flush)
        self.checkpoints = RunCheckpoints(cfg, run_id, self.supervisor, counters, self.storage)

    def run(self) -> None:
        cfg, c = self.cfg, self.metrics.counters
        start = time.monotonic() - c.wall_time_s
        last_log = last_ckpt = last_count = time.monotonic()
        last_frames, last_updates = c.env_frames, None
        fps = 0.0  # over the last log interval
        print(f"logging to {cfg.logdir}  (tensorboard --logdir {cfg.logdir})", flush=True)
        while c.env_frames < cfg.total_frames:
            time.sleep(min(1.0, cfg.log_interval_s))
            self.supervisor.supervise()
            if self.evaluation is not None:
                self.evaluation.poll(self.supervisor.learner.handle, c.env_frames)
            now = time.monotonic()
            due = now - last_log >= cfg.log_interval_s
            # Frames are counted when a log line is due, and every second where the
            # budget would run out before the next line: a run stops within about a
            # second's frames of --total-frames, not a log interval's.
            if not due and c.env_frames + fps * (now - last_count) >= cfg.total_frames:
                self.metrics.collect(self.supervisor, frames_only=True)
                last_count = now
            if due or c.env_frames >= cfg.total_frames:  # a line for the last seconds too
                c.wall_time_s = now - start
                learner = self.metrics.collect(self.supervisor)
                last_count = now
                fps = (c.env_frames - last_frames) / (now - last_log)
                ups = None
                if learner is not None and last_updates is not None:
                    ups = (learner.updates - last_updates) / (now - last_log)
                if learner is not None:
                    last_updates = learner.updates
                self.metrics.log(fps, ups, learner, self.supervisor)
                last_log, last_frames = now, c.env_frames
            if now - last_ckpt >= cfg.checkpoint_interval_s:
                self.checkpoints.save()
                last_ckpt = now
        c.wall_time_s = time.monotonic() - start
        print(f"reached {c.env_frames:,} frames", flush=True)
        if self.evaluation is not None:
            self.evaluation.finish()

    def finish(self, saved: Path | None) -> None:
        """Once the program and Ray have stopped: the final evaluation of the weights in
        ``saved`` (the final checkpoint), logged at the run's last frame count; then the
        TensorBoard writer is closed, and with ``--storage`` the run's last files copied."""
        from apex_dqn.evaluation.final import final_evaluation

        try:
            final_evaluation(self.cfg, saved, self.writer, self.metrics.counters.env_frames,
                             self.run_id)  # fmt: skip
        finally:
            self.writer.close()
            if self.storage is not None:
                self.storage.finish()


def main(argv: list[str] | None = None) -> int:
    cfg, resume, address, run = prepare(argv)
    import ray

    session.start_ray(cfg, address)
    try:
        cfg = resolve_on_cluster(cfg)
        rundir.claim(run)  # just before the run first writes to its directory
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
    from apex_dqn.learner.learning import choose_amp  # decided again on the learner's node

    print(f"learner arithmetic: {choose_amp(cfg.amp, cfg.device)}", flush=True)
    print(replay_ratio.describe(cfg), flush=True)
    driver = None
    try:
        driver = Driver(cfg, resume, run.run_id)
        driver.run()
    except KeyboardInterrupt:
        print("\ninterrupted: saving a checkpoint before stopping", flush=True)
    finally:
        session.ignore_signals()  # neither a second Ctrl-C nor a SIGTERM cuts the checkpoint
        saved = None
        try:
            if driver is not None:
                saved = driver.checkpoints.final()
        finally:
            if driver is not None:
                driver.supervisor.stop()
            ray.shutdown()
            if driver is not None:  # after the checkpoint: a signal now skips only this
                driver.finish(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
