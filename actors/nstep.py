"""Vectorized n-step transition building for a batch of K environments.

For a transition starting at step t the accumulator emits

    R_t = sum_{j=0}^{h-1} gamma^j * r_{t+j}        (r clipped to [-1, 1])
    discount_t = 0            if the episode terminated within the window
               = gamma^h      otherwise
    next_obs_t = obs_{t+h}

with h = n, or fewer when the episode ends (terminates or is truncated) at step t + h.
The learner's target is ``R_t + discount_t * Q_target(next_obs_t, argmax_a Q(next_obs_t, a))``:
a terminal zeroes the bootstrap, a truncation (frame cap) keeps it, and a lost life
zeroes it too when ``terminal_on_life_loss`` is set, though the game goes on.

Frames are named by number: every step each env contributes one new frame (the newest
of its 84x84 stack), numbered ``step * K + env``; a stack is the numbers of its four
frames, ``ZERO_FRAME`` standing for the zero padding of an episode start, exactly as
ale-py pads. The first priority of a transition is |R_t + discount_t * max_a Q(next_obs_t, a)
- Q(obs_t, a_t)|, from the actor's own network, computed with values the actor already has
from its action-selecting forward passes.

Call order per step: ``bootstrap(q_next_max)`` with the Q-values of the current
observations (it emits what is complete), ``record(actions, q_taken)`` for the actions
sent, then ``observe(...)`` with what the env returned.
"""

from __future__ import annotations

import numpy as np

from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import ZERO_FRAME, TransitionChunk


class NStepAccumulator:
    def __init__(
        self, num_envs: int, n: int, gamma: float, stream: int, terminal_on_life_loss: bool
    ):
        self.k, self.n, self.gamma, self.stream = num_envs, n, gamma, stream
        self.terminal_on_life_loss = terminal_on_life_loss
        self._powers = gamma ** np.arange(n + 1, dtype=np.float64)
        k = num_envs
        self.stack = np.full((k, STACK), ZERO_FRAME, dtype=np.int64)
        # Pending transitions of each env, oldest first, `count[e]` of them.
        self.count = np.zeros(k, dtype=np.int64)
        self.win_obs = np.zeros((k, n, STACK), dtype=np.int64)
        self.win_action = np.zeros((k, n), dtype=np.uint8)
        self.win_q = np.zeros((k, n), dtype=np.float32)
        self.win_return = np.zeros((k, n), dtype=np.float64)
        # ended: the current obs is the last of an episode, so the next step is a reset.
        self.ended = np.zeros(k, dtype=bool)
        self.cut = np.zeros(k, dtype=bool)  # pending transitions must stop bootstrapping
        self.step = 0
        self._rows = np.arange(k, dtype=np.int64)
        self._window = np.arange(n)
        self._first_frame = 0
        self._frames: list[np.ndarray] = []
        self._out: list[tuple[np.ndarray, ...]] = []

    # ------------------------------------------------------------------------- frames
    def start(self, obs: np.ndarray) -> None:
        """Begin from the observations of a fresh reset, (K, 4, 84, 84)."""
        self.stack[:] = ZERO_FRAME
        self.stack[:, -1] = self._rows
        self._frames.append(obs[:, -1].copy())

    def _add_frames(self, obs: np.ndarray, reset: np.ndarray) -> None:
        self.step += 1
        self.stack[:, :-1] = self.stack[:, 1:]
        self.stack[:, -1] = self.step * self.k + self._rows
        if reset.any():
            self.stack[reset, :-1] = ZERO_FRAME
        self._frames.append(obs[:, -1].copy())

    # -------------------------------------------------------------------- transitions
    def bootstrap(self, q_max: np.ndarray) -> None:
        """Emit every transition whose bootstrap observation is the current one."""
        ending = self.ended | self.cut
        if ending.any():  # episode ends and lost lives: rare, flush the whole window
            for e in np.flatnonzero(ending):
                c = int(self.count[e])
                if c:
                    disc = np.zeros(c) if self.cut[e] else self._powers[c - np.arange(c)]
                    window = (
                        self.win_obs[e, :c],
                        np.repeat(self.stack[e][None], c, axis=0),
                        self.win_action[e, :c],
                        self.win_return[e, :c],
                        self.win_q[e, :c],
                    )
                    self._emit(*window, disc, q_max[e])
                self.count[e] = 0
            self.cut[:] = False
        full = np.flatnonzero(self.count == self.n)
        if len(full):
            # Every env's window is full on most steps: basic indexing is cheaper then.
            rows = slice(None) if len(full) == self.k else full
            self._emit(self.win_obs[rows, 0], self.stack[rows], self.win_action[rows, 0],
                       self.win_return[rows, 0], self.win_q[rows, 0],
                       np.full(len(full), self._powers[self.n]), q_max[rows])  # fmt: skip
            self.win_obs[rows, :-1] = self.win_obs[rows, 1:]
            self.win_action[rows, :-1] = self.win_action[rows, 1:]
            self.win_q[rows, :-1] = self.win_q[rows, 1:]
            self.win_return[rows, :-1] = self.win_return[rows, 1:]
            self.count[rows] -= 1

    def _emit(self, obs, next_obs, actions, returns, q_taken, discounts, q_max) -> None:
        # Copies: the window arrays are overwritten by record() before the chunk is flushed.
        returns = returns.astype(np.float32)
        discounts = discounts.astype(np.float32)
        priorities = np.abs(returns + discounts * q_max - q_taken)
        self._out.append((obs.copy(), next_obs.copy(), actions.copy(), returns, discounts,
                          priorities))  # fmt: skip

    def record(self, actions: np.ndarray, q_taken: np.ndarray) -> None:
        """Open a transition for each env whose action will count (not a reset step)."""
        live = np.flatnonzero(~self.ended) if self.ended.any() else self._rows
        slot = self.count[live]
        self.win_obs[live, slot] = self.stack[live]
        self.win_action[live, slot] = actions[live]
        self.win_q[live, slot] = q_taken[live]
        self.win_return[live, slot] = 0.0
        self.count[live] += 1

    def observe(
        self,
        obs: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        life_lost: np.ndarray,
    ) -> None:
        """Take one step's results; ``rewards`` are already clipped."""
        was_reset = self.ended
        live = ~was_reset
        if rewards.any():
            # Pending item j of an env with c items gets reward r * gamma^(c - 1 - j).
            j = self._window
            power = np.maximum(self.count[:, None] - 1 - j, 0)
            mask = (j < self.count[:, None]) & live[:, None]
            self.win_return += np.where(mask, rewards[:, None] * self._powers[power], 0.0)
        self._add_frames(obs, was_reset)
        self.ended = live & (terminated | truncated)
        self.cut = live & (terminated | (life_lost & self.terminal_on_life_loss))

    # -------------------------------------------------------------------------- chunks
    def pending_transitions(self) -> int:
        return sum(len(out[2]) for out in self._out)

    def flush(self) -> TransitionChunk:
        """Everything emitted since the last flush, with the frames seen since then."""
        if self._frames:
            frames = np.concatenate(self._frames).reshape(-1, *FRAME_SHAPE)
        else:
            frames = np.zeros((0, *FRAME_SHAPE), dtype=np.uint8)
        if self._out:
            obs, next_obs, actions, returns, discounts, priorities = (
                np.concatenate(parts) for parts in zip(*self._out, strict=True)
            )
        else:
            obs = next_obs = np.zeros((0, STACK), dtype=np.int64)
            actions = np.zeros(0, dtype=np.uint8)
            returns = discounts = priorities = np.zeros(0, dtype=np.float32)
        chunk = TransitionChunk(
            stream=self.stream,
            first_frame=self._first_frame,
            frames=frames,
            tail=(self.n + STACK) * self.k,
            obs=obs,
            next_obs=next_obs,
            actions=actions,
            returns=returns,
            discounts=discounts,
            priorities=priorities.astype(np.float32),
        )
        self._first_frame += len(frames)
        self._frames.clear()
        self._out.clear()
        return chunk
