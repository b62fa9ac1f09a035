"""Learning curves from synthetic TensorBoard event files written with SummaryWriter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from apex_dqn.common.config import Config
from apex_dqn.evaluation.plot import load_run, main, moving_average

T0 = 1_600_000_000.0  # wall times in the past, as a real run's


def write_session(run_dir, start: float, first_frame: int, episodes: int):
    """One driver session: its config at the start, then 10 s and 4,000 frames an
    episode, and an evaluation every 20 episodes."""
    writer = SummaryWriter(str(run_dir))
    rows = "\n".join(f"|{k}|{v}|" for k, v in Config().to_dict().items())
    writer.add_text("config", "|setting|value|\n|-|-|\n" + rows, 0, walltime=start)
    for i in range(episodes):
        frames = first_frame + 4_000 * (i + 1)
        wall = start + 10.0 * (i + 1)
        writer.add_scalar("charts/episodic_return", 100.0 + i, frames, walltime=wall)
        if i % 20 == 19:
            writer.add_scalar("eval/episodic_return_mean", 150.0 + i, frames, walltime=wall)
            writer.add_scalar("eval/episodic_return_std", 12.0, frames, walltime=wall)
    # The final evaluation of the session's last weights, at its last frame count.
    writer.add_scalar("eval/final_return_mean", 200.0, frames, walltime=wall)
    writer.close()


@pytest.fixture
def resumed_run(tmp_path):
    """Two sessions of one run, a day apart, as after a resume."""
    write_session(tmp_path, T0, 0, 60)
    write_session(tmp_path, T0 + 86_400.0, 240_000, 40)
    return tmp_path


def test_load_run_joins_sessions_and_leaves_out_the_gap(resumed_run):
    run = load_run(resumed_run)
    train = run.scalars["charts/episodic_return"]
    assert len(train) == 100
    assert (np.diff(train.steps) == 4_000).all()
    np.testing.assert_allclose(train.values, 100.0 + np.r_[np.arange(60), np.arange(40)])
    # 600 s of the first session, then the second starts where the first ended.
    np.testing.assert_allclose(train.elapsed_s[:60], 10.0 * np.arange(1, 61))
    np.testing.assert_allclose(train.elapsed_s[60:], 600.0 + 10.0 * np.arange(1, 41))
    assert len(run.scalars["eval/episodic_return_mean"]) == 5
    np.testing.assert_allclose(run.scalars["eval/final_return_mean"].steps, [240_000, 400_000])
    assert run.game == "space_invaders"


def test_plot_writes_a_png(resumed_run, tmp_path, capsys):
    out = tmp_path / "figs" / "curve.png"
    assert main([str(resumed_run), "--out", str(out)]) == 0
    assert "100 training episodes, 5 evaluations" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.format == "PNG"
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert width > height > 300
    # Something was drawn in the curves' colours, not just axes.
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert blue.sum() > 500 and red.sum() > 100


def test_default_output_is_in_the_run_directory(resumed_run):
    assert main([str(resumed_run)]) == 0
    assert (resumed_run / "curve.png").stat().st_size > 0


def test_only_eval_scalars_still_plot(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for i in range(5):
        writer.add_scalar("eval/episodic_return_mean", 100 + i, 1_000 * i, walltime=T0 + i)
    writer.close()
    assert main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0


def test_missing_tags_and_directories_are_one_line_errors(tmp_path, capsys):
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("losses/td_loss", 1.0, 0)
    writer.close()
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("apex-dqn-plot: error: no 'charts/episodic_return'")
        and "losses/td_loss" in err
    )
    assert len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_command_line_exit_code_for_a_missing_directory(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "apex_dqn.evaluation.plot", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"apex-dqn-plot: error: {tmp_path / 'nope'} is not a directory"


def test_moving_average_is_a_trailing_mean():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    assert len(moving_average(np.zeros(0), 5)) == 0
