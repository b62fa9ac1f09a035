"""Evaluation with the standard protocol, and a command to score a checkpoint.

The protocol (to compare with published scores): unclipped game score; up to 30 random
no-op starts; epsilon 0.05 unless set; episodes capped at 108,000 emulator frames; the
full game (all lives, a lost life is not an episode's end); sticky actions as the
config says. A random policy is the same evaluator with epsilon 1.0.

* :class:`Evaluator` (plain class, no Ray) plays N episodes on ale-py's vector env, K at a
  time. Each env plays a fixed share of the N episodes, so short episodes are not
  over-represented the way they would be by keeping the first N to finish. It can also
  play one episode on gymnasium's reference env and keep the emulator's RGB screens.
* :class:`EvaluatorWorker` is the thin Ray wrapper the driver decorates with
  ``ray.remote``; ``evaluate(version, weights, episodes)`` returns a plain dict.
* ``python -m actors.evaluate --checkpoint PATH --episodes N`` prints a checkpoint's
  scores next to the random policy's, measured the same way, and can write a video.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from apex_dqn.common.config import Config, normalize_game
from apex_dqn.common.envs import make_reference_env, make_vector_env
from apex_dqn.common.networks import QNetwork, build_network, load_numpy_state
from apex_dqn.common.protocol import (
    ALE_FPS,
    EVAL_EPSILON,
    EVAL_MAX_EPISODE_FRAMES,
    EVAL_NOOP_MAX,
    human_normalized,
    reference_scores,
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
        self, episodes: int, *, epsilon: float | None = None, seed: int | None = None
    ) -> EvalResult:
        """Play ``episodes`` whole episodes; each env plays its share of them."""
        if episodes < 1:
            raise ValueError(f"episodes={episodes}: need at least one")
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
                for e in np.flatnonzero(ended & (done < quota)):
                    cut = bool(truncated[e] and not terminated[e])
                    results.append((float(score[e]), int(length[e]), int(frames[e]), cut))
                    done[e] += 1
                score[ended] = 0.0
                length[ended] = 0
                resetting = ended
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


class EvaluatorWorker:
    """Ray wrapper: ``ray.remote(EvaluatorWorker).options(num_cpus=1).remote(cfg, ...)``.

    ``evaluate`` loads the given weights (the numpy state dict the learner publishes;
    pass its ObjectRef directly and Ray hands the dict over), plays ``episodes`` and,
    when ``video`` is on, one more recorded episode, returned as animated-GIF bytes
    ready for :func:`common.video.log_video`.
    """

    def __init__(
        self,
        cfg: Config,
        num_actions: int,
        *,
        num_envs: int = 8,
        epsilon: float = EVAL_EPSILON,
        noop_max: int = EVAL_NOOP_MAX,
        max_episode_frames: int = EVAL_MAX_EPISODE_FRAMES,
        video: bool = True,
        video_max_steps: int = VIDEO_MAX_STEPS,
        threads: int = 1,
        seed: int | None = None,
    ):
        if video:
            from apex_dqn.common.video import VideoError, gif_available

            if not gif_available():
                raise VideoError("videos need Pillow: pip install 'apex-dqn[video]'")
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.net = build_network(num_actions, cfg.network, cfg.dueling)
        self.video = video
        self.video_max_steps = video_max_steps
        self.evaluator = Evaluator(
            cfg,
            self.net,
            num_envs=num_envs,
            epsilon=epsilon,
            noop_max=noop_max,
            max_episode_frames=max_episode_frames,
            threads=threads,
            seed=cfg.seed + 1_000_003 if seed is None else seed,
        )

    def evaluate(
        self,
        weights_version: int,
        numpy_state_dict: dict[str, Any],
        episodes: int,
        video: bool | None = None,
    ) -> dict[str, Any]:
        load_numpy_state(self.net, numpy_state_dict)
        result = self.evaluator.evaluate(episodes)
        out: dict[str, Any] = {"weights_version": int(weights_version), **result.summary()}
        out["human_normalized"] = human_normalized(result.mean, self.evaluator.cfg.game)
        out["video_gif"] = None
        if self.video if video is None else video:
            from apex_dqn.common.video import encode_gif

            rec = self.evaluator.record(max_steps=self.video_max_steps)
            out.update(
                video_gif=encode_gif(rec.frames, rec.fps),
                video_score=rec.score,
                video_steps=rec.steps,
                video_fps=rec.fps,
                video_cut=rec.cut,
            )
        return out


# ----------------------------------------------------------------------------- command


class CommandError(RuntimeError):
    """Ends the command with a one-line message and exit code 2."""


def config_from_dict(saved: dict[str, Any]) -> Config:
    """The checkpoint's config, keeping only settings this version still knows."""
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in saved.items() if k in names})
    return cfg.replace(game=normalize_game(cfg.game))


def load_policy(path: str | os.PathLike) -> tuple[Config, QNetwork, dict[str, Any]]:
    """Rebuild the online Q-network of a checkpoint file (or a run directory's newest)."""
    from apex_dqn.common import checkpoint
    from apex_dqn.common.envs import available_games, num_actions

    try:
        payload = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise CommandError(str(exc)) from exc
    cfg = config_from_dict(payload["config"])
    if cfg.game not in available_games():
        raise CommandError(f"checkpoint {payload['path']} is for an unknown game {cfg.game!r}")
    learner = payload["learner"]
    if not isinstance(learner, dict) or "online" not in learner:
        raise CommandError(f"checkpoint {payload['path']} has no online network")
    net = build_network(num_actions(cfg.game), cfg.network, cfg.dueling)
    try:
        net.load_state_dict(learner["online"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CommandError(
            f"checkpoint {payload['path']} does not fit a {cfg.network} network for "
            f"{cfg.game}: {first}"
        ) from exc
    net.eval()
    return cfg, net, payload


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m actors.evaluate",
        description="Score a checkpoint under the evaluation protocol, next to a random policy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory")
    p.add_argument("--episodes", type=int, default=10, help="episodes per policy")
    p.add_argument("--epsilon", type=float, default=EVAL_EPSILON, help="exploration rate")
    p.add_argument("--envs", type=int, default=8, help="episodes played in parallel")
    p.add_argument("--noop-max", type=int, default=EVAL_NOOP_MAX, help="random no-op starts")
    p.add_argument(
        "--max-episode-frames",
        type=int,
        default=EVAL_MAX_EPISODE_FRAMES,
        help="cap on an episode's emulator frames",
    )
    p.add_argument(
        "--sticky-action-prob",
        type=float,
        default=None,
        help="repeat-action probability (default: the checkpoint's)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of no-op starts and exploration")
    p.add_argument("--no-random", action="store_true", help="skip measuring the random policy")
    p.add_argument("--video", default="", help="record one episode to this .mp4 or .gif file")
    p.add_argument(
        "--video-max-steps",
        type=int,
        default=VIDEO_MAX_STEPS,
        help="stop the recording after this many agent steps",
    )
    p.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("episodes", "envs", "max_episode_frames", "video_max_steps", "threads"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise CommandError(f"{flag}={getattr(args, name)} is invalid: must be positive")
    if args.noop_max < 0:
        raise CommandError(f"--noop-max={args.noop_max} is invalid: must be >= 0")
    for name in ("epsilon", "sticky_action_prob"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            flag = "--" + name.replace("_", "-")
            raise CommandError(f"{flag}={value} is invalid: must be in [0, 1]")
    if args.video:
        from apex_dqn.common.video import VideoError, check_video_path

        try:
            check_video_path(args.video)
        except VideoError as exc:
            raise CommandError(str(exc)) from exc


def format_table(rows: list[tuple[str, EvalResult]], game: str) -> str:
    header = (
        f"{'policy':<12}{'epsilon':>8}{'episodes':>10}{'mean':>10}{'std':>10}"
        f"{'min':>9}{'max':>9}{'truncated':>11}{'human-norm':>12}"
    )
    lines = [header]
    for name, r in rows:
        hn = human_normalized(r.mean, game)
        lines.append(
            f"{name:<12}{r.epsilon:>8.2f}{len(r.scores):>10d}{r.mean:>10.1f}{r.std:>10.1f}"
            f"{r.min:>9.0f}{r.max:>9.0f}{int(r.truncated.sum()):>11d}"
            f"{'-' if hn is None else f'{hn:.3f}':>12}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    _check_args(args)
    cfg, net, payload = load_policy(args.checkpoint)
    if args.sticky_action_prob is not None:
        cfg = cfg.replace(sticky_action_prob=args.sticky_action_prob)
    torch.set_num_threads(args.threads)
    evaluator = Evaluator(
        cfg,
        net,
        num_envs=args.envs,
        epsilon=args.epsilon,
        noop_max=args.noop_max,
        max_episode_frames=args.max_episode_frames,
        threads=args.threads,
        seed=args.seed,
    )
    updates = int(payload["learner"].get("updates", 0))
    frames = int(payload.get("counters", {}).get("env_frames", 0))
    head = "dueling " if cfg.dueling else ""
    print(f"checkpoint  {payload['path']}")
    print(
        f"            {cfg.game}, {cfg.network} {head}network, {updates:,} learner updates, "
        f"{frames:,} env frames"
    )
    print(
        f"protocol    {args.episodes} episodes per policy on {min(args.envs, args.episodes)} "
        f"envs, up to {args.noop_max} no-op starts, capped at {args.max_episode_frames:,} "
        f"frames, sticky actions {cfg.sticky_action_prob}, full game, seed {args.seed}"
    )
    print(flush=True)
    rows = [("checkpoint", evaluator.evaluate(args.episodes, seed=args.seed))]
    if not args.no_random:
        rows.append(("random", evaluator.evaluate(args.episodes, epsilon=1.0, seed=args.seed)))
    print(format_table(rows, cfg.game))
    published = reference_scores(cfg.game)
    if published:
        scores = ", ".join(f"{k} {v:,.0f}" for k, v in published.items())
        print(f"published (no-op starts): {scores}")
    if args.video:
        from apex_dqn.common.video import write_video

        rec = evaluator.record(seed=args.seed, max_steps=args.video_max_steps)
        path = write_video(args.video, rec.frames, fps=rec.fps)
        ending = "cut short" if rec.cut else "truncated" if rec.truncated else "game over"
        print(
            f"video       {path}: {len(rec.frames)} frames at {rec.fps:g} fps, "
            f"score {rec.score:.0f} ({ending})"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except CommandError as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
