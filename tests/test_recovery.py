"""Failure recovery with real processes: the learner is SIGKILLed mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--num-actors", "1", "--envs-per-actor", "4", "--replay-shards", "1",
    "--replay-capacity", "20000", "--replay-min-size", "400", "--batch-size", "16",
    "--network", "dqn2013", "--push-period", "20", "--publish-period", "5",
    "--weight-sync-period", "10", "--target-update-period", "10",
    "--log-interval-s", "2", "--checkpoint-interval-s", "4",
]  # fmt: skip


class Run:
    """``train.py`` in a subprocess, its output collected line by line."""

    def __init__(self, args: list[str]):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "train.py", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.mark.ray
@pytest.mark.rom
def test_learner_killed_restarts_from_its_last_checkpoint(tmp_path):
    run = Run([*TINY, "--total-frames", "100000000", "--logdir", str(tmp_path)])
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
