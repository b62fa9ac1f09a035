"""An exported policy: float16 weights within a stated bound of the checkpoint's, a file
that evaluate, play and load_policy read and train.py refuses to resume, and the committed
policy of the Results table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.evaluation import export
from apex_dqn.evaluation.policy import load_policy
from apex_dqn.learner.learning import Learner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "benchmarks" / "results" / "space_invaders_60min_policy.pt"
NUM_ACTIONS = 6  # Space Invaders
# Float16 rounds each weight to 2^-11 of itself; through the network's five layers the
# Q-values move by a few times that, relative to their own scale.
RELATIVE_Q_BOUND = 1e-2


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint whose online weights are moved off the initializer's values by noise."""
    cfg = Config(game="space_invaders", network="nature", dueling=True, batch_size=8)
    learner = Learner(cfg, NUM_ACTIONS)
    with torch.no_grad():
        for param in learner.online.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return checkpoint.save(
        tmp_path_factory.mktemp("run"),
        {"config": cfg.to_dict(), "learner": learner.state_dict(),
         "counters": {"env_frames": 12_000, "episodes": 3}},
        step=7,
        keep=1,
    )  # fmt: skip


def test_float16_q_values_stay_within_the_bound_of_float32(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "policy.pt"
    assert export.main(["--checkpoint", str(trained_checkpoint), "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    _, full, _ = load_policy(trained_checkpoint)
    cfg, half, payload = load_policy(out)
    assert payload["exported_from"] == trained_checkpoint.name
    assert all(v.dtype == torch.float16 for v in payload["learner"]["online"].values())
    assert next(half.parameters()).dtype == torch.float32  # cast back as it loads
    assert cfg.game == "space_invaders" and payload["counters"]["env_frames"] == 12_000
    obs = torch.randint(0, 256, (64, 4, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        q_full, q_half = full(obs), half(obs)
    scale = q_full.abs().max().item()
    assert scale > 0
    assert (q_half - q_full).abs().max().item() <= RELATIVE_Q_BOUND * scale
    # Two bytes a weight, where a checkpoint holds four for each of the online and target
    # networks and the optimizer's two moments.
    weights = sum(p.numel() for p in full.parameters())
    assert 2 * weights < out.stat().st_size < 2.1 * weights


def test_float32_export_is_exact(trained_checkpoint, tmp_path):
    out = tmp_path / "policy32.pt"
    argv = ["--checkpoint", str(trained_checkpoint.parent), "--out", str(out)]
    assert export.main([*argv, "--dtype", "float32"]) == 0
    _, full, _ = load_policy(trained_checkpoint)
    _, same, _ = load_policy(out)
    for a, b in zip(full.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dtype", "int8"], "--dtype='int8' is invalid: must be one of float16, float32"),
        (["--out", "{exists}"], "exists: an export never replaces a file"),
        (["--out", "{tmp}/no/such/dir/p.pt"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_line_and_touch_nothing(
    trained_checkpoint, tmp_path, capsys, extra, message
):
    exists = tmp_path / "taken.pt"
    exists.write_bytes(b"someone's file")
    argv = ["--checkpoint", str(trained_checkpoint), "--out", str(tmp_path / "p.pt"), *extra]
    argv = [a.format(exists=exists, tmp=tmp_path) for a in argv]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert exists.read_bytes() == b"someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt"]


def test_train_refuses_to_resume_an_export(trained_checkpoint, tmp_path, capsys):
    from apex_dqn.driver.prepare import prepare

    out = tmp_path / "policy.pt"
    export.main(["--checkpoint", str(trained_checkpoint), "--out", str(out)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        prepare(["--resume", str(out), "--logdir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "is a policy exported from checkpoint-" in err and "not resumed" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.rom
def test_the_committed_policy_loads_and_plays(capsys):
    """The Results table's Space Invaders policy: at most 10 MB of float16 weights, which
    load exactly (float16 values are float32 values) and which evaluate scores."""
    from apex_dqn.evaluation import evaluate

    assert COMMITTED.stat().st_size <= 10 * 2**20
    cfg, net, payload = load_policy(COMMITTED)
    assert cfg.game == "space_invaders" and payload["learner"]["updates"] > 0
    saved = payload["learner"]["online"]
    for name, value in net.state_dict().items():
        assert saved[name].dtype == torch.float16 and torch.equal(value, saved[name].float())
    argv = ["--checkpoint", str(COMMITTED), "--episodes", "1", "--envs", "1",
            "--max-episode-frames", "400", "--threads", "1", "--no-random"]  # fmt: skip
    assert evaluate.main(argv) == 0
    assert f"{payload['learner']['updates']:,} learner updates" in capsys.readouterr().out
