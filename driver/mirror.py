"""A run's copy in durable storage (``--storage URI``), and resuming from it.

The run directory ``.../NAME`` is copied to ``<storage>/NAME/``, file for file under the
same names: ``run-id``, each checkpoint of the run with its owner file and saved replay
(``checkpoint-<updates>.pt``, ``.pt.run``, ``.pt.replay-<s>.npz``) and the TensorBoard
event files. A copy of the run's storage folder is therefore a run directory, and
``--resume <storage>/NAME`` continues the run from it on any machine.

Copies (:class:`RunMirror`) are made by one background thread (:class:`StorageCopy`),
one pass at a time, after every checkpoint and when the run stops, so the driver never
waits on the network. A pass copies what changed since the last one: the run id file,
then each checkpoint of the run, oldest first, as its owner file, its replay files, and
the checkpoint itself last, so that a checkpoint visible in storage always has its owner
file and its whole replay beside it (a checkpoint is copied only once the driver has
written it and its replay: :meth:`RunMirror.ready`); then the event files, whole (they
only grow, and are flushed first), and the run's final evaluations; then it prunes.
Every file is written atomically for a reader (:meth:`~apex_dqn.common.storage.Storage.put`).
Pruning in storage follows the rules of the run directory
(:mod:`apex_dqn.common.checkpoint`): only checkpoints whose owner file names this run,
all but the ``--keep-checkpoints`` newest, each deleted before its replay and its owner
file; no other file is ever touched. A pass that fails is one line,
the run goes on, and the next pass copies what this one did not.

A storage folder holds one run, like a run directory: a new run refuses one that holds a
run (:func:`check_location`), and a resumed run one that holds another run.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apex_dqn.common import checkpoint
from apex_dqn.common.storage import Storage, StorageError, describe

EVENTS = re.compile(r"^events\.out\.tfevents\.")
FINISH_TIMEOUT_S = 900.0  # the longest the driver waits, when the run stops, for the last copy


def is_run_file(name: str) -> bool:
    """Whether a file of this name shows that a folder holds a run (as
    :data:`apex_dqn.driver.rundir.MARKERS`)."""
    return (checkpoint.checkpoint_step(name) is not None or bool(EVENTS.match(name))
            or name == checkpoint.RUN_ID_FILE)  # fmt: skip


def _replay_names(files: dict[str, int], name: str) -> list[str]:
    prefix = name + checkpoint.REPLAY_INFIX
    return sorted(n for n in files if n.startswith(prefix) and n.endswith(".npz"))


def location(store: Storage, logdir: str) -> Storage:
    """Where in the storage folder ``store`` the run directory ``logdir`` is copied:
    the subfolder of the directory's name."""
    return store.child(Path(logdir).resolve().name)


def check_location(store: Storage, run_id: str | None, free: str) -> None:
    """Refuse a storage folder that holds a run other than ``run_id`` (None: a new run,
    which needs a folder holding no run); ``free`` is the ``--logdir`` to suggest."""
    files = store.files()
    found = sorted(n for n in files if is_run_file(n))
    if not found:
        return
    owner = checkpoint.parse_run_id(store.read_text(checkpoint.RUN_ID_FILE))
    if run_id is not None and owner == run_id:
        return
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    whose = f"run {owner}" if owner else "a run"
    if run_id is None:
        raise StorageError(
            f"--storage: {store.uri()} already holds {whose} ({found[0]}{more}): continue it "
            f"with --resume {store.uri()}, or name this run's directory otherwise, e.g. "
            f"--logdir {free}"
        )
    raise StorageError(
        f"--storage: {store.uri()} holds another {whose} ({found[0]}{more}), not this one "
        f"({run_id}): continue this run in a directory of another name, e.g. --logdir {free}"
    )


class RunMirror:
    """Copies run ``run_id``'s directory ``directory`` to the storage folder ``store``.

    ``flush`` is called at the start of each pass (the TensorBoard writer's flush, so
    that the event files copied hold every point written so far).
    """

    def __init__(self, store: Storage, directory: Path, run_id: str, keep: int,
                 flush: Callable[[], None] | None = None):  # fmt: skip
        self.store, self.directory, self.run_id, self.keep = store, Path(directory), run_id, keep
        self.flush = flush
        self._copied: dict[str, tuple[int, int]] = {}  # name -> (size, mtime_ns) when copied
        self._owners: dict[str, str | None] = {}  # checkpoint name in storage -> its run
        self._started = False
        # The newest checkpoint whose save (and replay) is complete: a newer one is being
        # written, and is copied once the driver says it is done (:meth:`ready`).
        found = checkpoint.list_checkpoints(self.directory, run_id)
        self._ready = checkpoint.checkpoint_step(found[-1].name) if found else -1

    def ready(self, path: str | Path) -> None:
        """Checkpoint ``path`` is complete, its replay files too: copy it from now on."""
        step = checkpoint.checkpoint_step(Path(path).name)
        if step is not None:
            self._ready = max(self._ready, step)

    def _stat(self, name: str) -> tuple[int, int] | None:
        try:
            st = (self.directory / name).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def _already_there(self, files: dict[str, int]) -> None:
        """Count as copied the local files that storage holds already: the same size, and
        stored no earlier than the local file was written (a file downloaded from storage
        keeps its stored time, :func:`fetch_run`)."""
        for name, size in files.items():
            local = self._stat(name)
            if local is None or local[0] != size:
                continue
            stored = self.store.modified(name)
            if stored is not None and stored + 1e-3 >= local[1] / 1e9:  # float rounding
                self._copied[name] = local

    def _copy(self, name: str, done: list[tuple[str, int]]) -> None:
        """Copy ``name`` if it changed since it was last copied; nothing if it is gone."""
        local = self._stat(name)
        if local is None or self._copied.get(name) == local:
            return
        try:
            self.store.put(self.directory / name, name)
        except FileNotFoundError:  # pruned here meanwhile
            if self._stat(name) is None:
                return
            raise
        self._copied[name] = local
        done.append((name, local[0]))

    def sync(self) -> list[tuple[str, int]]:
        """One pass: copy what changed, then prune; returns the files copied and their
        sizes. Raises whatever storage raises: the next pass starts over."""
        if self.flush is not None:
            self.flush()
        files = self.store.files()
        if not self._started:
            self._already_there(files)
            self._started = True
        done: list[tuple[str, int]] = []
        self._copy(checkpoint.RUN_ID_FILE, done)
        ready = self._ready
        for path in checkpoint.list_checkpoints(self.directory, self.run_id):
            name = path.name
            if (checkpoint.checkpoint_step(name) or 0) > ready:
                continue  # still being written
            self._copy(name + checkpoint.OWNER_SUFFIX, done)
            self._owners[name] = self.run_id
            local_replay = {p.name for p in checkpoint.replay_files(path).values()}
            if self._copied.get(name) != self._stat(name):  # a new or rewritten checkpoint:
                for stale in set(_replay_names(files, name)) - local_replay:  # old replay goes
                    self.store.remove(stale)
            for replay in sorted(local_replay):
                self._copy(replay, done)
            self._copy(name, done)
        from apex_dqn.evaluation.final import FILE_PREFIX  # the run's final evaluations

        own = f"{FILE_PREFIX}{self.run_id}-"
        for other in sorted(p.name for p in self.directory.iterdir()
                            if EVENTS.match(p.name) or p.name.startswith(own)):  # fmt: skip
            self._copy(other, done)
        self.prune()
        return done

    def _owner(self, name: str) -> str | None:
        if name not in self._owners:
            text = self.store.read_text(name + checkpoint.OWNER_SUFFIX)
            self._owners[name] = checkpoint.parse_run_id(text)
        return self._owners[name]

    def prune(self) -> None:
        """Delete this run's checkpoints in storage but its ``keep`` newest, each with its
        replay then its owner file, and this run's owner files left without a checkpoint
        (with their replay); no other file."""
        files = self.store.files()
        mine = sorted((step, name) for name in files
                      if (step := checkpoint.checkpoint_step(name)) is not None
                      and self._owner(name) == self.run_id)  # fmt: skip
        for _, name in mine[: -self.keep] if self.keep > 0 else []:
            self.store.remove(name)  # the checkpoint first: it never lacks its owner file
            for replay in _replay_names(files, name):
                self.store.remove(replay)
            self.store.remove(name + checkpoint.OWNER_SUFFIX)
            self._forget(name)
        for side in files:
            if not side.endswith(checkpoint.OWNER_SUFFIX):
                continue
            name = side[: -len(checkpoint.OWNER_SUFFIX)]
            if checkpoint.checkpoint_step(name) is None or name in files:
                continue
            if checkpoint.parse_run_id(self.store.read_text(side)) == self.run_id:
                for replay in _replay_names(files, name):
                    self.store.remove(replay)
                self.store.remove(side)
                self._forget(name)

    def _forget(self, name: str) -> None:
        self._owners.pop(name, None)
        for key in [k for k in self._copied if k == name or k.startswith(name + ".")]:
            del self._copied[key]


def summary(done: list[tuple[str, int]]) -> str:
    """``checkpoint-0000000120.pt, 2 replay file(s), 1 event file(s) (3.1 MiB)``: what a
    pass copied (owner and run id files count in the size only)."""
    names = [n for n, _ in done]
    ckpts = [n for n in names if checkpoint.checkpoint_step(n) is not None]
    replay = sum(checkpoint.REPLAY_INFIX in n for n in names)
    events = sum(bool(EVENTS.match(n)) for n in names)
    parts = [", ".join(ckpts)] if ckpts else []
    parts += [f"{replay} replay file(s)"] if replay else []
    parts += [f"{events} event file(s)"] if events else []
    if not parts:  # owner and run id files, a final evaluation
        parts = [f"{len(names)} file(s)"]
    return f"{', '.join(parts)} ({sum(s for _, s in done) / 2**20:,.1f} MiB)"


class StorageCopy:
    """Runs :meth:`RunMirror.sync` in a background thread: one pass at a time, a pass
    asked for while one runs follows it (asks coalesce), so the driver never waits."""

    def __init__(self, mirror: RunMirror):
        self.mirror = mirror
        self._cond = threading.Condition()
        self._wanted = self._closing = False
        self.failures = 0
        self._thread = threading.Thread(target=self._loop, name="storage-copy", daemon=True)
        self._thread.start()

    def request(self, ready: str | Path | None = None) -> None:
        """Ask for a pass; returns at once. ``ready``: a checkpoint just completed, with
        its replay files (:meth:`RunMirror.ready`)."""
        if ready is not None:
            self.mirror.ready(ready)
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closing:
                    self._cond.wait()
                if not self._wanted:
                    return
                self._wanted = False
            self._pass()

    def _pass(self) -> bool:
        start = time.monotonic()
        where = self.mirror.store.uri()
        try:
            done = self.mirror.sync()
        except Exception as exc:  # storage errors of every kind: the run goes on
            self.failures += 1
            print(f"storage: copy to {where} failed ({describe(exc)}); the run goes on and "
                  "the next checkpoint tries again", flush=True)  # fmt: skip
            return False
        if done:
            print(f"stored {summary(done)} in {where} in {time.monotonic() - start:.1f}s",
                  flush=True)  # fmt: skip
        return True

    def finish(self, timeout: float = FINISH_TIMEOUT_S) -> bool:
        """One last pass, waited for at most ``timeout`` seconds; whether it ended."""
        with self._cond:
            self._wanted = self._closing = True
            self._cond.notify()
        print(f"copying the run's last files to {self.mirror.store.uri()}", flush=True)
        self._thread.join(timeout)
        if self._thread.is_alive():
            print(f"storage: the copy to {self.mirror.store.uri()} did not end within "
                  f"{timeout:.0f}s; {self.mirror.directory} holds every file",
                  flush=True)  # fmt: skip
            return False
        return True


def start_copy(cfg: Any, run_id: str, flush: Callable[[], None] | None = None
               ) -> StorageCopy | None:  # fmt: skip
    """The run's copy to ``cfg.storage``, started with a first pass (the run id); None
    without ``--storage``."""
    if not cfg.storage:
        return None
    from apex_dqn.common.storage import connect

    store = location(connect(cfg.storage), cfg.logdir)
    mirror = RunMirror(store, Path(cfg.logdir), run_id, cfg.keep_checkpoints, flush)
    copy = StorageCopy(mirror)
    copy.request()
    return copy


# ------------------------------------------------------------------------ resuming
def _runs_in(store: Storage) -> list[str]:
    """The subfolders of ``store`` that hold a run id file: runs stored there."""
    try:
        entries = store.fs.ls(store.root, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
             if e.get("type") == "directory"]  # fmt: skip
    return sorted(n for n in names if store.child(n).read_text(checkpoint.RUN_ID_FILE))


def fetch_checkpoint(store: Storage, staging: Path) -> dict[str, Any]:
    """Download the newest readable checkpoint of the run stored in ``store`` into the
    local folder ``staging`` and load it (its ``path``: the local file; ``stored``: its
    name in storage). A checkpoint that cannot be read is one line, and the one before
    it is tried. :class:`StorageError` when none can be."""
    files = store.files()
    run_id = checkpoint.parse_run_id(store.read_text(checkpoint.RUN_ID_FILE))
    names = sorted((step, n) for n in files if (step := checkpoint.checkpoint_step(n)) is not None)
    if run_id is not None:
        owners = {n: store.read_text(n + checkpoint.OWNER_SUFFIX) for _, n in names}
        names = [(s, n) for s, n in names if checkpoint.parse_run_id(owners[n]) == run_id]
    if not names:
        runs = _runs_in(store)
        hint = ""
        if runs:
            example = store.child(runs[0]).uri()
            hint = f"; it holds the run(s) {', '.join(runs)}: e.g. --resume {example}"
        whose = f" of run {run_id}" if run_id else ""
        raise StorageError(f"--resume {store.uri()}: no checkpoint{whose} there{hint}")
    for _, name in reversed(names):
        local = staging / name
        try:
            store.get(name, local)
            payload = checkpoint.load(local)
        except checkpoint.CheckpointError as exc:
            print(str(exc).replace(str(local), store.uri(name)) + ": trying the one before",
                  flush=True)  # fmt: skip
            local.unlink(missing_ok=True)
            continue
        except Exception as exc:
            raise StorageError(f"--resume {store.uri(name)}: {describe(exc)}") from exc
        payload["stored"], payload["staged"] = name, True
        return payload
    raise StorageError(
        f"--resume {store.uri()}: none of its {len(names)} checkpoint(s) can be read"
    )


def local_copy(payload: dict[str, Any]) -> Storage | None:
    """The storage folder a checkpoint ``payload`` was loaded from, when it is its run's
    copy in a local storage folder (``--storage /path``: ``/path/NAME``), not the run's
    directory; None otherwise. Marks ``payload`` as stored there (``stored``)."""
    from apex_dqn.common.storage import connect, split

    saved = payload["config"]
    where = saved.get("storage")
    if not isinstance(where, str) or not where or split(where)[0] != "file":
        return None
    here = Path(payload["path"]).parent
    copy = Path(split(where)[1]) / here.name
    if not copy.is_dir() or not os.path.samefile(copy, here):
        return None
    if os.path.realpath(str(saved.get("logdir") or "")) == os.path.realpath(here):
        return None  # the run directory itself
    payload["stored"], payload["staged"] = Path(payload["path"]).name, False
    return connect(where).child(here.name)


def check_local_copy(directory: Path, run_id: str | None, stored: str) -> None:
    """Refuse to resume from storage into a directory where the run has a newer
    checkpoint than the stored one ``stored`` (the run went on after its last copy):
    that one is resumed with ``--resume DIR``."""
    step = checkpoint.checkpoint_step(stored) or 0
    newer = [p for p in checkpoint.list_checkpoints(directory, run_id)
             if (checkpoint.checkpoint_step(p.name) or 0) > step]  # fmt: skip
    if run_id is not None and newer:
        raise StorageError(
            f"{directory} holds {newer[-1].name} of this run, newer than the stored "
            f"{stored}: resume it with --resume {directory}"
        )


def _keep_stored_time(store: Storage, name: str, local: Path) -> None:
    """Give a downloaded file the time it was stored (as ``cp -p`` does), so that the
    run's copy knows it holds it already (:meth:`RunMirror._already_there`)."""
    stored = store.modified(name)
    if stored is not None:
        os.utime(local, (stored, stored))


def fetch_run(store: Storage, payload: dict[str, Any], directory: Path) -> Path:
    """Put into ``directory`` what it lacks of the stored run for resuming from the
    fetched checkpoint ``payload`` (:func:`fetch_checkpoint`): that checkpoint, its owner
    file and replay files, and the event files (TensorBoard continues the run's curves).
    A file already in ``directory`` is never replaced. Returns the local checkpoint."""
    start = time.monotonic()
    name = payload["stored"]
    directory.mkdir(parents=True, exist_ok=True)
    files = store.files()
    wanted = [name + checkpoint.OWNER_SUFFIX, *_replay_names(files, name),
              *sorted(n for n in files if EVENTS.match(n))]  # fmt: skip
    fetched: list[int] = []
    staged = Path(payload["path"])
    final = directory / name
    if not final.exists():
        if payload.get("staged") and staged.is_file():
            _move(staged, final)
        else:
            store.get(name, final)
        _keep_stored_time(store, name, final)
        fetched.append(final.stat().st_size)
    for n in wanted:
        target = directory / n
        if n in files and not target.exists():
            store.get(n, target)
            _keep_stored_time(store, n, target)
            fetched.append(target.stat().st_size)
    print(f"fetched {len(fetched)} file(s) of {name} and the run's event files from "
          f"{store.uri()} into {directory} ({sum(fetched) / 2**20:,.1f} MiB in "
          f"{time.monotonic() - start:.1f}s)", flush=True)  # fmt: skip
    return final


def _move(staged: Path, final: Path) -> None:
    """Move a staged download into place, atomically (a copy if on another disk)."""
    import shutil

    from apex_dqn.common.files import write_atomically

    try:
        os.replace(staged, final)
    except OSError:
        with staged.open("rb") as src:
            write_atomically(final, lambda f: shutil.copyfileobj(src, f, 8 << 20))
        staged.unlink(missing_ok=True)
