"""Failure recovery with real processes: the learner is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import time

import pytest

from apex_dqn.benchmarks.train_run import TrainRun
from apex_dqn.common import checkpoint

TINY = [
    "--num-actors", "1", "--envs-per-actor", "4", "--replay-shards", "1",
    "--replay-capacity", "20000", "--replay-min-size", "400", "--batch-size", "16",
    "--network", "dqn2013", "--push-period", "20", "--publish-period", "5",
    "--weight-sync-period", "10", "--target-update-period", "10",
    "--log-interval-s", "2", "--checkpoint-interval-s", "4", "--final-eval-episodes", "0",
]  # fmt: skip


@pytest.mark.ray
@pytest.mark.rom
@pytest.mark.slow
def test_learner_killed_restarts_from_its_last_checkpoint(tmp_path):
    run = TrainRun([*TINY, "--total-frames", "100000000", "--logdir", str(tmp_path)])
    try:
        pid = int(run.wait_for(r"^learner: pid (\d+)", timeout=120).group(1))
        # Wait for a checkpoint holding real progress, then kill the learner outright.
        run.wait_for(r"checkpoint .*checkpoint-\d+\.pt", timeout=180)
        deadline = time.monotonic() + 180
        while (saved := checkpoint.load(tmp_path))["learner"]["updates"] == 0:
            assert time.monotonic() < deadline, "\n".join(run.lines[-30:])
            time.sleep(2)
        saved_updates = saved["learner"]["updates"]
        saved_frames = saved["counters"]["env_frames"]
        os.kill(pid, signal.SIGKILL)
        mark = len(run.lines)
        restart = run.wait_for(r"restarting it from (.*)", timeout=60, after=mark)
        assert "checkpoint-" in restart.group(1)
        new_pid = int(run.wait_for(r"^learner: pid (\d+)", timeout=60, after=mark).group(1))
        assert new_pid != pid
        # Training goes on: a later checkpoint has more updates than the one restored.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            latest = checkpoint.load(tmp_path)
            if latest["learner"]["updates"] > saved_updates + 5:
                break
            time.sleep(2)
        else:
            raise AssertionError("no progress after the restart:\n" + "\n".join(run.lines[-30:]))
    finally:
        code = run.stop()
    assert code == 0, "\n".join(run.lines[-30:])
    final = checkpoint.load(tmp_path)
    learner = final["learner"]
    # Counters and optimizer continued from the checkpoint rather than from zero: Adam's
    # step count equals the update count only if its state was restored.
    assert learner["updates"] > saved_updates
    assert final["counters"]["env_frames"] > saved_frames
    steps = {int(s["step"]) for s in learner["optimizer"]["state"].values()}
    assert steps == {learner["updates"]}
