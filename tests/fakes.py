"""A fake of ale-py's ``AtariVectorEnv`` with the same API and semantics, no ROM needed.

Each frame is random 84x84 uint8 noise, so a stack rebuilt from the wrong frames can
never pass for the right one. Stacks are zero-padded at an episode start, autoreset is
next-step (the step after an episode's final observation ignores its action and returns
a new episode's first observation with reward 0), lives fall at random, and an episode
is truncated after ``max_steps`` agent steps, like ale-py's frame cap.
"""

from __future__ import annotations

import numpy as np

from common.envs import FRAME_SHAPE, STACK


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
        self._actions: np.ndarray | None = None
        self.closed = False

    def _frame(self) -> np.ndarray:
        return self.rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)

    def _reset_env(self, e: int) -> None:
        self.stack[e] = 0
        self.stack[e, -1] = self._frame()
        self.t[e] = 0
        self.lives[e] = self.start_lives
        self.needs_reset[e] = False

    def _info(self) -> dict[str, np.ndarray]:
        return {"lives": self.lives.copy(), "env_id": np.arange(self.num_envs, dtype=np.int32)}

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        for e in range(self.num_envs):
            self._reset_env(e)
        return self.stack.copy(), self._info()

    def send(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        assert actions.shape == (self.num_envs,), actions.shape
        assert ((actions >= 0) & (actions < self.num_actions)).all()
        self._actions = actions

    def recv(self):
        assert self._actions is not None, "recv() without send()"
        self._actions = None
        k = self.num_envs
        reward = np.zeros(k, dtype=np.int32)
        terminated = np.zeros(k, dtype=bool)
        truncated = np.zeros(k, dtype=bool)
        for e in range(k):
            if self.needs_reset[e]:
                self._reset_env(e)
                continue
            self.stack[e, :-1] = self.stack[e, 1:]
            self.stack[e, -1] = self._frame()
            self.t[e] += 1
            reward[e] = self.rng.choice([0, 0, 0, 5, 10, 30])
            if self.rng.random() < self.life_loss_prob:
                self.lives[e] -= 1
            terminated[e] = self.lives[e] == 0 or self.rng.random() < self.terminate_prob
            truncated[e] = not terminated[e] and self.t[e] >= self.max_steps
            self.needs_reset[e] = terminated[e] or truncated[e]
        return self.stack.copy(), reward, terminated, truncated, self._info()

    def step(self, actions: np.ndarray):
        self.send(actions)
        return self.recv()

    def close(self) -> None:
        self.closed = True
