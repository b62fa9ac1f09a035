"""Files written so that a reader never sees half of one (checkpoints, saved replay)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(final: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``final`` with ``write(file)``: into a temporary file in the same directory,
    flushed to disk, then renamed over ``final``, so a crash leaves the old file or the
    whole new one, and a failed write leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix="." + final.name + "-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
