"""The play command: headless refusal, watching to a file, and windows on SDL's dummy driver."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.common.video import read_video
from apex_dqn.evaluation import play
from apex_dqn.learner.learning import Learner

pytestmark = pytest.mark.rom

CFG = Config(game="space_invaders", network="dqn2013", dueling=True)


def headless_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER")}  # fmt: skip
    return env


@pytest.fixture
def dummy_display(monkeypatch):
    """SDL's dummy video driver: pygame opens 'windows' without a screen."""
    pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    learner = Learner(CFG, 6)
    return checkpoint.save(
        tmp_path_factory.mktemp("run"),
        {"config": CFG.to_dict(), "learner": learner.state_dict(), "counters": {}},
        step=0,
        keep=1,
    )


@pytest.mark.parametrize(
    "argv",
    [["human"], ["watch", "--checkpoint", "unused.pt"]],
    ids=["human", "watch"],
)
def test_headless_machine_gets_one_line_and_exit_code_2(argv):
    proc = subprocess.run(
        [sys.executable, "-m", "apex_dqn.evaluation.play", *argv],
        capture_output=True,
        text=True,
        env=headless_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "apex-dqn-play: error: no display (DISPLAY and WAYLAND_DISPLAY are not set)"
    )
    assert "Traceback" not in proc.stderr


def test_display_problem_follows_the_environment(monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    if sys.platform.startswith("linux"):
        assert "no display" in play.display_problem()
    monkeypatch.setenv("DISPLAY", ":0")
    assert play.display_problem() is None


def test_watch_to_a_file_works_headless(saved_checkpoint, tmp_path, monkeypatch, capsys):
    pytest.importorskip("imageio_ffmpeg")
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"):
        monkeypatch.delenv(name, raising=False)
    video = tmp_path / "watch.mp4"
    code = play.main([
        "watch", "--checkpoint", str(saved_checkpoint), "--episodes", "2",
        "--max-steps", "15", "--video", str(video),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "game 1: score" in out and "game 2: score" in out
    assert read_video(video).shape == (32, 210, 160, 3)  # two games of 1 + 15 screens


def test_watch_bad_checkpoint_with_video_is_one_line(tmp_path, capsys):
    code = play.main(["watch", "--checkpoint", str(tmp_path / "x.pt"), "--video", "o.gif"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"apex-dqn-play: error: checkpoint {tmp_path / 'x.pt'} does not exist"
    )


def test_watch_in_a_window(saved_checkpoint, dummy_display, capsys):
    code = play.main([
        "watch", "--checkpoint", str(saved_checkpoint), "--max-steps", "10", "--fps", "1000",
    ])  # fmt: skip
    assert code == 0
    assert "game 1: score" in capsys.readouterr().out


def test_human_play_runs_games_and_prints_scores(dummy_display, capsys):
    # Nobody presses a key: NOOP until each game hits its 200-frame cap.
    code = play.main([
        "human", "--episodes", "2", "--max-episode-frames", "200", "--fps", "1000",
        "--seed", "1",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "game 1: score 0 (time limit)" in out
    assert "game 2: score 0 (time limit)" in out
    assert "2 game(s): mean score 0.0" in out


def test_keyboard_map_covers_every_action_with_arrows_too():
    pygame = pytest.importorskip("pygame")
    env = play.human_env(CFG)
    try:
        mapping = play.keys_to_action(env)
        assert set(mapping.values()) == set(range(env.action_space.n))
        assert mapping[(ord(" "),)] == 1  # FIRE
        assert mapping[(pygame.K_RIGHT,)] == mapping[(ord("d"),)]
        assert mapping[tuple(sorted((ord(" "), pygame.K_LEFT)))] == mapping[(32, ord("a"))]
        env.reset(seed=0)
        assert env.render().shape == (210, 160, 3)
    finally:
        env.close()


def test_unknown_game_is_refused(capsys):
    assert play.main(["human", "--game", "pong_deluxe"]) == 2
    assert "is not an ALE game" in capsys.readouterr().err
