"""Run directories: a run never writes into another's, the default one is never shared,
and ``train.py`` refuses, before Ray starts and without touching a file, to mix two runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config, resolve_auto
from apex_dqn.driver import rundir, session
from apex_dqn.driver.rundir import Run, RunDirError

REPO = Path(__file__).resolve().parents[2]
RUN = "run0000aaaa"
OTHER = "run0000bbbb"
GIB = 1 << 30


def _saved_config(directory: Path) -> Config:
    return resolve_auto(
        Config(network="dqn2013", logdir=str(directory), total_frames=50_000, lr=2e-4),
        cpus=2, gpus=0, memory_bytes=8 * GIB,
    )  # fmt: skip


def make_run(directory: Path, run_id: str | None, steps: tuple[int, ...] = (40, 60)) -> None:
    """A run's directory as ``train.py`` leaves it: checkpoints with their owner files, a
    TensorBoard event file, and the run id file (without one when ``run_id`` is None: a
    run from before runs had ids)."""
    from torch.utils.tensorboard import SummaryWriter

    from apex_dqn.learner.learning import Learner

    cfg = _saved_config(directory)
    state = Learner(cfg, 6).state_dict()
    for step in steps:
        content = {"config": cfg.to_dict(), "learner": {**state, "updates": step},
                   "counters": {"env_frames": 100 * step}}  # fmt: skip
        path = checkpoint.save(directory, content, step=step, keep=5, run_id=run_id or OTHER)
        if run_id is None:  # as an earlier version wrote it: no run id, no owner file
            Path(f"{path}{checkpoint.OWNER_SUFFIX}").unlink()
            torch.save({"format": checkpoint.FORMAT, **content}, path)
    if run_id is not None:
        checkpoint.publish_run_id(directory, run_id)
    writer = SummaryWriter(str(directory))
    writer.add_scalar("charts/episodic_return", 1.0, 0)
    writer.close()


def snapshot(*directories: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directories``: its bytes and modification time."""
    return {
        str(p): (p.read_bytes(), p.stat().st_mtime_ns)
        for d in directories
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------ units
def test_run_files_are_checkpoints_event_files_and_the_run_id(tmp_path):
    assert rundir.run_files(tmp_path / "missing") == []
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".checkpoint-0000000001.pt-abc.tmp").write_text("x")
    (tmp_path / "checkpoint-0000000001.pt.run").write_text(RUN)
    assert rundir.run_files(tmp_path) == []
    for name in ("checkpoint-0000000001.pt", "events.out.tfevents.1.host.1.0", "run-id"):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_bytes(b"x")
        assert rundir.run_files(d) == [name]


def test_free_name_is_the_first_sibling_that_does_not_exist(tmp_path):
    run = tmp_path / "run"
    assert rundir.free_name(run) == tmp_path / "run-2"
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-3").write_text("a file takes the name too")
    assert rundir.free_name(run) == tmp_path / "run-4"


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    first = rundir.new_default("SpaceInvaders")
    second = rundir.new_default("space_invaders")
    assert first == Path("runs/space_invaders-20250101-120000")
    assert second == Path("runs/space_invaders-20250101-120000-2")
    assert first.is_dir() and second.is_dir() and not any(second.iterdir())


def test_check_new_refuses_a_directory_holding_a_run(tmp_path):
    rundir.check_new(tmp_path / "missing")
    (tmp_path / "unrelated.txt").write_text("not a run")
    rundir.check_new(tmp_path)  # a directory without a run is free
    make_run(tmp_path / "a", RUN)
    with pytest.raises(RunDirError) as info:
        rundir.check_new(tmp_path / "a")
    a = tmp_path / "a"
    assert str(info.value) == (
        f"--logdir {a} already holds a run (checkpoint-0000000040.pt and 3 more): continue "
        f"it with --resume {a}, or start a new run in a free directory, e.g. --logdir {a}-2"
    )


def _newest(directory: Path) -> Path:
    return checkpoint.list_checkpoints(directory)[-1]


def test_resume_in_place_keeps_the_run_id(tmp_path):
    make_run(tmp_path, RUN)
    assert rundir.for_resume(_newest(tmp_path), RUN, "") == Run(tmp_path, RUN)


def test_resume_in_place_of_a_run_without_an_id_adopts_its_checkpoint(tmp_path):
    make_run(tmp_path, None)
    newest = _newest(tmp_path)
    run = rundir.for_resume(newest, None, "")
    assert run.directory == tmp_path and run.adopt == newest
    assert run.run_id not in (None, RUN, OTHER)
    before = snapshot(tmp_path)
    rundir.claim(run)
    assert checkpoint.read_run_id(tmp_path) == run.run_id
    assert checkpoint.owner(newest) == run.run_id  # the other checkpoint stays ownerless
    assert [checkpoint.owner(p) for p in checkpoint.list_checkpoints(tmp_path)] == [
        None, run.run_id,
    ]  # fmt: skip
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_resume_refuses_another_runs_directory(tmp_path):
    make_run(tmp_path / "a", RUN)
    make_run(tmp_path / "b", OTHER)
    a, b = tmp_path / "a", tmp_path / "b"
    # A checkpoint of run b copied into run a's directory, continued there.
    stray = a / "checkpoint-0000000099.pt"
    stray.write_bytes(_newest(b).read_bytes())
    with pytest.raises(RunDirError, match=rf"is not of run {RUN}, whose directory .*{a}-2$"):
        rundir.for_resume(stray, OTHER, "")
    # Run b continued into run a's directory.
    with pytest.raises(RunDirError, match=rf"^--logdir {a} holds another run \({RUN}\)"):
        rundir.for_resume(_newest(b), OTHER, str(a))
    # ... or into a directory of a run without an id.
    make_run(tmp_path / "old", None)
    with pytest.raises(RunDirError, match="already holds another run"):
        rundir.for_resume(_newest(b), OTHER, str(tmp_path / "old"))
    # A free directory, or one of its own run, takes it.
    assert rundir.for_resume(_newest(b), OTHER, str(tmp_path / "new")).directory == (
        tmp_path / "new"
    )
    assert rundir.for_resume(_newest(b), OTHER, str(b)) == Run(b, OTHER)


def test_a_directory_claimed_by_another_run_meanwhile_stops_this_one(tmp_path):
    rundir.claim(Run(tmp_path, RUN))
    rundir.claim(Run(tmp_path, RUN))  # the same run again: fine
    with pytest.raises(RunDirError, match=rf"taken by another run \({RUN}\) while this one"):
        rundir.claim(Run(tmp_path, OTHER))
    assert checkpoint.read_run_id(tmp_path) == RUN


# ------------------------------------------------------------------ train.prepare
@pytest.fixture
def local(monkeypatch):
    """``train.prepare`` as on a machine where Ray will be local."""
    monkeypatch.setattr(session, "cluster_address", lambda cfg: None)
    import train

    return train


def test_a_new_run_gets_a_default_directory_of_its_own(tmp_path, monkeypatch, local):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    cfg1, _, _, run1 = local.prepare(["--game", "Breakout"])
    cfg2, _, _, run2 = local.prepare(["--game", "breakout"])
    assert run1.directory == Path("runs/breakout-20250101-120000")
    assert run2.directory == Path("runs/breakout-20250101-120000-2")
    assert (cfg1.logdir, cfg2.logdir) == (str(run1.directory), str(run2.directory))
    assert run1.run_id != run2.run_id


def test_resume_with_only_the_directory_continues_with_the_saved_settings(tmp_path, local, capsys):
    make_run(tmp_path, RUN)
    before = snapshot(tmp_path)
    cfg, resume, _, run = local.prepare(["--resume", str(tmp_path)])
    assert run == Run(tmp_path, RUN)
    assert resume["path"] == str(_newest(tmp_path))
    assert cfg == _saved_config(tmp_path).replace(resume=str(tmp_path))
    assert "changed on resume" not in capsys.readouterr().out
    cfg, _, _, _ = local.prepare(["--resume", str(tmp_path), "--lr", "5e-05"])
    assert cfg.lr == 5e-5
    assert capsys.readouterr().out == "changed on resume: --lr 0.0002 -> 5e-05\n"
    assert snapshot(tmp_path) == before  # preparing only reads


# --------------------------------------------------------------- the command itself
def _train(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def _refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    return lines[0]


def test_train_refuses_a_directory_holding_another_run_and_leaves_it(tmp_path):
    """A new run, or another run resumed, pointed at a directory holding a run: one
    line, status 2, and every file of both runs as it was (same bytes, same mtime)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_run(a, RUN)
    make_run(b, OTHER)
    before = snapshot(a, b)
    line = _refused(_train("--logdir", str(a), "--total-frames", "1000"))
    assert f"--logdir {a} already holds a run" in line
    assert f"--resume {a}" in line and f"--logdir {a}-2" in line
    line = _refused(_train("--resume", str(b), "--logdir", str(a)))
    assert f"--logdir {a} holds another run ({RUN})" in line and f"--logdir {a}-2" in line
    assert snapshot(a, b) == before
    assert not (tmp_path / "a-2").exists()
