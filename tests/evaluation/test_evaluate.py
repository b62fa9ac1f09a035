"""The evaluator on the real Space Invaders ROM, its Ray host, and its command.

Episodes are capped at 2,000 frames (500 agent steps) to keep this fast, so most are
truncated rather than played to game over.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.common.networks import QNetwork, build_network, state_dict_to_numpy
from apex_dqn.common.video import decode_gif, read_video
from apex_dqn.evaluation.evaluate import main
from apex_dqn.evaluation.evaluator import Evaluator
from apex_dqn.evaluation.worker import EvaluatorWorker, start_evaluator
from apex_dqn.learner.learning import Learner

pytestmark = [pytest.mark.rom, pytest.mark.usefixtures("one_torch_thread")]

NUM_ACTIONS = 6  # Space Invaders' minimal action set
NOOP = 0
CAP = 2_000  # emulator frames per episode
SHORT = 800
CFG = Config(game="space_invaders", network="dqn2013", dueling=True)


def constant_policy_net(action: int) -> QNetwork:
    """A dueling network whose greedy action is always ``action``."""
    torch.manual_seed(0)
    net = build_network(NUM_ACTIONS, CFG.network, CFG.dueling)
    with torch.no_grad():
        net.advantage[-1].weight.zero_()
        net.advantage[-1].bias.zero_()
        net.advantage[-1].bias[action] = 1.0
    return net


@pytest.fixture(scope="module")
def random_play():
    """Four episodes of a random policy on two envs: each env plays two in a row."""
    ev = Evaluator(CFG, None, num_envs=2, epsilon=1.0, max_episode_frames=CAP, seed=3)
    return ev.evaluate(4)


def test_scores_are_unclipped_game_points(random_play):
    r = random_play
    assert len(r.scores) == len(r.lengths) == len(r.frames) == len(r.truncated) == 4
    # Space Invaders pays 5 to 30 points an invader: the real score, not one per kill.
    assert all(s % 5 == 0 for s in r.scores)
    assert r.max > 30  # clipped to +1 per kill, 500 random steps never kill 30 invaders
    assert r.mean == pytest.approx(np.mean(r.scores))
    assert r.std == pytest.approx(np.std(r.scores))
    assert (r.min, r.max) == (min(r.scores), max(r.scores))


def test_truncation_at_the_frame_cap_is_reported(random_play):
    r = random_play
    assert r.truncated.any()
    # A truncated episode stopped at the cap: 500 agent steps after its no-op start.
    assert (r.lengths[r.truncated] == CAP // CFG.frame_skip).all()
    assert (r.frames[r.truncated] >= CAP).all()
    assert (r.frames[r.truncated] <= CAP + 30 * CFG.frame_skip).all()  # plus no-ops
    # An episode that was not truncated ended at game over, before the cap.
    assert (r.lengths[~r.truncated] < CAP // CFG.frame_skip).all()
    summary = r.summary()
    assert summary["num_truncated"] == int(r.truncated.sum())
    assert summary["truncated"] == [bool(t) for t in r.truncated]


def test_epsilon_one_ignores_the_network(random_play):
    counts = random_play.action_counts
    # Every agent step of every counted episode took one action, uniformly drawn.
    assert counts.sum() == random_play.lengths.sum()
    assert (counts > 0.1 * counts.sum() / NUM_ACTIONS).all()


def test_epsilon_zero_follows_the_network():
    ev = Evaluator(CFG, constant_policy_net(NOOP), num_envs=2, epsilon=0.0,
                   max_episode_frames=SHORT, seed=5)  # fmt: skip
    r = ev.evaluate(2)
    assert r.action_counts[NOOP] == r.action_counts.sum() == r.lengths.sum()
    assert (r.scores == 0).all()  # never fires, never scores
    explored = ev.evaluate(2, epsilon=1.0, seed=5)
    assert (explored.action_counts > 0).all()
    assert explored.scores.sum() > 0


def test_epsilon_is_validated():
    with pytest.raises(ValueError, match="epsilon"):
        Evaluator(CFG, None, epsilon=1.5)
    with pytest.raises(ValueError, match="network"):
        Evaluator(CFG, None, num_envs=1, max_episode_frames=CAP).evaluate(1, epsilon=0.5)


def test_record_keeps_rgb_screens_of_one_episode():
    ev = Evaluator(CFG, None, epsilon=1.0, max_episode_frames=SHORT, seed=1)
    rec = ev.record(max_steps=None)
    assert rec.frames.dtype == np.uint8 and rec.frames.shape[1:] == (210, 160, 3)
    assert len(rec.frames) == rec.steps + 1  # after the reset, then after each step
    assert rec.terminated or rec.truncated
    assert not rec.cut
    assert rec.score % 5 == 0
    # Colour: the channels differ somewhere (a grayscale screen would have them equal).
    assert (rec.frames[..., 0] != rec.frames[..., 1]).any()
    assert rec.fps == 15.0
    short = ev.record(max_steps=20)
    assert short.steps == 20 and len(short.frames) == 21 and short.cut


def test_worker_evaluates_published_numpy_weights():
    pytest.importorskip("PIL")
    net = constant_policy_net(NOOP)
    state = state_dict_to_numpy(net)
    for array in state.values():
        array.setflags(write=False)  # as they come out of Ray's object store
    worker = EvaluatorWorker(CFG, NUM_ACTIONS, num_envs=2, epsilon=0.0,
                             max_episode_frames=400, video_max_steps=30)  # fmt: skip
    out = worker.evaluate(7, state, 2)
    assert out["weights_version"] == 7
    assert out["episodes"] == 2 and out["scores"] == [0.0, 0.0]
    assert out["action_counts"][NOOP] == sum(out["action_counts"])
    assert out["video_steps"] == 30 and out["video_cut"]
    frames = decode_gif(out["video_gif"])
    assert frames.shape[1:] == (210, 160, 3) and 1 <= len(frames) <= 31
    assert worker.evaluate(8, state, 1, video=False)["video_gif"] is None


@pytest.mark.ray
def test_worker_over_ray_takes_the_weights_ref(ray_local):
    ray = ray_local
    worker = start_evaluator(
        CFG, NUM_ACTIONS, num_envs=1, epsilon=0.0, max_episode_frames=SHORT, video=False
    )
    ref = ray.put(state_dict_to_numpy(constant_policy_net(NOOP)))
    out = ray.get(worker.evaluate.remote(3, ref, 1), timeout=120)
    assert out["weights_version"] == 3 and out["scores"] == [0.0]
    assert out["action_counts"][NOOP] == out["lengths"][0]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    cfg = CFG.replace(replay_capacity=50_000, batch_size=32)
    learner = Learner(cfg, NUM_ACTIONS)
    run_dir = tmp_path_factory.mktemp("run")
    path = checkpoint.save(
        run_dir,
        {"config": cfg.to_dict(), "learner": learner.state_dict(),
         "counters": {"env_frames": 0, "episodes": 0}},
        step=0,
        keep=1,
    )  # fmt: skip
    return path


def test_command_prints_checkpoint_and_random_rows(saved_checkpoint, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    video = tmp_path / "play.mp4"
    code = main([
        "--checkpoint", str(saved_checkpoint), "--episodes", "2", "--envs", "2",
        "--max-episode-frames", "1000", "--threads", "1",
        "--video", str(video), "--video-max-steps", "40",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["policy"][:4] == ["policy", "epsilon", "episodes", "mean"]
    assert rows["checkpoint"][1:3] == ["0.05", "2"]
    assert rows["random"][1:3] == ["1.00", "2"]
    assert "published (no-op starts): random 148, human 1,652" in out
    frames = read_video(video)
    assert frames.shape == (41, 210, 160, 3)  # the screen after the reset + 40 steps


def test_command_accepts_a_run_directory_and_writes_gif(saved_checkpoint, tmp_path, capsys):
    pytest.importorskip("PIL")
    video = tmp_path / "play.gif"
    code = main([
        "--checkpoint", str(saved_checkpoint.parent), "--episodes", "1", "--envs", "1",
        "--max-episode-frames", "400", "--threads", "1", "--no-random", "--epsilon", "1.0",
        "--video", str(video), "--video-max-steps", "25",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert str(saved_checkpoint) in out
    assert not any(line.startswith("random") for line in out.splitlines())
    assert 1 <= len(read_video(video)) <= 26  # identical screens are stored once


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--episodes", "1", "--video", "x.avi"], "must end in .gif or .mp4"),
        (["--episodes", "0"], "--episodes=0 is invalid"),
        (["--epsilon", "2"], "--epsilon=2.0 is invalid"),
    ],
)
def test_command_refuses_bad_options(saved_checkpoint, argv, message, capsys):
    assert main(["--checkpoint", str(saved_checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apex-dqn-evaluate: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_command_bad_path_is_one_line_and_exit_code_2(tmp_path):
    missing = tmp_path / "nope.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "apex_dqn.evaluation.evaluate", "--checkpoint", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"apex-dqn-evaluate: error: checkpoint {missing} does not exist"
    assert proc.stdout == ""
