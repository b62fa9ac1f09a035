"""The driver's periodic evaluation, with fake learner and evaluator Ray actors.

The clock is the test's, so "due" is exact; the fakes run on the session's local Ray,
so weights travel as the learner's ObjectRefs and evaluations really are in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from apex_dqn.common.config import Config
from apex_dqn.evaluation.periodic import PeriodicEvaluation

pytestmark = pytest.mark.ray

INTERVAL = 100.0
CFG = Config(game="space_invaders", eval_interval_s=INTERVAL, eval_episodes=3, eval_video=False)


class FakeLearner:
    """Publishes ``(version, [ref])`` like the learner; version 0 is "nothing learnt"."""

    def __init__(self) -> None:
        self.latest: tuple[int, dict] = (0, {})

    def publish(self, version: int, **behaviour: float) -> None:
        """``behaviour`` rides in the weights: ``delay`` (s) and ``fail`` for the evaluator."""
        self.latest = (version, {"version": version, **behaviour})

    def latest_weights(self) -> tuple[int, list]:
        import ray

        version, weights = self.latest
        return version, [ray.put(weights)]


class FakeEvaluator:
    """Answers like ``EvaluatorWorker.evaluate``: a mean of 10 x the weights' version."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bool]] = []

    def evaluate(self, version: int, weights: dict, episodes: int, video: bool) -> dict:
        assert weights["version"] == version  # the ref arrived resolved
        self.calls.append((version, episodes, video))
        time.sleep(weights.get("delay", 0.0))
        if weights.get("fail"):
            raise RuntimeError("the emulator broke")
        mean = 10.0 * version
        return {"weights_version": version, "episodes": episodes, "mean": mean, "std": 1.0,
                "min": mean - 1, "max": mean + 1, "mean_length": 50.0, "num_truncated": 0,
                "human_normalized": 0.5, "video_gif": None}  # fmt: skip

    def get_calls(self) -> list[tuple[int, int, bool]]:
        return self.calls


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def steps(self, tag: str) -> list[tuple[float, int]]:
        return [(v, s) for t, v, s in self.scalars if t == tag]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    ray: Any
    learner: Any  # FakeLearner's handle
    evaluator: Any  # FakeEvaluator's handle
    periodic: PeriodicEvaluation
    writer: FakeWriter
    clock: Clock

    def publish(self, version: int, **behaviour: float) -> None:
        self.ray.get(self.learner.publish.remote(version, **behaviour))

    def poll(self, env_frames: int) -> None:
        self.periodic.poll(self.learner, env_frames)

    def settle(self, env_frames: int, limit_s: float = 30.0) -> None:
        """Poll (as the driver's loop does) until the evaluation in flight is collected."""
        deadline = time.monotonic() + limit_s
        while self.periodic.busy:
            assert time.monotonic() < deadline, "the evaluation never finished"
            self.poll(env_frames)
            time.sleep(0.02)

    def calls(self) -> list[tuple[int, int, bool]]:
        return self.ray.get(self.evaluator.get_calls.remote())


@pytest.fixture
def rig(ray_local):
    ray = ray_local
    learner = ray.remote(FakeLearner).options(num_cpus=0).remote()
    evaluator = ray.remote(FakeEvaluator).options(num_cpus=0).remote()
    writer, clock = FakeWriter(), Clock()
    periodic = PeriodicEvaluation(ray, CFG, 6, writer, evaluator=evaluator, clock=clock)
    yield Rig(ray, learner, evaluator, periodic, writer, clock)
    for handle in (learner, evaluator):
        ray.kill(handle)


def test_due_once_an_interval_has_passed(rig):
    rig.publish(4)
    rig.clock.now += INTERVAL - 1
    rig.poll(1_000)
    assert not rig.periodic.busy  # not due yet
    rig.clock.now += 1
    rig.poll(2_000)
    assert rig.periodic.busy
    rig.settle(3_000)
    rig.clock.now += INTERVAL / 2
    rig.poll(4_000)
    assert not rig.periodic.busy  # an interval after the last start, not after its end
    rig.clock.now += INTERVAL / 2
    rig.poll(5_000)
    rig.settle(6_000)
    assert rig.calls() == [(4, 3, False), (4, 3, False)]
    assert rig.writer.steps("eval/episodic_return_mean") == [(40.0, 2_000), (40.0, 5_000)]


def test_nothing_is_evaluated_before_the_learner_publishes(rig):
    rig.clock.now += 10 * INTERVAL
    rig.poll(1_000)  # version 0: nothing learnt yet
    assert not rig.periodic.busy
    rig.publish(1)
    rig.poll(2_000)  # still due: it starts at once
    assert rig.periodic.busy
    rig.settle(2_000)
    assert rig.writer.steps("eval/weights_version") == [(1, 2_000)]


def test_a_result_is_logged_at_the_frames_its_weights_were_taken_at(rig, capsys):
    rig.publish(7, delay=2.0)
    rig.clock.now += INTERVAL
    rig.poll(12_345)
    rig.publish(8)
    rig.clock.now += 5 * INTERVAL  # due again, but one evaluation runs at a time
    rig.poll(20_000)
    rig.poll(30_000)
    assert rig.periodic.busy
    assert rig.calls() == [(7, 3, False)]
    rig.settle(40_000)  # logs v7, then starts v8 at once (overdue) and logs it
    assert rig.calls() == [(7, 3, False), (8, 3, False)]
    first = {tag: (value, step) for tag, value, step in rig.writer.scalars[:8]}
    assert first == {
        "eval/episodic_return_mean": (70.0, 12_345),
        "eval/episodic_return_std": (1.0, 12_345),
        "eval/episodic_return_min": (69.0, 12_345),
        "eval/episodic_return_max": (71.0, 12_345),
        "eval/episodic_length_mean": (50.0, 12_345),
        "eval/truncated_episodes": (0, 12_345),
        "eval/weights_version": (7, 12_345),
        "eval/human_normalized_score": (0.5, 12_345),
    }
    assert rig.writer.steps("eval/weights_version") == [(7, 12_345), (8, 40_000)]
    assert "eval (weights v7): 70.0 +/- 1.0 over 3 episodes" in capsys.readouterr().out


def test_a_failed_evaluation_is_reported_and_the_next_goes_ahead(rig, capsys):
    rig.publish(2, fail=True)
    rig.clock.now += INTERVAL
    rig.poll(1_000)
    rig.settle(1_000)
    assert "evaluation failed:" in capsys.readouterr().out
    assert rig.writer.scalars == []
    rig.publish(3)
    rig.clock.now += INTERVAL
    rig.poll(2_000)
    rig.settle(2_000)
    assert rig.writer.steps("eval/weights_version") == [(3, 2_000)]


def test_finish_waits_for_the_evaluation_in_flight_within_its_timeout(rig, capsys):
    rig.periodic.finish(timeout=30)  # nothing in flight: returns at once, says nothing
    assert capsys.readouterr().out == ""
    rig.publish(5, delay=3.0)
    rig.clock.now += INTERVAL
    rig.poll(1_000)
    started = time.monotonic()
    rig.periodic.finish(timeout=0.3)
    assert time.monotonic() - started < 2.0  # bounded: gave up on the slow one
    assert rig.periodic.busy and rig.writer.scalars == []
    rig.periodic.finish(timeout=30)
    assert not rig.periodic.busy
    assert rig.writer.steps("eval/episodic_return_mean") == [(50.0, 1_000)]
    assert "waiting for the evaluation in progress" in capsys.readouterr().out


def test_every_third_evaluation_asks_for_a_video(rig):
    pytest.importorskip("PIL")
    periodic = PeriodicEvaluation(rig.ray, CFG.replace(eval_video=True), 6, rig.writer,
                                  evaluator=rig.evaluator, clock=rig.clock)  # fmt: skip
    rig.periodic = periodic
    rig.publish(1)
    for frames in range(4):
        rig.clock.now += INTERVAL
        rig.poll(frames)
        rig.settle(frames)
    assert [video for _, _, video in rig.calls()] == [True, False, False, True]
