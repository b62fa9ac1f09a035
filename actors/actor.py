"""The actor: explores a batch of environments with its own epsilons and feeds replay.

Plain class, no Ray: transitions leave through ``sink(chunk)`` and newer weights arrive
through ``weights_source()``; ``actors/worker.py`` binds both to Ray, tests to local
objects. Q-values come from ``policy`` (an :class:`actors.inference.InferenceNet`: the
learner's network rebuilt for cheap batched CPU inference).

Lanes. The K environments are split into lanes, each a vector env of its own
(``common.envs.make_lane_envs``), served in turn: ``step()`` receives one lane's
results, runs the forward pass on them and sends the lane's actions. ``send()`` returns
at once, and while that lane's emulator threads step, this thread serves the next lane,
so inference overlaps emulation instead of adding to it; with one lane the actor is
plain synchronous batched stepping. A lane is a vector env of its own, not a part of one
env's envs returned per ``recv()``, because ale-py's ``send()`` cannot name envs (it
applies ``actions[i]`` to the i-th env of the latest ``recv()``) and such an env, with
several emulator threads, returns whichever envs finished first: envs of several lanes,
in any order. An env that returns all its envs at once returns them in env order.

Each lane is its own stream of frames (``stream * 16 + lane``) with its own
:class:`NStepAccumulator`, which numbers frames ``step * width + row``; a lane's slice
of the per-env arrays (epsilons, scores, lengths, lives) is a view into the actor's.
Env ``e`` of the actor is reset with seed ``seed + e``, as one vector env of all K
would seed it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from apex_dqn.actors.inference import InferenceNet
from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.config import Config
from apex_dqn.common.envs import VectorEnv
from apex_dqn.common.messages import Episode, TransitionChunk

Sink = Callable[[TransitionChunk], None]
WeightsSource = Callable[[], "tuple[int, dict] | None"]


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
    env: VectorEnv
    envs: slice  # the lane's envs among the actor's: per-env arrays are updated through views
    epsilons: np.ndarray
    acc: NStepAccumulator


class Actor:
    def __init__(
        self,
        cfg: Config,
        index: int,
        envs: Sequence[VectorEnv],
        policy: InferenceNet,
        epsilons: np.ndarray,
        sink: Sink,
        weights_source: WeightsSource,
        stream: int,
        seed: int,
    ):
        """Reset every lane's env and send its first actions; ``envs`` are the lanes."""
        self.cfg, self.index, self.policy = cfg, index, policy
        self.k = sum(env.num_envs for env in envs)
        self.epsilons = np.asarray(epsilons, dtype=np.float32)
        if len(self.epsilons) != self.k:
            raise ValueError(f"{len(self.epsilons)} epsilons for {self.k} envs")
        self.lanes: list[_Lane] = []
        first = 0
        for i, env in enumerate(envs):
            acc = NStepAccumulator(env.num_envs, cfg.n_step, cfg.gamma, stream * 16 + i,
                                   cfg.terminal_on_life_loss)  # fmt: skip
            span = slice(first, first + env.num_envs)
            self.lanes.append(_Lane(env, span, self.epsilons[span], acc))
            first = span.stop
        self._turn = itertools.cycle(self.lanes)
        self.sink, self.weights_source = sink, weights_source
        self.rng = np.random.default_rng(seed)
        self.weights_version = -1
        self.lane_steps = 0  # lane results received
        self.env_steps = 0  # agent steps over all envs, reset steps included
        self.times = ActorTimes()
        self.episodes: list[Episode] = []
        self._score = np.zeros(self.k, dtype=np.float64)
        self._length = np.zeros(self.k, dtype=np.int64)
        self._lives = np.zeros(self.k, dtype=np.int64)
        for lane in self.lanes:
            obs, info = lane.env.reset(seed=seed + lane.envs.start)
            lane.acc.start(obs)
            self._lives[lane.envs] = info["lives"]
            self._act(lane, obs)

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
    def _act(self, lane: _Lane, obs: np.ndarray) -> None:
        """Choose the lane's actions from its observations, epsilon-greedy, and send them."""
        t0 = time.perf_counter()
        q = self.policy(obs)
        t1 = time.perf_counter()
        lane.acc.bootstrap(q.max(axis=1))
        actions = q.argmax(axis=1)
        explore = self.rng.random(len(actions)) < lane.epsilons
        actions[explore] = self.rng.integers(0, q.shape[1], int(explore.sum()))
        lane.acc.record(actions, np.take_along_axis(q, actions[:, None], axis=1)[:, 0])
        lane.env.send(actions)
        self.times.inference += t1 - t0
        self.times.nstep += time.perf_counter() - t1

    def step(self) -> None:
        """Receive the next lane's results and send that lane's next actions."""
        lane = next(self._turn)
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = lane.env.recv()
        t1 = time.perf_counter()
        self.times.env += t1 - t0
        self._observe(lane, obs, reward, terminated, truncated, info["lives"])
        self.times.nstep += time.perf_counter() - t1
        self._act(lane, obs)
        if lane.acc.step % self.cfg.push_period == 0:
            t2 = time.perf_counter()
            self.sink(lane.acc.flush())
            self.times.push += time.perf_counter() - t2
        self.lane_steps += 1
        if self.lane_steps % (self.cfg.weight_sync_period * len(self.lanes)) == 0:
            t3 = time.perf_counter()
            self.sync_weights()
            self.times.weights += time.perf_counter() - t3

    def _observe(self, lane: _Lane, obs, reward, terminated, truncated, lives) -> None:
        envs, acc = lane.envs, lane.acc
        live = ~acc.ended  # a reset step's reward belongs to no episode
        self._score[envs] += np.where(live, reward, 0.0)
        self._length[envs] += live
        for j in np.flatnonzero(live & (terminated | truncated)):
            e = envs.start + int(j)
            self.episodes.append(
                Episode(float(self._score[e]), int(self._length[e]), float(self.epsilons[e]),
                        self.index, e)
            )  # fmt: skip
            self._score[e] = 0.0
            self._length[e] = 0
        lives = np.asarray(lives)
        life_lost = (lives < self._lives[envs]) & live
        self._lives[envs] = lives
        acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, life_lost)
        self.env_steps += acc.k

    def run(self, steps: int) -> None:
        """Take ``steps`` actor steps: ``steps * lanes`` lane steps, one agent step per env."""
        for _ in range(steps * len(self.lanes)):
            self.step()

    def drain_episodes(self) -> list[Episode]:
        episodes, self.episodes = self.episodes, []
        return episodes
