"""Everything a run checks before Ray starts: the command line, the run directory, the
checkpoint to resume from, and the settings sized for this machine.

A mistake ends here, in one line and exit status 2, before any Ray process exists.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from apex_dqn.common import checkpoint, storage
from apex_dqn.common.cli import fail
from apex_dqn.common.config import (
    Config,
    ConfigError,
    build_parser,
    from_args,
    resolve_auto,
    resolve_preset,
    resume_config,
    validate,
    validate_flags,
)
from apex_dqn.driver import mirror, rundir, session

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
    is refused here in one line; the file is only read. A new run's ``--preset auto`` is
    resolved for this machine (or the cluster joined) and printed as ``preset auto ->
    laptop: no GPU, 2 CPUs`` (:func:`resolve_preset`); a resumed run keeps its preset.

    ``--storage`` is reached here, and a folder there holding another run refused
    (:func:`mirror.check_location`). ``--resume URI`` of a run's copy in storage
    (``s3://``, ``gs://``, or a local storage folder) downloads its newest readable
    checkpoint, resumes from it as from a local one, and once everything is checked
    fetches into the run directory what it lacks (:func:`mirror.fetch_run`).
    """
    try:
        cfg = from_args(argv)
    except ConfigError as exc:
        fail(PROG, str(exc))
    resume, changes, run, chosen = None, [], None, ""
    stored: storage.Storage | None = None  # resuming from the run's copy in storage
    staging: Path | None = None  # where its checkpoint was downloaded to
    try:
        if cfg.resume:
            if storage.is_uri(cfg.resume):  # the run's copy in storage
                stored = storage.open_storage(cfg.resume, "--resume")
                staging = Path(tempfile.mkdtemp(prefix="apex-dqn-resume-"))
                resume = mirror.fetch_checkpoint(stored, staging)
            else:
                resume = checkpoint.load(cfg.resume)
                if resume.get("exported_from"):  # evaluation/export.py's policy file
                    raise checkpoint.CheckpointError(
                        f"checkpoint {resume['path']} is a policy exported from "
                        f"{resume['exported_from']}, its online network alone: it can be "
                        "scored and watched, not resumed"
                    )
                stored = mirror.local_copy(resume)
            source = stored.uri(resume["stored"]) if stored else resume["path"]
            cfg, changes = resume_config(
                resume["config"], argv, fixed=checkpoint.STRUCTURAL, source=f"checkpoint {source}",
            )  # fmt: skip
            if stored is not None:
                cfg, changes = _from_storage(cfg, changes, stored, resume["config"], argv)
            validate(cfg)
            run = rundir.for_resume(resume["path"], resume["run_id"], cfg.logdir)
            cfg = cfg.replace(logdir=str(run.directory))
            if stored is not None:
                mirror.check_local_copy(run.directory, run.run_id, resume["stored"])
            _check_storage(cfg, run.run_id)
        else:
            validate_flags(cfg, argv)
            if cfg.logdir:
                rundir.check_new(cfg.logdir)
                _check_storage(cfg, None)
                run = rundir.Run(Path(cfg.logdir), checkpoint.new_run_id())
        address = session.cluster_address(cfg)
        cpus, gpus, memory = _local_resources() if address is None else (0, 0, 0)
        if resume is None:
            joined = address is not None
            cfg, chosen = resolve_preset(cfg, argv, cpus=cpus, gpus=gpus, joined=joined)
            validate(cfg)
        if address is None:
            cfg = resolve_auto(cfg, cpus=cpus, gpus=gpus, memory_bytes=memory)
            validate(cfg, gpus=gpus)
        if resume is not None:
            from apex_dqn.common.envs import num_actions
            from apex_dqn.learner.learning import check_learner_state

            check_learner_state(cfg, num_actions(cfg.game), resume["learner"], resume["path"])
    except (ConfigError, checkpoint.CheckpointError) as exc:
        _clean(staging)
        fail(PROG, str(exc))
    if run is None:  # the default directory, taken only once everything else passed
        run = rundir.Run(rundir.new_default(cfg.game), checkpoint.new_run_id())
        try:
            _check_storage(cfg.replace(logdir=str(run.directory)), None)
        except ConfigError as exc:
            run.directory.rmdir()  # created empty just now
            fail(PROG, str(exc))
    cfg = cfg.replace(logdir=str(run.directory))
    if stored is not None and resume is not None:  # everything checked: fetch the run
        try:
            resume["path"] = str(mirror.fetch_run(stored, resume, run.directory))
        except Exception as exc:
            fail(PROG, f"--resume {stored.uri()}: cannot fetch the run: {storage.describe(exc)}")
        finally:
            _clean(staging)
    if chosen:
        print(chosen, flush=True)
    for change in changes:
        print(f"changed on resume: {change}", flush=True)
    return cfg, resume, address, run


def _from_storage(
    cfg: Config, changes: list[str], stored: storage.Storage, saved: dict, argv: list[str] | None
) -> tuple[Config, list[str]]:
    """The config of a run resumed from its copy ``stored``: it keeps writing to the
    storage it came from (unless ``--storage`` is given), and continues in the directory
    it had, by the stored name (unless ``--logdir`` is given)."""
    given = vars(build_parser(only_given=True).parse_args(argv))
    if "storage" not in given:
        where = stored.parent().uri()
        if where != saved.get("storage"):
            before = saved.get("storage") or "''"
            changes = [*changes, f"--storage {before} -> {where}"]
        cfg = cfg.replace(storage=where)
    if "logdir" not in given:
        cfg = cfg.replace(logdir=str(Path(saved.get("logdir") or "runs").parent / stored.name))
    return cfg, changes


def _check_storage(cfg: Config, run_id: str | None) -> None:
    """With ``--storage``: reach it, and refuse a folder there that holds another run
    (``run_id`` None: a new run, which needs one that holds none)."""
    if cfg.storage:
        store = mirror.location(storage.open_storage(cfg.storage), cfg.logdir)
        mirror.check_location(store, run_id, str(rundir.free_name(cfg.logdir)))


def _clean(staging: Path | None) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)


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
