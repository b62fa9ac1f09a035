"""The final evaluation of a run's final weights, on the real Space Invaders ROM: the time
limit, what it logs and saves, a signal that skips it, and what it does without a
checkpoint. ``train.py`` runs it at every run's end: ``tests/test_train.py`` checks that
on a run that reaches its frames, on Ctrl-C, and on SIGTERM followed by a second signal.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.common.networks import build_network
from apex_dqn.evaluation import final
from apex_dqn.evaluation.evaluator import Evaluator
from apex_dqn.learner.learning import Learner

pytestmark = [pytest.mark.rom, pytest.mark.usefixtures("one_torch_thread")]

CFG = Config(game="space_invaders", network="dqn2013", dueling=True, final_eval_episodes=2,
             final_eval_s=60.0, max_episode_frames=2_000)  # fmt: skip


class Writer:
    """Records ``add_scalar`` calls as TensorBoard's SummaryWriter receives them."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[float, int]]] = {}
        self.flushed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.setdefault(tag, []).append((float(value), int(step)))

    def flush(self) -> None:
        self.flushed = True


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    learner = Learner(CFG, 6)
    return checkpoint.save(
        tmp_path_factory.mktemp("run"),
        {"config": CFG.to_dict(), "learner": learner.state_dict(), "counters": {}},
        step=123, keep=1, run_id="run0001",
    )  # fmt: skip


def test_a_time_limit_cuts_every_episode_in_play_and_says_so():
    torch.manual_seed(0)
    net = build_network(6, "dqn2013", True)
    ev = Evaluator(CFG, net, num_envs=3, seed=1)
    r = ev.evaluate(3, time_limit_s=0.2)  # a Space Invaders game lasts far longer
    assert r.time_limited and r.summary()["time_limited"] is True
    assert len(r.scores) == 3 and r.truncated.all()  # one per env: each was in play
    assert (r.lengths > 0).all() and (r.frames > 0).all()
    whole = ev.evaluate(1)  # no limit: a whole game, not cut
    assert not whole.time_limited and whole.frames[0] > 0
    with pytest.raises(ValueError, match="time_limit_s"):
        ev.evaluate(1, time_limit_s=0)


def test_the_final_weights_are_evaluated_logged_and_saved(saved, capsys):
    writer = Writer()
    result = final.final_evaluation(CFG, saved, writer, step=4_000, run_id="run0001")
    out = capsys.readouterr().out
    assert "final evaluation: 2 episodes of the weights in checkpoint-0000000123.pt" in out
    assert "final evaluation (update 0): " in out and "over 2 episodes" in out
    assert result["episodes"] == 2 and result["updates"] == 0
    assert result["checkpoint"] == saved.name and result["env_frames"] == 4_000
    assert all(s % 5 == 0 for s in result["scores"])  # unclipped game points
    for key in ("mean", "std", "min", "max"):
        assert writer.scalars[f"eval/final_return_{key}"] == [(result[key], 4_000)]
    assert writer.scalars["eval/final_episodes"] == [(2.0, 4_000)]
    assert "eval/final_human_normalized_score" in writer.scalars and writer.flushed
    path = final.result_path(saved.parent, "run0001", 0)
    assert path.name in out and json.loads(path.read_text()) == result
    assert final.read_final_evaluations(saved.parent) == [result]
    assert np.isclose(result["mean"], np.mean(result["scores"]))


def test_a_signal_skips_it_and_puts_the_handlers_back(saved, capsys, monkeypatch):
    def interrupted(cfg, online):  # the second Ctrl-C arrives while the games are played
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("the signal did not stop the evaluation")

    monkeypatch.setattr(final, "evaluate_weights", interrupted)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        writer = Writer()
        assert final.final_evaluation(CFG, saved, writer, 1, "run0002") is None
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert "final evaluation skipped (SIGINT): exiting" in capsys.readouterr().out
    assert writer.scalars == {}
    assert not final.result_path(saved.parent, "run0002", 0).exists()


def test_no_checkpoint_or_turned_off_means_no_evaluation(saved, tmp_path, capsys):
    writer = Writer()
    assert final.final_evaluation(CFG, None, writer, 1, "run0003") is None
    assert "no final evaluation: the final checkpoint was not written" in capsys.readouterr().out
    off = CFG.replace(final_eval_episodes=0)
    assert final.final_evaluation(off, saved, writer, 1, "run0003") is None
    assert capsys.readouterr().out == "" and writer.scalars == {}
    broken = tmp_path / "checkpoint-0000000001.pt"
    broken.write_bytes(b"not a checkpoint")
    assert final.final_evaluation(CFG, broken, writer, 1, "run0003") is None
    assert "no final evaluation: CheckpointError" in capsys.readouterr().out
