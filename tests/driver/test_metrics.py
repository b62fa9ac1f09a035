"""Run metrics: a fixed, small set of scalar tags at any scale; aggregates that are right."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from apex_dqn.common.config import Config
from apex_dqn.common.messages import ActorReport, Episode, LearnerStats, ShardStats
from apex_dqn.common.schedules import population_epsilons
from apex_dqn.driver import metrics as metrics_module
from apex_dqn.driver.metrics import (
    EPSILON_BUCKETS,
    Counters,
    RunMetrics,
    epsilon_bucket,
    epsilon_bucket_tag,
)

# What the periodic evaluation writes (evaluation/periodic.py), on top of the driver's.
EVAL_TAGS = 8


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def flush(self) -> None:
        pass


@dataclass
class FakeComponent:
    index: int


@dataclass
class FakeSupervisor:
    actors: dict[int, FakeComponent]
    shards: list[FakeComponent] = field(default_factory=list)
    learner_restarts: int = 0
    cpus: float = 512.0

    def running_actors(self) -> list[FakeComponent]:
        return list(self.actors.values())

    def shard_restarted(self, s: int) -> None:
        raise AssertionError("no shard restarted here")


def _learner_stats(updates: int) -> LearnerStats:
    names = ["losses/td_loss", "losses/q_values", "losses/q_max", "losses/abs_td",
             "losses/grad_norm", "replay/new_priority_max", "replay/importance_weight",
             "sampler/sample_requests_in_flight", "sampler/stats_requests_in_flight",
             "sampler/priority_updates_in_flight", "sampler/failed_requests"]  # fmt: skip
    return LearnerStats(updates, 10, 0.5, 1_000, updates // 5, 1.0, dict.fromkeys(names, 1.0))


def _shard_stats(size: int) -> ShardStats:
    return ShardStats(size, size, 0, float(size), 0.5, size, 4, 7_300 * size, 1, 0, 3)


def _report(cfg: Config, i: int, steps: int) -> ActorReport:
    eps = population_epsilons(i, cfg.num_actors, cfg.max_actors, 1, "actor")
    episodes = [Episode(float(10 * i), 100, float(eps[0]), i, 0)]
    return ActorReport(i, episodes, steps, weights_version=3, pushes_in_flight=i % 4,
                       pushes_failed=0)  # fmt: skip


def _run(cfg: Config, actors: int, shards: int, clock: list[float]) -> FakeWriter:
    writer = FakeWriter()
    m = RunMetrics(cfg, writer, Counters())
    sup = FakeSupervisor({i: FakeComponent(i) for i in range(actors)},
                         [FakeComponent(s) for s in range(shards)])  # fmt: skip
    for round_ in range(3):
        clock[0] += 10.0
        for i in range(actors):
            m._actor_report(_report(cfg, i, steps=100 * (i + 1)), known=True)
        for s in range(shards):
            m._shard_stats(s, _shard_stats(1_000 * (s + 1)), sup)
        m.log(1_000.0, 30.0, _learner_stats(100 * (round_ + 1)), sup)
    return writer


@pytest.fixture
def clock(monkeypatch):
    now = [1_000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: now[0])
    return now


def test_256_actors_and_8_shards_stay_within_80_tags_by_default(clock, capsys):
    cfg = Config(num_actors=256, replay_shards=8, envs_per_actor=1, epsilon_spread="actor")
    writer = _run(cfg, actors=256, shards=8, clock=clock)
    tags = set(writer.scalars)
    assert len(tags) + EVAL_TAGS <= 80, sorted(tags)
    assert not [t for t in tags if t.startswith(("actors/1", "replay/1/", "replay/0/"))]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 3  # one console line per interval, at any scale


def test_worker_charts_on_adds_each_actor_and_shard(clock):
    cfg = Config(num_actors=3, replay_shards=2, worker_charts="on", envs_per_actor=1)
    tags = set(_run(cfg, actors=3, shards=2, clock=clock).scalars)
    for i in range(3):
        assert {f"actors/{i}/weights_version", f"actors/{i}/pushes_in_flight"} <= tags
    assert {"replay/0/size", "replay/1/mean_priority"} <= tags


@pytest.mark.parametrize(("worker_charts", "population", "expected"), [
    ("auto", 8, True), ("auto", 9, False), ("on", 256, True), ("off", 2, False),
])  # fmt: skip
def test_worker_charts_setting(worker_charts, population, expected):
    cfg = Config(num_actors=population, worker_charts=worker_charts)
    assert RunMetrics(cfg, FakeWriter(), Counters()).worker_charts is expected


def test_throughput_percentiles_and_the_slowest_actor(clock):
    cfg = Config(num_actors=10, envs_per_actor=1)
    scalars = _run(cfg, actors=10, shards=1, clock=clock).scalars
    sps = np.array([100 * (i + 1) / 10.0 for i in range(10)])  # steps over 10 s
    last = {tag: values[-1][1] for tag, values in scalars.items()}
    assert last["actors/sps_min"] == pytest.approx(sps.min())
    assert last["actors/sps_p50"] == pytest.approx(np.percentile(sps, 50))
    assert last["actors/sps_p90"] == pytest.approx(np.percentile(sps, 90))
    assert last["actors/slowest"] == 0
    assert last["actors/pushes_in_flight_max"] == 3
    assert last["replay/mean_priority"] == pytest.approx(1.0)
    assert last["learner/beta"] == 0.5


@pytest.mark.parametrize(("epsilon", "band"), [
    (0.4, 0), (0.5, 0), (0.4 ** 2.7, 0), (0.4 ** 2.8, 1), (0.4 ** 4.6, 2), (0.4 ** 8, 3),
    (1e-6, 3), (0.0, 3),
])  # fmt: skip
def test_epsilon_bands(epsilon, band):
    assert epsilon_bucket(epsilon) == band


def test_scores_by_epsilon_band_are_the_means_of_their_episodes(clock):
    cfg = Config(num_actors=64, envs_per_actor=1, epsilon_spread="actor")
    scalars = _run(cfg, actors=64, shards=1, clock=clock).scalars
    expected: dict[int, list[float]] = {}
    for i in range(64):
        eps = population_epsilons(i, 64, 0, 1, "actor")[0]
        expected.setdefault(epsilon_bucket(float(eps)), []).append(10.0 * i)
    assert sorted(expected) == list(range(EPSILON_BUCKETS))
    for band, scores in expected.items():
        values = [v for _, v in scalars[epsilon_bucket_tag(band)]]
        assert values == pytest.approx([np.mean(scores)] * 3)


def test_band_tags_name_their_epsilon_range():
    names = [epsilon_bucket_tag(b) for b in range(EPSILON_BUCKETS)]
    assert names[0] == "epsilon/episodic_return_0.4-0.08"
    assert names[-1].endswith("-0.00066")
    assert len(set(names)) == EPSILON_BUCKETS
