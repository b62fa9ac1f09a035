"""Each command, run as a console script and as a module, refuses a bad path in one line.

``PROG: error: MESSAGE`` on stderr, nothing on stdout, exit status 2, no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# (console script, module, arguments with {missing} for a path that does not exist, the
# message, and the optional package the command checks for before it looks at the path)
COMMANDS = [
    ("apex-dqn-evaluate", "apex_dqn.evaluation.evaluate", ["--checkpoint", "{missing}"],
     "checkpoint {missing} does not exist", None),
    ("apex-dqn-play", "apex_dqn.evaluation.play",
     ["watch", "--checkpoint", "{missing}", "--video", "{missing}.gif"],
     "checkpoint {missing} does not exist", "PIL"),
    ("apex-dqn-export", "apex_dqn.evaluation.export",
     ["--checkpoint", "{missing}", "--out", "{missing}.pt"],
     "checkpoint {missing} does not exist", None),
    ("apex-dqn-plot", "apex_dqn.evaluation.plot", ["{missing}"],
     "{missing} is not a directory", "matplotlib"),
]  # fmt: skip


def script_path(name: str) -> str | None:
    """The installed console script: beside this Python, or else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.mark.parametrize("form", ["script", "module"])
@pytest.mark.parametrize(
    ("prog", "module", "argv", "message", "needs"), COMMANDS, ids=[c[0] for c in COMMANDS]
)
def test_a_bad_path_is_one_error_line_and_exit_status_2(
    prog, module, argv, message, needs, form, tmp_path
):
    if needs is not None:
        pytest.importorskip(needs)
    if form == "script":
        script = script_path(prog)
        if script is None:
            pytest.skip(f"{prog} is not installed (pip install -e .)")
        command = [script]
    else:
        command = [sys.executable, "-m", module]
    missing = str(tmp_path / "nope")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.run(
        [*command, *(a.format(missing=missing) for a in argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the installed package, not the source tree on the path
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"{prog}: error: {message.format(missing=missing)}\n"
    assert proc.stdout == ""
