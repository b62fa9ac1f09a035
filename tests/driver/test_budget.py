"""The driver's loop stops within about a second's frames of ``--total-frames``.

The actors' frames reach the driver only when it collects their reports. Collected once
a log interval, a run would overshoot its budget by up to an interval's frames (40k at
4,000 frames/s and 10 s); near the budget the driver collects every second instead. The
loop runs here on a fake clock, with actors producing a steady ``fps``.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from apex_dqn import train
from apex_dqn.common.config import Config
from apex_dqn.driver.metrics import Counters


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SteadyActors:
    """RunMetrics' part in the loop: frames at ``fps`` counted when collected."""

    def __init__(self, clock: FakeClock, fps: float) -> None:
        self.clock, self.fps = clock, fps
        self.counters = Counters()
        self.counted_at = clock.now
        self.lines: list[tuple[float, int]] = []  # (time, frames) of each console line
        self.full_collections = 0  # those that take the learner's means, which resets them

    def collect(self, supervisor, frames_only: bool = False) -> None:
        self.counters.env_frames += round(self.fps * (self.clock.now - self.counted_at))
        self.counted_at = self.clock.now
        self.full_collections += not frames_only

    def log(self, fps, ups, learner, supervisor) -> None:
        self.lines.append((self.clock.now, self.counters.env_frames))


def _run(monkeypatch, total_frames: int, fps: float, log_interval_s: float) -> SteadyActors:
    clock = FakeClock()
    monkeypatch.setattr(train, "time", clock)
    driver = train.Driver.__new__(train.Driver)
    driver.cfg = Config(total_frames=total_frames, log_interval_s=log_interval_s,
                        checkpoint_interval_s=1e9)  # fmt: skip
    driver.metrics = actors = SteadyActors(clock, fps)
    driver.supervisor = SimpleNamespace(supervise=lambda: None)
    driver.evaluation = None
    driver.checkpoints = SimpleNamespace(save=lambda: None)
    driver.run()
    return actors


@pytest.mark.parametrize(
    ("total_frames", "fps", "log_interval_s"),
    [
        (1_000_000, 4_000.0, 10.0),  # the budget falls mid-interval
        (1_040_000, 4_000.0, 10.0),  # ... exactly on a log line
        (1_003_000, 4_000.0, 10.0),  # ... 3,000 frames past one
        (200_000, 1_000.0, 30.0),  # a long log interval
        (50_000, 20_000.0, 10.0),  # spent within the first interval: no rate known yet
        (5_000, 400.0, 0.5),  # intervals under a second
    ],
)
def test_run_stops_within_a_second_of_frames(monkeypatch, total_frames, fps, log_interval_s):
    actors = _run(monkeypatch, total_frames, fps, log_interval_s)
    frames = actors.counters.env_frames
    assert total_frames <= frames
    if total_frames > fps * log_interval_s:  # the rate is known by the last interval
        assert frames <= total_frames + fps * min(1.0, log_interval_s)
    else:  # before the first line no rate is known: collected once an interval
        assert frames <= total_frames + fps * log_interval_s
    # the last line shows the run's last frames
    assert actors.lines[-1][1] == frames


def test_lines_come_once_a_log_interval_until_the_last(monkeypatch):
    actors = _run(monkeypatch, 1_000_000, 4_000.0, 10.0)
    times = [t for t, _ in actors.lines]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap == pytest.approx(10.0) for gap in gaps[:-1])
    assert gaps[-1] <= 10.0
    # the counts in between leave the learner's means to the line that writes them
    assert actors.full_collections == len(actors.lines)
