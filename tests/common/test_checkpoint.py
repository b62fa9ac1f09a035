"""Checkpoint files: atomic writes, the last K of a run kept and no other run's file
touched, newest loaded, and one clear line for every file that is not a checkpoint."""

from __future__ import annotations

import copy
import functools
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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

RUN = "run0000aaaa"  # the run id of the checkpoints these tests save
OTHER = "run0000bbbb"
REPO = Path(__file__).resolve().parents[2]


def payload(step: int) -> dict:
    return {
        "config": Config(seed=step).to_dict(),
        "learner": {"weights": torch.full((3,), float(step)), "updates": step},
        "counters": {"env_frames": 100 * step, "episodes": step},
    }


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_then_load_round_trips(tmp_path):
    path = save(tmp_path, payload(7), step=7, keep=3, run_id=RUN)
    assert path == tmp_path / "checkpoint-0000000007.pt"
    got = load(path)
    assert got["format"] == checkpoint.FORMAT
    assert got["run_id"] == RUN == checkpoint.owner(path)
    assert got["config"] == Config(seed=7).to_dict()
    assert torch.equal(got["learner"]["weights"], torch.full((3,), 7.0))
    assert got["counters"] == {"env_frames": 700, "episodes": 7}
    assert got["path"] == str(path)


def test_save_leaves_no_temporary_files(tmp_path):
    for step in (1, 2):
        save(tmp_path, payload(step), step=step, keep=5, run_id=RUN)
    assert names(tmp_path) == [
        "checkpoint-0000000001.pt", "checkpoint-0000000001.pt.run",
        "checkpoint-0000000002.pt", "checkpoint-0000000002.pt.run",
    ]  # fmt: skip


def test_save_creates_the_directory(tmp_path):
    target = tmp_path / "a" / "b"
    save(target, payload(1), step=1, keep=1, run_id=RUN)
    assert names(target) == ["checkpoint-0000000001.pt", "checkpoint-0000000001.pt.run"]


def test_save_without_a_run_id_takes_the_payloads_or_a_new_one(tmp_path):
    a = save(tmp_path / "a", {**payload(1), "run_id": OTHER}, step=1, keep=1)
    assert load(a)["run_id"] == OTHER == checkpoint.owner(a)
    b = save(tmp_path / "b", payload(1), step=1, keep=1)
    assert load(b)["run_id"] == checkpoint.owner(b) not in (None, OTHER)


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    first = save(tmp_path, payload(1), step=1, keep=3, run_id=RUN)
    before = first.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, payload(2), step=2, keep=3, run_id=RUN)
    monkeypatch.undo()
    # The owner file is written first: the crash leaves it alone, without a checkpoint.
    assert names(tmp_path) == [
        "checkpoint-0000000001.pt", "checkpoint-0000000001.pt.run",
        "checkpoint-0000000002.pt.run",
    ]  # fmt: skip
    assert first.read_bytes() == before
    assert load(tmp_path)["counters"]["episodes"] == 1
    # The run's next checkpoint removes the lone owner file.
    save(tmp_path, payload(3), step=3, keep=3, run_id=RUN)
    assert "checkpoint-0000000002.pt.run" not in names(tmp_path)


def test_crash_rewriting_the_same_step_keeps_the_old_file(tmp_path, monkeypatch):
    first = save(tmp_path, payload(5), step=5, keep=3, run_id=RUN)
    before = first.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"x" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, payload(6), step=5, keep=3, run_id=RUN)
    monkeypatch.undo()
    assert names(tmp_path) == ["checkpoint-0000000005.pt", "checkpoint-0000000005.pt.run"]
    assert first.read_bytes() == before


def test_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 10, 20):
        save(tmp_path, payload(step), step=step, keep=3, run_id=RUN)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-0000000003.pt",
        "checkpoint-0000000010.pt",
        "checkpoint-0000000020.pt",
    ]
    assert len(list(tmp_path.iterdir())) == 6  # each with its owner file


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
        save(tmp_path, payload(step), step=step, keep=10, run_id=RUN)
    got = load(tmp_path)
    assert got["learner"]["updates"] == 12
    assert got["path"] == str(tmp_path / "checkpoint-0000000012.pt")


def test_load_empty_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load(tmp_path)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "checkpoint-0000000001.pt")


def _state(path: Path) -> tuple[bytes, int]:
    """A file's bytes and modification time: what "left exactly as it was" compares."""
    return path.read_bytes(), path.stat().st_mtime_ns


def _zip_of_other_content(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes/readme.txt", "a zip archive, but not a torch file")


def _learner_state(network: str) -> dict:
    from apex_dqn.learner.learning import Learner

    torch.manual_seed(0)
    return Learner(Config(network=network), 6).state_dict()


def _checkpoint(**changes) -> dict:
    """A checkpoint payload of a small Space Invaders run, with ``changes`` applied."""
    cfg = Config(network="dqn2013", logdir="runs/x")
    content = {"format": checkpoint.FORMAT, "run_id": RUN, "config": cfg.to_dict(),
               "learner": _learner_state("dqn2013"), "counters": {"env_frames": 100}}  # fmt: skip
    content.update(changes)
    return content


def _incompatible(path: Path) -> None:
    """A dqn2013 run's checkpoint whose online network is a nature network's."""
    content = _checkpoint()
    content["learner"]["online"] = _learner_state("nature")["online"]
    torch.save(content, path)


# Every kind of file that is not a checkpoint this version can use: how to make it, and
# what the one line says of it.
BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "truncated-10-bytes": (lambda p: p.write_bytes(_good_bytes()[:10]), "is truncated"),
    "truncated-half": (lambda p: p.write_bytes(_good_bytes()[:_half()]), "is truncated"),
    "truncated-end": (lambda p: p.write_bytes(_good_bytes()[:-20]), "is truncated"),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(4096)), "not a file written by torch.save"),
    "plain-pickle": (lambda p: p.write_bytes(pickle.dumps({"format": 1})),
                     "not a file written by torch.save"),
    "zip-of-other": (_zip_of_other_content, "a zip archive without torch data"),
    "tensor": (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor"),
    "list": (lambda p: torch.save([1, 2, 3], p), "holds a list"),
    "foreign-object": (lambda p: torch.save({**_checkpoint(), "extra": Config()}, p),
                       "holds objects other than tensors"),
    "no-format": (lambda p: torch.save({k: v for k, v in _checkpoint().items()
                                        if k != "format"}, p), "has no format version"),
    "future-format": (lambda p: torch.save(_checkpoint(format=99), p),
                      "format version 99, newer than this version reads (1)"),
    "old-format": (lambda p: torch.save(_checkpoint(format=0), p), "format version 0, expected 1"),
    "malformed-part": (lambda p: torch.save(_checkpoint(config=[1, 2]), p),
                       "its 'config' is a list"),
    "malformed-run-id": (lambda p: torch.save(_checkpoint(run_id="../x"), p),
                         "run id '../x' is invalid"),
}  # fmt: skip


@functools.cache
def _good_bytes() -> bytes:
    """A real checkpoint's bytes, for the files cut short."""
    buffer = io.BytesIO()
    torch.save(_checkpoint(), buffer)
    return buffer.getvalue()


def _half() -> int:
    return len(_good_bytes()) // 2


def _no_torch_loader_text(text: str) -> None:
    lowered = text.lower()
    assert "weights_only" not in lowered and "weights only" not in lowered, text
    assert "unpickl" not in lowered and "traceback" not in lowered, text


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_is_refused_in_one_line_and_left_alone(tmp_path, kind):
    make, says = BAD_FILES[kind]
    path = tmp_path / "checkpoint-0000000001.pt"
    make(path)
    before = _state(path)
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} ") and says in message, message
    assert "\n" not in message
    _no_torch_loader_text(message)
    assert _state(path) == before


def test_the_newest_checkpoint_bad_names_the_previous_one(tmp_path):
    save(tmp_path, payload(1), step=1, keep=3, run_id=RUN)
    path = save(tmp_path, payload(2), step=2, keep=3, run_id=RUN)
    cut = path.read_bytes()[:-50]
    path.write_bytes(cut)
    with pytest.raises(CheckpointError) as info:
        load(tmp_path)
    message = str(info.value)
    assert f"checkpoint {path} is truncated" in message
    assert f"the run's previous checkpoint is {tmp_path / 'checkpoint-0000000001.pt'}" in message
    assert path.read_bytes() == cut
    assert load(tmp_path / "checkpoint-0000000001.pt")["counters"]["episodes"] == 1


def _evaluate_command() -> list[str]:
    script = shutil.which("apex-dqn-evaluate")
    return [script] if script else [sys.executable, "-m", "apex_dqn.evaluation.evaluate"]


# What the commands are given: the file kinds above most likely met in practice, and a
# checkpoint whose networks do not fit its own config.
COMMAND_CASES = {
    **{kind: BAD_FILES[kind][0] for kind in (
        "truncated-half", "random-bytes", "zip-of-other", "tensor", "foreign-object",
        "future-format",
    )},
    "incompatible": _incompatible,
}  # fmt: skip


@pytest.mark.slow  # two commands started per case (~40 s in all); load() is tested above
@pytest.mark.parametrize("kind", list(COMMAND_CASES))
def test_commands_refuse_a_bad_checkpoint_in_one_line(tmp_path, kind):
    """``train.py --resume FILE`` (before Ray starts) and ``apex-dqn-evaluate
    --checkpoint FILE``: exit status 2, one line on stderr naming the file, no loader
    advice, and the file as it was."""
    path = tmp_path / "checkpoint-0000000005.pt"
    COMMAND_CASES[kind](path)
    before = _state(path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for command in (
        [sys.executable, "train.py", "--resume", str(path)],
        [*_evaluate_command(), "--checkpoint", str(path), "--threads", "1"],
    ):
        proc = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(path) in lines[0]
        _no_torch_loader_text(proc.stdout + proc.stderr)
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr
        assert _state(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


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


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: _state(p) for p in sorted(directory.iterdir())}


def _legacy(directory: Path, step: int) -> Path:
    """A checkpoint written before runs had ids: no run id inside, no owner file."""
    path = directory / f"checkpoint-{step:010d}.pt"
    torch.save({"format": checkpoint.FORMAT, **payload(step)}, path)
    return path


def test_pruning_touches_only_the_runs_own_checkpoints(tmp_path):
    """Two runs' checkpoints and one from before runs had ids in one directory: each run
    keeps its own last K, and no other file is deleted or changed."""
    legacy = _legacy(tmp_path, 4)
    for step in (1, 2, 3):
        save(tmp_path, payload(step), step=step, keep=2, run_id=OTHER)
    theirs = _snapshot(tmp_path)
    assert sorted(theirs) == [
        "checkpoint-0000000002.pt", "checkpoint-0000000002.pt.run",
        "checkpoint-0000000003.pt", "checkpoint-0000000003.pt.run", legacy.name,
    ]  # fmt: skip
    for step in (5, 6, 7, 8):
        save(tmp_path, payload(step), step=step, keep=2, run_id=RUN)
    now = _snapshot(tmp_path)
    assert {name: now[name] for name in theirs} == theirs
    mine = {name: state for name, state in now.items() if name not in theirs}
    assert sorted(mine) == [
        "checkpoint-0000000007.pt", "checkpoint-0000000007.pt.run",
        "checkpoint-0000000008.pt", "checkpoint-0000000008.pt.run",
    ]  # fmt: skip
    # The other run saves again, with K = 1: it prunes its own and leaves this run's.
    save(tmp_path, payload(9), step=9, keep=1, run_id=OTHER)
    after = _snapshot(tmp_path)
    assert {name: after[name] for name in mine} == mine
    assert after[legacy.name] == theirs[legacy.name]
    assert [p.name for p in list_checkpoints(tmp_path, OTHER)] == ["checkpoint-0000000009.pt"]
    assert [p.name for p in list_checkpoints(tmp_path, RUN)] == [
        "checkpoint-0000000007.pt", "checkpoint-0000000008.pt",
    ]  # fmt: skip


def test_save_never_replaces_another_runs_checkpoint(tmp_path):
    save(tmp_path, payload(5), step=5, keep=3, run_id=OTHER)
    _legacy(tmp_path, 6)
    before = _snapshot(tmp_path)
    for step, whose in ((5, f"run {OTHER}"), (6, "a run of unknown id")):
        with pytest.raises(CheckpointError) as info:
            save(tmp_path, payload(step), step=step, keep=3, run_id=RUN)
        path = tmp_path / f"checkpoint-{step:010d}.pt"
        assert str(info.value) == (
            f"checkpoint {path} belongs to {whose}, not to this run ({RUN}): not replaced"
        )
    assert _snapshot(tmp_path) == before


def test_a_run_replaces_its_own_checkpoint_of_the_same_step(tmp_path):
    save(tmp_path, payload(5), step=5, keep=3, run_id=RUN)
    save(tmp_path, {**payload(5), "counters": {"episodes": 55}}, step=5, keep=3, run_id=RUN)
    assert load(tmp_path)["counters"] == {"episodes": 55}
    assert names(tmp_path) == ["checkpoint-0000000005.pt", "checkpoint-0000000005.pt.run"]


def test_load_of_a_directory_reads_its_own_runs_newest(tmp_path):
    save(tmp_path, payload(3), step=3, keep=3, run_id=RUN)
    save(tmp_path, payload(9), step=9, keep=3, run_id=OTHER)  # newer, another run's
    assert load(tmp_path)["counters"]["episodes"] == 9  # no run id file: all of them count
    assert checkpoint.publish_run_id(tmp_path, RUN) == RUN
    assert load(tmp_path)["counters"]["episodes"] == 3
    only_theirs = tmp_path / "only-theirs"
    save(only_theirs, payload(1), step=1, keep=1, run_id=OTHER)
    checkpoint.publish_run_id(only_theirs, RUN)
    with pytest.raises(CheckpointError, match=f"^no checkpoint of run {RUN}, whose directory "):
        load(only_theirs)


def test_the_first_run_to_publish_its_id_owns_the_directory(tmp_path):
    d = tmp_path / "run"
    assert checkpoint.read_run_id(d) is None
    assert checkpoint.publish_run_id(d, RUN) == RUN
    before = _state(d / checkpoint.RUN_ID_FILE)
    assert checkpoint.publish_run_id(d, OTHER) == RUN
    assert checkpoint.publish_run_id(d, RUN) == RUN
    assert _state(d / checkpoint.RUN_ID_FILE) == before
    assert checkpoint.read_run_id(d) == RUN
    assert names(d) == [checkpoint.RUN_ID_FILE]  # no temporary file left


def test_publishing_a_run_id_without_hard_links_is_first_come_too(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(checkpoint.os, "link", no_links)
    assert checkpoint.publish_run_id(tmp_path, RUN) == RUN
    assert checkpoint.publish_run_id(tmp_path, OTHER) == RUN
    assert checkpoint.read_run_id(tmp_path) == RUN
    assert names(tmp_path) == [checkpoint.RUN_ID_FILE]


def test_adopt_records_an_owner_once_and_leaves_the_checkpoint(tmp_path):
    legacy = _legacy(tmp_path, 4)
    before = _state(legacy)
    assert checkpoint.owner(legacy) is None
    checkpoint.adopt(legacy, RUN)
    checkpoint.adopt(legacy, OTHER)  # an owner, once recorded, stays
    assert checkpoint.owner(legacy) == RUN
    assert _state(legacy) == before
    save(tmp_path, payload(4), step=4, keep=1, run_id=RUN)  # now the run's to replace
    assert load(legacy)["run_id"] == RUN


def _with_replay(directory: Path, step: int, run_id: str, shards: int = 2) -> Path:
    """A checkpoint and its replay files, as the driver writes them with --save-replay."""
    path = save(directory, payload(step), step=step, keep=10, run_id=run_id)
    for s in range(shards):
        checkpoint.replay_path(path, s).write_bytes(f"replay {s} of {step}".encode())
    return path


def test_replay_files_go_with_their_checkpoint_and_only_their_runs(tmp_path):
    """Pruning deletes a checkpoint's replay files with it, and those an interrupted
    pruning left beside an owner file; another run's replay files are never touched,
    and a checkpoint rewritten at its step loses the replay of the one it replaces."""
    theirs = _with_replay(tmp_path, 1, OTHER)
    assert checkpoint.replay_path(theirs, 1).name == "checkpoint-0000000001.pt.replay-1.npz"
    assert sorted(checkpoint.replay_files(theirs)) == [0, 1]
    before = _snapshot(tmp_path)
    for step in (2, 3, 4):
        _with_replay(tmp_path, step, RUN)
    # A pruning cut short: checkpoint 2 gone, its replay and owner file still there.
    (tmp_path / "checkpoint-0000000002.pt").unlink()
    save(tmp_path, payload(5), step=5, keep=2, run_id=RUN)
    now = _snapshot(tmp_path)
    assert {name: now[name] for name in before} == before
    assert sorted(set(now) - set(before)) == [
        "checkpoint-0000000004.pt", "checkpoint-0000000004.pt.replay-0.npz",
        "checkpoint-0000000004.pt.replay-1.npz", "checkpoint-0000000004.pt.run",
        "checkpoint-0000000005.pt", "checkpoint-0000000005.pt.run",
    ]  # fmt: skip
    save(tmp_path, payload(4), step=4, keep=2, run_id=RUN)  # rewritten: its replay goes
    assert checkpoint.replay_files(tmp_path / "checkpoint-0000000004.pt") == {}
    assert {name: _snapshot(tmp_path)[name] for name in before} == before
