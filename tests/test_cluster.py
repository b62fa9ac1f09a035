"""Several Ray nodes on this one machine: actors spread, grow with nodes, survive one leaving.

A head of 1 CPU and worker nodes of their own CPUs (``ray.cluster_utils.Cluster``, run by
``tests/cluster_control.py`` in a process of its own), and ``train.py --address`` joining
them. Nodes share one IP here, so placement is checked by node id, which every component
prints.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from apex_dqn.benchmarks.train_run import TrainRun as Run

pytestmark = [pytest.mark.ray, pytest.mark.rom, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--num-actors", "2", "--max-actors", "4", "--envs-per-actor", "2",
    "--replay-shards", "2", "--replay-capacity", "4000", "--replay-min-size", "200",
    "--batch-size", "16", "--network", "dqn2013", "--push-period", "20",
    "--publish-period", "5", "--weight-sync-period", "10", "--target-update-period", "10",
    "--log-interval-s", "2", "--checkpoint-interval-s", "100000", "--eval-interval-s", "0",
    "--final-eval-episodes", "0", "--total-frames", "1000000000",
]  # fmt: skip
ACTOR = r"^actor {i}: pid (\d+) node (\w+) ip \S+ epsilon (\S+)$"


class ClusterControl:
    """``tests/cluster_control.py`` in a subprocess: one command, one answer."""

    def __init__(self, head_cpus: int, log: Path):
        self._log = open(log, "w")  # noqa: SIM115 - closed by close()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "cluster_control.py"), str(head_cpus)],
            cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log,
        )  # fmt: skip
        self._answers: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            first = self._answer(timeout=180).split()
        except BaseException:
            self.close()
            raise
        self.address, self.head = first[1], first[3]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._answers.put(line.strip())

    def _answer(self, timeout: float = 120) -> str:
        try:
            return self._answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the cluster did not answer in {timeout} s") from None

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def add(self, cpus: int) -> str:
        return self.ask(f"add {cpus}").split()[1]

    def close(self) -> None:
        """Shut the cluster down: end of input, as the controller expects."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


def _placed(run: Run, kind: str) -> dict[int, str]:
    """Index -> node id of each actor or shard, from its latest ``KIND i: pid`` line."""
    found = {}
    for line in run.lines:
        if m := re.match(rf"^{kind} (\d+): pid \d+ node (\w+)", line):
            found[int(m.group(1))] = m.group(2)
    return found


def _training(run: Run, after: int) -> int:
    """Progress lines since line ``after`` in which the learner made updates."""
    rates = [re.search(r"upd/s (\S+)", line) for line in run.lines[after:]]
    return sum(1 for m in rates if m and float(m.group(1)) > 0)


def test_actors_spread_grow_with_nodes_and_outlive_a_node(tmp_path, monkeypatch):
    # A short private temp dir: the cluster never becomes this machine's default one (the
    # address file lives there), and its socket paths stay under the length limit.
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = ClusterControl(head_cpus=1, log=tmp_path / "cluster.log")
    run = None
    try:
        first = [cluster.add(1), cluster.add(1)]
        run = Run([*TINY, "--address", cluster.address, "--logdir", str(tmp_path / "run")])
        namespace = run.wait_for(r"^ray namespace: (\S+)", timeout=120).group(1)
        learner = run.wait_for(r"^learner: pid \d+ .* node (\w+)", timeout=120).group(1)
        a0 = run.wait_for(ACTOR.format(i=0), timeout=120)
        a1 = run.wait_for(ACTOR.format(i=1), timeout=120)
        # Spread: the two actors on two nodes (each worker has room for one).
        assert a0.group(2) != a1.group(2)
        assert {a0.group(2), a1.group(2)} <= {cluster.head, *first}
        run.wait_for(r"loss \d+\.\d+", timeout=180)  # training

        # A node with 2 CPUs joins: the driver starts actors 2 and 3, which land there.
        mark = len(run.lines)
        joined = cluster.add(2)
        run.wait_for(r"^cluster: 5 CPUs \(was 3\)", timeout=60, after=mark)
        for i in (2, 3):
            assert run.wait_for(ACTOR.format(i=i), timeout=120, after=mark).group(2) == joined
        epsilons = {i: re.search(ACTOR.format(i=i), "\n".join(run.lines), re.M).group(3)
                    for i in range(4)}  # fmt: skip
        assert len(set(epsilons.values())) == 4

        # A worker node leaves (one with an actor, and a shard when one has both, not the
        # learner's): its actor waits for room, its shard comes back elsewhere, empty, and
        # the learner trains on.
        nodes, shards = _placed(run, "actor"), _placed(run, "shard")
        candidates = [n for n in first if n != learner and n in nodes.values()]
        victim = max(candidates, key=lambda n: n in shards.values())
        lost = next(i for i, n in nodes.items() if n == victim)
        moved = [s for s, n in shards.items() if n == victim]
        mark = len(run.lines)
        assert cluster.ask(f"remove {victim}") == f"removed {victim}"
        run.wait_for(rf"^actor {lost} stopped \(", timeout=60, after=mark)
        run.wait_for(r"^cluster: 4 CPUs \(was 5\)", timeout=60, after=mark)
        deadline = time.monotonic() + 120
        while _training(run, after=mark) < 3:  # the learner keeps making updates
            assert time.monotonic() < deadline, "\n".join(run.lines[-30:])
            assert run.proc.poll() is None, "\n".join(run.lines[-30:])
            time.sleep(0.5)
        assert not any(f"actor {lost}: pid" in line for line in run.lines[mark:])
        assert any(re.search(r"upd/s \S+\s+actors 3\b", line) for line in run.lines[mark:])
        for s in moved:
            run.wait_for(rf"^replay shard {s} restarted empty", timeout=60, after=mark)
            node = run.wait_for(rf"^shard {s}: pid \d+ node (\w+)", timeout=60, after=mark)
            assert node.group(1) != victim

        # Room again: Ray restarts the waiting actor on the new node, same epsilons.
        mark = len(run.lines)
        extra = cluster.add(1)
        back = run.wait_for(ACTOR.format(i=lost), timeout=120, after=mark)
        assert back.group(2) == extra and back.group(3) == epsilons[lost]

        # An actor killed for good is dropped, and its index started again in the room.
        mark = len(run.lines)
        assert cluster.ask(f"kill {namespace} actor-{lost}") == f"killed actor-{lost}"
        run.wait_for(rf"^actor {lost} is dead for good .* 3 left$", timeout=60, after=mark)
        again = run.wait_for(ACTOR.format(i=lost), timeout=120, after=mark)
        assert again.group(3) == epsilons[lost]
        assert run.proc.poll() is None
    finally:
        code = run.stop() if run is not None else 0
        cluster.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code == 0, "\n".join(run.lines[-30:])
    assert "the learner died" not in "\n".join(run.lines)
