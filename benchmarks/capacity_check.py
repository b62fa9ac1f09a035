"""The sizing model checked against real training runs on this machine, in one session.

    python -m apex_dqn.benchmarks.capacity_check [--runs single,cluster] [--seconds 120]
        [--actors 2] [--quick]

First the per-core costs of ``benchmarks.capacity`` are measured here, for the very
settings of the runs below (network, envs per actor, batch). Then ``train.py`` runs on
the real Space Invaders ROM, free-running (no replay-ratio limit), for ``--seconds``:

* ``single``: one local Ray, ``--actors`` actors, one replay shard beside the learner;
* ``cluster``: a ``ray.cluster_utils.Cluster`` of three nodes on this machine (a head of
  one CPU and two workers of one CPU each), ``train.py --address`` joining it, two
  actors, two shards spread over the nodes: samples cross nodes, zstd-compressed.

What a run measured comes from its TensorBoard counters, over the steady part of the run
(from the first log interval after the learner's first update to the run's last log):
env frames (transitions/s = frames/s / frame skip), ``replay/added`` (inserts/s) and
``charts/learner_updates`` (updates/s, times the batch: samples/s), each as a difference
of cumulative counts over the window's wall time; and the CPU time over the same window
of each of the run's Ray processes (actors, learner, shards), from ``/proc``, in cores.
The cluster run also reads this machine's loopback bytes over the window: every byte
between its nodes crosses it, and so does Ray's own control traffic and that of
anything else on the machine, so the figure is an upper bound of what the nodes sent.

Each run is predicted twice with :func:`benchmarks.capacity.predict`: ``nominal``, each
actor and the learner a core of its own, as the tool sizes a cluster; and ``shared``,
the whole program on this machine's ``os.cpu_count()`` cores (``Cluster.cores``). The
ratios are measured / predicted. The last line is one JSON object.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from argparse import Namespace
from dataclasses import asdict
from pathlib import Path
from typing import Any

from apex_dqn.benchmarks import capacity
from apex_dqn.benchmarks.capacity import Cluster, Costs
from apex_dqn.benchmarks.train_run import TrainRun

FRAME_SKIP = 4
NETWORK, ENVS, BATCH = "dqn2013", 8, 32
RUN_ARGS = [
    "--envs-per-actor", str(ENVS), "--network", NETWORK, "--batch-size", str(BATCH),
    "--replay-capacity", "40000", "--replay-min-size", "2000", "--push-period", "50",
    "--log-interval-s", "5", "--eval-interval-s", "0", "--final-eval-episodes", "0",
    "--checkpoint-interval-s", "100000", "--total-frames", "1000000000", "--seed", "0",
    "--max-actors", "0", "--samples-per-insert", "0",
]  # fmt: skip
# Ray's process titles of the program's parts (``ray::<class>``), and the role of each.
ROLES = {"ActorWorker": "actor", "LearnerWorker": "learner", "HostedShard": "shard"}


# ------------------------------------------------------------------------ measuring
def steady_rates(scalars: dict[str, list[tuple[float, int, float]]], batch: int) -> dict:
    """Rates over the steady window of a run's scalars (tag -> [(wall_time, step, value)],
    step = env frames): from the first log after the learner's first update to the last
    log. Raises ValueError when the learner never updated or the window has one log."""
    updates = scalars.get("charts/learner_updates", [])
    first = next((i for i, (_, _, v) in enumerate(updates) if v > 0), None)
    if first is None or len(updates) - first < 3:
        raise ValueError("the learner did not train for two log intervals: run longer")
    (t0, f0, u0), (t1, f1, u1) = updates[first + 1], updates[-1]
    added = {step: v for _, step, v in scalars.get("replay/added", [])}  # same log, same step
    wall = t1 - t0
    out = {
        "window_s": wall,
        "transitions_per_s": (f1 - f0) / FRAME_SKIP / wall,
        "updates_per_s": (u1 - u0) / wall,
        "samples_per_s": (u1 - u0) * batch / wall,
    }
    if f0 in added and f1 in added:
        out["inserts_per_s"] = (added[f1] - added[f0]) / wall
    return out


def read_scalars(logdir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every scalar of the run's event file: tag -> [(wall_time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = logdir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}  # fmt: skip


def role_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds) of this process tree's Ray workers of the program."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            role = next((r for name, r in ROLES.items() if title.startswith(f"ray::{name}")), None)
            if role is not None:
                t = proc.cpu_times()
                found[proc.pid] = (role, t.user + t.system)
        except psutil.Error:
            continue
    return found


def loopback_bytes() -> int:
    """Bytes received on this machine's loopback interface so far."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    return 0


def measure_run(args: list[str], logdir: Path, seconds: float, env: dict | None = None) -> dict:
    """Run ``train.py`` for ``seconds`` once it trains; its steady rates, CPU by role and
    loopback bytes over the window."""
    run = TrainRun([*args, "--logdir", str(logdir)], env=env or dict(os.environ))
    try:
        run.wait_for(r"upd/s [1-9]|upd/s 0\.[1-9]", timeout=600)  # the learner trains
        cpu0, lo0, t0 = role_cpu_seconds(), loopback_bytes(), time.monotonic()
        time.sleep(seconds)
        cpu1, lo1, t1 = role_cpu_seconds(), loopback_bytes(), time.monotonic()
    finally:
        code = run.stop(timeout=120)
    if code != 0:
        raise RuntimeError(f"train.py exited with {code}:\n" + "\n".join(run.lines[-20:]))
    rates = steady_rates(read_scalars(logdir), BATCH)
    cores: dict[str, list[float]] = {}
    for pid, (role, after) in cpu1.items():
        if pid in cpu0:
            cores.setdefault(role, []).append((after - cpu0[pid][1]) / (t1 - t0))
    rates["cores"] = {role: sorted(v, reverse=True) for role, v in cores.items()}
    rates["loopback_bytes_per_s"] = (lo1 - lo0) / (t1 - t0)
    rates["nodes"] = placement(run.lines)
    return rates


def placement(lines: list[str]) -> dict[str, str]:
    """Node id of the learner, each actor and each shard, from the driver's lines."""
    found = {}
    for line in lines:
        if m := re.match(r"^(learner|actor \d+|shard \d+): pid \d+ .*?node (\w+)", line):
            found[m.group(1)] = m.group(2)
    return found


# ------------------------------------------------------------------------- comparing
def compare(measured: dict, predicted: dict[str, capacity.Prediction], batch: int) -> dict:
    """Measured over predicted, for each prediction (``nominal``, ``shared``): the
    transitions the actors produce, the inserts, the samples and updates, and the
    actors' and the learner's cores against the core share."""
    out: dict[str, Any] = {}
    for name, p in predicted.items():
        pairs = {
            "transitions_per_s": (measured["transitions_per_s"], p.insert_per_s),
            "samples_per_s": (measured["samples_per_s"], p.sample_per_s),
            "updates_per_s": (measured["updates_per_s"], p.sample_per_s / batch),
        }
        if "inserts_per_s" in measured:
            pairs["inserts_per_s"] = (measured["inserts_per_s"], p.insert_per_s)
        for role in ("actor", "learner"):
            if measured["cores"].get(role):
                got = measured["cores"][role]
                pairs[f"{role}_cores_each"] = (sum(got) / len(got), p.core_share)
        out[name] = {
            key: {"measured": m, "predicted": q, "ratio": m / q if q > 0 else float("inf")}
            for key, (m, q) in pairs.items()
        }
    return out


def given(costs: Costs, measured: dict, batch: int) -> dict:
    """The per-core costs alone, on the CPU time the run's processes actually got: the
    actors' transitions/s ``sum(actor cores) * a`` and the learner's samples/s
    ``learner cores * L_core``, beside what they made. This separates the model's two
    parts: what a core does (checked here), and how many cores each part gets (the
    ``shared`` prediction), which other programs on the machine change."""
    cores = measured["cores"]
    pairs = {
        "transitions_per_s": (measured["transitions_per_s"],
                              sum(cores.get("actor", [])) * costs.actor_steps_per_core),
        "samples_per_s": (measured["samples_per_s"],
                          sum(cores.get("learner", [])) * costs.learner_samples_per_core),
    }  # fmt: skip
    return {key: {"measured": m, "predicted": q, "ratio": m / q if q > 0 else float("inf")}
            for key, (m, q) in pairs.items()}  # fmt: skip


def cluster_for(costs: Costs, actors: int, shards: int, placement_: str, wire: str,
                nodes: int, cores: float) -> Cluster:  # fmt: skip
    """The model's description of one of the runs."""
    return Cluster(
        actors=actors, shards=shards, learner_samples_per_s=costs.learner_samples_per_core,
        link_gbps=100.0, replay_capacity=40_000, placement=placement_, wire=wire,
        actors_per_node=max(1, actors // nodes), batch_size=BATCH, envs_per_actor=ENVS,
        publish_period=25, weight_sync_period=100, cores=cores,
    )  # fmt: skip


def check(name: str, costs: Costs, k: Cluster, measured: dict) -> dict:
    """Predictions nominal and on this machine's cores, set beside ``measured``."""
    predicted = {
        "nominal": capacity.predict(costs, k.__class__(**{**asdict(k), "cores": 0.0})),
        "shared": capacity.predict(costs, k),
    }
    rows = compare(measured, predicted, BATCH)
    rows["given"] = given(costs, measured, BATCH)
    result = {"measured": measured, "compare": rows,
              "predicted": {n: asdict(p) for n, p in predicted.items()}}  # fmt: skip
    print(f"--- {name}: measured over {measured['window_s']:.0f}s / predicted", flush=True)
    for kind, rows in result["compare"].items():
        for key, row in rows.items():
            print(f"{kind:<8} {key:<20} {row['measured']:>10,.2f} {row['predicted']:>10,.2f} "
                  f"{row['ratio']:>6.2f}", flush=True)  # fmt: skip
    return result


def single(costs: Costs, args: Namespace, tmp: Path) -> dict:
    run_args = [*RUN_ARGS, "--num-actors", str(args.actors), "--replay-shards", "1"]
    measured = measure_run(run_args, tmp / "single", args.seconds)
    k = cluster_for(costs, args.actors, 1, "learner", "raw", 1, float(os.cpu_count() or 1))
    return check("single machine", costs, k, measured)


def multi_node(costs: Costs, args: Namespace, tmp: Path) -> dict:
    """Two actors, two shards spread, on a three-node ``ray.cluster_utils.Cluster``."""
    from ray.cluster_utils import Cluster as RayCluster

    # As tests/test_cluster.py: no auth tokens between the local nodes, and a short private
    # temp dir (socket paths stay under the length limit; never this machine's default).
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp)
    os.environ.pop("RAY_ADDRESS", None)
    env = dict(os.environ)
    try:
        head = {"num_cpus": 1, "include_dashboard": False}
        cluster = RayCluster(initialize_head=True, head_node_args=head)
    except BaseException:
        _restore(saved, ray_tmp)
        raise
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_args = [*RUN_ARGS, "--num-actors", "2", "--replay-shards", "2",
                    "--replay-placement", "spread", "--address", cluster.address]  # fmt: skip
        measured = measure_run(run_args, tmp / "cluster", args.seconds, env=env)
    finally:
        cluster.shutdown()
        _restore(saved, ray_tmp)
    k = cluster_for(costs, 2, 2, "spread", "zstd", 3, float(os.cpu_count() or 1))
    result = check("three nodes", costs, k, measured)
    result["cross_node_bytes_per_s"] = cross_node_bytes(costs, k, measured)
    return result


def _restore(saved: dict[str, str | None], ray_tmp: str) -> None:
    """The environment as it was before the cluster, and its temp dir removed."""
    import shutil

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(ray_tmp, ignore_errors=True)


def cross_node_bytes(costs: Costs, k: Cluster, measured: dict) -> dict[str, float]:
    """Bytes/s that crossed nodes by the model, for the placement the run printed and the
    rates it measured (pushes of actors whose shard is on another node, batches of shards
    not on the learner's node and their priority updates, weights fetched by actor nodes
    other than the learner's), beside the loopback bytes/s measured."""
    nodes = measured["nodes"]
    learner = nodes.get("learner")
    per_actor = measured["transitions_per_s"] / k.actors
    per_shard = measured["samples_per_s"] / k.shards
    pushes = sum(per_actor * costs.push_bytes for i in range(k.actors)
                 if nodes.get(f"actor {i}") != nodes.get(f"shard {i % k.shards}"))  # fmt: skip
    remote = [s for s in range(k.shards) if nodes.get(f"shard {s}") != learner]
    samples = len(remote) * per_shard * (costs.wire_bytes[k.wire] + costs.update_bytes)
    fetches = min(
        measured["updates_per_s"] / k.publish_period,
        costs.actor_steps_per_core / (k.envs_per_actor * k.weight_sync_period),
    )
    actor_nodes = {nodes.get(f"actor {i}") for i in range(k.actors)} - {learner}
    weights = len(actor_nodes) * costs.param_bytes * fetches
    predicted = pushes + samples + weights
    got = measured["loopback_bytes_per_s"]
    return {
        "pushes": pushes,
        "samples": samples,
        "weights": weights,
        "predicted": predicted,
        "loopback_measured": got,
        "ratio": got / predicted if predicted else float("inf"),
    }


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = capacity.OneLineParser(prog="python -m apex_dqn.benchmarks.capacity_check",
                                    description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--runs", default="single,cluster",
                        help="comma-separated: single, cluster")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=120.0, help="measured, per run")
    parser.add_argument("--actors", type=int, default=2, help="of the single-machine run")
    parser.add_argument("--quick", action="store_true", help="rough costs, short runs")
    args = parser.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - {"single", "cluster"}:
        parser.error(f"--runs {args.runs!r}: choose among single, cluster")
    if not args.seconds > 0 or args.actors < 1:
        parser.error(
            f"--seconds {args.seconds:g} / --actors {args.actors}: the seconds must be "
            "positive and the actors at least 1"
        )
    quick = args.quick
    costs_args = Namespace(
        network=NETWORK, envs=ENVS, learner_batch=BATCH,
        actor_seconds=2.0 if quick else 10.0, rounds=2 if quick else 4,
        shard_capacity=2_000 if quick else 20_000, reps=10 if quick else 30,
        learner_seconds=2.0 if quick else 8.0,
    )  # fmt: skip
    load = [os.getloadavg()[0]]
    costs, raw = capacity.measure(costs_args)
    result: dict[str, Any] = {"costs": asdict(costs), "costs_measured": raw}
    with tempfile.TemporaryDirectory(prefix="capacity-check-") as tmp:
        for run in runs:
            result[run] = (single if run == "single" else multi_node)(costs, args, Path(tmp))
            load.append(os.getloadavg()[0])
    result.update(cpus=os.cpu_count(), load_avg_1m=load, seconds=args.seconds, quick=quick)
    print(json.dumps(capacity.rounded(result)), flush=True)
    return result


if __name__ == "__main__":
    main()
