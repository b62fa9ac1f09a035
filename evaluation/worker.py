"""The evaluator's Ray host, and the one place that says how it runs on the cluster.

:class:`EvaluatorWorker` wraps an :class:`~apex_dqn.evaluation.evaluator.Evaluator`:
``evaluate(version, weights, episodes)`` loads the weights the learner publishes and
returns the result as a plain dict (no numpy arrays, no classes of this project), so the
driver needs nothing beyond Ray to read it. :func:`start_evaluator` starts one with the
Ray options of :data:`EVALUATOR_OPTIONS`.
"""

from __future__ import annotations

from typing import Any

import torch

from apex_dqn.common.config import Config
from apex_dqn.common.networks import build_network, load_numpy_state
from apex_dqn.evaluation.evaluator import VIDEO_MAX_STEPS, Evaluator
from apex_dqn.evaluation.protocol import (
    EVAL_EPSILON,
    EVAL_MAX_EPISODE_FRAMES,
    EVAL_NOOP_MAX,
    human_normalized,
)

# No CPU reserved: the evaluator plays a few episodes now and then, beside the actors,
# and a core held for it would sit idle between evaluations, one actor fewer all run.
# Restarted without limit: it keeps no state worth losing, the next evaluation simply
# goes to the new one.
EVALUATOR_OPTIONS: dict[str, Any] = {"num_cpus": 0, "max_restarts": -1}

# The evaluator plays from a seed of its own, apart from the actors' (``cfg.seed + i``).
SEED_OFFSET = 1_000_003


class EvaluatorWorker:
    """Ray host of an :class:`Evaluator` with its own copy of the Q-network.

    ``evaluate`` loads the given weights (the numpy state dict the learner publishes;
    pass its ObjectRef directly and Ray hands the dict over), plays ``episodes`` and,
    when ``video`` is on, one more recorded episode, returned as animated-GIF bytes
    ready for :func:`apex_dqn.common.video.log_video`.
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
            seed=cfg.seed + SEED_OFFSET if seed is None else seed,
        )

    def evaluate(
        self,
        weights_version: int,
        numpy_state_dict: dict[str, Any],
        episodes: int,
        video: bool | None = None,
    ) -> dict[str, Any]:
        """The summary of ``episodes`` played with these weights, with ``weights_version``,
        the human-normalised mean ``(mean - random) / (human - random)`` (None for a
        game without reference scores) and ``video_gif`` (None unless recorded)."""
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


def start_evaluator(cfg: Config, num_actions: int, **settings: Any) -> Any:
    """Start an :class:`EvaluatorWorker` on the cluster (Ray must be initialised) with
    :data:`EVALUATOR_OPTIONS`; ``settings`` go to its constructor. Returns its handle."""
    import ray

    remote = ray.remote(EvaluatorWorker).options(**EVALUATOR_OPTIONS)
    return remote.remote(cfg, num_actions, **settings)
