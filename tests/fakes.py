"""A fake of ale-py's ``AtariVectorEnv`` with the same API and semantics, no ROM needed.

Each frame is random 84x84 uint8 noise, so a stack rebuilt from the wrong frames can
never pass for the right one. Stacks are zero-padded at an episode start, autoreset is
next-step (the step after an episode's final observation ignores its action and returns
a new episode's first observation with reward 0), lives fall at random, and an episode
is truncated after ``max_steps`` agent steps, like ale-py's frame cap. ``send`` steps
every env and ``recv`` returns them all, in env order, with ``info["env_id"]``.
"""

from __future__ import annotations

import numpy as np

from apex_dqn.common.envs import FRAME_SHAPE, STACK


class FakeAtariVectorEnv:
    def __init__(
        self,
        num_envs: int,
        num_actions: int = 6,
        terminate_prob: float = 0.02,
        life_loss_prob: float = 0.02,
        max_steps: int = 200,
        lives: int = 3,
        seed: int = 0,
    ):
        self.num_envs = num_envs
        self.num_actions = num_actions
        self.terminate_prob = terminate_prob
        self.life_loss_prob = life_loss_prob
        self.max_steps = max_steps
        self.start_lives = lives
        self.rng = np.random.default_rng(seed)
        self.stack = np.zeros((num_envs, STACK, *FRAME_SHAPE), dtype=np.uint8)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.lives = np.full(num_envs, lives, dtype=np.int32)
        self.needs_reset = np.zeros(num_envs, dtype=bool)
        self._pending: tuple | None = None  # the result of the last send(), until recv()
        self.closed = False

    def _frame(self, e: int) -> np.ndarray:
        """The next frame of env ``e``."""
        return self.rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)

    def _reward(self, e: int, action: int) -> int:
        """The reward of ``action`` in env ``e``'s current state."""
        return int(self.rng.choice([0, 0, 0, 5, 10, 30]))

    def _step_env(self, e: int, action: int) -> tuple[int, bool, bool]:
        """Step env ``e`` (or reset it after an episode's end): reward, terminated, truncated."""
        if self.needs_reset[e]:
            self._reset_env(e)
            return 0, False, False
        reward = self._reward(e, action)
        self.stack[e, :-1] = self.stack[e, 1:]
        self.stack[e, -1] = self._frame(e)
        self.t[e] += 1
        if self.rng.random() < self.life_loss_prob:
            self.lives[e] -= 1
        terminated = bool(self.lives[e] == 0 or self.rng.random() < self.terminate_prob)
        truncated = not terminated and bool(self.t[e] >= self.max_steps)
        self.needs_reset[e] = terminated or truncated
        return reward, terminated, truncated

    def _reset_env(self, e: int) -> None:
        self.stack[e] = 0
        self.stack[e, -1] = self._frame(e)
        self.t[e] = 0
        self.lives[e] = self.start_lives
        self.needs_reset[e] = False

    def _result(self, reward, terminated, truncated) -> tuple:
        info = {"lives": self.lives.copy(), "env_id": np.arange(self.num_envs, dtype=np.int32)}
        return self.stack.copy(), reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        for e in range(self.num_envs):
            self._reset_env(e)
        self._pending = None
        k = self.num_envs
        obs, _, _, _, info = self._result(np.zeros(k, np.int32), np.zeros(k, bool),
                                          np.zeros(k, bool))  # fmt: skip
        return obs, info

    def send(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        assert self._pending is None, "send() twice without recv()"
        assert actions.shape == (self.num_envs,), actions.shape
        assert ((actions >= 0) & (actions < self.num_actions)).all()
        k = self.num_envs
        reward = np.zeros(k, dtype=np.int32)
        terminated = np.zeros(k, dtype=bool)
        truncated = np.zeros(k, dtype=bool)
        for e in range(k):
            reward[e], terminated[e], truncated[e] = self._step_env(e, int(actions[e]))
        self._pending = self._result(reward, terminated, truncated)

    def recv(self):
        assert self._pending is not None, "recv() without send()"
        result, self._pending = self._pending, None
        return result

    def step(self, actions: np.ndarray):
        self.send(actions)
        return self.recv()

    def close(self) -> None:
        self.closed = True


class RowPolicy:
    """A stand-in for the Q-network whose Q-values of a row depend on that row alone, exactly.

    Integer arithmetic on a fixed sample of each stack's pixels, scaled once: no
    floating-point reduction whose rounding could change with the batch a row is in, so
    a row's Q-values, argmax and first priorities are bit for bit the same whichever
    envs it is batched with.
    """

    def __init__(self, num_actions: int, seed: int = 0):
        self.num_actions = num_actions
        pixels = STACK * FRAME_SHAPE[0] * FRAME_SHAPE[1]
        self.pick = np.random.default_rng(seed).choice(pixels, 64, replace=False)
        self.weights = np.random.default_rng(seed + 1).integers(-9, 10, (64, num_actions))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = obs.reshape(len(obs), -1)[:, self.pick].astype(np.int64)
        return ((x @ self.weights) / 997.0).astype(np.float32)


class ToyAtariVectorEnv(FakeAtariVectorEnv):
    """A learnable game with the same observations and API: the newest frame shows a
    bright bar on the left or on the right; action 0 (left) or 1 (right) matching it
    earns +1, anything else 0. Episodes are truncated after ``max_steps`` steps. A
    working learner reaches near-perfect greedy play within a few hundred updates; a
    broken one stays at chance (1/4 of the steps rewarded under a uniform policy)."""

    def __init__(self, num_envs: int, max_steps: int = 20, seed: int = 0):
        self.side = np.zeros(num_envs, dtype=np.int64)
        super().__init__(num_envs, num_actions=4, terminate_prob=0.0, life_loss_prob=0.0,
                         max_steps=max_steps, seed=seed)  # fmt: skip

    def _frame(self, e: int) -> np.ndarray:
        self.side[e] = self.rng.integers(0, 2)
        frame = np.zeros(FRAME_SHAPE, dtype=np.uint8)
        columns = slice(6, 36) if self.side[e] == 0 else slice(48, 78)
        frame[20:64, columns] = 255
        return frame

    def _reward(self, e: int, action: int) -> int:
        return int(action == self.side[e])
