"""The actor: explores a batch of environments with its own epsilons and feeds replay.

Plain class, no Ray: transitions leave through ``sink(chunk)`` and newer weights arrive
through ``weights_source()``; ``actors/worker.py`` binds both to Ray, tests to local
objects. Q-values come from ``policy`` (an :class:`actors.inference.InferenceNet`: the
learner's network rebuilt for cheap batched CPU inference).

Lanes. The K environments are split into ``lanes`` equal groups that ale-py steps
asynchronously (its vector env with ``batch_size = K / lanes``): while the emulator
threads step some envs, this thread runs the forward pass for others, so inference
overlaps emulation instead of adding to it. Each lane is its own stream of frames with
its own :class:`NStepAccumulator`, which numbers frames ``step * width + row`` and so
needs its envs in lockstep, one result of every env of the lane per lane step; with one
lane the actor is plain synchronous batched stepping. ``step()`` handles one ``recv()``.

What ``recv()`` returns. With one emulator thread ale-py returns the lanes whole and in
the order their actions were sent. With more threads it returns the first ``batch_size``
envs that finished, in the order they finished (``info["env_id"]``): a batch may mix
lanes and envs come in any order, and an env may be several steps ahead of another env
of its lane. ``send()`` cannot name envs: ale-py applies ``actions[i]`` to the i-th env
of the latest ``recv()``, so each batch must be answered, whole and at once, before the
next ``recv()``; an env left unanswered would never step again.

So acting and accounting are split. Acting is per batch, whatever its envs: one forward
pass, epsilon-greedy with each env's own epsilon, ``send``. Accounting is per lane step:
a batch that is exactly one lane in order, with nothing of that lane held (always the
case with one lane or one thread), goes straight to the lane's accumulator as before;
otherwise each env's result (its newest frame, reward, end flags and lives, with the
max Q-value and the action and Q-value of the action just chosen for it) is held, per
env in arrival order, until every env of the lane has returned that step; then the
lane step is fed to the accumulator exactly as a whole batch would have been. An env's
greedy action depends only on its own observation, an exploring one is drawn with its
own epsilon (from the actor's one generator, so in another order than with whole lanes,
from the same distribution), and the accumulator sees each env's results in that env's
own order: given its actions, each env's transitions, returns, terminals, stacks and
episode scores are bit for bit those of the env stepped alone.

Holding costs memory in proportion to how far the envs of a lane drift apart: ale-py
never brings a late env back into step (each env steps once per pass of the action
queue, so a delay stays), the spread wanders like a random walk (tens of steps after
10^4 steps per env on two threads), and each held result is one 84x84 frame plus a few
numbers. The ring of held lane steps doubles when an env gets that far ahead.
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
    index: int
    ids: np.ndarray  # global env indices of this lane, consecutive
    envs: slice  # the same, as a slice: per-env arrays are updated through views
    epsilons: np.ndarray
    acc: NStepAccumulator
    started: bool = False


class _Held:
    """Results of envs whose lane step is not complete yet, in a ring of lane steps per lane.

    Every array is ``(lanes, capacity, width, ...)``. Lane ``l``'s oldest incomplete step
    sits in slot ``head[l]``; an env ``e`` (row ``e % width`` of lane ``e // width``) with
    ``ahead[e]`` results held puts its next one in slot ``(head[l] + ahead[e]) % capacity``:
    an env's results arrive in its own step order, so that slot is the lane step the
    result belongs to. ``filled[l, c]`` counts the envs present in slot ``c``; the head
    step is complete when it reaches ``width``. Writes are one fancy-indexed assignment
    per array, whatever the batch: no loop over envs.
    """

    def __init__(self, num_lanes: int, width: int, capacity: int = 8):
        self.width, self.capacity = width, capacity
        self.head = np.zeros(num_lanes, dtype=np.int64)
        self.ahead = np.zeros(num_lanes * width, dtype=np.int64)
        self.filled = np.zeros((num_lanes, capacity), dtype=np.int64)
        self.arrays: dict[str, np.ndarray] = {}

    def holds(self, lane: int) -> bool:
        return bool(self.filled[lane].any())

    def put(self, ids: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Hold row ``j`` of every value as env ``ids[j]``'s next result."""
        while (self.ahead[ids] >= self.capacity).any():
            self._grow()
        lanes, rows = np.divmod(ids, self.width)
        slots = (self.head[lanes] + self.ahead[ids]) % self.capacity
        for name, value in values.items():
            if name not in self.arrays:
                shape = (len(self.head), self.capacity, self.width, *value.shape[1:])
                self.arrays[name] = np.zeros(shape, dtype=value.dtype)
            self.arrays[name][lanes, slots, rows] = value
        self.ahead[ids] += 1
        np.add.at(self.filled, (lanes, slots), 1)

    def complete(self, lane: int) -> dict[str, np.ndarray] | None:
        """The lane's oldest step, if every env has returned it: views, valid until ``pop``."""
        head = self.head[lane]
        if self.filled[lane, head] < self.width:
            return None
        return {name: array[lane, head] for name, array in self.arrays.items()}

    def pop(self, lane: int) -> None:
        """Let go of the lane's oldest step, once it has been accounted for."""
        self.filled[lane, self.head[lane]] = 0
        self.ahead[lane * self.width : (lane + 1) * self.width] -= 1
        self.head[lane] = (self.head[lane] + 1) % self.capacity

    def _grow(self) -> None:
        """Double the ring; each lane's steps move to slots 0, 1, ... from its head on."""
        old, lanes = self.capacity, np.arange(len(self.head))[:, None]
        order = (self.head[:, None] + np.arange(old)) % old
        self.capacity *= 2
        for name, array in [*self.arrays.items(), ("filled", self.filled)]:
            grown = np.zeros((len(lanes), self.capacity, *array.shape[2:]), dtype=array.dtype)
            grown[:, :old] = array[lanes, order]
            if name == "filled":
                self.filled = grown
            else:
                self.arrays[name] = grown
        self.head[:] = 0


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
        self.width = width
        self.lanes = []
        for i, first in enumerate(range(0, self.k, width)):
            acc = NStepAccumulator(
                width, cfg.n_step, cfg.gamma, stream * 16 + i, cfg.terminal_on_life_loss
            )
            ids, envs = np.arange(first, first + width), slice(first, first + width)
            self.lanes.append(_Lane(i, ids, envs, self.epsilons[envs], acc))
        self.sink, self.weights_source = sink, weights_source
        self.rng = np.random.default_rng(seed)
        self.weights_version = -1
        self.lane_steps = 0  # batches received (one lane's worth of env steps each)
        self.env_steps = 0  # agent steps over all envs, reset steps included
        self.times = ActorTimes()
        self.episodes: list[Episode] = []
        self._score = np.zeros(self.k, dtype=np.float64)
        self._length = np.zeros(self.k, dtype=np.int64)
        self._lives = np.zeros(self.k, dtype=np.int64)
        self._held: _Held | None = None  # created by the first batch that is not a whole lane
        obs, info = env.reset(seed=seed)
        lane = self._whole_lane(info)
        if lane is not None:
            self._act(lane, obs, info["lives"])
        else:
            b = len(obs)
            no_end = np.zeros(b, dtype=bool)
            self._act_mixed(obs, np.zeros(b, dtype=np.int64), no_end, no_end, info)

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
    def _whole_lane(self, info: dict) -> _Lane | None:
        """The lane this batch is, if it is one whole lane in order with nothing held."""
        ids = info.get("env_id")
        if ids is None:
            if len(self.lanes) == 1:
                return self.lanes[0]
            raise RuntimeError("an env stepped in lanes must name its envs in info['env_id']")
        ids = np.asarray(ids)
        lane = self.lanes[int(ids[0]) // self.width]
        if ids.shape != lane.ids.shape or not (ids == lane.ids).all():
            return None
        if self._held is not None and self._held.holds(lane.index):
            return None
        return lane

    def _start(self, lane: _Lane, obs: np.ndarray, lives: np.ndarray) -> None:
        lane.acc.start(obs)
        self._lives[lane.envs] = lives
        lane.started = True

    def _act(self, lane: _Lane, obs: np.ndarray, lives: np.ndarray) -> None:
        """Start or continue a whole lane from its observations: choose actions, send them."""
        t0 = time.perf_counter()
        if not lane.started:
            self._start(lane, obs, lives)
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

    def _act_mixed(self, obs, reward, terminated, truncated, info: dict) -> None:
        """Answer a batch of any envs at once, then account for the lane steps it completes."""
        t0 = time.perf_counter()
        ids = np.asarray(info["env_id"], dtype=np.int64)
        q = self.policy(obs)
        t1 = time.perf_counter()
        actions = q.argmax(axis=1)
        explore = self.rng.random(len(ids)) < self.epsilons[ids]
        actions[explore] = self.rng.integers(0, q.shape[1], int(explore.sum()))
        self.env.send(actions)
        if self._held is None:
            self._held = _Held(len(self.lanes), self.width)
        values = {
            "frame": obs[:, -1:],  # the accumulator keeps only the newest frame of a stack
            # float64 and int64 hold any env's rewards and lives exactly, whatever batch
            # first sets the arrays' types (the reset's rewards are made up here).
            "reward": np.asarray(reward, dtype=np.float64),
            "terminated": np.asarray(terminated, dtype=bool),
            "truncated": np.asarray(truncated, dtype=bool),
            "lives": np.asarray(info["lives"], dtype=np.int64),
            "q_max": q.max(axis=1),
            "action": actions,
            "q_taken": np.take_along_axis(q, actions[:, None], axis=1)[:, 0],
        }
        self._held.put(ids, values)
        push = 0.0
        for i in np.unique(ids // self.width):
            lane = self.lanes[int(i)]
            while (step := self._held.complete(lane.index)) is not None:
                push += self._account(lane, step)
                self._held.pop(lane.index)
        self.times.inference += t1 - t0
        self.times.nstep += time.perf_counter() - t1 - push
        self.times.push += push

    def _account(self, lane: _Lane, s: dict[str, np.ndarray]) -> float:
        """Feed one complete held lane step to the accumulator, as ``step`` would a whole
        lane; returns the seconds spent pushing."""
        observed = lane.started
        if observed:
            self._observe(lane, s["frame"], s["reward"], s["terminated"], s["truncated"],
                          s["lives"])  # fmt: skip
        else:
            self._start(lane, s["frame"], s["lives"])
        lane.acc.bootstrap(s["q_max"])
        lane.acc.record(s["action"], s["q_taken"])
        if observed and lane.acc.step % self.cfg.push_period == 0:
            t0 = time.perf_counter()
            self.sink(lane.acc.flush())
            return time.perf_counter() - t0
        return 0.0

    def step(self) -> None:
        """Receive one batch of results and send that batch's next actions."""
        t0 = time.perf_counter()
        obs, reward, terminated, truncated, info = self.env.recv()
        t1 = time.perf_counter()
        self.times.env += t1 - t0
        lane = self._whole_lane(info)
        if lane is None:
            self._act_mixed(obs, reward, terminated, truncated, info)
        else:
            observed = lane.started
            if observed:
                self._observe(lane, obs, reward, terminated, truncated, info["lives"])
            self.times.nstep += time.perf_counter() - t1
            self._act(lane, obs, info["lives"])
            if observed and lane.acc.step % self.cfg.push_period == 0:
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
            e = int(lane.ids[j])
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
        self.env_steps += len(lane.ids)

    def run(self, steps: int) -> None:
        """Take ``steps`` actor steps: ``steps * lanes`` batches, ``steps`` per env on average."""
        for _ in range(steps * len(self.lanes)):
            self.step()

    def drain_episodes(self) -> list[Episode]:
        episodes, self.episodes = self.episodes, []
        return episodes
