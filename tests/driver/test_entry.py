"""train.py run from a checkout whose package is not installed says so in one line."""

from __future__ import annotations

import subprocess
import sys

from apex_dqn.benchmarks.train_run import ROOT


def test_uninstalled_package_is_one_line_and_exit_2():
    # -S: no site-packages, so neither the installed apex_dqn nor anything else is found.
    done = subprocess.run([sys.executable, "-S", "train.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("train.py: error: the apex_dqn package is not installed")
