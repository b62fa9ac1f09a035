"""Checkpoint files: atomic writes, the last K kept, newest loaded, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.checkpoint import (
    CheckpointError,
    check_compatible,
    list_checkpoints,
    load,
    save,
)
from apex_dqn.common.config import Config


def payload(step: int) -> dict:
    return {
        "config": Config(seed=step).to_dict(),
        "learner": {"weights": torch.full((3,), float(step)), "updates": step},
        "counters": {"env_frames": 100 * step, "episodes": step},
    }


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_then_load_round_trips(tmp_path):
    path = save(tmp_path, payload(7), step=7, keep=3)
    assert path == tmp_path / "checkpoint-0000000007.pt"
    got = load(path)
    assert got["format"] == checkpoint.FORMAT
    assert got["config"] == Config(seed=7).to_dict()
    assert torch.equal(got["learner"]["weights"], torch.full((3,), 7.0))
    assert got["counters"] == {"env_frames": 700, "episodes": 7}
    assert got["path"] == str(path)


def test_save_leaves_no_temporary_files(tmp_path):
    for step in (1, 2):
        save(tmp_path, payload(step), step=step, keep=5)
    assert names(tmp_path) == ["checkpoint-0000000001.pt", "checkpoint-0000000002.pt"]


def test_save_creates_the_directory(tmp_path):
    target = tmp_path / "a" / "b"
    save(target, payload(1), step=1, keep=1)
    assert names(target) == ["checkpoint-0000000001.pt"]


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = save(tmp_path, payload(1), step=1, keep=3)
    before = first.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, payload(2), step=2, keep=3)
    monkeypatch.undo()
    assert names(tmp_path) == ["checkpoint-0000000001.pt"]
    assert first.read_bytes() == before
    assert load(tmp_path)["counters"]["episodes"] == 1


def test_crash_rewriting_the_same_step_keeps_the_old_file(tmp_path, monkeypatch):
    first = save(tmp_path, payload(5), step=5, keep=3)
    before = first.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"x" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, payload(6), step=5, keep=3)
    monkeypatch.undo()
    assert names(tmp_path) == ["checkpoint-0000000005.pt"]
    assert first.read_bytes() == before


def test_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 10, 20):
        save(tmp_path, payload(step), step=step, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-0000000003.pt",
        "checkpoint-0000000010.pt",
        "checkpoint-0000000020.pt",
    ]
    assert len(list(tmp_path.iterdir())) == 3


def test_list_orders_by_step_not_by_name(tmp_path):
    # Written by hand without zero padding: 9 < 10 < 100 numerically.
    for step in (100, 9, 10):
        torch.save(
            {"format": checkpoint.FORMAT, **payload(step)}, tmp_path / f"checkpoint-{step}.pt"
        )
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "checkpoint-x.pt").write_text("not a checkpoint either")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-9.pt",
        "checkpoint-10.pt",
        "checkpoint-100.pt",
    ]
    assert load(tmp_path)["counters"]["episodes"] == 100


def test_list_of_missing_directory_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []


def test_load_directory_picks_the_newest(tmp_path):
    for step in (3, 12, 7):
        save(tmp_path, payload(step), step=step, keep=10)
    got = load(tmp_path)
    assert got["learner"]["updates"] == 12
    assert got["path"] == str(tmp_path / "checkpoint-0000000012.pt")


def test_load_empty_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load(tmp_path)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "checkpoint-0000000001.pt")


@pytest.mark.parametrize("keep_bytes", [0, 10, 200, -20])
def test_truncated_file_raises_clearly_and_is_left_alone(tmp_path, keep_bytes):
    save(tmp_path, payload(1), step=1, keep=3)
    path = save(tmp_path, payload(2), step=2, keep=3)
    data = path.read_bytes()
    truncated = data[:keep_bytes]
    path.write_bytes(truncated)
    for where in (path, tmp_path):
        with pytest.raises(CheckpointError) as info:
            load(where)
        message = str(info.value)
        assert str(path) in message
        assert "unreadable" in message
        assert "\n" not in message
    assert path.read_bytes() == truncated
    assert names(tmp_path) == ["checkpoint-0000000001.pt", "checkpoint-0000000002.pt"]


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "checkpoint-0000000001.pt"
    path.write_bytes(b"\x00\x01 this is not a torch file")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(path)
    assert path.exists()


@pytest.mark.parametrize(
    "content",
    [
        {"format": 99, "config": {}, "learner": {}, "counters": {}},
        {"config": {}, "learner": {}, "counters": {}},
        [1, 2, 3],
        torch.zeros(3),
    ],
    ids=["future-format", "no-format", "list", "tensor"],
)
def test_unknown_format_raises(tmp_path, content):
    path = tmp_path / "checkpoint-0000000001.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="unknown format"):
        load(path)


@pytest.mark.parametrize("missing", ["config", "learner", "counters"])
def test_missing_part_raises(tmp_path, missing):
    content = {"format": checkpoint.FORMAT, **payload(1)}
    del content[missing]
    path = tmp_path / "checkpoint-0000000001.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=missing):
        load(path)


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "checkpoint-0000000001.pt"
    torch.save({"format": checkpoint.FORMAT, **payload(1), "extra": Config()}, path)
    with pytest.raises(CheckpointError, match="unreadable"):
        load(path)


def test_learner_state_survives_a_checkpoint(tmp_path, one_torch_thread):
    from apex_dqn.learner.learning import Learner, TorchBatch

    cfg = Config(network="dqn2013", dueling=False, target_update_period=2)
    torch.manual_seed(0)
    learner = Learner(cfg, 4, "cpu")
    g = torch.Generator().manual_seed(0)
    batch = TorchBatch(
        obs=torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8, generator=g),
        actions=torch.tensor([0, 3]),
        returns=torch.tensor([1.0, 0.0]),
        discounts=torch.tensor([0.9, 0.0]),
        next_obs=torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8, generator=g),
        weights=torch.tensor([1.0, 0.5]),
    )
    for _ in range(3):
        learner.update(batch)
    state = copy.deepcopy(learner.state_dict())
    save(tmp_path, {"config": cfg.to_dict(), "learner": state, "counters": {}}, 3, keep=1)
    restored = Learner(cfg, 4, "cpu")
    restored.load_state_dict(load(tmp_path)["learner"])
    assert restored.updates == 3
    for a, b in zip(learner.online.parameters(), restored.online.parameters(), strict=True):
        assert torch.equal(a, b)
    pa, _ = learner.update(batch)
    pb, _ = restored.update(batch)
    assert torch.equal(pa, pb)


def test_check_compatible(tmp_path):
    saved = Config(network="nature", dueling=True).to_dict()
    check_compatible(saved, Config(network="nature", seed=5, lr=1.0).to_dict(), "ck.pt")
    for changes, key in (
        ({"network": "dqn2013"}, "network"),
        ({"dueling": False}, "dueling"),
        ({"game": "breakout"}, "game"),
    ):
        config = Config().replace(**changes).to_dict()
        with pytest.raises(CheckpointError) as info:
            check_compatible(saved, config, "ck.pt")
        message = str(info.value)
        assert "ck.pt" in message
        assert f"{key}={saved[key]!r}" in message
        assert f"{key}={config[key]!r}" in message
