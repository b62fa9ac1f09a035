"""Checkpoint files: written atomically, the last K kept, loaded with ``weights_only=True``.

A checkpoint is ``checkpoint-<updates>.pt`` in the run directory: a dict of the format
version, the config, the learner's state (online and target networks, optimizer, update
count) and the driver's counters. It is written to a temporary file in the same
directory, flushed to disk and renamed over, so a crash leaves either the old file or
the new one, never half of one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
# Settings a checkpoint's networks depend on: resuming with others cannot work.
STRUCTURAL = ("game", "network", "dueling")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to an incompatible run."""


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save(directory: str | os.PathLike, payload: dict[str, Any], step: int, keep: int) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"checkpoint-{step:010d}.pt"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load one checkpoint file, or the newest in a directory."""
    p = Path(path)
    if p.is_dir():
        found = list_checkpoints(p)
        if not found:
            raise CheckpointError(f"no checkpoint-*.pt files in {p}")
        p = found[-1]
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {p} is unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {p} has an unknown format (expected format {FORMAT})")
    for key in ("config", "learner", "counters"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {p} lacks {key!r}")
    payload["path"] = str(p)
    return payload


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: str) -> None:
    for key in STRUCTURAL:
        if saved_config.get(key) != config.get(key):
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={saved_config.get(key)!r}, "
                f"but this run has {key}={config.get(key)!r}"
            )
