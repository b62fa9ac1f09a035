"""Checkpoint files: written atomically, owned by one run, the run's last K kept, loaded
with ``weights_only=True``, and any file that is not one refused in one line.

A checkpoint is ``checkpoint-<updates>.pt`` in the run directory: a dict of the format
version, the id of the run that wrote it, the config, the learner's state (online and
target networks, optimizer, update count) and the driver's counters. It is written to a
temporary file in the same directory, flushed to disk and renamed over, so a crash
leaves either the old file or the new one, never half of one.

Ownership. Every run has an id (:func:`new_run_id`), kept across resumes. The run
directory names its run in the file :data:`RUN_ID_FILE`, and every checkpoint names its
run twice: inside (``run_id``) and in a one-line owner file beside it,
``checkpoint-<updates>.pt.run``, so that pruning can tell whose a file is without
loading it. Pruning, and :func:`load` of a directory, only ever consider the files of
the directory's own run; a checkpoint whose owner is unknown (one written before runs
had ids) or another run's is never deleted or replaced.

Saved replay (``--save-replay``). Each replay shard writes its contents beside the
checkpoint, ``checkpoint-<updates>.pt.replay-<shard>.npz`` (:func:`replay_path`), after
the checkpoint itself: the checkpoint's owner file covers them, and they go with their
checkpoint, before its owner file, so that a crash while pruning never leaves replay
files without a file naming their run. A checkpoint rewritten at the same update count
loses the replay files of the one it replaces (they were of another moment).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch

from apex_dqn.common.files import write_atomically

FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
RUN_ID_FILE = "run-id"  # in a run directory: the id of the run it belongs to
OWNER_SUFFIX = ".run"  # checkpoint-<updates>.pt.run: the id of the run that wrote it
REPLAY_INFIX = ".replay-"  # checkpoint-<updates>.pt.replay-<shard>.npz: a shard's contents
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Settings the state in a checkpoint depends on: resuming with others cannot work. The
# networks' shapes follow game (its action count), network and dueling; the optimizer
# state is that optimizer's (Adam's moments are not RMSProp's averages).
STRUCTURAL = ("game", "network", "dueling", "optimizer")
_PARTS = ("config", "learner", "counters")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to an incompatible run."""


def new_run_id() -> str:
    """A fresh run id: 48 random bits as 12 hex digits. Two ids are equal with even odds
    only among some 2**24 (16M) runs (the birthday bound), far more than share a disk."""
    return uuid.uuid4().hex[:12]


def checkpoint_step(name: str) -> int | None:
    """The update count in a checkpoint's file name ``checkpoint-<updates>.pt``; None for
    any other name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def parse_run_id(text: str | None) -> str | None:
    """The run id in the text of a run id or owner file; None if it holds none."""
    text = (text or "").strip()
    return text if _RUN_ID.match(text) else None


def _read_id(path: Path) -> str | None:
    """The run id stored in the one-line file ``path``; None if absent or malformed."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _RUN_ID.match(text) else None


def read_run_id(directory: str | os.PathLike) -> str | None:
    """The id of the run that owns ``directory`` (its :data:`RUN_ID_FILE`), or None."""
    return _read_id(Path(directory) / RUN_ID_FILE)


def publish_run_id(directory: str | os.PathLike, run_id: str) -> str:
    """Make ``run_id`` the owner of ``directory`` unless it already has one; returns the
    owner now recorded (``run_id``, or the other run's id).

    The file is written in full under a temporary name and hard-linked to its final
    name: the link fails if the name exists, so of two runs claiming one directory at
    once exactly one wins, and no reader ever sees half an id. Where the file system has
    no hard links, the name is created exclusively (``O_EXCL``) and then written.
    """
    if not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / RUN_ID_FILE
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".run-id-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(run_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return _read_id(final) or "unknown"
        except OSError:  # no hard links here
            try:
                fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return _read_id(final) or "unknown"
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(run_id + "\n")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return run_id


def _owner_file(path: Path) -> Path:
    return path.with_name(path.name + OWNER_SUFFIX)


def owner(path: str | os.PathLike) -> str | None:
    """The id of the run that wrote the checkpoint ``path`` (from its owner file), or
    None when unknown: no owner file (a checkpoint from before runs had ids)."""
    return _read_id(_owner_file(Path(path)))


def adopt(path: str | os.PathLike, run_id: str) -> None:
    """Record ``run_id`` as the owner of the checkpoint ``path`` if it has none.

    For the checkpoint a run resumes from in place when it was written before runs had
    ids: it is provably this run's, and owning it lets the run replace it when its first
    checkpoint falls on the same update count. The checkpoint file itself is not touched.
    """
    p = Path(path)
    if owner(p) is None:
        _write_owner(p, run_id)


def _write_owner(path: Path, run_id: str) -> None:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}")
    write_atomically(_owner_file(path), lambda f: f.write((run_id + "\n").encode("ascii")))


def replay_path(path: str | os.PathLike, shard: int) -> Path:
    """The file of replay shard ``shard``'s contents saved with the checkpoint ``path``."""
    p = Path(path)
    return p.with_name(f"{p.name}{REPLAY_INFIX}{shard}.npz")


def replay_files(path: str | os.PathLike) -> dict[int, Path]:
    """The replay shard files saved with the checkpoint ``path``, by shard index."""
    p = Path(path)
    name = re.compile("^" + re.escape(p.name + REPLAY_INFIX) + r"(\d+)\.npz$")
    if not p.parent.is_dir():
        return {}
    found = ((name.match(f.name), f) for f in p.parent.iterdir())
    return {int(m.group(1)): f for m, f in found if m}


def _remove_replay(path: Path) -> None:
    for f in replay_files(path).values():
        f.unlink(missing_ok=True)


def list_checkpoints(directory: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Checkpoints in ``directory``, oldest (fewest updates) first; with ``run_id``, only
    those that run wrote."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    if run_id is not None:
        found = [(n, p) for n, p in found if owner(p) == run_id]
    return [p for _, p in sorted(found)]


def save(
    directory: str | os.PathLike,
    payload: dict[str, Any],
    step: int,
    keep: int,
    run_id: str | None = None,
) -> Path:
    """Write ``payload`` as ``checkpoint-<step>.pt`` of run ``run_id``; keep that run's
    ``keep`` checkpoints with the most updates and delete its older ones.

    ``run_id`` defaults to the payload's ``run_id``, else a new id (a checkpoint of its
    own). The owner file is written before the checkpoint, so a checkpoint never exists
    without one; a crash in between leaves an owner file alone, removed by the run's
    next pruning. A checkpoint of another run, or of an unknown one, is never replaced
    (:class:`CheckpointError`) nor deleted.
    """
    run_id = run_id or payload.get("run_id") or new_run_id()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"checkpoint-{step:010d}.pt"
    if final.exists() and (other := owner(final)) != run_id:
        whose = f"run {other}" if other else "a run of unknown id"
        raise CheckpointError(
            f"checkpoint {final} belongs to {whose}, not to this run ({run_id}): not replaced"
        )
    if owner(final) != run_id:
        _write_owner(final, run_id)
    else:  # the run's own checkpoint of this step, replaced: its replay was of then
        _remove_replay(final)
    content = {"format": FORMAT, **payload, "run_id": run_id}
    write_atomically(final, lambda f: torch.save(content, f))
    _prune(d, run_id, keep)
    return final


def _prune(directory: Path, run_id: str, keep: int) -> None:
    """Delete run ``run_id``'s checkpoints but its ``keep`` newest, with their replay
    files, and its owner files left without a checkpoint (with the replay files beside
    them); no other file is touched."""
    for old in list_checkpoints(directory, run_id)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)  # the checkpoint first: it never lacks its owner file
        _remove_replay(old)  # then its replay, while its owner file still names the run
        _owner_file(old).unlink(missing_ok=True)
    for side in directory.glob("checkpoint-*.pt" + OWNER_SUFFIX):
        checkpoint_file = side.with_name(side.name[: -len(OWNER_SUFFIX)])
        if not checkpoint_file.exists() and _read_id(side) == run_id:
            _remove_replay(checkpoint_file)
            side.unlink(missing_ok=True)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint file, or the newest of a directory's run.

    In a directory with a :data:`RUN_ID_FILE`, only that run's checkpoints count (a
    directory from before runs had ids: all of them). The payload gains ``path``; its
    ``run_id`` is None for a checkpoint written before runs had ids. Anything that is not
    a checkpoint of this program raises :class:`CheckpointError` with one line naming the
    file and what is wrong with it; the file is only read.
    """
    p = Path(path)
    if p.is_dir():
        run_id = read_run_id(p)
        found = list_checkpoints(p, run_id)
        if not found:
            others = list_checkpoints(p)
            if run_id is not None and others:
                raise CheckpointError(
                    f"no checkpoint of run {run_id}, whose directory {p} is: its "
                    f"{len(others)} checkpoint-*.pt file(s) belong to other runs"
                )
            raise CheckpointError(f"no checkpoint-*.pt files in {p}")
        try:
            return _load_file(found[-1])
        except CheckpointError as exc:
            if len(found) < 2:
                raise
            raise CheckpointError(f"{exc}; the run's previous checkpoint is {found[-2]}") from exc
    return _load_file(p)


def _load_file(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    _check_archive(p)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {p} is damaged: its pickled data cannot be read"
            ) from exc
        # The safe loader refused an object other than tensors and plain containers:
        # torch's text is about its loader's options; the question is whose file this is.
        raise CheckpointError(
            f"checkpoint {p} is not a checkpoint of this program: it holds objects other "
            "than tensors, numbers, strings and containers of them"
        ) from exc
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {p} is damaged: its torch archive cannot be read ({type(exc).__name__})"
        ) from exc
    return _check_payload(p, payload)


def _check_archive(p: Path) -> None:
    """Refuse a file that is not a torch archive, before torch reads it.

    ``torch.save`` writes a zip archive whose central directory is at its end, so a
    file cut short is no longer a valid zip yet still starts with the zip signature.
    """
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes): it was cut short")
    try:
        with zipfile.ZipFile(p) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        with p.open("rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise CheckpointError(
                f"checkpoint {p} is truncated: a torch archive cut short at {size} bytes"
            ) from exc
        raise CheckpointError(
            f"checkpoint {p} is not a checkpoint: not a file written by torch.save"
        ) from exc
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in members):
        raise CheckpointError(
            f"checkpoint {p} is not a checkpoint: a zip archive without torch data"
        )


def _check_payload(p: Path, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {p} is not a checkpoint of this program: it holds a "
            f"{type(payload).__name__}, not a dict with a format version"
        )
    version = payload.get("format")
    if version is None:
        raise CheckpointError(
            f"checkpoint {p} is not a checkpoint of this program: it has no format version"
        )
    if version != FORMAT:
        newer = isinstance(version, int) and version > FORMAT
        raise CheckpointError(
            f"checkpoint {p} has format version {version!r}, "
            + (f"newer than this version reads ({FORMAT})" if newer else f"expected {FORMAT}")
        )
    for key in _PARTS:
        if key not in payload:
            raise CheckpointError(f"checkpoint {p} is incomplete: it lacks {key!r}")
        if not isinstance(payload[key], dict):
            raise CheckpointError(
                f"checkpoint {p} is malformed: its {key!r} is a {type(payload[key]).__name__}, "
                "not a dict"
            )
    run_id = payload.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        raise CheckpointError(f"checkpoint {p} is malformed: its run id {run_id!r} is invalid")
    payload["run_id"] = run_id
    payload["path"] = str(p)
    return payload


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Refuse a config whose :data:`STRUCTURAL` settings differ from the checkpoint's."""
    for key in STRUCTURAL:
        if saved_config.get(key) != config.get(key):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved_config.get(key)!r}, "
                f"but this run has {key}={config.get(key)!r}"
            )


def check_network_state(
    saved: Any, expected: dict[str, torch.Tensor], path: str, what: str, name: str
) -> None:
    """Refuse a saved network state (``name``: ``online``, ``target``) that would not load
    into a network whose state is ``expected`` (``what`` describes that network): a
    tensor missing or of another shape, or one the network has not. One line, naming the
    first difference, where ``load_state_dict`` would list them all over many lines."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} is malformed: its {name} network is not a dict")
    for key, tensor in expected.items():
        got = saved.get(key)
        if not isinstance(got, torch.Tensor) or got.shape != tensor.shape:
            found = tuple(got.shape) if isinstance(got, torch.Tensor) else "nothing"
            raise CheckpointError(
                f"checkpoint {path} does not fit {what}: its {name} network has {found} "
                f"for {key}, which needs {tuple(tensor.shape)}"
            )
    if extra := sorted(str(k) for k in set(saved) - set(expected)):
        raise CheckpointError(
            f"checkpoint {path} does not fit {what}: its {name} network has {extra[0]!r}, "
            "which that network has not"
        )
