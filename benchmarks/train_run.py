"""``python train.py ARGS`` in a subprocess, as a person runs it: for the process-level
tests and the benchmarks that measure whole runs (``benchmarks/capacity_check.py``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _terminal_sigint() -> None:
    # A shell's background jobs start with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give train.py the default disposition, as a terminal does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class TrainRun:
    """``train.py`` in its own process group; its output collected line by line."""

    def __init__(
        self, args: list[str], wrapper: tuple[str, ...] = (), env: dict[str, str] | None = None
    ):
        """``wrapper``: a command that runs train.py as its child, e.g. ``timeout``.
        ``env``: its environment; by default this process's, less ``RAY_ADDRESS`` (a run
        of its own, not one joining whatever cluster the caller's shell names)."""
        if env is None:
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env = {**env, "PYTHONUNBUFFERED": "1"}
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_terminal_sigint,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 240, after: int = 0) -> re.Match:
        """The first line from ``after`` on matching ``pattern``; the run is killed if
        none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines[after:]):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(
            f"train.py printed no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:])
        )

    def wait(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(timeout=10)
        return code

    def interrupt(self) -> None:
        """What Ctrl-C in a terminal sends: SIGINT to the whole process group."""
        self.signal_group(signal.SIGINT)

    def signal_group(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout: float = 90) -> int:
        """Ctrl-C, then the exit code; killed if it has not exited within ``timeout``."""
        self.interrupt()
        try:
            return self.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
