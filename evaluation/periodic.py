"""The driver's periodic evaluation: the newest weights, the standard protocol, logged.

Every ``eval_interval_s`` the driver hands the learner's newest published weights to an
:class:`~apex_dqn.evaluation.worker.EvaluatorWorker` (started by
:func:`~apex_dqn.evaluation.worker.start_evaluator`: no CPU reserved, restarted if it
dies) and, when the result is in, writes the ``eval/*`` TensorBoard tags at the frame
count the weights were taken at, so the curve says how good the agent was after that
much experience, however long the evaluation took. One evaluation runs at a time: the
next is not due before the last is logged, so a slow one delays the next rather than
piling up. A failed evaluation is reported and the next one goes ahead.

Nothing here waits on the evaluator, except :meth:`PeriodicEvaluation.finish` at the
end of a run; asking the learner for its weights is bounded (it answers them at once,
on a thread of its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from apex_dqn.common.config import Config
from apex_dqn.common.inflight import InFlight

WEIGHTS_TIMEOUT_S = 30.0  # longest wait for the learner's weights
VIDEO_EVERY = 3  # a video with every third evaluation (when videos are on)
VIDEO_MAX_STEPS = 2_700  # 3 minutes of play at 15 agent steps a second


class PeriodicEvaluation:
    """Evaluates the learner's newest weights every ``cfg.eval_interval_s`` and logs them.

    ``ray`` is the Ray module (already initialised), ``writer`` a TensorBoard
    ``SummaryWriter``. The evaluator is started here unless ``evaluator`` gives a handle
    with the same ``evaluate.remote(version, weights, episodes, video)``; ``clock``
    (seconds, monotonic) times the interval.
    """

    def __init__(
        self,
        ray: Any,
        cfg: Config,
        num_actions: int,
        writer: Any,
        *,
        evaluator: Any | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        from apex_dqn.common.video import gif_available

        self._ray, self.cfg, self.writer, self._clock = ray, cfg, writer, clock
        self.video = cfg.eval_video and gif_available()
        if evaluator is None:
            from apex_dqn.evaluation.worker import start_evaluator

            evaluator = start_evaluator(
                cfg,
                num_actions,
                epsilon=cfg.eval_epsilon,
                video=self.video,
                video_max_steps=VIDEO_MAX_STEPS,
            )
        self.worker = evaluator
        # The evaluation in flight (one at most), tagged with the env frames at its weights.
        self._running: InFlight[int] = InFlight()
        self._count = 0  # evaluations started
        self._last = clock()  # when the last one started (the first is due an interval in)

    @property
    def busy(self) -> bool:
        """Whether an evaluation is in flight, not yet logged."""
        return len(self._running) > 0

    def poll(self, learner: Any, env_frames: int) -> None:
        """Log a finished evaluation; start the next one, on ``learner``'s newest weights,
        when it is due. ``env_frames``: the frames collected so far, the step it logs at."""
        ray = self._ray
        if not self._collect(timeout=0.0):
            return
        now = self._clock()
        if now - self._last < self.cfg.eval_interval_s:
            return
        try:
            latest = ray.get(learner.latest_weights.remote(), timeout=WEIGHTS_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            return  # the learner is restarting or busy: ask again at the next poll
        if latest is None or latest[0] == 0:
            return  # nothing learnt yet
        version, (weights,) = latest  # weights: an ObjectRef, resolved by the evaluator's Ray
        video = self.video and self._count % VIDEO_EVERY == 0
        ref = self.worker.evaluate.remote(version, weights, self.cfg.eval_episodes, video)
        self._running.add(ref, env_frames)
        self._last = now
        self._count += 1

    def finish(self, timeout: float = 300.0) -> None:
        """Wait up to ``timeout`` seconds for an evaluation in flight, so the last one is
        logged; one still running then is left unlogged."""
        if not self.busy:
            return
        print("waiting for the evaluation in progress", flush=True)
        self._collect(timeout=timeout)

    def _collect(self, timeout: float) -> bool:
        """Log the evaluation in flight if it finishes within ``timeout`` seconds;
        True when none is left in flight."""
        for step, ref in self._running.take(timeout=timeout):
            try:
                result = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                print(f"evaluation failed: {exc}", flush=True)
                continue
            self._log(result, step)
        return not self.busy

    def _log(self, result: dict[str, Any], step: int) -> None:
        """Write the result's ``eval/*`` tags at ``step`` and print its mean."""
        from apex_dqn.common.video import log_video

        w = self.writer
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
