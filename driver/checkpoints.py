"""The run's checkpoints, taken by the driver: the learner's state and the driver's
counters, and with ``--save-replay`` each shard's contents beside them; and what a
restarted learner or a resumed run's shards start from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
from apex_dqn.driver.metrics import Counters
from apex_dqn.driver.mirror import StorageCopy
from apex_dqn.driver.supervisor import Supervisor

REPLAY_TIMEOUT_S = 900.0  # the longest the driver waits for the shards to save or load replay


class RunCheckpoints:
    """Checkpoints of run ``run_id`` in ``cfg.logdir``: only its own files are pruned."""

    def __init__(self, cfg: Config, run_id: str, supervisor: Supervisor, counters: Counters,
                 storage: StorageCopy | None = None):  # fmt: skip
        """``storage``: the run's copy in storage (``--storage``), asked to copy the run
        after each checkpoint."""
        self.cfg, self.run_id = cfg, run_id
        self.supervisor, self.counters = supervisor, counters
        self.storage = storage

    def save(self) -> Path | None:
        """The learner's state and the driver's counters, written atomically as a
        checkpoint of this run; only this run's older checkpoints are pruned.

        A checkpoint that cannot be taken (the learner does not answer, the disk is full)
        is reported in one line and the run goes on: the previous one is still there.
        With ``--save-replay`` every shard then writes its contents beside it
        (:meth:`save_replay`).
        """
        try:
            state = ray.get(self.supervisor.learner.handle.state.remote(), timeout=300)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"no checkpoint: the learner did not answer ({type(exc).__name__})", flush=True)
            return None
        try:
            path = checkpoint.save(
                self.cfg.logdir,
                {"run_id": self.run_id, "config": self.cfg.to_dict(), "learner": state,
                 "counters": vars(self.counters).copy()},
                step=int(state["updates"]),
                keep=self.cfg.keep_checkpoints,
                run_id=self.run_id,
            )  # fmt: skip
        except (checkpoint.CheckpointError, OSError) as exc:
            print(f"no checkpoint: {exc}", flush=True)
            return None
        print(f"checkpoint {path}", flush=True)
        if self.cfg.save_replay:
            self.save_replay(path)
        if self.storage is not None:
            self.storage.request(ready=path)
        return path

    def save_replay(self, path: Path) -> None:
        """Ask every shard to write its contents beside checkpoint ``path`` (each writes
        its own file, atomically: ``checkpoint.replay_path``), and wait for them all.

        One line for what was saved, and one per shard that could not save (it is
        restarting, the disk is full): resuming from this checkpoint then starts that
        shard empty, and the run goes on.
        """
        asked = [(c.index, c.handle.save_replay.remote(str(checkpoint.replay_path(path, c.index))))
                 for c in self.supervisor.shards]  # fmt: skip
        deadline = time.monotonic() + REPLAY_TIMEOUT_S
        items = size = saved = 0
        slowest = 0.0
        for s, ref in asked:
            try:
                count, nbytes, seconds = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                cause = getattr(exc, "cause", None) or exc
                why = (str(cause).splitlines() or [""])[0]
                print(f"replay shard {s} not saved: {type(cause).__name__}: {why}", flush=True)
                continue
            items, size, saved = items + count, size + nbytes, saved + 1
            if self.storage is not None and not checkpoint.replay_path(path, s).is_file():
                print(f"replay shard {s} saved on another node: not copied to storage (its "
                      "file is not on the driver's node)", flush=True)  # fmt: skip
            slowest = max(slowest, seconds)
        print(f"replay saved: {items:,} transitions of {saved}/{len(asked)} shard(s), "
              f"{size / 2**20:,.1f} MiB, in {slowest:.1f}s", flush=True)  # fmt: skip

    def final(self) -> Path | None:
        """Save a last checkpoint and return its path; if that fails, say which one the run
        continues from, and return None."""
        path = self.save()
        if path is None:  # e.g. a signal reached Ray's processes too
            kept = checkpoint.list_checkpoints(self.cfg.logdir, self.run_id)
            print(f"the run continues from {kept[-1] if kept else 'nothing: no checkpoint'}"
                  f" with --resume {self.cfg.logdir}", flush=True)  # fmt: skip
        return path


def replay_files(replay_from: str | None, shards: int) -> list[str | None]:
    """Each shard's saved replay file beside checkpoint ``replay_from`` (None: none to
    load); a missing one is said in one line and that shard starts empty."""
    if replay_from is None:
        return [None] * shards
    files: list[str | None] = []
    for s in range(shards):
        path = checkpoint.replay_path(replay_from, s)
        if path.is_file():
            files.append(str(path))
        else:
            print(f"replay shard {s} starts empty: {path} does not exist", flush=True)
            files.append(None)
    unused = sorted(s for s in checkpoint.replay_files(replay_from) if s >= shards)
    if unused:
        print(f"replay of saved shard(s) {', '.join(map(str, unused))} not restored: this "
              f"run has {shards} shard(s)", flush=True)  # fmt: skip
    return files


def restored_replay(shards: list[Any], files: list[str | None]) -> int:
    """Wait for the shards given a file to load it; one line each: what it restored, or
    why it starts empty. Returns the transitions restored over all shards."""

    deadline = time.monotonic() + REPLAY_TIMEOUT_S
    total = 0
    for s, (shard, path) in enumerate(zip(shards, files, strict=True)):
        if path is None:
            continue
        try:
            count, error = ray.get(
                shard.restored.remote(), timeout=max(1.0, deadline - time.monotonic())
            )
        except (ray.exceptions.RayError, TimeoutError) as exc:
            count, error = 0, f"it did not say what it restored ({type(exc).__name__})"
        if error is not None:
            print(f"replay shard {s} starts empty: {error}", flush=True)
        else:
            print(f"replay shard {s} restored {count:,} transitions from {path}", flush=True)
        total += count
    if total:
        print(f"replay restored: {total:,} transitions; learning starts without waiting for "
              "--replay-min-size", flush=True)  # fmt: skip
    return total


def newest_learner_state(logdir: str) -> tuple[dict | None, str]:
    """The learner's state in the run's newest readable checkpoint, and where it came from
    (the one before if the newest cannot be read: a learner never restarts blank while
    the run has a checkpoint to give it)."""
    found = checkpoint.list_checkpoints(logdir, checkpoint.read_run_id(logdir))
    for path in reversed(found):
        try:
            return checkpoint.load(path)["learner"], str(path)
        except checkpoint.CheckpointError as exc:
            print(f"cannot restart the learner from {path}: {exc}", flush=True)
    return None, "scratch (no checkpoint of this run yet)"
