"""Play the game yourself, or watch a checkpoint play, in a window or to a video file.

    python -m apex_dqn.evaluation.play human [--game space_invaders]
    apex-dqn-play watch --checkpoint RUN_DIR_OR_FILE [--episodes 1] [--video out.mp4]

``human`` runs ``gymnasium.utils.play.play`` on the reference env, under the agent's
conditions (frame skip, no-op starts, the frame cap), and prints each game's unclipped
score. Keys: arrows move, space fires (W/A/S/D work too), Esc quits.
``watch`` plays a checkpoint's network with the evaluation protocol; with ``--video`` it
writes a file instead of opening a window, which works on a headless machine.

A window needs pygame (``pip install 'apex-dqn[play]'``) and a display. A user error
(no display, a missing checkpoint, an invalid option) is one line,
``apex-dqn-play: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from apex_dqn.common.cli import CommandError, run_command
from apex_dqn.common.config import Config, normalize_game
from apex_dqn.evaluation.protocol import (
    ALE_FPS,
    EVAL_EPSILON,
    EVAL_MAX_EPISODE_FRAMES,
    EVAL_NOOP_MAX,
)

PROG = "apex-dqn-play"


def display_problem() -> str | None:
    """Why no window can open here, or None when one can."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if os.environ.get("SDL_VIDEODRIVER"):
        return None  # an explicit SDL driver (e.g. kmsdrm, or dummy for tests)
    return "no display (DISPLAY and WAYLAND_DISPLAY are not set)"


def _pygame() -> Any:
    try:
        os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
        import pygame
    except ImportError as exc:
        raise CommandError("pygame is not installed: pip install 'apex-dqn[play]'") from exc
    return pygame


def _need_window(alternative: str) -> Any:
    problem = display_problem()
    if problem is not None:
        raise CommandError(f"{problem}: cannot open a window; {alternative}")
    return _pygame()


# ------------------------------------------------------------------------------- human


def human_env(cfg: Config) -> Any:
    """The reference env with RGB rendering, for ``gymnasium.utils.play.play``."""
    from apex_dqn.common.envs import make_reference_env

    return make_reference_env(cfg, render_mode="rgb_array")


def keys_to_action(env: Any) -> dict[tuple[int, ...], int]:
    """ALE's keyboard map (W/A/S/D and space) plus the arrow keys for moving."""
    import pygame

    def code(key: str | int) -> int:
        return ord(key) if isinstance(key, str) else int(key)

    mapping = {
        tuple(sorted(code(k) for k in keys)): int(action)
        for keys, action in env.unwrapped.get_keys_to_action().items()
    }
    arrows = {ord("w"): pygame.K_UP, ord("a"): pygame.K_LEFT,
              ord("s"): pygame.K_DOWN, ord("d"): pygame.K_RIGHT}  # fmt: skip
    for keys, action in list(mapping.items()):
        if any(k in arrows for k in keys):
            mapping.setdefault(tuple(sorted(arrows.get(k, k) for k in keys)), action)
    return mapping


def play_human(cfg: Config, *, episodes: int, zoom: float, fps: float, seed: int | None) -> None:
    """Play ``episodes`` games (0: until Esc) at ``fps`` agent steps a second."""
    pygame = _need_window("play on a machine with a screen")
    from gymnasium.utils.play import play

    env = human_env(cfg)
    scores: list[float] = []
    state = {"score": 0.0}

    def on_step(obs, next_obs, action, reward, terminated, truncated, info) -> None:
        state["score"] += float(reward)
        if terminated or truncated:
            scores.append(state["score"])
            ending = "game over" if terminated else "time limit"
            print(f"game {len(scores)}: score {state['score']:.0f} ({ending})", flush=True)
            state["score"] = 0.0
            if episodes and len(scores) >= episodes:
                pygame.event.post(pygame.event.Event(pygame.QUIT))

    print("arrows or W/A/S/D move, space fires, Esc quits", flush=True)
    try:
        play(env, fps=round(fps), zoom=zoom, callback=on_step, keys_to_action=keys_to_action(env),
             seed=seed)  # fmt: skip
    finally:
        env.close()
    if scores:
        print(f"{len(scores)} game(s): mean score {np.mean(scores):.1f}, best {max(scores):.0f}")


# ------------------------------------------------------------------------------- watch


class Window:
    """A pygame window showing RGB screens at a fixed rate; closing it stops play."""

    def __init__(self, pygame: Any, title: str, zoom: float, fps: float):
        self.pygame, self.title, self.fps = pygame, title, fps
        pygame.init()
        self.size = (round(160 * zoom), round(210 * zoom))
        self.screen = pygame.display.set_mode(self.size)
        self.clock = pygame.time.Clock()
        self.open = True

    def show(self, frame: np.ndarray, caption: str) -> bool:
        pg = self.pygame
        for event in pg.event.get():
            if event.type == pg.QUIT or (event.type == pg.KEYDOWN and event.key == pg.K_ESCAPE):
                self.open = False
        if not self.open:
            return False
        surface = pg.surfarray.make_surface(np.ascontiguousarray(frame.swapaxes(0, 1)))
        self.screen.blit(pg.transform.scale(surface, self.size), (0, 0))
        pg.display.set_caption(f"{self.title}  {caption}")
        pg.display.flip()
        self.clock.tick(self.fps)
        return True

    def close(self) -> None:
        self.pygame.quit()


def watch(args: argparse.Namespace) -> None:
    """Play the checkpoint's games in a window, or record them all to one video file."""
    window_needed = not args.video
    pygame = _need_window("write a file with --video out.mp4") if window_needed else None
    if args.video:
        from apex_dqn.common.video import check_video_path

        check_video_path(args.video)  # a VideoError is a user error: one line
    from apex_dqn.evaluation.evaluator import Evaluator
    from apex_dqn.evaluation.policy import load_policy

    cfg, net, payload = load_policy(args.checkpoint)
    evaluator = Evaluator(
        cfg,
        net,
        num_envs=1,
        epsilon=args.epsilon,
        noop_max=args.noop_max,
        max_episode_frames=args.max_episode_frames,
        seed=args.seed,
    )
    fps = args.fps or evaluator.video_fps
    print(f"watching {payload['path']} play {cfg.game} (epsilon {args.epsilon})", flush=True)
    window = Window(pygame, cfg.game, args.zoom, fps) if pygame is not None else None
    frames: list[np.ndarray] = []
    try:
        for episode in range(1, args.episodes + 1):
            on_frame = None
            if window is not None:

                def on_frame(frame, score, steps, episode=episode):
                    return window.show(frame, f"game {episode}  score {score:.0f}")

            rec = evaluator.record(
                max_steps=args.max_steps or None, keep_frames=bool(args.video), on_frame=on_frame
            )
            frames.extend(rec.frames)
            ending = "game over" if rec.terminated else "time limit" if rec.truncated else "stopped"
            print(
                f"game {episode}: score {rec.score:.0f}, {rec.steps} steps ({ending})", flush=True
            )
            if window is not None and not window.open:
                break
    finally:
        if window is not None:
            window.close()
    if args.video:
        from apex_dqn.common.video import write_video

        path = write_video(args.video, np.stack(frames), fps=fps)
        print(f"video {path}: {len(frames)} frames at {fps:g} fps")


# ------------------------------------------------------------------------------ command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Play Atari yourself, or watch a checkpoint play.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True)

    h = sub.add_parser("human", help="play with the keyboard",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    h.add_argument("--game", default="space_invaders", help="ALE game id")
    h.add_argument("--episodes", type=int, default=0, help="games before quitting (0: until Esc)")
    h.add_argument("--frame-skip", type=int, default=4, help="emulator frames per key read")
    h.add_argument("--fps", type=float, default=0.0, help="steps per second (0: real time)")
    h.add_argument("--noop-max", type=int, default=EVAL_NOOP_MAX, help="random no-op starts")
    h.add_argument(
        "--max-episode-frames", type=int, default=EVAL_MAX_EPISODE_FRAMES, help="frame cap"
    )
    h.add_argument("--sticky-action-prob", type=float, default=0.0, help="sticky actions")
    h.add_argument("--zoom", type=float, default=3.0, help="window scale")
    h.add_argument("--seed", type=int, default=None, help="seed of the no-op starts")

    w = sub.add_parser("watch", help="watch a checkpoint play",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    w.add_argument("--checkpoint", required=True, help="checkpoint file, or a run directory")
    w.add_argument("--episodes", type=int, default=1, help="games to play")
    w.add_argument("--epsilon", type=float, default=EVAL_EPSILON, help="exploration rate")
    w.add_argument("--video", default="", help="write a .mp4 or .gif file instead of a window")
    w.add_argument("--fps", type=float, default=0.0, help="frames per second (0: real time)")
    w.add_argument("--noop-max", type=int, default=EVAL_NOOP_MAX, help="random no-op starts")
    w.add_argument(
        "--max-episode-frames", type=int, default=EVAL_MAX_EPISODE_FRAMES, help="frame cap"
    )
    w.add_argument("--max-steps", type=int, default=0, help="stop a game after this many steps")
    w.add_argument("--zoom", type=float, default=3.0, help="window scale")
    w.add_argument("--seed", type=int, default=0, help="seed of no-op starts and exploration")
    return p


def _check(args: argparse.Namespace) -> None:
    positive = ["max_episode_frames", "zoom", "frame_skip"]
    if args.mode == "watch":
        positive.append("episodes")
    for name in positive:
        if hasattr(args, name) and not getattr(args, name) > 0:
            raise CommandError(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    for name in ("fps", "noop_max", "max_steps"):
        if hasattr(args, name) and getattr(args, name) < 0:
            raise CommandError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    if args.mode == "human" and args.episodes < 0:
        raise CommandError(f"--episodes={args.episodes} must be >= 0")
    if not 0.0 <= getattr(args, "epsilon", 0.0) <= 1.0:
        raise CommandError(f"--epsilon={args.epsilon} must be in [0, 1]")


def run(args: argparse.Namespace) -> None:
    """Check the options, then play as a human (agent's conditions) or watch a checkpoint."""
    _check(args)
    if args.mode == "watch":
        watch(args)
        return
    from apex_dqn.common.envs import available_games

    game = normalize_game(args.game)
    if game not in available_games():
        raise CommandError(f"--game={args.game!r} is not an ALE game (e.g. space_invaders)")
    cfg = Config(
        game=game,
        frame_skip=args.frame_skip,
        noop_max=args.noop_max,
        max_episode_frames=args.max_episode_frames,
        sticky_action_prob=args.sticky_action_prob,
    )
    fps = args.fps or ALE_FPS / args.frame_skip
    play_human(cfg, episodes=args.episodes, zoom=args.zoom, fps=fps, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit status (2 for a user error)."""
    return run_command(PROG, lambda a: run(build_parser().parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
