"""Run directories: each holds one run alone.

A run directory holds one run's checkpoints, TensorBoard event files and the file naming
its run id (:data:`~apex_dqn.common.checkpoint.RUN_ID_FILE`). A second run written into
it would mix with the first: TensorBoard draws every event file of a directory as one
curve, and each run's checkpoints are the other's to overwrite. So:

* a new run never starts in a directory that holds a run (:func:`check_new`); the one
  line that refuses it names ``--resume DIR`` and a free directory (:func:`free_name`);
* the default directory, ``runs/<game>-<date>-<time>``, is created by the run that takes
  it (:func:`new_default`), so two runs started in the same second get two directories;
* a resumed run continues in its own directory, or in one that holds no run
  (:func:`for_resume`);
* a run records its id in its directory (:func:`claim`) just before it first writes
  there; of two runs claiming one directory at once, one wins and the other stops.

Everything but :func:`claim` and :func:`new_default` only reads, so a refused command
leaves every file as it was.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from apex_dqn.common import checkpoint
from apex_dqn.common.config import ConfigError, default_logdir

# What makes a directory hold a run: any of these at its top level.
MARKERS = ("checkpoint-*.pt", "events.out.tfevents.*", checkpoint.RUN_ID_FILE)


class RunDirError(ConfigError):
    """A run directory cannot be used by this run; the message is one line."""


@dataclass(frozen=True)
class Run:
    """Where a run writes, and under which id.

    ``adopt``: the checkpoint a run resumes from in place when it has no owner file (it
    was written before runs had ids); :func:`claim` records this run as its owner.
    """

    directory: Path
    run_id: str
    adopt: Path | None = None


def run_files(directory: str | os.PathLike) -> list[str]:
    """The names of the files that show ``directory`` holds a run, sorted; [] if none."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted({p.name for pattern in MARKERS for p in d.glob(pattern) if p.is_file()})


def free_name(directory: str | os.PathLike) -> Path:
    """``DIR-2``, ``DIR-3``, ...: the first sibling of ``directory`` that does not exist."""
    d = Path(directory)
    if not d.name:  # "." or "/"
        d = d.resolve()
    for k in itertools.count(2):
        candidate = d.with_name(f"{d.name}-{k}")
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")


def new_default(game: str) -> Path:
    """Create and return ``runs/<game>-<date>-<time>``, or its first free ``-2``, ``-3``,
    ... sibling: ``mkdir`` fails on an existing name, so no two runs get one directory."""
    base = Path(default_logdir(game))
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in itertools.count(1):
        candidate = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def _holds_a_run(directory: Path, found: list[str], which: str = "a run") -> str:
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return f"--logdir {directory} already holds {which} ({found[0]}{more})"


def check_new(directory: str | os.PathLike) -> None:
    """Refuse to start a new run in a directory that holds one."""
    d = Path(directory)
    found = run_files(d)
    if found:
        raise RunDirError(
            f"{_holds_a_run(d, found)}: continue it with --resume {d}, or start a new run "
            f"in a free directory, e.g. --logdir {free_name(d)}"
        )


def for_resume(path: str | os.PathLike, run_id: str | None, logdir: str) -> Run:
    """Where a run resumed from the checkpoint ``path`` continues, and under which id.

    ``run_id`` is the id stored in the checkpoint (None in one written before runs had
    ids: then the id of its owner file, else a new id). The run continues in ``logdir``
    if given, else in the checkpoint's directory. That directory must be this run's (its
    run id file names it), or hold no run, or, without a run id file, be the
    checkpoint's own directory (a run from before runs had ids, continued in place).
    """
    source = Path(path)
    here = source.parent
    directory = Path(logdir) if logdir else here
    run_id = run_id or checkpoint.owner(source) or checkpoint.new_run_id()
    in_place = os.path.realpath(directory) == os.path.realpath(here)
    owner = checkpoint.read_run_id(directory)
    if owner is not None and owner != run_id:
        if in_place:
            raise RunDirError(
                f"checkpoint {source} is not of run {owner}, whose directory {here} is: "
                f"continue it in a directory of its own, e.g. --logdir {free_name(here)}"
            )
        raise RunDirError(
            f"--logdir {directory} holds another run ({owner}): continue this one in its "
            f"own directory (no --logdir) or a free one, e.g. --logdir {free_name(directory)}"
        )
    if owner is None and not in_place and (found := run_files(directory)):
        raise RunDirError(
            f"{_holds_a_run(directory, found, 'another run')}: continue this one in its own "
            f"directory (no --logdir) or a free one, e.g. --logdir {free_name(directory)}"
        )
    adopt = source if in_place and checkpoint.owner(source) is None else None
    return Run(directory, run_id, adopt)


def claim(run: Run) -> None:
    """Record ``run.run_id`` as the owner of ``run.directory`` (and of ``run.adopt``).

    Called once the run is about to write there. Raises :class:`RunDirError` when
    another run claimed the directory since this one was checked.
    """
    holder = checkpoint.publish_run_id(run.directory, run.run_id)
    if holder != run.run_id:
        raise RunDirError(
            f"--logdir {run.directory} was taken by another run ({holder}) while this one "
            f"started: use a free directory, e.g. --logdir {free_name(run.directory)}"
        )
    if run.adopt is not None:
        checkpoint.adopt(run.adopt, run.run_id)
