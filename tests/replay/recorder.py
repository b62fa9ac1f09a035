"""Drive the fake Atari env through ``NStepAccumulator`` and remember everything seen.

``RecordedStream`` steps a ``FakeAtariVectorEnv`` the way ``Actor.step`` does (bootstrap,
record, env step, observe, push every ``push_period`` steps), records every observation
stack, action, reward and end flag, and computes by brute force, from the raw
trajectory alone, what each transition must hold. ``check_shard`` compares every live
item of a shard with that reference, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.envs import STACK
from apex_dqn.common.messages import TransitionChunk
from apex_dqn.replay.shard import ReplayShard
from tests.fakes import FakeAtariVectorEnv


@dataclass
class Expected:
    obs: np.ndarray  # (4, 84, 84) the stack the actor saw at the start
    next_obs: np.ndarray  # (4, 84, 84) the stack it saw h steps later
    action: int
    ret: float
    discount: float
    h: int
    end: str  # "terminal", "truncated", "life" (cut by a lost life) or "" (full window)


class RecordedStream:
    def __init__(
        self,
        stream: int,
        num_envs: int = 4,
        n: int = 3,
        gamma: float = 0.99,
        push_period: int = 5,
        terminal_on_life_loss: bool = False,
        seed: int = 0,
        **env_kwargs,
    ):
        self.k, self.n, self.gamma, self.push_period = num_envs, n, gamma, push_period
        self.terminal_on_life_loss = terminal_on_life_loss
        self.env = FakeAtariVectorEnv(num_envs, seed=seed, **env_kwargs)
        self.rng = np.random.default_rng(seed + 1)
        self.acc = NStepAccumulator(num_envs, n, gamma, stream, terminal_on_life_loss)
        obs, info = self.env.reset(seed=seed)
        self.acc.start(obs)
        self.obs = obs
        self.lives = np.asarray(info["lives"]).copy()
        # Per env e, per step s (0 = the first reset): what the actor saw.
        self.stacks: list[list[np.ndarray]] = [[obs[e].copy()] for e in range(num_envs)]
        self.final = [[False] for _ in range(num_envs)]  # stack at s ends an episode
        self.episode = [[0] for _ in range(num_envs)]
        self.actions: list[list[int]] = [[] for _ in range(num_envs)]  # action at s
        self.rewards: list[list[float]] = [[0.0] for _ in range(num_envs)]  # into step s
        self.terminated = [[False] for _ in range(num_envs)]
        self.truncated = [[False] for _ in range(num_envs)]
        self.life_lost = [[False] for _ in range(num_envs)]
        self.steps = 0
        self.emitted: list[tuple[int, int]] = []  # (env, step) of every pushed transition

    def step(self) -> TransitionChunk | None:
        """One actor step; returns a chunk when this step pushes."""
        k = self.k
        q = self.rng.normal(size=(k, 6)).astype(np.float32)
        self.acc.bootstrap(q.max(axis=1))
        actions = self.rng.integers(0, 6, k)
        self.acc.record(actions, q[np.arange(k), actions])
        obs, reward, terminated, truncated, info = self.env.step(actions)
        lives = np.asarray(info["lives"])
        life_lost = (lives < self.lives) & ~self.acc.ended
        self.lives = lives.copy()
        self.acc.observe(obs, np.clip(reward, -1.0, 1.0), terminated, truncated, life_lost)
        for e in range(k):
            was_final = self.final[e][-1]
            self.actions[e].append(int(actions[e]))
            self.stacks[e].append(obs[e].copy())
            self.final[e].append(bool(terminated[e] or truncated[e]))
            self.episode[e].append(self.episode[e][-1] + int(was_final))
            self.rewards[e].append(float(np.clip(reward[e], -1, 1)))
            self.terminated[e].append(bool(terminated[e]))
            self.truncated[e].append(bool(truncated[e]))
            self.life_lost[e].append(bool(life_lost[e]))
        self.obs = obs
        self.steps += 1
        if self.steps % self.push_period:
            return None
        chunk = self.acc.flush()
        newest = chunk.obs[:, -1]  # frame number step * K + env, never the zero frame
        self.emitted.extend(zip((newest % k).tolist(), (newest // k).tolist(), strict=True))
        return chunk

    def expected(self, e: int, s: int) -> Expected:
        """What the transition starting at step ``s`` of env ``e`` must hold."""
        assert not self.final[e][s], f"env {e} step {s}: a transition starts at a final stack"
        ret, end, h = 0.0, "", self.n
        for j in range(1, self.n + 1):
            assert s + j < len(self.rewards[e]), f"env {e} step {s}: emitted before step {s + j}"
            ret += self.gamma ** (j - 1) * self.rewards[e][s + j]
            if self.terminated[e][s + j]:
                end, h = "terminal", j
                break
            if self.life_lost[e][s + j] and self.terminal_on_life_loss:
                end, h = "life", j
                break
            if self.truncated[e][s + j]:
                end, h = "truncated", j
                break
        discount = 0.0 if end in ("terminal", "life") else self.gamma**h
        return Expected(
            self.stacks[e][s], self.stacks[e][s + h], self.actions[e][s], ret, discount, h, end
        )


def live_keys(shard: ReplayShard) -> np.ndarray:
    return np.arange(shard.oldest_key, shard.next_key)


def check_shard(shard: ReplayShard, emitted: list[tuple[int, RecordedStream, int, int]]):
    """Every live item equals what its actor saw; ``emitted[key]`` is (stream, rec, e, s).

    Returns the list of (Expected, stored index) pairs checked, for further assertions.
    """
    keys = live_keys(shard)
    if len(keys) == 0:
        return []
    batch = shard.lookup(keys)
    wants = []
    for key in keys.tolist():
        _, rec, e, s = emitted[key]
        wants.append(rec.expected(e, s))
    obs = np.stack([w.obs for w in wants])
    next_obs = np.stack([w.next_obs for w in wants])
    for name, have, want in (("obs", batch.obs, obs), ("next_obs", batch.next_obs, next_obs)):
        wrong = np.flatnonzero((have != want).reshape(len(keys), -1).any(axis=1))
        assert len(wrong) == 0, f"{name} of keys {keys[wrong][:10]} differ from what was seen"
    assert np.array_equal(batch.actions, [w.action for w in wants])
    assert np.allclose(batch.returns, [w.ret for w in wants], rtol=0, atol=1e-5)
    assert np.allclose(batch.discounts, [w.discount for w in wants], rtol=1e-6, atol=0)
    return [(w, i) for i, w in enumerate(wants)]


def zero_padding(stack: np.ndarray) -> int:
    """Leading all-zero frames of a stack (its episode is younger than the stack)."""
    count = 0
    for frame in stack[: STACK - 1]:
        if frame.any():
            break
        count += 1
    return count
