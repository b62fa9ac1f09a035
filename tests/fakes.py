"""A fake of ale-py's ``AtariVectorEnv`` with the same API and semantics, no ROM needed.

Each frame is random 84x84 uint8 noise, so a stack rebuilt from the wrong frames can
never pass for the right one. Stacks are zero-padded at an episode start, autoreset is
next-step (the step after an episode's final observation ignores its action and returns
a new episode's first observation with reward 0), lives fall at random, and an episode
is truncated after ``max_steps`` agent steps, like ale-py's frame cap.

With ``batch_size < num_envs`` it is asynchronous like ale-py with one thread: ``reset``
returns the first batch, and each ``recv`` returns the next batch in the order actions
were sent (the other batches' reset observations come first), with ``info["env_id"]``.
``ScrambledAtariVectorEnv`` is asynchronous like ale-py with several threads: each
``recv`` returns any ``batch_size`` of the envs in flight, in any order.
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
        batch_size: int = 0,
    ):
        self.num_envs = num_envs
        self.batch_size = batch_size or num_envs
        assert num_envs % self.batch_size == 0
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
        self._ready: list[tuple] = []  # results waiting for recv(), oldest first
        self._sent: np.ndarray | None = None  # env ids the next send() acts on
        self.closed = False

    def _env_rng(self, e: int) -> np.random.Generator:
        """The generator env ``e``'s frames, rewards, lost lives and episode ends come from."""
        return self.rng

    def _frame(self, e: int) -> np.ndarray:
        """The next frame of env ``e``."""
        return self._env_rng(e).integers(0, 256, FRAME_SHAPE, dtype=np.uint8)

    def _reward(self, e: int, action: int) -> int:
        """The reward of ``action`` in env ``e``'s current state."""
        return int(self._env_rng(e).choice([0, 0, 0, 5, 10, 30]))

    def _step_env(self, e: int, action: int) -> tuple[int, bool, bool]:
        """Step env ``e`` (or reset it after an episode's end): reward, terminated, truncated."""
        if self.needs_reset[e]:
            self._reset_env(e)
            return 0, False, False
        reward = self._reward(e, action)
        self.stack[e, :-1] = self.stack[e, 1:]
        self.stack[e, -1] = self._frame(e)
        self.t[e] += 1
        rng = self._env_rng(e)
        if rng.random() < self.life_loss_prob:
            self.lives[e] -= 1
        terminated = bool(self.lives[e] == 0 or rng.random() < self.terminate_prob)
        truncated = not terminated and bool(self.t[e] >= self.max_steps)
        self.needs_reset[e] = terminated or truncated
        return reward, terminated, truncated

    def _reset_env(self, e: int) -> None:
        self.stack[e] = 0
        self.stack[e, -1] = self._frame(e)
        self.t[e] = 0
        self.lives[e] = self.start_lives
        self.needs_reset[e] = False

    def _result(self, ids: np.ndarray, reward, terminated, truncated) -> tuple:
        info = {"lives": self.lives[ids].copy(), "env_id": ids.astype(np.int32)}
        return self.stack[ids].copy(), reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        for e in range(self.num_envs):
            self._reset_env(e)
        b = self.batch_size
        zeros = np.zeros(b, dtype=np.int32), np.zeros(b, dtype=bool), np.zeros(b, dtype=bool)
        batches = [np.arange(i, i + b) for i in range(0, self.num_envs, b)]
        self._ready = [self._result(ids, *zeros) for ids in batches[1:]]
        self._sent = batches[0]
        obs, _, _, _, info = self._result(batches[0], *zeros)
        return obs, info

    def send(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        assert self._sent is not None, "send() twice without recv()"
        assert actions.shape == (len(self._sent),), actions.shape
        assert ((actions >= 0) & (actions < self.num_actions)).all()
        ids, self._sent = self._sent, None
        b = len(ids)
        reward = np.zeros(b, dtype=np.int32)
        terminated = np.zeros(b, dtype=bool)
        truncated = np.zeros(b, dtype=bool)
        for j, e in enumerate(ids):
            reward[j], terminated[j], truncated[j] = self._step_env(e, int(actions[j]))
        self._ready.append(self._result(ids, reward, terminated, truncated))

    def recv(self):
        assert self._ready, "recv() without send()"
        result = self._ready.pop(0)
        self._sent = result[4]["env_id"].astype(np.int64)
        return result

    def step(self, actions: np.ndarray):
        self.send(actions)
        return self.recv()

    def close(self) -> None:
        self.closed = True


class ScrambledAtariVectorEnv(FakeAtariVectorEnv):
    """The fake stepped like ale-py's vector env with several emulator threads.

    ``reset`` and ``recv`` return ``batch_size`` of the envs in flight (those not waiting
    for an action), drawn from the oldest ``2 * batch_size`` in a shuffled order, so a
    batch mixes lanes, comes in any order, and an env may run steps ahead of another.
    ``send`` applies ``actions[i]`` to the i-th env of the latest batch, as ale-py does.
    Each env draws from a generator of its own, seeded by ``(seed, env)``: what an env
    returns depends only on its seed and the actions it was sent, never on the order in
    which envs are stepped, so the same envs with ``scramble=False`` (batches of the
    oldest envs in flight, in order: whole lanes, as with one thread) are the reference
    the scrambled run must reproduce. ``laggard=(env, period)`` lets that env come back
    only on every ``period``-th batch, so the others run ever further ahead of it.
    """

    def __init__(
        self, num_envs: int, *, batch_size: int, scramble: bool = True, order_seed: int = 0,
        seed: int = 0, laggard: tuple[int, int] | None = None, **fake,
    ):  # fmt: skip
        super().__init__(num_envs, batch_size=batch_size, seed=seed, **fake)
        self.scramble, self.laggard, self.batches = scramble, laggard, 0
        self.order_rng = np.random.default_rng(order_seed)
        self._seed_envs(seed)
        self._in_flight: list[int] = []  # envs with an action (or a reset) pending, oldest first
        self._results: dict[int, tuple] = {}  # each env's result of its pending action

    def _seed_envs(self, seed: int) -> None:
        self.env_rngs = [np.random.default_rng((seed, e)) for e in range(self.num_envs)]

    def _env_rng(self, e: int) -> np.random.Generator:
        return self.env_rngs[e]

    def _batch(self) -> tuple:
        b = self.batch_size
        ready = self._in_flight
        if self.laggard is not None and self.batches % self.laggard[1]:
            ready = [e for e in ready if e != self.laggard[0]]
        assert len(ready) >= b, "too few envs in flight for a batch"
        if self.scramble:
            window = min(2 * b, len(ready))
            picked = [ready[i] for i in self.order_rng.permutation(window)[:b]]
        else:
            picked = ready[:b]
        self.batches += 1
        for e in picked:
            self._in_flight.remove(e)
        ids = np.array(picked, dtype=np.int64)
        reward, terminated, truncated, lives = (
            np.array([self._results[e][i] for e in picked]) for i in range(4)
        )
        info = {"lives": lives.astype(np.int32), "env_id": ids.astype(np.int32)}
        self._sent = ids
        obs = np.stack([self._results.pop(e)[4] for e in picked])
        return obs, reward.astype(np.int32), terminated.astype(bool), truncated.astype(bool), info

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self._seed_envs(seed)
        for e in range(self.num_envs):
            self._reset_env(e)
            self._results[e] = (0, False, False, int(self.lives[e]), self.stack[e].copy())
        self._in_flight = list(range(self.num_envs))
        obs, _, _, _, info = self._batch()
        return obs, info

    def send(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions)
        assert self._sent is not None, "send() twice without recv()"
        assert actions.shape == (len(self._sent),), actions.shape
        assert ((actions >= 0) & (actions < self.num_actions)).all()
        ids, self._sent = self._sent, None
        for j, e in enumerate(ids.tolist()):
            reward, terminated, truncated = self._step_env(e, int(actions[j]))
            self._results[e] = (reward, terminated, truncated, int(self.lives[e]),
                                self.stack[e].copy())  # fmt: skip
            self._in_flight.append(e)

    def recv(self):
        assert self._sent is None and len(self._in_flight) >= self.batch_size, "recv() first"
        return self._batch()


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

    def __init__(self, num_envs: int, max_steps: int = 20, seed: int = 0, batch_size: int = 0):
        self.side = np.zeros(num_envs, dtype=np.int64)
        super().__init__(num_envs, num_actions=4, terminate_prob=0.0, life_loss_prob=0.0,
                         max_steps=max_steps, seed=seed, batch_size=batch_size)  # fmt: skip

    def _frame(self, e: int) -> np.ndarray:
        self.side[e] = self.rng.integers(0, 2)
        frame = np.zeros(FRAME_SHAPE, dtype=np.uint8)
        columns = slice(6, 36) if self.side[e] == 0 else slice(48, 78)
        frame[20:64, columns] = 255
        return frame

    def _reward(self, e: int, action: int) -> int:
        return int(action == self.side[e])
