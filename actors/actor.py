"""The actor: explores a batch of environments with its own epsilons and feeds replay.

Plain class, no Ray: transitions leave through ``sink(chunk)`` and newer weights arrive
through ``weights_source()``; ``actors/worker.py`` binds both to Ray, tests to local
objects. One ``step()`` is one batched forward pass and one step of every env.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from actors.nstep import NStepAccumulator
from common.config import Config
from common.envs import VectorEnv
from common.messages import TransitionChunk
from common.networks import QNetwork, load_numpy_state

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

    env: float = 0.0
    inference: float = 0.0
    nstep: float = 0.0
    push: float = 0.0
    weights: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


class Actor:
    def __init__(
        self,
        cfg: Config,
        index: int,
        env: VectorEnv,
        net: QNetwork,
        epsilons: np.ndarray,
        sink: Sink,
        weights_source: WeightsSource,
        stream: int,
        seed: int,
    ):
        self.cfg, self.index, self.env, self.net = cfg, index, env, net
        self.epsilons = np.asarray(epsilons, dtype=np.float32)
        self.k = env.num_envs
        if len(self.epsilons) != self.k:
            raise ValueError(f"{len(self.epsilons)} epsilons for {self.k} envs")
        self.sink, self.weights_source = sink, weights_source
        self.rng = np.random.default_rng(seed)
        self.acc = NStepAccumulator(
            self.k, cfg.n_step, cfg.gamma, stream, cfg.terminal_on_life_loss
        )
        self.weights_version = -1
        self.steps = 0  # batched steps taken
        self.env_steps = 0  # agent steps over all envs, reset steps included
        self.times = ActorTimes()
        self.episodes: list[Episode] = []
        self._score = np.zeros(self.k, dtype=np.float64)
        self._length = np.zeros(self.k, dtype=np.int64)
        obs, info = env.reset(seed=seed)
        self.obs = obs
        self._lives = np.asarray(info["lives"]).copy()
        self.acc.start(obs)
        self.net.eval()

    def sync_weights(self) -> bool:
        """Load newer weights if the source has any; never waits for them."""
        got = self.weights_source()
        if got is None:
            return False
        version, state = got
        if version <= self.weights_version:
            return False
        load_numpy_state(self.net, state)
        self.weights_version = version
        return True

    @torch.inference_mode()
    def _q_values(self) -> np.ndarray:
        return self.net(torch.from_numpy(self.obs)).numpy()

    def step(self) -> None:
        t0 = time.perf_counter()
        q = self._q_values()
        t1 = time.perf_counter()
        self.acc.bootstrap(q.max(axis=1))
        greedy = q.argmax(axis=1)
        explore = self.rng.random(self.k) < self.epsilons
        actions = np.where(explore, self.rng.integers(0, q.shape[1], self.k), greedy)
        self.acc.record(actions, q[np.arange(self.k), actions])
        t2 = time.perf_counter()
        self.env.send(actions.astype(np.int64))
        obs, reward, terminated, truncated, info = self.env.recv()
        t3 = time.perf_counter()
        self._track_episodes(reward, terminated, truncated)
        lives = np.asarray(info["lives"])
        life_lost = (lives < self._lives) & ~self.acc.ended
        self._lives = lives.copy()
        self.acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, life_lost)
        self.obs = obs
        self.steps += 1
        self.env_steps += self.k
        t4 = time.perf_counter()
        self.times.inference += t1 - t0
        self.times.nstep += (t2 - t1) + (t4 - t3)
        self.times.env += t3 - t2
        if self.steps % self.cfg.push_period == 0:
            self.push()
        if self.steps % self.cfg.weight_sync_period == 0:
            t5 = time.perf_counter()
            self.sync_weights()
            self.times.weights += time.perf_counter() - t5

    def push(self) -> None:
        t0 = time.perf_counter()
        self.sink(self.acc.flush())
        self.times.push += time.perf_counter() - t0

    def _track_episodes(
        self, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> None:
        live = ~self.acc.ended  # a reset step's reward belongs to no episode
        self._score += np.where(live, reward, 0.0)
        self._length += live
        for e in np.flatnonzero(live & (terminated | truncated)):
            self.episodes.append(
                Episode(
                    float(self._score[e]),
                    int(self._length[e]),
                    float(self.epsilons[e]),
                    self.index,
                    int(e),
                )
            )
            self._score[e] = 0.0
            self._length[e] = 0

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def drain_episodes(self) -> list[Episode]:
        episodes, self.episodes = self.episodes, []
        return episodes
