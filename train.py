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
    from apex_dqn.common.config import (
        Config,
        ConfigError,
        from_args,
        resolve_auto,
        resume_config,
        validate,
    )
    from apex_dqn.driver import rundir, session
except ModuleNotFoundError as exc:  # run from a checkout that was never installed
    if exc.name != "apex_dqn":
        raise
    print("train.py: error: the apex_dqn package is not installed: run `pip install "
          "torch==2.13.0 && pip install -e .` in the repository first", file=sys.stderr)
    sys.exit(2)

PROG = "train.py"
REPLAY_TIMEOUT_S = 900.0  # the longest the driver waits for the shards to save or load replay


def prepare(argv: list[str] | None) -> tuple[Config, dict | None, str | None, rundir.Run]:
    """Parse and validate everything that can be checked before Ray starts.

    Returns the config (autos resolved from this machine when Ray will be local), the
    checkpoint to resume from, the address of the cluster to join, if any, and the run:
    its directory and id.

    A new run gets a directory that holds no other run (:func:`rundir.check_new`; the
    default one is created here, empty). ``--resume`` loads the checkpoint and takes
    every setting from it; flags given change the run's settings, except the structural
    ones (:data:`checkpoint.STRUCTURAL`), and each change is printed as
    ``changed on resume: --lr 0.0001 -> 5e-05`` (:func:`resume_config`). A checkpoint
    that is not one, or whose learner state does not fit the networks its config names,
    is refused here in one line; the file is only read.
    """
    try:
        cfg = from_args(argv)
    except ConfigError as exc:
        fail(PROG, str(exc))
    resume, changes, run = None, [], None
    try:
        if cfg.resume:
            resume = checkpoint.load(cfg.resume)
            cfg, changes = resume_config(
                resume["config"], argv, fixed=checkpoint.STRUCTURAL,
                source=f"checkpoint {resume['path']}",
            )  # fmt: skip
            validate(cfg)
            run = rundir.for_resume(resume["path"], resume["run_id"], cfg.logdir)
            cfg = cfg.replace(logdir=str(run.directory))
        else:
            validate(cfg)
            if cfg.logdir:
                rundir.check_new(cfg.logdir)
                run = rundir.Run(Path(cfg.logdir), checkpoint.new_run_id())
        address = session.cluster_address(cfg)
        if address is None:
            cpus, gpus, memory = _local_resources()
            cfg = resolve_auto(cfg, cpus=cpus, gpus=gpus, memory_bytes=memory)
            validate(cfg, gpus=gpus)
        if resume is not None:
            from apex_dqn.common.envs import num_actions
            from apex_dqn.learner.learning import check_learner_state

            check_learner_state(cfg, num_actions(cfg.game), resume["learner"], resume["path"])
    except (ConfigError, checkpoint.CheckpointError) as exc:
        fail(PROG, str(exc))
    if run is None:  # the default directory, taken only once everything else passed
        run = rundir.Run(rundir.new_default(cfg.game), checkpoint.new_run_id())
    cfg = cfg.replace(logdir=str(run.directory))
    for change in changes:
        print(f"changed on resume: {change}", flush=True)
    return cfg, resume, address, run


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
    files = _replay_files(replay_from, cfg.replay_shards)
    shards = [
        start_shard(
            s, per_shard, cfg.priority_alpha, seed=cfg.seed + s, memory=memory,
            placement=placement, wire=cfg.replay_wire, restore=files[s],
        )
        for s in range(cfg.replay_shards)
    ]  # fmt: skip
    min_replay = 1 if _restored_replay(shards, files) > 0 else None

    def new_learner(state: dict | None) -> Any:
        return start_learner(
            cfg, shards, actions, state, node=placement.learner_node, min_replay=min_replay
        )

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


def _replay_files(replay_from: str | None, shards: int) -> list[str | None]:
    """Each shard's saved replay file beside checkpoint ``replay_from`` (None: none to
    load); a missing one is said in one line and that shard starts empty."""
    if replay_from is None:
        return [None] * shards
    files: list[str | None] = []
    for s in range(shards):
        path = checkpoint.replay_path(replay_from, s)
        if path.is_file():
            files.append(str(path))
        else:
            print(f"replay shard {s} starts empty: {path} does not exist", flush=True)
            files.append(None)
    unused = sorted(s for s in checkpoint.replay_files(replay_from) if s >= shards)
    if unused:
        print(f"replay of saved shard(s) {', '.join(map(str, unused))} not restored: this "
              f"run has {shards} shard(s)", flush=True)  # fmt: skip
    return files


def _restored_replay(shards: list[Any], files: list[str | None]) -> int:
    """Wait for the shards given a file to load it; one line each: what it restored, or
    why it starts empty. Returns the transitions restored over all shards."""
    import ray

    deadline = time.monotonic() + REPLAY_TIMEOUT_S
    total = 0
    for s, (shard, path) in enumerate(zip(shards, files, strict=True)):
        if path is None:
            continue
        try:
            count, error = ray.get(
                shard.restored.remote(), timeout=max(1.0, deadline - time.monotonic())
            )
        except (ray.exceptions.RayError, TimeoutError) as exc:
            count, error = 0, f"it did not say what it restored ({type(exc).__name__})"
        if error is not None:
            print(f"replay shard {s} starts empty: {error}", flush=True)
        else:
            print(f"replay shard {s} restored {count:,} transitions from {path}", flush=True)
        total += count
    if total:
        print(f"replay restored: {total:,} transitions; learning starts without waiting for "
              "--replay-min-size", flush=True)  # fmt: skip
    return total


def _newest_learner_state(logdir: str) -> tuple[dict | None, str]:
    """The learner's state in the run's newest readable checkpoint, and where it came from
    (the one before if the newest cannot be read: a learner never restarts blank while
    the run has a checkpoint to give it)."""
    found = checkpoint.list_checkpoints(logdir, checkpoint.read_run_id(logdir))
    for path in reversed(found):
        try:
            return checkpoint.load(path)["learner"], str(path)
        except checkpoint.CheckpointError as exc:
            print(f"cannot restart the learner from {path}: {exc}", flush=True)
    return None, "scratch (no checkpoint of this run yet)"


class Driver:
    """Runs the program until the frame budget is spent; checkpoints; shuts it down.

    ``run_id`` is the run's id: stored in each checkpoint, whose pruning touches only the
    run's own files (:mod:`apex_dqn.common.checkpoint`).
    """

    def __init__(self, cfg: Config, resume: dict | None, run_id: str):
        from torch.utils.tensorboard import SummaryWriter

        from apex_dqn.driver.metrics import (
            Counters,
            RunMetrics,
            config_table,
            custom_scalars_layout,
            write_hparams,
        )

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
        """The learner's state and the driver's counters, written atomically as a
        checkpoint of this run; only this run's older checkpoints are pruned.

        A checkpoint that cannot be taken (the learner does not answer, the disk is full)
        is reported in one line and the run goes on: the previous one is still there.
        With ``--save-replay`` every shard then writes its contents beside it
        (:meth:`save_replay`).
        """
        import ray

        try:
            state = ray.get(self.supervisor.learner.handle.state.remote(), timeout=300)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"no checkpoint: the learner did not answer ({type(exc).__name__})", flush=True)
            return None
        try:
            path = checkpoint.save(
                self.cfg.logdir,
                {"run_id": self.run_id, "config": self.cfg.to_dict(), "learner": state,
                 "counters": vars(self.metrics.counters).copy()},
                step=int(state["updates"]),
                keep=self.cfg.keep_checkpoints,
                run_id=self.run_id,
            )  # fmt: skip
        except (checkpoint.CheckpointError, OSError) as exc:
            print(f"no checkpoint: {exc}", flush=True)
            return None
        print(f"checkpoint {path}", flush=True)
        if self.cfg.save_replay:
            self.save_replay(path)
        return path

    def save_replay(self, path: Path) -> None:
        """Ask every shard to write its contents beside checkpoint ``path`` (each writes
        its own file, atomically: ``checkpoint.replay_path``), and wait for them all.

        One line for what was saved, and one per shard that could not save (it is
        restarting, the disk is full): resuming from this checkpoint then starts that
        shard empty, and the run goes on.
        """
        import ray

        asked = [(c.index, c.handle.save_replay.remote(str(checkpoint.replay_path(path, c.index))))
                 for c in self.supervisor.shards]  # fmt: skip
        deadline = time.monotonic() + REPLAY_TIMEOUT_S
        items = size = saved = 0
        slowest = 0.0
        for s, ref in asked:
            try:
                count, nbytes, seconds = ray.get(
                    ref, timeout=max(1.0, deadline - time.monotonic())
                )
            except (ray.exceptions.RayError, TimeoutError) as exc:
                cause = getattr(exc, "cause", None) or exc
                why = (str(cause).splitlines() or [""])[0]
                print(f"replay shard {s} not saved: {type(cause).__name__}: {why}", flush=True)
                continue
            items, size, saved = items + count, size + nbytes, saved + 1
            slowest = max(slowest, seconds)
        print(f"replay saved: {items:,} transitions of {saved}/{len(asked)} shard(s), "
              f"{size / 2**20:,.1f} MiB, in {slowest:.1f}s", flush=True)  # fmt: skip

    def final_checkpoint(self) -> None:
        """Save a last checkpoint; if that fails, say which one the run continues from."""
        if self.save_checkpoint() is None:  # e.g. a signal reached Ray's processes too
            kept = checkpoint.list_checkpoints(self.cfg.logdir, self.run_id)
            print(f"the run continues from {kept[-1] if kept else 'nothing: no checkpoint'}"
                  f" with --resume {self.cfg.logdir}", flush=True)  # fmt: skip

    def shutdown(self) -> None:
        self.supervisor.stop()
        self.writer.close()


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
    driver = None
    try:
        driver = Driver(cfg, resume, run.run_id)
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
