"""The driver's periodic evaluation: the newest weights, the standard protocol, logged.

Every ``eval_interval_s`` the driver hands the learner's newest published weights to an
:class:`actors.evaluate.EvaluatorWorker` (no CPU reserved: it plays a few episodes now
and then, beside the actors; Ray restarts it if it dies) and, when the result is in,
writes the ``eval/*`` TensorBoard tags at the frame count the weights were taken at.
Nothing here ever waits, except :meth:`PeriodicEvaluation.finish` at the end of a run.
"""

from __future__ import annotations

import time
from typing import Any

from apex_dqn.common.config import Config


class PeriodicEvaluation:
    def __init__(self, ray: Any, cfg: Config, num_actions: int, writer: Any):
        from apex_dqn.actors.evaluate import EvaluatorWorker
        from apex_dqn.common.video import gif_available

        self._ray, self.cfg, self.writer = ray, cfg, writer
        self.worker = (
            ray.remote(EvaluatorWorker)
            .options(num_cpus=0, max_restarts=-1)
            .remote(cfg, num_actions, epsilon=cfg.eval_epsilon,
                    video=cfg.eval_video and gif_available(), video_max_steps=2_700)
        )  # fmt: skip
        self._ref: Any = None  # the evaluation in flight
        self._step = 0  # env frames when its weights were taken
        self._count = 0
        self._last = time.monotonic()

    def poll(self, learner: Any, env_frames: int) -> None:
        """Log a finished evaluation; start the next one, on ``learner``'s newest weights,
        when it is due."""
        ray = self._ray
        if not self._collect():
            return
        now = time.monotonic()
        if now - self._last < self.cfg.eval_interval_s:
            return
        try:
            latest = ray.get(learner.latest_weights.remote(), timeout=30)
        except (ray.exceptions.RayError, TimeoutError):
            return
        if latest is None or latest[0] == 0:
            return  # nothing learnt yet
        version, (weights,) = latest
        video = self.cfg.eval_video and self._count % 3 == 0
        self._ref = self.worker.evaluate.remote(version, weights, self.cfg.eval_episodes, video)
        self._step, self._last = env_frames, now
        self._count += 1

    def finish(self, timeout: float = 300.0) -> None:
        """Wait (bounded) for an evaluation in flight, so the last one is logged."""
        if self._ref is None:
            return
        print("waiting for the evaluation in progress", flush=True)
        self._ray.wait([self._ref], timeout=timeout)
        self._collect()

    def _collect(self) -> bool:
        """Log the evaluation in flight if it has finished; False while it runs."""
        ray = self._ray
        if self._ref is None:
            return True
        if not ray.wait([self._ref], timeout=0)[0]:
            return False
        try:
            self._log(ray.get(self._ref))
        except ray.exceptions.RayError as exc:
            print(f"evaluation failed: {exc}", flush=True)
        self._ref = None
        return True

    def _log(self, result: dict) -> None:
        from apex_dqn.common.video import log_video

        w, step = self.writer, self._step
        for key in ("mean", "std", "min", "max"):
            w.add_scalar(f"eval/episodic_return_{key}", result[key], step)
        w.add_scalar("eval/episodic_length_mean", result["mean_length"], step)
        w.add_scalar("eval/truncated_episodes", result["num_truncated"], step)
        w.add_scalar("eval/weights_version", result["weights_version"], step)
        if result["human_normalized"] is not None:
            w.add_scalar("eval/human_normalized_score", result["human_normalized"], step)
        if result["video_gif"] is not None:
            log_video(w, "eval/video", result["video_gif"], step)
        print(
            f"eval (weights v{result['weights_version']}): {result['mean']:.1f} "
            f"+/- {result['std']:.1f} over {result['episodes']} episodes",
            flush=True,
        )
