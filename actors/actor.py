"""The actor: explores a batch of environments with its own epsilons and feeds replay.

Plain class, no Ray: transitions leave through ``sink(chunk)`` and newer weights arrive
through ``weights_source()``; ``actors/worker.py`` binds both to Ray, tests to local
objects. Q-values come from ``policy`` (an :class:`actors.inference.InferenceNet`: the
learner's network rebuilt for cheap batched CPU inference).

Lanes. The K environments are split into ``lanes`` equal groups that ale-py steps
asynchronously (its vector env with ``batch_size = K / lanes``): while the emulator
thread steps one lane, this thread runs the forward pass for another, so inference
overlaps emulation instead of adding to it. Each lane is its own stream of frames with
its own :class:`NStepAccumulator`; with one lane the actor is plain synchronous
batched stepping. ``step()`` advances one lane: receive its results, pick its next
actions with one batched forward pass, send them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.config import Config
from apex_dqn.common.envs import VectorEnv
from apex_dqn.common.messages import TransitionChunk

Sink = Callable[[TransitionChunk], None]
WeightsSource = Callable[[], "tuple[int, dict] | None"]


@dataclass
class Episode:
    """One finished episode: unclipped game score, agent steps, and who played it."""

    score: float
    length: int
    epsilon: float
    actor: int
    env: int


@dataclass
class ActorTimes:
    """Seconds spent per part of the step loop, since creation."""

    env: float = 0.0  # waiting for the emulator
    inference: float = 0.0  # the forward pass
    nstep: float = 0.0  # action choice, n-step building, first priorities, episode stats
    push: float = 0.0  # handing chunks to the sink
    weights: float = 0.0  # checking for and loading newer weights


@dataclass
class _Lane:
    ids: np.ndarray  # global env indices of this lane, consecutive
    envs: slice  # the same, as a slice: per-env arrays are updated through views
    epsilons: np.ndarray
    acc: NStepAccumulator
    started: bool = False


class Actor:
    def __init__(
        self,
        cfg: Config,
        index: int,
        env: VectorEnv,
        policy: InferenceNet,
        epsilons: np.ndarray,
        sink: Sink,
        weights_source: WeightsSource,
        stream: int,
        seed: int,
    ):
        self.cfg, self.index, self.env, self.policy = cfg, index, env, policy
        self.k = env.num_envs
        self.epsilons = np.asarray(epsilons, dtype=np.float32)
        if len(self.epsilons) != self.k:
            raise ValueError(f"{len(self.epsilons)} epsilons for {self.k} envs")
        width = getattr(env, "batch_size", self.k)
        if self.k % width:
            raise ValueError(f"{self.k} envs do not split into lanes of {width}")
        self.lanes = []
        for i, first in enumerate(range(0, self.k, width)):
            acc = NStepAccumulator(
                width, cfg.n_step, cfg.gamma, stream * 16 + i, cfg.terminal_on_life_loss
            )
            ids, envs = np.arange(first, first + width), slice(first, first + width)
            self.lanes.append(_Lane(ids, envs, self.epsilons[envs], acc))
        self.sink, self.weights_source = sink, weights_source
        self.rng = np.random.default_rng(seed)
        self.weights_version = -1
        self.lane_steps = 0  # lane steps taken; every lane stepping once is one actor step
        self.env_steps = 0  # agent steps over all envs, reset steps included
        self.times = ActorTimes()
        self.episodes: list[Episode] = []
        self._score = np.zeros(self.k, dtype=np.float64)
        self._length = np.zeros(self.k, dtype=np.int64)
        self._lives = np.zeros(self.k, dtype=np.int64)
        obs, info = env.reset(seed=seed)
        self._act(self._lane_of(info), obs, info)

    # ---------------------------------------------------------------------- weights
    def sync_weights(self) -> bool:
        """Load newer weights if the source has any; never waits for them."""
        got = self.weights_source()
        if got is None:
            return False
        version, state = got
        if version <= self.weights_version:
            return False
        self.policy.load_state(state)
        self.weights_version = version
        return True

    # ------------------------------------------------------------------------- loop
    def _lane_of(self, info: dict) -> _Lane:
        ids = info.get("env_id")
        if ids is None and len(self.lanes) == 1:
            return self.lanes[0]
        ids = np.asarray(ids)
        lane = self.lanes[int(ids[0]) // len(self.lanes[0].ids)]
        if ids.shape != lane.ids.shape or not (ids == lane.ids).all():
            raise RuntimeError(f"the env returned envs {ids.tolist()}, not one whole lane")
        return lane

    def _act(self, lane: _Lane, obs: np.ndarray, info: dict) -> None:
        """Start or continue a lane from its observations: choose actions and send them."""
        t0 = time.perf_counter()
        if not lane.started:
            lane.acc.start(obs)
            self._lives[lane.envs] = info["lives"]
            lane.started = True
        q = self.policy(obs)
        t1 = time.perf_counter()
        width = len(lane.ids)
        lane.acc.bootstrap(q.max(axis=1))
        actions = q.argmax(axis=1)
        explore = self.rng.random(width) < lane.epsilons
        actions[explore] = self.rng.integers(0, q.shape[1], int(explore.sum()))
        lane.acc.record(actions, np.take_along_axis(q, actions[:, None], axis=1)[:, 0])
        self.env.send(actions)
        self.times.inference += t1 - t0
        self.times.nstep += time.perf_counter() - t1

    def step(self) -> None:
        """Advance one lane: receive its step's results, then send its next actions."""
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.recv()
        t1 = time.perf_counter()
        self.times.env += t1 - t0
        lane = self._lane_of(info)
        observed = lane.started
        if observed:
            self._observe(lane, obs, reward, terminated, truncated, info)
        self.times.nstep += time.perf_counter() - t1
        self._act(lane, obs, info)
        self.lane_steps += 1
        if observed and lane.acc.step % self.cfg.push_period == 0:
            t2 = time.perf_counter()
            self.sink(lane.acc.flush())
            self.times.push += time.perf_counter() - t2
        if self.lane_steps % (self.cfg.weight_sync_period * len(self.lanes)) == 0:
            t3 = time.perf_counter()
            self.sync_weights()
            self.times.weights += time.perf_counter() - t3

    def _observe(self, lane: _Lane, obs, reward, terminated, truncated, info) -> None:
        envs, acc = lane.envs, lane.acc
        live = ~acc.ended  # a reset step's reward belongs to no episode
        self._score[envs] += np.where(live, reward, 0.0)
        self._length[envs] += live
        for j in np.flatnonzero(live & (terminated | truncated)):
            e = int(lane.ids[j])
            self.episodes.append(
                Episode(float(self._score[e]), int(self._length[e]), float(self.epsilons[e]),
                        self.index, e)
            )  # fmt: skip
            self._score[e] = 0.0
            self._length[e] = 0
        lives = np.asarray(info["lives"])
        life_lost = (lives < self._lives[envs]) & live
        self._lives[envs] = lives
        acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, life_lost)
        self.env_steps += len(lane.ids)

    def run(self, steps: int) -> None:
        """Take ``steps`` actor steps (each lane steps ``steps`` times)."""
        for _ in range(steps * len(self.lanes)):
            self.step()

    def drain_episodes(self) -> list[Episode]:
        episodes, self.episodes = self.episodes, []
        return episodes
