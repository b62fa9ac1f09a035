"""A run's copy in storage (``driver/mirror.py``), on fsspec's in-memory filesystem and a
local folder: what a pass copies and in which order, pruning by ownership, failures that
cost nothing, and what ``--resume`` fetches back."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from apex_dqn.common import checkpoint, storage
from apex_dqn.common.storage import Storage, StorageError
from apex_dqn.driver import mirror
from apex_dqn.driver.mirror import RunMirror, StorageCopy
from tests.driver.test_rundir import OTHER, RUN, make_run


@pytest.fixture
def memory() -> Storage:
    """An empty folder ``/bucket-*/prefix`` of fsspec's memory filesystem."""
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    bucket = f"/bucket-{uuid.uuid4().hex[:8]}"
    yield Storage(fs, f"{bucket}/prefix", "memory")
    fs.rm(bucket, recursive=True)


class Recording(Storage):
    """A storage folder that records what is put and removed, in order."""

    def __init__(self, inner: Storage):
        super().__init__(inner.fs, inner.root, inner.scheme)
        self.log: list[str] = []

    def child(self, name: str) -> Recording:
        return Recording(super().child(name))

    def put(self, local, name: str) -> None:
        self.log.append(f"put {name}")
        super().put(local, name)

    def remove(self, name: str) -> None:
        self.log.append(f"rm {name}")
        super().remove(name)


def _save(run: Path, step: int, run_id: str = RUN, replay: int = 0, keep: int = 5) -> Path:
    saved = checkpoint.load(next(run.glob("checkpoint-*.pt")))
    payload = {k: saved[k] for k in ("config", "learner", "counters")}
    path = checkpoint.save(run, payload, step=step, keep=keep, run_id=run_id)
    for s in range(replay):
        checkpoint.replay_path(path, s).write_bytes(bytes([s]) * 100)
    return path


def test_a_pass_copies_the_run_in_order_and_then_only_what_changed(tmp_path, memory):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(40,))
    _save(run, 60, replay=2)
    store = Recording(memory).child("run")
    flushed = []
    m = RunMirror(store, run, RUN, keep=3, flush=lambda: flushed.append(1))
    done = m.sync()
    (event,) = [p.name for p in run.glob("events.out.tfevents.*")]
    c40, c60 = "checkpoint-0000000040.pt", "checkpoint-0000000060.pt"
    # The run id, then per checkpoint its owner file, its replay, the checkpoint last.
    assert store.log == [
        "put run-id", f"put {c40}.run", f"put {c40}", f"put {c60}.run",
        f"put {c60}.replay-0.npz", f"put {c60}.replay-1.npz", f"put {c60}", f"put {event}",
    ]  # fmt: skip
    assert {n for n, _ in done} == {e.split(" ")[1] for e in store.log}
    assert store.files() == {p.name: p.stat().st_size for p in run.iterdir()}
    assert flushed == [1]
    assert mirror.summary(done).startswith(f"{c40}, {c60}, 2 replay file(s), 1 event file(s)")
    store.log.clear()
    assert m.sync() == [] and store.log == []  # nothing changed, nothing copied
    with (run / event).open("ab") as f:  # an event file grows: copied whole again
        f.write(b"more")
    m.sync()
    assert store.log == [f"put {event}"]


def test_pruning_in_storage_deletes_only_the_runs_own_older_checkpoints(tmp_path, memory):
    """keep=2: the run's older checkpoints go (checkpoint, replay, owner file, in that
    order); another run's checkpoint and one of unknown owner stay, with their files."""
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))
    store = Recording(memory).child("run")
    # Files in the folder that are not this run's: another run's, and one without owner.
    other = tmp_path / "other"
    make_run(other, OTHER, steps=(5,))
    foreign = "checkpoint-0000000005.pt"
    store.put(other / foreign, foreign)
    store.put(other / f"{foreign}.run", f"{foreign}.run")
    store.put(other / foreign, "checkpoint-0000000007.pt")  # no owner file
    m = RunMirror(store, run, RUN, keep=2)
    m.sync()
    for step in (20, 30):
        m.ready(_save(run, step, replay=1, keep=2))
        m.sync()
    store.log.clear()
    m.ready(_save(run, 40, replay=1, keep=2))
    m.sync()
    old = "checkpoint-0000000020.pt"
    assert store.log[-3:] == [f"rm {old}", f"rm {old}.replay-0.npz", f"rm {old}.run"]
    kept = sorted(n for n in store.files() if checkpoint.checkpoint_step(n) is not None)
    assert kept == [foreign, "checkpoint-0000000007.pt", "checkpoint-0000000030.pt",
                    "checkpoint-0000000040.pt"]  # fmt: skip
    assert store.read_text(f"{foreign}.run").strip() == OTHER


def test_a_rewritten_checkpoint_replaces_its_stored_replay(tmp_path, memory):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))
    path = _save(run, 20, replay=2)
    m = RunMirror(memory, run, RUN, keep=3)
    m.sync()
    path = _save(run, 20, replay=0)  # the same update count again, no replay this time
    assert not checkpoint.replay_files(path)
    m.sync()
    assert not [n for n in memory.files() if checkpoint.REPLAY_INFIX in n]


def test_a_failed_pass_is_one_line_and_the_next_one_copies_everything(tmp_path, memory, capsys):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))

    class Down(Storage):
        def put(self, local, name):
            raise ConnectionError("endpoint unreachable\nsecond line")

    copy = StorageCopy(RunMirror(Down(memory.fs, memory.root, "memory"), run, RUN, keep=3))
    copy.request()
    assert copy.finish(timeout=30)
    out = capsys.readouterr().out.splitlines()
    failed = [x for x in out if x.startswith("storage: copy to")]
    assert failed == [
        f"storage: copy to {memory.uri()} failed (ConnectionError: endpoint unreachable second "
        "line); the run goes on and the next checkpoint tries again"
    ] * copy.failures  # fmt: skip
    assert copy.failures >= 1 and memory.files() == {}
    copy = StorageCopy(RunMirror(memory, run, RUN, keep=3))  # storage is back
    assert copy.finish(timeout=30)
    assert set(memory.files()) == {p.name for p in run.iterdir()}
    assert any(x.startswith("stored checkpoint-0000000010.pt") for x in
               capsys.readouterr().out.splitlines())  # fmt: skip


def test_a_storage_folder_holds_one_run(tmp_path, memory):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))
    store = memory.child("run")
    mirror.check_location(store, None, "runs/x-2")  # empty: a new run may take it
    RunMirror(store, run, RUN, keep=3).sync()
    mirror.check_location(store, RUN, "runs/x-2")  # its own run continues there
    with pytest.raises(StorageError) as info:
        mirror.check_location(store, None, "runs/x-2")
    assert str(info.value).startswith(f"--storage: {store.uri()} already holds run {RUN} (")
    assert str(info.value).endswith(
        f"continue it with --resume {store.uri()}, or name this run's directory otherwise, "
        "e.g. --logdir runs/x-2"
    )
    with pytest.raises(StorageError, match=f"holds another run {RUN} .*, not this one"):
        mirror.check_location(store, OTHER, "runs/x-2")


def test_a_resume_fetches_the_newest_readable_checkpoint_and_what_it_lacks(tmp_path, memory,
                                                                           capsys):  # fmt: skip
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10, 20))
    _save(run, 30, replay=2)
    store = memory.child("run")
    RunMirror(store, run, RUN, keep=5).sync()
    # The newest stored checkpoint is damaged: the one before is taken, in one line.
    (tmp_path / "cut").write_bytes((run / "checkpoint-0000000030.pt").read_bytes()[:500])
    store.put(tmp_path / "cut", "checkpoint-0000000030.pt")
    staging = tmp_path / "staging"
    staging.mkdir()
    payload = mirror.fetch_checkpoint(store, staging)
    assert payload["stored"] == "checkpoint-0000000020.pt" and payload["run_id"] == RUN
    assert capsys.readouterr().out == (
        f"checkpoint {store.uri('checkpoint-0000000030.pt')} is truncated: a torch archive cut "
        "short at 500 bytes: trying the one before\n"
    )
    # Fetched into a new directory: the checkpoint, its owner file, the event files.
    new = tmp_path / "new"
    local = mirror.fetch_run(store, payload, new)
    assert local == new / "checkpoint-0000000020.pt"
    assert sorted(p.name for p in new.iterdir()) == sorted(
        ["checkpoint-0000000020.pt", "checkpoint-0000000020.pt.run",
         *(p.name for p in run.glob("events.out.tfevents.*"))]
    )  # fmt: skip
    assert checkpoint.load(local)["learner"]["updates"] == 20
    # Fetched files keep the time they were stored: a mirror of the resumed run copies
    # none of them again.
    checkpoint.publish_run_id(new, RUN)
    log = Recording(memory).child("run")
    RunMirror(log, new, RUN, keep=5).sync()
    assert log.log == ["put run-id"]


def test_a_resume_names_the_runs_of_a_storage_root(tmp_path, memory):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))
    RunMirror(memory.child("run"), run, RUN, keep=5).sync()
    with pytest.raises(StorageError) as info:
        mirror.fetch_checkpoint(memory, tmp_path)
    assert str(info.value) == (
        f"--resume {memory.uri()}: no checkpoint there; it holds the run(s) run: e.g. "
        f"--resume {memory.uri()}/run"
    )


def test_a_newer_local_checkpoint_is_not_overridden_by_storage(tmp_path):
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10, 20))
    mirror.check_local_copy(run, RUN, "checkpoint-0000000020.pt")
    with pytest.raises(StorageError, match=r"holds checkpoint-0000000020\.pt of this run, newer"):
        mirror.check_local_copy(run, RUN, "checkpoint-0000000010.pt")


def test_a_local_storage_folder_is_a_copy_to_resume_from(tmp_path):
    """``--storage DIR``: the copy in DIR/NAME is told apart from the run directory."""
    run = tmp_path / "runs" / "run"
    make_run(run, RUN, steps=(10,))
    saved = checkpoint.load(run)
    where = tmp_path / "durable"
    saved["config"] = {**saved["config"], "storage": str(where), "logdir": str(run)}
    assert mirror.local_copy(dict(saved)) is None  # the run directory itself
    copy = storage.open_storage(str(where)).child("run")
    RunMirror(copy, run, RUN, keep=3).sync()
    stored = checkpoint.load(where / "run")
    stored["config"] = saved["config"]
    found = mirror.local_copy(stored)
    assert found is not None and found.uri() == copy.uri()
    assert stored["stored"] == "checkpoint-0000000010.pt"


def test_resume_from_a_local_storage_copy_fetches_the_run_where_it_was(tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """``--storage DIR`` and the run directory lost: ``--resume DIR/NAME`` alone puts the
    run back where it was, and keeps it writing to DIR; the copy is only read."""
    from apex_dqn.driver import session
    from apex_dqn.driver.prepare import prepare
    from tests.driver.test_rundir import snapshot

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(session, "cluster_address", lambda cfg: None)
    run = Path("runs") / "run"
    make_run(run, RUN, steps=(10, 20))
    where = tmp_path / "durable"
    for path in run.glob("checkpoint-*.pt"):  # as a run with --storage DIR saved them
        saved = checkpoint.load(path)
        saved["config"] = {**saved["config"], "storage": str(where), "logdir": str(run)}
        checkpoint.save(run, {k: saved[k] for k in ("config", "learner", "counters")},
                        step=saved["learner"]["updates"], keep=5, run_id=RUN)  # fmt: skip
    copy = storage.open_storage(str(where)).child("run")
    RunMirror(copy, run, RUN, keep=5).sync()
    before = snapshot(where)
    import shutil

    shutil.rmtree(run)
    cfg, resume, _, new = prepare(["--resume", str(where / "run")])
    assert new.directory == run and new.run_id == RUN
    assert (cfg.logdir, cfg.storage) == (str(run), str(where))
    assert resume["path"] == str(run / "checkpoint-0000000020.pt")
    assert checkpoint.load(resume["path"])["learner"]["updates"] == 20
    assert "changed on resume" not in capsys.readouterr().out
    assert snapshot(where) == before


def test_a_checkpoint_being_written_is_copied_only_once_it_is_complete(tmp_path, memory):
    """A pass that runs while the driver writes a checkpoint and its replay leaves that
    checkpoint out until the driver says it is complete."""
    run = tmp_path / "run"
    make_run(run, RUN, steps=(10,))
    m = RunMirror(memory, run, RUN, keep=5)
    path = _save(run, 20)  # saved, its replay not yet written
    m.sync()
    assert "checkpoint-0000000010.pt" in memory.files()
    assert "checkpoint-0000000020.pt" not in memory.files()
    checkpoint.replay_path(path, 0).write_bytes(b"r" * 10)
    m.ready(path)
    m.sync()
    assert {"checkpoint-0000000020.pt", f"{path.name}.replay-0.npz"} <= set(memory.files())
