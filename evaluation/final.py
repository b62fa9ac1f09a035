"""The final evaluation: the weights a run ends with, under the standard protocol.

However a run ends (its frame budget spent, Ctrl-C, SIGTERM), the driver first writes
the final checkpoint, stops the program and Ray, and only then evaluates the online
network of that checkpoint, in its own process, on the cores the actors have given
back. The checkpoint is written before anything here runs, so no evaluation can cost a
run its last state; and what is evaluated is exactly what the checkpoint holds.

``final_eval_episodes`` episodes (0: none) are played at once, one per env (up to
:data:`MAX_ENVS`), for at most ``final_eval_s`` seconds of wall time
(:meth:`Evaluator.evaluate`'s ``time_limit_s``): an episode still in play at the limit
counts as truncated with its score so far, as the protocol counts one cut by its
108,000-frame cap, so the limit lowers the mean rather than leaving out long episodes.
A signal while it plays (a second Ctrl-C, another SIGTERM) skips it, and the run exits.

The result is printed in one line, written to TensorBoard as ``eval/final_return_mean``,
``_std``, ``_min``, ``_max``, ``eval/final_episodes`` (and ``eval/final_human_normalized_score``
when the game has reference scores) at the run's final frame count, and saved as
``final-eval-<run id>-<updates>.json`` beside the checkpoint (:func:`read_final_evaluations`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from apex_dqn.common.config import Config

MAX_ENVS = 32  # envs played at once; more episodes than this are played in turns
FILE_PREFIX = "final-eval-"
SEED_OFFSET = 2_000_003  # apart from the actors' seeds and the periodic evaluator's


class Skipped(BaseException):
    """A signal arrived during the final evaluation: it is abandoned. A BaseException,
    as KeyboardInterrupt is, so that no library's ``except Exception`` turns it into an
    error of its own (torch's ``load_state_dict`` would)."""


def _skip(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Skipped(signal.Signals(signum).name)


@contextlib.contextmanager
def skippable() -> Iterator[None]:
    """Inside, SIGINT or SIGTERM raises :class:`Skipped`; the handlers before are put back
    after (the driver ignores both by then: nothing may cut its shutdown short)."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, _skip)
    signal.signal(signal.SIGTERM, _skip)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def evaluate_weights(cfg: Config, online: dict[str, Any]) -> dict[str, Any]:
    """``cfg.final_eval_episodes`` episodes of the Q-network with state dict ``online``
    (as a checkpoint stores it), at most ``cfg.final_eval_s`` seconds: the summary of
    :meth:`EvalResult.summary` with the human-normalised mean."""
    from apex_dqn.common.envs import num_actions
    from apex_dqn.common.networks import build_network
    from apex_dqn.evaluation.evaluator import Evaluator
    from apex_dqn.evaluation.protocol import human_normalized

    net = build_network(num_actions(cfg.game), cfg.network, cfg.dueling)
    net.load_state_dict(online)
    envs = min(cfg.final_eval_episodes, MAX_ENVS)
    evaluator = Evaluator(cfg, net, num_envs=envs, epsilon=cfg.eval_epsilon,
                          threads=min(envs, os.cpu_count() or 1),
                          seed=cfg.seed + SEED_OFFSET)  # fmt: skip
    result = evaluator.evaluate(cfg.final_eval_episodes, time_limit_s=cfg.final_eval_s)
    out = result.summary()
    out["human_normalized"] = human_normalized(result.mean, evaluator.cfg.game)
    return out


def final_evaluation(
    cfg: Config, saved: Path | None, writer: Any, step: int, run_id: str
) -> dict[str, Any] | None:
    """Evaluate the online network of checkpoint ``saved`` (the run's final one), log it
    at ``step`` (the run's env frames) and save it beside the checkpoint; the result, or
    None when there is none (turned off, no final checkpoint, skipped by a signal, or
    failed: each said in one line)."""
    from apex_dqn.common import checkpoint

    if cfg.final_eval_episodes == 0:
        return None
    if saved is None:
        print("no final evaluation: the final checkpoint was not written", flush=True)
        return None
    try:
        with skippable():  # said once a signal would skip it
            print(f"final evaluation: {cfg.final_eval_episodes} episodes of the weights in "
                  f"{saved.name}, at most {cfg.final_eval_s:g}s (Ctrl-C skips it)",
                  flush=True)  # fmt: skip
            state = checkpoint.load(saved)
            result = evaluate_weights(cfg, state["learner"]["online"])
    except Skipped as exc:
        print(f"final evaluation skipped ({exc}): exiting", flush=True)
        return None
    except Exception as exc:  # the checkpoint is safe: report, and end the run as usual
        print(f"no final evaluation: {type(exc).__name__}: {exc}", flush=True)
        return None
    updates = int(state["learner"]["updates"])
    result.update(run_id=run_id, checkpoint=saved.name, updates=updates, env_frames=int(step),
                  game=cfg.game)  # fmt: skip
    _log(writer, result, step)
    path = save(saved.parent, result)
    cut = f", {result['num_truncated']} cut by the time limit" if result["time_limited"] else ""
    print(
        f"final evaluation (update {updates:,}): {result['mean']:.1f} +/- {result['std']:.1f} "
        f"over {result['episodes']} episodes, {result['env_frames']:,} frames played in "
        f"{result['wall_s']:.0f}s{cut}; saved to {path.name}",
        flush=True,
    )
    return result


def _log(writer: Any, result: dict[str, Any], step: int) -> None:
    for key in ("mean", "std", "min", "max"):
        writer.add_scalar(f"eval/final_return_{key}", result[key], step)
    writer.add_scalar("eval/final_episodes", result["episodes"], step)
    if result["human_normalized"] is not None:
        writer.add_scalar("eval/final_human_normalized_score", result["human_normalized"], step)
    writer.flush()


def result_path(directory: str | os.PathLike, run_id: str, updates: int) -> Path:
    """Where the final evaluation of run ``run_id`` at ``updates`` updates is saved: a
    name of the run's own, so no other run's file is ever replaced."""
    return Path(directory) / f"{FILE_PREFIX}{run_id}-{updates:010d}.json"


def save(directory: str | os.PathLike, result: dict[str, Any]) -> Path:
    """Write ``result`` (with its ``run_id`` and ``updates``) atomically as JSON."""
    from apex_dqn.common.files import write_atomically

    path = result_path(directory, result["run_id"], result["updates"])
    text = json.dumps(result, indent=1) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))
    return path


def read_final_evaluations(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every final evaluation saved in run directory ``directory``, fewest updates first;
    files that are not readable JSON objects are left out."""
    found = []
    for path in Path(directory).glob(f"{FILE_PREFIX}*.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            found.append(result)
    return sorted(found, key=lambda r: (r.get("updates", 0), r.get("env_frames", 0)))
