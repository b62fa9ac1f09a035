"""Everything a run checks before Ray starts: the command line, the run directory, the
checkpoint to resume from, and the settings sized for this machine.

A mistake ends here, in one line and exit status 2, before any Ray process exists.
"""

from __future__ import annotations

import os
from pathlib import Path

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

PROG = "train.py"


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


