"""Evaluation under the standard protocol: a Q-network (or a random policy) plays whole games.

The protocol (:mod:`apex_dqn.evaluation.protocol`, to compare with published scores):
unclipped game score; up to 30 random no-op starts; epsilon 0.05 unless set; episodes
capped at 108,000 emulator frames; the full game (a lost life is not an episode's end);
sticky actions as the config says. A random policy is the same evaluator with epsilon 1.0.

:class:`Evaluator` (plain, no Ray) plays N episodes on ale-py's vector env, K at a time.
Each env plays a fixed share of the N episodes (``N // K``, one more for the first
``N % K``), so the mean is over episodes started independently: keeping the first N to
finish would over-represent short episodes and bias the mean towards them. It can also
play one episode on gymnasium's reference env and keep the emulator's RGB screens, for
videos and for watching.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from apex_dqn.common.config import Config, normalize_game
from apex_dqn.common.envs import make_reference_env, make_vector_env
from apex_dqn.common.networks import QNetwork
from apex_dqn.evaluation.protocol import (
    ALE_FPS,
    EVAL_EPSILON,
    EVAL_MAX_EPISODE_FRAMES,
    EVAL_NOOP_MAX,
)

VIDEO_MAX_STEPS = 4_500  # 5 minutes of play at frame skip 4

# on_frame(rgb_screen, score_so_far, agent_steps) -> False to stop the episode early
FrameCallback = Callable[[np.ndarray, float, int], "bool | None"]


@dataclass
class EvalResult:
    """Per-episode results of one evaluation, in the order the envs finished them."""

    epsilon: float
    seed: int
    scores: np.ndarray  # unclipped game score
    lengths: np.ndarray  # agent steps
    frames: np.ndarray  # emulator frames, no-op starts included
    truncated: np.ndarray  # ended by the frame cap, not by game over
    action_counts: np.ndarray  # actions taken, over all counted episodes
    wall_s: float
    time_limited: bool = False  # the time limit cut the evaluation short

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        """Population standard deviation of the episode scores."""
        return float(np.std(self.scores))

    @property
    def min(self) -> float:
        return float(np.min(self.scores))

    @property
    def max(self) -> float:
        return float(np.max(self.scores))

    def summary(self) -> dict[str, Any]:
        """Plain Python values: safe to return over Ray or dump as JSON."""
        return {
            "epsilon": float(self.epsilon),
            "seed": int(self.seed),
            "episodes": len(self.scores),
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "scores": [float(s) for s in self.scores],
            "lengths": [int(n) for n in self.lengths],
            "frames": [int(f) for f in self.frames],
            "truncated": [bool(t) for t in self.truncated],
            "num_truncated": int(np.sum(self.truncated)),
            "mean_length": float(np.mean(self.lengths)),
            "env_frames": int(np.sum(self.frames)),
            "action_counts": [int(c) for c in self.action_counts],
            "wall_s": float(self.wall_s),
            "time_limited": bool(self.time_limited),
        }


@dataclass
class Recording:
    """One episode played on the reference env, with the emulator's RGB screens."""

    frames: np.ndarray  # uint8 (T, 210, 160, 3): the screen after the reset and each step
    score: float
    steps: int
    terminated: bool  # game over
    truncated: bool  # frame cap
    fps: float  # frames per second of real play time

    @property
    def cut(self) -> bool:
        """True when the recording stopped before the episode ended."""
        return not (self.terminated or self.truncated)


class Evaluator:
    """Plays a Q-network (or a random policy) under the evaluation protocol.

    ``cfg`` gives the game, frame skip and sticky actions; ``noop_max`` and
    ``max_episode_frames`` are the protocol's, whatever training used. ``net`` may be
    None for a purely random policy (epsilon 1.0).
    """

    def __init__(
        self,
        cfg: Config,
        net: QNetwork | None,
        *,
        num_envs: int = 8,
        epsilon: float = EVAL_EPSILON,
        noop_max: int = EVAL_NOOP_MAX,
        max_episode_frames: int = EVAL_MAX_EPISODE_FRAMES,
        threads: int = 1,
        seed: int = 0,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs}: need at least one env")
        _check_epsilon(epsilon)
        self.cfg = cfg.replace(
            game=normalize_game(cfg.game),
            noop_max=noop_max,
            max_episode_frames=max_episode_frames,
        )
        self.net = net
        if net is not None:
            net.eval()
        self.num_envs = num_envs
        self.epsilon = epsilon
        self.threads = threads
        self._seed = seed

    @property
    def video_fps(self) -> float:
        """Recorded screens per second of real play: one per agent step."""
        return ALE_FPS / self.cfg.frame_skip

    def _next_seed(self) -> int:
        seed = self._seed
        self._seed += 7_919
        return seed

    def _actions(
        self, obs: np.ndarray, epsilon: float, rng: np.random.Generator, n: int
    ) -> np.ndarray:
        k = len(obs)
        if epsilon >= 1.0:
            return rng.integers(0, n, k)
        assert self.net is not None
        with torch.inference_mode():
            actions = self.net(torch.from_numpy(obs)).argmax(dim=1).numpy()
        explore = rng.random(k) < epsilon
        actions[explore] = rng.integers(0, n, int(explore.sum()))
        return actions

    def evaluate(
        self,
        episodes: int,
        *,
        epsilon: float | None = None,
        seed: int | None = None,
        time_limit_s: float | None = None,
    ) -> EvalResult:
        """Play ``episodes`` whole episodes; each env plays its share of them.

        ``time_limit_s`` bounds the wall time: when it has passed, play stops. Each env
        then keeps the episodes it finished; an env that finished none counts the one it
        is playing, as truncated with its score so far, the way the protocol counts an
        episode cut by the frame cap. So every env contributes, and no episode begun just
        before the limit (a near-zero score) enters the mean; the mean is still biased
        towards short episodes when the limit cuts in, which ``time_limited`` says.
        """
        if episodes < 1:
            raise ValueError(f"episodes={episodes}: need at least one")
        if time_limit_s is not None and not time_limit_s > 0:
            raise ValueError(f"time_limit_s={time_limit_s}: must be positive")
        epsilon = self.epsilon if epsilon is None else epsilon
        _check_epsilon(epsilon, self.net, need_net=True)
        seed = self._next_seed() if seed is None else seed
        k = min(self.num_envs, episodes)
        quota = np.full(k, episodes // k)
        quota[: episodes % k] += 1
        rng = np.random.default_rng(seed)
        started = time.perf_counter()
        env = make_vector_env(self.cfg, k, threads=self.threads)
        try:
            n = int(env.single_action_space.n)
            counts = np.zeros(n, dtype=np.int64)
            done = np.zeros(k, dtype=np.int64)
            score = np.zeros(k, dtype=np.float64)
            length = np.zeros(k, dtype=np.int64)
            # True where the last step ended an episode: the next step is a reset step,
            # which ignores its action and returns a new episode's first frame, reward 0.
            resetting = np.zeros(k, dtype=bool)
            results: list[tuple[float, int, int, bool]] = []
            limited = False
            obs, _ = env.reset(seed=seed)
            while (done < quota).any():
                actions = self._actions(obs, epsilon, rng, n)
                counted = ~resetting & (done < quota)
                counts += np.bincount(actions[counted], minlength=n)
                env.send(actions.astype(np.int64))
                obs, reward, terminated, truncated, info = env.recv()
                live = ~resetting
                score += np.where(live, reward, 0.0)
                length += live
                ended = live & (terminated | truncated)
                frames = np.asarray(info.get("episode_frame_number", length * self.cfg.frame_skip))
                frames = frames.astype(np.int64)
                for e in np.flatnonzero(ended & (done < quota)):
                    cut = bool(truncated[e] and not terminated[e])
                    results.append((float(score[e]), int(length[e]), int(frames[e]), cut))
                    done[e] += 1
                score[ended] = 0.0
                length[ended] = 0
                resetting = ended
                # Checked after a step: every env has then finished an episode or begun one.
                late = time_limit_s is not None and time.perf_counter() - started > time_limit_s
                if late and (done < quota).any():
                    limited = True
                    for e in np.flatnonzero((done == 0) & (length > 0)):
                        results.append((float(score[e]), int(length[e]), int(frames[e]), True))
                    break
        finally:
            env.close()
        scores, lengths, frame_counts, cut = (np.array(c) for c in zip(*results, strict=True))
        return EvalResult(
            epsilon=float(epsilon),
            seed=int(seed),
            scores=scores.astype(np.float64),
            lengths=lengths.astype(np.int64),
            frames=frame_counts.astype(np.int64),
            truncated=cut.astype(bool),
            action_counts=counts,
            wall_s=time.perf_counter() - started,
            time_limited=limited,
        )

    def record(
        self,
        *,
        epsilon: float | None = None,
        seed: int | None = None,
        max_steps: int | None = VIDEO_MAX_STEPS,
        keep_frames: bool = True,
        on_frame: FrameCallback | None = None,
    ) -> Recording:
        """Play one episode on gymnasium's reference env, keeping its RGB screens.

        The reference pipeline gives the network the same observations as the vector
        env, and its emulator gives the full-colour screen. The recording stops after
        ``max_steps`` agent steps (None: at the episode's end) or when ``on_frame``
        returns False.
        """
        epsilon = self.epsilon if epsilon is None else epsilon
        _check_epsilon(epsilon, self.net, need_net=True)
        seed = self._next_seed() if seed is None else seed
        rng = np.random.default_rng(seed)
        env = make_reference_env(self.cfg)
        try:
            n = int(env.action_space.n)
            ale = env.unwrapped.ale
            obs, _ = env.reset(seed=seed)
            frames: list[np.ndarray] = []
            score, steps, terminated, truncated = 0.0, 0, False, False
            while True:
                screen = ale.getScreenRGB()
                if keep_frames:
                    frames.append(screen)
                if on_frame is not None and on_frame(screen, score, steps) is False:
                    break
                if terminated or truncated or (max_steps is not None and steps >= max_steps):
                    break
                action = int(self._actions(np.asarray(obs)[None], epsilon, rng, n)[0])
                obs, reward, terminated, truncated, _ = env.step(action)
                score += float(reward)
                steps += 1
        finally:
            env.close()
        shape = (0, 210, 160, 3)
        return Recording(
            frames=np.stack(frames) if frames else np.zeros(shape, np.uint8),
            score=score,
            steps=steps,
            terminated=bool(terminated),
            truncated=bool(truncated and not terminated),
            fps=self.video_fps,
        )


def _check_epsilon(epsilon: float, net: QNetwork | None = None, need_net: bool = False) -> None:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon={epsilon} is invalid: must be in [0, 1]")
    if need_net and net is None and epsilon < 1.0:
        raise ValueError(f"epsilon={epsilon}: a policy that is not purely random needs a network")
