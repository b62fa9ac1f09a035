"""Failures with real processes: shards and actors SIGKILLed, and memory over a long run.

The first two tests drive the Ray plumbing directly (a shard process killed under an
actor's pusher and under the learner's sampler). The others share one ``train.py`` run,
which an actor and then a replay shard are SIGKILLed in, and whose memory is sampled
from the moment replay is full: a soak with failures in it.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest

from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.benchmarks.train_run import TrainRun as Run
from tests.fakes import FakeAtariVectorEnv

pytestmark = pytest.mark.ray


def _chunks(stream: int, envs: int = 4, push_period: int = 10, seed: int = 0) -> Iterator:
    """Transition chunks as an actor pushes them, from the fake env, without end."""
    env = FakeAtariVectorEnv(envs, seed=seed)
    acc = NStepAccumulator(envs, 3, 0.99, stream, False)
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    acc.start(obs)
    lives = np.asarray(info["lives"]).copy()
    steps = 0
    while True:
        q = rng.normal(size=(envs, 6)).astype(np.float32)
        acc.bootstrap(q.max(axis=1))
        actions = rng.integers(0, 6, envs)
        acc.record(actions, q[np.arange(envs), actions])
        obs, reward, terminated, truncated, info = env.step(actions)
        now = np.asarray(info["lives"])
        life_lost = (now < lives) & ~acc.ended
        lives = now.copy()
        acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, life_lost)
        steps += 1
        if steps % push_period == 0:
            yield acc.flush()


def _returns(fn, timeout: float = 120.0) -> None:
    """Run ``fn`` on a thread and fail if it has not returned within ``timeout`` s."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} still blocked after {timeout} s"
    if errors:
        raise errors[0]


def _until(condition, timeout: float = 120.0, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{condition} still false after {timeout} s"
        time.sleep(every)


def _restarted_pid(ray, shard, old_pid: int) -> int:
    """Wait for Ray to bring a killed shard back; returns its new pid."""
    pids: list[int] = []

    def back() -> bool:
        try:
            pids.append(ray.get(shard.where.remote(), timeout=10).pid)
        except (ray.exceptions.RayError, TimeoutError):
            return False
        return pids[-1] != old_pid

    _until(back, every=0.5)
    return pids[-1]


def test_pusher_never_hangs_on_a_dead_shard_and_reaches_the_restarted_one(ray_local):
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    shard = ReplayShardWorker.options(num_cpus=0, max_restarts=-1).remote(2_000, 0.6, seed=0)
    pusher = BoundedPusher(shard, limit=2)
    chunks = _chunks(stream=7)
    for _ in range(6):
        pusher(next(chunks))
        assert len(pusher.in_flight) <= 2
    first = ray.get(shard.where.remote())
    assert ray.get(shard.stats.remote()).added > 0

    os.kill(first.pid, signal.SIGKILL)

    def push(count: int) -> None:
        for _ in range(count):
            pusher(next(chunks))
            assert len(pusher.in_flight) <= 2

    # Pushes go on while the shard is dead and while Ray restarts it: none hangs.
    _returns(lambda: push(20))
    _restarted_pid(ray, shard, first.pid)

    # Ray restarted it, empty; the actor's next pushes land in it.
    def stored() -> bool:
        push(1)
        return ray.get(shard.stats.remote()).added > 0

    _returns(lambda: _until(stored))
    _returns(pusher.flush)
    acked, failed = pusher.acked, pusher.failed
    assert not pusher.in_flight

    # Dead for good: every push fails at once, is counted, and nothing waits.
    ray.kill(shard, no_restart=True)
    _returns(lambda: push(10))
    _returns(pusher.flush)
    assert pusher.failed == failed + 10
    assert pusher.acked == acked


def test_sampler_skips_a_killed_shard_and_samples_it_again_once_refilled(ray_local):
    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.worker import ReplayShardWorker

    ray = ray_local
    shards = [
        ReplayShardWorker.options(num_cpus=0, max_restarts=-1).remote(1_000, 0.6, seed=s)
        for s in range(2)
    ]
    feeds = [_chunks(stream=10 + s, seed=s) for s in range(2)]
    for shard, feed in zip(shards, feeds, strict=True):
        ray.get([shard.add.remote(next(feed)) for _ in range(8)])
    sampler = RaySampler(shards, batch_size=16, prefetch=3, seed=0, refresh_s=0.5)
    keys = np.arange(16)

    def draws(count: int) -> list[int]:
        """Shards of ``count`` batches drawn, priorities sent back as the learner does."""
        seen: list[int] = []
        while len(seen) < count:
            drawn = sampler.draw(0.4, timeout=1.0)
            if drawn is not None:
                seen.append(drawn.shard)
                sampler.update_priorities(drawn.shard, drawn.batch.keys, np.ones(16))
            flight = sampler.in_flight()
            assert flight["sample_requests"] <= 3 and flight["stats_requests"] <= 2
            assert flight["priority_updates"] < 64
        return seen

    _returns(lambda: draws(30))
    assert {0, 1} <= set(draws(40))
    pid = ray.get(shards[1].where.remote()).pid
    os.kill(pid, signal.SIGKILL)

    # The other shard serves every batch meanwhile; updates to the dead one are dropped.
    after: list[int] = []
    _returns(lambda: after.extend(draws(60)))
    assert sampler.totals[1] == 0 and after[-20:] == [0] * 20
    sent = sampler.in_flight()["priority_updates"]
    sampler.update_priorities(1, keys, np.ones(16))
    assert sampler.in_flight()["priority_updates"] <= sent
    assert sampler.failures >= 1

    # Ray restarted it, empty; once an actor refills it, the periodic refresh brings it back.
    _restarted_pid(ray, shards[1], pid)
    ray.get([shards[1].add.remote(next(feeds[1])) for _ in range(8)])
    _returns(lambda: _until(lambda: 1 in draws(5), timeout=60))
    assert ray.get(shards[1].stats.remote()).samples > 0
    for shard in shards:
        ray.kill(shard)


# ------------------------------------------------------------- one train.py run, killed
ACTORS = SHARDS = 2
CAPACITY = 4_000  # replay is full a few seconds after the actors start
PUSHES_IN_FLIGHT = 4
PREFETCH = 4
LOG_S = 2.0
SOAK_S = 96.0  # sampled from the moment replay is full; compared by thirds
TINY = [
    "--num-actors", str(ACTORS), "--envs-per-actor", "4", "--replay-shards", str(SHARDS),
    "--replay-capacity", str(CAPACITY), "--replay-min-size", "400", "--batch-size", "16",
    "--network", "dqn2013", "--push-period", "20", "--publish-period", "5",
    "--weight-sync-period", "10", "--target-update-period", "10",
    "--max-pushes-in-flight", str(PUSHES_IN_FLIGHT), "--prefetch-batches", str(PREFETCH),
    "--log-interval-s", str(LOG_S), "--checkpoint-interval-s", "100000",
    "--eval-interval-s", "0", "--final-eval-episodes", "0", "--total-frames", "1000000000",
]  # fmt: skip


@dataclass
class Killed:
    """What the run printed and logged, and when the test did what to it."""

    lines: list[str]
    logdir: Path
    code: int
    events: dict[str, float] = field(default_factory=dict)  # what -> time.time()
    pids: dict[str, int] = field(default_factory=dict)  # before the kills
    rss: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def scalars(self, tag: str) -> list[tuple[float, int, float]]:
        """(wall time, step, value) of a TensorBoard scalar, in the order logged."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.logdir), size_guidance={"scalars": 0})
        acc.Reload()
        if tag not in acc.Tags()["scalars"]:
            return []
        return [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]


def _sample_rss(pids: dict[str, int], out: list, stop: threading.Event) -> None:
    while not stop.wait(2.0):
        sample = {}
        for name, pid in pids.items():
            try:
                sample[name] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        out.append((time.time(), sample))


def _latest(run: Run, pattern: str) -> int:
    """The value of the last line matching ``pattern`` (one group) so far."""
    found = [m for line in run.lines if (m := re.search(pattern, line))]
    return int(found[-1].group(1)) if found else -1


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Killed:
    logdir = tmp_path_factory.mktemp("killed")
    run = Run([*TINY, "--logdir", str(logdir)])
    record = Killed(run.lines, logdir, code=-1)
    stop = threading.Event()
    sampler = None
    try:
        for name, pattern in [
            ("learner", r"^learner: pid (\d+)"),
            ("shard0", r"^shard 0: pid (\d+)"),
            ("shard1", r"^shard 1: pid (\d+)"),
            ("actor0", r"^actor 0: pid (\d+)"),
            ("actor1", r"^actor 1: pid (\d+)"),
        ]:
            record.pids[name] = int(run.wait_for(pattern, timeout=180).group(1))
        record.pids["driver"] = run.proc.pid
        run.wait_for(rf"replay {CAPACITY:,}\b", timeout=180)  # replay is full
        record.events["full"] = time.time()
        watched = {k: record.pids[k] for k in ("driver", "learner", "shard0")}
        sampler = threading.Thread(target=_sample_rss, args=(watched, record.rss, stop))
        sampler.start()

        # An actor SIGKILLed: Ray restarts it, the driver restarts its loop.
        mark = len(run.lines)
        os.kill(record.pids["actor0"], signal.SIGKILL)
        record.events["actor_killed"] = time.time()
        run.wait_for(r"^actor 0: pid (\d+)", timeout=120, after=mark)
        record.events["actor_back"] = time.time()
        time.sleep(6 * LOG_S)  # its new pushes show in shard 0's counters

        # A replay shard SIGKILLed: Ray restarts it, empty; the driver counts the loss.
        mark = len(run.lines)
        os.kill(record.pids["shard1"], signal.SIGKILL)
        record.events["shard_killed"] = time.time()
        run.wait_for(r"^replay shard 1 restarted empty", timeout=120, after=mark)
        run.wait_for(r"^shard 1: pid (\d+)", timeout=120, after=mark)
        record.events["shard_back"] = time.time()

        # Soak: keep going until SOAK_S seconds of sampling with replay full.
        remaining = record.events["full"] + SOAK_S - time.time()
        if remaining > 0:
            time.sleep(remaining)
        record.events["end"] = time.time()
        assert run.proc.poll() is None, "\n".join(run.lines[-40:])
        assert _latest(run, r"upd/s \S+\s+actors (\d+)") == ACTORS
    finally:
        stop.set()
        if sampler is not None:
            sampler.join()
        record.code = run.stop()
    return record


@pytest.mark.rom
@pytest.mark.slow
def test_killed_actor_comes_back_with_its_epsilons_and_pushes_again(killed):
    lines = "\n".join(killed.lines)
    before = re.search(rf"^actor 0: pid {killed.pids['actor0']} .* epsilon (\S+)$", lines, re.M)
    after = [m for m in re.finditer(r"^actor 0: pid (\d+) .* epsilon (\S+)$", lines, re.M)]
    assert before and len(after) == 2, lines
    assert int(after[1].group(1)) != killed.pids["actor0"]
    assert after[1].group(2) == before.group(1)  # the same index, so the same epsilons
    assert re.search(r"^actor 0 stopped \(", lines, re.M)
    assert not re.search(r"^actor 1 stopped|^the learner died|is dead for good", lines, re.M)
    # Actor 0 alone pushes to shard 0: its count grows after the old process was gone.
    settled = killed.events["actor_killed"] + 2 * LOG_S
    added = [(t, v) for t, _, v in killed.scalars("replay/0/added") if t > settled]
    assert added and added[-1][1] > added[0][1], added
    assert all(b >= a for (_, a), (_, b) in itertools.pairwise(added))


@pytest.mark.rom
@pytest.mark.slow
def test_killed_shard_comes_back_the_loss_is_counted_and_training_goes_on(killed):
    lines = "\n".join(killed.lines)
    loss = re.search(r"^replay shard 1 restarted empty: ([\d,]+) transitions lost", lines, re.M)
    assert loss, lines
    lost = int(loss.group(1).replace(",", ""))
    assert 0 < lost <= CAPACITY // SHARDS
    assert killed.scalars("replay/lost_transitions")[-1][2] == lost
    assert killed.scalars("replay/shard_restarts")[-1][2] == 1
    new_pid = re.findall(r"^shard 1: pid (\d+)", lines, re.M)[-1]
    assert int(new_pid) != killed.pids["shard1"]
    # Nothing else lost: shard 0 never restarted, the learner neither.
    assert "replay shard 0 restarted" not in lines and "the learner died" not in lines
    kill = killed.events["shard_killed"]
    # The learner trained while shard 1 was down and refilling...
    samples = killed.scalars("replay/1/samples")
    drop = next((i for i in range(1, len(samples)) if samples[i][2] < samples[i - 1][2]), None)
    assert drop is not None, samples  # the restarted shard's count began again
    back = next((t for t, _, v in samples[drop:] if v > 0), None)
    assert back is not None, samples  # and the learner samples it again: picked up
    updates = [(t, v) for t, _, v in killed.scalars("charts/learner_updates")]
    before = max(v for t, v in updates if t < kill)
    while_down = max(v for t, v in updates if t <= back)
    assert while_down > before, (updates, kill, back)
    # ... and goes on after it, sampling the restarted shard more and more.
    assert samples[-1][2] > 0 and samples[-1][0] > back
    assert updates[-1][1] > while_down


@pytest.mark.rom
@pytest.mark.slow
def test_memory_stays_bounded_once_replay_is_full(killed):
    assert killed.code == 0, "\n".join(killed.lines[-40:])
    start, end = killed.events["full"], killed.events["end"]
    third = (end - start) / 3
    for name in ("driver", "learner", "shard0"):
        middle = [
            s[name] for t, s in killed.rss if start + third <= t < start + 2 * third and name in s
        ]
        last = [s[name] for t, s in killed.rss if t >= start + 2 * third and name in s]
        assert len(middle) >= 5 and len(last) >= 5, (name, killed.rss)
        assert max(last) <= 1.15 * max(middle), (name, max(middle), max(last))
    # Every queue stays within its bound all run long.
    for tag, bound in [
        ("sampler/sample_requests_in_flight", PREFETCH),
        ("sampler/stats_requests_in_flight", SHARDS),
        ("sampler/priority_updates_in_flight", 64),
        *[(f"actors/{i}/pushes_in_flight", PUSHES_IN_FLIGHT) for i in range(ACTORS)],
    ]:
        values = [v for _, _, v in killed.scalars(tag)]
        assert values and max(values) <= bound, (tag, values)
