"""Score a checkpoint under the evaluation protocol, next to a random policy.

    python -m apex_dqn.evaluation.evaluate --checkpoint RUN_DIR_OR_FILE [--episodes 10]
    apex-dqn-evaluate --checkpoint RUN_DIR_OR_FILE [--video play.mp4]

Prints the checkpoint's scores and the random policy's, measured the same way (same
seeds, so the same no-op starts), beside the published ones, and can record one episode
to a video. A user error (a missing checkpoint, an invalid option) is one line,
``apex-dqn-evaluate: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from apex_dqn.common.cli import CommandError, run_command
from apex_dqn.evaluation.evaluator import VIDEO_MAX_STEPS, EvalResult, Evaluator
from apex_dqn.evaluation.policy import load_policy
from apex_dqn.evaluation.protocol import (
    EVAL_EPSILON,
    EVAL_MAX_EPISODE_FRAMES,
    EVAL_NOOP_MAX,
    human_normalized,
    reference_scores,
)

PROG = "apex-dqn-evaluate"


def build_parser() -> argparse.ArgumentParser:
    """The command line; every default is the protocol's."""
    p = argparse.ArgumentParser(
        prog=PROG,
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
    """Refuse invalid options before the checkpoint is loaded or any game is played."""
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
        from apex_dqn.common.video import check_video_path

        check_video_path(args.video)  # a VideoError is a user error: one line


def format_table(rows: list[tuple[str, EvalResult]], game: str) -> str:
    """One row a policy: its scores and its human-normalised mean
    ``(mean - random) / (human - random)`` (``-`` for a game without reference scores)."""
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
    """Score the checkpoint, then the random policy with the same seeds, and print both."""
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
        scores = ", ".join(f"{k} {v:,.1f}".removesuffix(".0") for k, v in published.items())
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
    """The command; returns its exit status (2 for a user error)."""
    return run_command(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
