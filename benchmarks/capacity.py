"""Cluster sizing: per-core costs measured on this machine, a cluster's load predicted.

    python -m apex_dqn.benchmarks.capacity [--actors 256] [--shards 8]
        [--learner-samples-per-s 100000] [--link-gbps 10] [--replay-capacity 2000000]
        [--replay-placement learner|spread] [--wire auto|raw|frames|zstd]
        [--target-replay-ratio 1] [--actors-per-node 16] [--batch-size 512]
        [--quick | --compare | --costs FILE]

Measured here, with the other benchmarks' own measuring functions:

* ``a``: an actor's agent steps per second per core, inference, n-step building and
  pushes to a shard in another process included (``benchmarks.actor``): steps/s over the
  actor process's CPU time per wall second;
* ``c_ins``: a shard's CPU seconds per inserted transition, into a full shard, so each
  chunk evicts (``benchmarks.replay.measure_buffer``: the inverse of ``insert_cpu_per_s``);
* ``c_smp[w]``: a shard's CPU seconds per sampled transition in wire format ``w``: the
  sample, its pickling and its copy into shared memory (``benchmarks.replay.measure_wire``,
  ``wire_encode512_cpu_ms / 512``), plus the priority update that comes back for it
  (``update512_cpu_ms / 512``);
* ``c_dec[w]``: the learner's CPU seconds per sampled transition to unpickle and expand it
  (``wire_decode512_cpu_ms / 512``);
* ``L_core``: the learner's samples per second on one core, updates/s on a batch already in
  memory times the batch size (``benchmarks.learner``'s synthetic figure);
* ``p``: bytes pushed per transition, actor to shard: a real ``TransitionChunk`` pickled
  with protocol 5, stream plus out-of-band buffers, over its transitions (a new frame of
  7,056 B, its frame numbers, action, return, discount, priority);
* ``W[w]``: bytes per sampled transition on the wire, measured the same way on batches of
  512 from a shard filled with Space Invaders screens (``benchmarks.replay.measure_wire``);
* ``u``: bytes per sampled transition of the priority update sent back (keys and
  priorities, pickled the same way);
* ``P``: bytes of the network's weights (float32), what an actor node fetches per new version.

The model, for ``A`` actors of one core each, ``N`` shards (each one process, so at most one
core), a learner that can consume ``L`` samples/s, links of ``B`` bytes/s each way
(``--link-gbps`` x 1e9 / 8) and a target replay ratio ``r*`` (sampled per inserted)::

    production              I_A = A * a
    insert rate             I = min(I_A, N / c_ins, B / p (learner placement) or N * B / p)
    shard load (cores)      rho(I, S) = (I / N) * c_ins + (S / N) * c_smp[w]
    shard sample capacity   S_shard = N * (1 - (I / N) * c_ins) / c_smp[w]
    learner placement       learner node in = I * p         (samples stay in shared memory)
    spread placement        shard node in  = (I / N) * p + (S / N) * u
                            shard node out = (S / N) * W[w]
                            learner in     = S * W[w],   S_link = B / W[w]
    weights, learner out    = nodes_with_actors * P * min(L / (batch * publish_period),
                                                          a / (envs * weight_sync_period))
    sample rate             S = min(L, S_shard, S_link, 1 / c_dec[w])
    replay ratio            R = S / I
    learner decode (cores)  S * c_dec[w]   (one prefetch thread, so S <= 1 / c_dec[w])
    replay memory           C * BYTES_PER_TRANSITION + N * 256 MiB   (shard_memory_bytes)
    shards needed           ceil(rho(I_A, L) * N), and for spread also
                            ceil(L * W[w] / B) and ceil(I_A * p / B)

On one machine of ``C`` cores (``--cores C``; 0, the default, gives each actor and the
learner a core of its own, as on a cluster sized by this tool) the actors and the learner
share what the shards leave: ``a`` and ``L`` are both scaled by
``share = min(1, (C - N * rho(A * a, L)) / (A + 1))`` (:func:`core_share`).
``benchmarks.capacity_check`` runs ``train.py`` here, on one node and on several
(``ray.cluster_utils.Cluster``), and sets what it measures beside these predictions.

Which part saturates first is the one of largest utilisation at the nominal point
(``I = I_A``, ``S = L``): the learner ``I_A * r* / L`` (it cannot sample each transition
``r*`` times), the actors ``L / (I_A * r*)`` (they cannot feed the learner at ``r*``; the two
are each other's inverse, so exactly one is >= 1), each shard ``rho(I, L)``, and each link
its bytes per second over ``B``, and the learner's decoding ``L * c_dec[w]``. ``c_dec`` is
measured with the expansion of compact batches on the CPU, an upper bound for a CUDA learner,
which expands them on the device. Ray's per-call overheads, the actors' own CPU beyond one
core, and pushes between processes of one node are not modelled.

``--costs FILE`` takes the per-core costs from a previous run's last line (its JSON) instead
of measuring them, to size several clusters from one measurement. ``--compare`` also runs
``benchmarks.actor`` and ``benchmarks.learner`` (one Ray shard) on this machine and sets
their measurements beside the predictions for this machine as a cluster of one actor, one
shard and a learner of one core. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import numpy as np

from apex_dqn.benchmarks import actor as actor_bench
from apex_dqn.benchmarks import learner as learner_bench
from apex_dqn.benchmarks import replay as replay_bench
from apex_dqn.benchmarks import synthetic
from apex_dqn.common.config import Config
from apex_dqn.common.messages import WIRE_FORMATS
from apex_dqn.replay.worker import shard_memory_bytes, wire_for

PLACEMENTS = ("learner", "spread")
LEARNER_NODE, SHARD_NODE = "learner node", "each shard node"


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Costs:
    """Per-core costs measured on one machine (see the module docstring's symbols)."""

    actor_steps_per_core: float  # a
    insert_s: float  # c_ins, CPU s per inserted transition
    sample_s: dict[str, float]  # c_smp[w], CPU s per sampled transition, update included
    decode_s: dict[str, float]  # c_dec[w], learner CPU s per sampled transition
    learner_samples_per_core: float  # L_core
    push_bytes: float  # p
    wire_bytes: dict[str, float]  # W[w]
    update_bytes: float  # u
    param_bytes: int  # P


@dataclass(frozen=True)
class Cluster:
    """The cluster whose load is predicted: ``learner_samples_per_s`` is what its learner
    consumes when nothing else holds it back (``L``), ``target_replay_ratio`` the samples
    per inserted transition wanted (``r*``); ``batch_size``, ``publish_period`` and
    ``weight_sync_period`` set how often weights cross the network, as in ``Config``."""

    actors: int = 256
    shards: int = 8
    learner_samples_per_s: float = 100_000.0
    link_gbps: float = 10.0
    replay_capacity: int = 2_000_000
    placement: str = "learner"
    wire: str = "raw"
    target_replay_ratio: float = 1.0
    actors_per_node: int = 16
    batch_size: int = 512
    envs_per_actor: int = 16
    publish_period: int = 25
    weight_sync_period: int = 100
    cores: float = 0.0  # > 0: the whole program shares this many cores (one machine)


@dataclass
class Prediction:
    """What the model says about one cluster; rates per second, bytes per second."""

    produced_per_s: float  # A * a, what the actors would push
    insert_per_s: float  # what reaches the shards
    insert_limited_by: str  # actors, network or shards
    sample_per_s: float
    replay_ratio: float
    limited_by: str  # what sets the sample rate: learner, shards, network, learner decode
    saturates_first: str
    saturated: list[str]  # every part at or over 1, most loaded first
    utilisation: dict[str, float]
    shard_cores: float  # rho at the operating point
    shards_needed: int
    replay_memory_bytes: int
    learner_decode_cores: float
    network: dict[str, dict[str, float]] = field(default_factory=dict)  # node -> in/out
    core_share: float = 1.0  # of a core, each actor's and the learner's (``core_share``)


def _links(c: Costs, k: Cluster, insert: float, sample: float) -> dict[str, dict[str, float]]:
    """Bytes per second in and out of the learner's node and of each shard node."""
    nodes = math.ceil(k.actors / k.actors_per_node)
    fetches = min(
        k.learner_samples_per_s / (k.batch_size * k.publish_period),
        c.actor_steps_per_core / (k.envs_per_actor * k.weight_sync_period),
    )
    weights_out = nodes * c.param_bytes * fetches
    if k.placement == "learner":  # shards live on the learner's node: samples stay there
        return {LEARNER_NODE: {"in": insert * c.push_bytes, "out": weights_out}}
    n = k.shards
    return {
        LEARNER_NODE: {"in": sample * c.wire_bytes[k.wire],
                       "out": sample * c.update_bytes + weights_out},
        SHARD_NODE: {"in": insert / n * c.push_bytes + sample / n * c.update_bytes,
                     "out": sample / n * c.wire_bytes[k.wire]},
    }  # fmt: skip


def replay_memory(capacity: int, shards: int) -> int:
    """Bytes of ``shards`` full shards holding ``capacity`` transitions between them, each
    with its process overhead (``shard_memory_bytes``: C * BYTES_PER_TRANSITION + N * 256 MiB)."""
    per, extra = divmod(capacity, shards)
    return sum(shard_memory_bytes(per + (i < extra)) for i in range(shards))


def shard_load(c: Costs, k: Cluster, insert: float, sample: float) -> float:
    """rho = (I / N) c_ins + (S / N) c_smp[w]: cores one shard process needs."""
    return (insert * c.insert_s + sample * c.sample_s[k.wire]) / k.shards


def core_share(c: Costs, k: Cluster) -> float:
    """The fraction of a core each actor and the learner get when the whole program
    shares ``k.cores`` cores (1 when ``k.cores`` is 0: a core each, as Ray reserves them).

    Each actor and the learner would keep one core busy; the shards need only
    ``N * rho`` cores at the nominal load and are served first (they wake for short
    calls, and the kernel's scheduler favours a process that has slept), so the rest is
    split evenly: ``share = min(1, (cores - N * rho(A * a, L)) / (A + 1))``.
    """
    if k.cores <= 0:
        return 1.0
    shards = shard_load(c, k, k.actors * c.actor_steps_per_core, k.learner_samples_per_s)
    left = max(k.cores - shards * k.shards, 0.0)
    return min(1.0, left / (k.actors + 1))


def predict(c: Costs, k: Cluster) -> Prediction:
    """The model of the module docstring, for cluster ``k`` with costs ``c``."""
    link = k.link_gbps * 1e9 / 8
    share = core_share(c, k)
    produced = k.actors * c.actor_steps_per_core * share
    demand = k.learner_samples_per_s * share
    # Pushes cross the learner node's link (learner placement) or the shard nodes' links
    # (spread), and each shard can insert at most 1 / c_ins per second on its one core.
    i_link = link / c.push_bytes * (1 if k.placement == "learner" else k.shards)
    i_shard = k.shards / c.insert_s
    insert = min(produced, i_link, i_shard)
    insert_limited_by = (
        "actors" if insert == produced else "network" if insert == i_link else "shards"
    )
    # What the shards can serve once their inserts are paid for, and what the links carry.
    spare = k.shards - insert * c.insert_s
    s_shard = max(spare, 0.0) / c.sample_s[k.wire]
    s_link = link / c.wire_bytes[k.wire] if k.placement == "spread" else math.inf
    # The learner's one prefetch thread decodes every batch.
    s_decode = 1.0 / c.decode_s[k.wire] if c.decode_s[k.wire] > 0 else math.inf
    limits = {"learner": demand, "shards": s_shard, "network": s_link, "learner decode": s_decode}
    limited_by = min(limits, key=limits.get)  # the first of equals: the learner
    sample = limits[limited_by]

    util = {
        "learner": produced * k.target_replay_ratio / demand,
        "actors": demand / (produced * k.target_replay_ratio),
        "shards": shard_load(c, k, produced, demand),
        "learner decode": demand * c.decode_s[k.wire],
    }
    for node, flows in _links(c, k, produced, demand).items():
        for way, rate in flows.items():
            util[f"network: {node} {way}"] = rate / link
    first = max(util, key=util.get)
    saturated = sorted((name for name, u in util.items() if u >= 1), key=util.get, reverse=True)

    # Shards for the nominal load: one core each, and (spread) one link out each.
    needed = math.ceil(shard_load(c, k, produced, demand) * k.shards)
    if k.placement == "spread":
        needed = max(needed, math.ceil(demand * c.wire_bytes[k.wire] / link),
                     math.ceil(produced * c.push_bytes / link))  # fmt: skip
    return Prediction(
        produced_per_s=produced,
        insert_per_s=insert,
        insert_limited_by=insert_limited_by,
        sample_per_s=sample,
        replay_ratio=sample / insert,
        limited_by=limited_by,
        saturates_first=first,
        saturated=saturated,
        utilisation=util,
        shard_cores=shard_load(c, k, insert, sample),
        shards_needed=max(needed, 1),
        replay_memory_bytes=replay_memory(k.replay_capacity, k.shards),
        learner_decode_cores=sample * c.decode_s[k.wire],
        network=_links(c, k, insert, sample),
        core_share=share,
    )


# ------------------------------------------------------------------------- measuring
def measure_actor(cfg: Config, seconds: float, rounds: int) -> dict[str, float]:
    """``benchmarks.actor``'s measurement: the real actor pushing to a Ray shard."""
    import ray
    import torch

    torch.set_num_threads(cfg.actor_threads)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _, act = actor_bench.measure(cfg, seconds, rounds)
    finally:
        ray.shutdown()
    return act


def measure_replay(capacity: int, reps: int, seed: int) -> dict:
    """Insert, sample and wire costs of one full shard of Space Invaders frames, and the
    bytes per pushed transition of the chunks that filled it."""
    from apex_dqn.replay.shard import ReplayShard

    chunks = replay_bench.real_chunks(int(capacity * 1.3), 8, 50, seed)
    pushed = sum(replay_bench.wire_bytes(*replay_bench.serialize(ch)) for ch in chunks)
    push_bytes = pushed / sum(len(ch) for ch in chunks)
    shard = ReplayShard(capacity, replay_bench.ALPHA, seed=seed)
    buffer = replay_bench.measure_buffer(shard, chunks, capacity, reps, seed)
    wire = replay_bench.measure_wire(shard, reps)
    keys = np.arange(replay_bench.BATCH, dtype=np.int64)
    update = (keys, np.ones(replay_bench.BATCH, dtype=np.float32))
    update_bytes = replay_bench.wire_bytes(*replay_bench.serialize(update)) / replay_bench.BATCH
    return {**buffer, **wire, "push_bytes": push_bytes, "update_bytes": update_bytes}


def measure_learner(network: str, batch: int, seconds: float) -> dict[str, float]:
    """``benchmarks.learner``'s synthetic figure on one torch thread, and its CPU cores."""
    import torch

    from apex_dqn.learner.learning import Learner

    torch.set_num_threads(1)
    dev = torch.device("cpu")
    cfg = Config(network=network, batch_size=batch, device="cpu")
    learner = Learner(cfg, num_actions=6, device=dev)
    fixed = synthetic.torch_batch(batch, dev, np.random.default_rng(0))
    for _ in range(3):
        learner.update(fixed)
    c0 = time.process_time()
    done, took = learner_bench.run_for(lambda: learner.update(fixed), seconds, dev)
    cores = (time.process_time() - c0) / took
    params = sum(p.numel() * 4 for p in learner.online.parameters())
    return {"updates_per_s": done / took, "cpu_cores": cores, "param_bytes": params}


def measure(args: argparse.Namespace) -> tuple[Costs, dict]:
    """Every per-core figure of :class:`Costs`, and the raw measurements behind them."""
    cfg = Config(network=args.network, envs_per_actor=args.envs)
    t0 = time.perf_counter()
    act = measure_actor(cfg, args.actor_seconds, args.rounds)
    print(f"actor: {act['steps_per_s']:,.0f} steps/s on {act['cpu_cores']:.2f} cores "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    rep = measure_replay(args.shard_capacity, args.reps, seed=0)
    print(f"replay: {rep['insert_cpu_per_s']:,.0f} inserts per CPU second, wire bytes "
          f"{ {w: round(b) for w, b in rep['wire_bytes_per_sampled_transition'].items()} } "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    lrn = measure_learner(args.network, args.learner_batch, args.learner_seconds)
    print(
        f"learner: {lrn['updates_per_s']:.1f} updates/s of {args.learner_batch} on "
        f"{lrn['cpu_cores']:.2f} cores ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    per = replay_bench.BATCH
    update_s = rep["update512_cpu_ms"] / 1e3 / per
    costs = Costs(
        actor_steps_per_core=act["steps_per_s"] / max(act["cpu_cores"], 1e-9),
        insert_s=1.0 / rep["insert_cpu_per_s"],
        sample_s={w: ms / 1e3 / per + update_s for w, ms in rep["wire_encode512_cpu_ms"].items()},
        decode_s={w: ms / 1e3 / per for w, ms in rep["wire_decode512_cpu_ms"].items()},
        learner_samples_per_core=lrn["updates_per_s"]
        * args.learner_batch
        / max(lrn["cpu_cores"], 1e-9),
        push_bytes=rep["push_bytes"],
        wire_bytes=dict(rep["wire_bytes_per_sampled_transition"]),
        update_bytes=rep["update_bytes"],
        param_bytes=int(lrn["param_bytes"]),
    )
    raw = {
        "actor_steps_per_s": act["steps_per_s"],
        "actor_cpu_cores": act["cpu_cores"],
        "learner_updates_per_s": lrn["updates_per_s"],
        "learner_cpu_cores": lrn["cpu_cores"],
    }
    return costs, raw


def load_costs(path: str) -> Costs:
    """The ``costs`` of a previous run's JSON line (the file's last line)."""
    from apex_dqn.common.cli import fail

    prog = "python -m apex_dqn.benchmarks.capacity"
    try:
        with open(path) as f:
            last = [line for line in f.read().splitlines() if line.strip()][-1]
        return Costs(**json.loads(last)["costs"])
    except OSError as exc:
        fail(prog, f"--costs {path}: cannot read it ({exc.strerror})")
    except (IndexError, KeyError, TypeError, ValueError):
        fail(prog, f"--costs {path}: its last line is not this tool's JSON line with 'costs'")


# ------------------------------------------------------------------------ comparing
def _bench(module: str, *args: str) -> dict:
    """Run another benchmark as a person does, and read its last line."""
    proc = subprocess.run([sys.executable, "-m", module, *args],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(costs: Costs, args: argparse.Namespace) -> dict[str, float]:
    """This machine as a cluster of one actor, one shard and a one-core learner: the
    predicted actor steps/s and learner updates/s beside what the benchmarks measure."""
    here = Cluster(
        actors=1, shards=1, learner_samples_per_s=costs.learner_samples_per_core,
        replay_capacity=args.shard_capacity, placement="learner", wire="raw",
        batch_size=args.learner_batch, envs_per_actor=args.envs, actors_per_node=1,
    )  # fmt: skip
    pred = predict(costs, here)
    # Cores the actor, the learner and the shard would want if they ran at once, as
    # train.py runs them here: above os.cpu_count() they would share cores.
    want = 1.0 + 1.0 + pred.shard_cores
    seconds, rounds = str(args.actor_seconds), str(args.rounds)
    act = _bench("apex_dqn.benchmarks.actor", "--envs", str(args.envs), "--network",
                 args.network, "--seconds", seconds, "--rounds", rounds)  # fmt: skip
    lrn = _bench("apex_dqn.benchmarks.learner", "--network", args.network, "--shards", "1",
                 "--batch-size", str(args.learner_batch), "--capacity",
                 str(args.shard_capacity), "--seconds", str(args.learner_seconds),
                 "--rounds", rounds)  # fmt: skip
    pred_actor = pred.insert_per_s
    pred_updates = pred.sample_per_s / args.learner_batch
    return {
        "predicted_actor_steps_per_s": pred_actor,
        "measured_actor_steps_per_s": act["actor_steps_per_s"],
        "actor_measured_over_predicted": act["actor_steps_per_s"] / pred_actor,
        "measured_actor_cpu_cores": act["actor_cpu_cores"],
        "predicted_learner_updates_per_s": pred_updates,
        "measured_learner_synthetic_updates_per_s": lrn["synthetic_updates_per_s"],
        "measured_learner_pipeline_updates_per_s": lrn["pipeline_updates_per_s"],
        "learner_pipeline_over_predicted": lrn["pipeline_updates_per_s"] / pred_updates,
        "cores_wanted_together": want,
    }


# ----------------------------------------------------------------------------- output
def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def table(costs: Costs, k: Cluster, p: Prediction) -> str:
    """The prediction as a readable table."""
    rows = [
        ("cluster", f"{k.actors} actors, {k.shards} shards, learner {k.learner_samples_per_s:,.0f}"
                    f" samples/s, {k.link_gbps:g} Gbit/s links, placement {k.placement}, "
                    f"wire {k.wire}"),
        ("per core here", f"actor {costs.actor_steps_per_core:,.0f} steps/s; shard insert "
                          f"{1 / costs.insert_s:,.0f}/s, sample {1 / costs.sample_s[k.wire]:,.0f}/s"
                          f" ({k.wire}); learner {costs.learner_samples_per_core:,.0f} samples/s"),
        ("insert rate I", f"{p.insert_per_s:,.0f} transitions/s of {p.produced_per_s:,.0f} "
                          f"produced (limited by {p.insert_limited_by})"),
        ("sample rate S", f"{p.sample_per_s:,.0f} samples/s (limited by {p.limited_by})"),
        ("replay ratio S/I", f"{p.replay_ratio:.2f} (target {k.target_replay_ratio:g})"),
        ("saturates first", f"{p.saturates_first} ({p.utilisation[p.saturates_first]:.2f})"),
        ("at or over 1", ", ".join(p.saturated) or "nothing"),
        ("shard load", f"{p.shard_cores:.2f} cores each of {k.shards}; "
                       f"{p.shards_needed} shards needed"),
        ("replay memory", f"{p.replay_memory_bytes / 2**30:,.1f} GiB for "
                          f"{k.replay_capacity:,} transitions"),
        ("learner decode", f"{p.learner_decode_cores:.2f} cores"),
    ]  # fmt: skip
    if k.cores > 0:
        rows.append(("core share", f"{p.core_share:.2f} of a core per actor and learner on "
                                   f"{k.cores:g} shared cores"))  # fmt: skip
    for node, flows in p.network.items():
        rows.append((node, f"in {_fmt_bytes(flows['in'])}/s, out {_fmt_bytes(flows['out'])}/s"))
    rows += [(f"utilisation {name}", f"{u:.2f}") for name, u in p.utilisation.items()]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        from apex_dqn.common.cli import fail

        fail(self.prog, message)


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what} must be a positive number, got {text!r}"
            ) from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{what} must be positive, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m apex_dqn.benchmarks.capacity",
                     description=__doc__.splitlines()[0])  # fmt: skip
    pint, pfloat = (lambda what: _positive(int, what)), (lambda what: _positive(float, what))
    d = Cluster()
    parser.add_argument("--actors", type=pint("--actors"), default=d.actors)
    parser.add_argument("--shards", type=pint("--shards"), default=d.shards)
    parser.add_argument("--learner-samples-per-s", type=pfloat("--learner-samples-per-s"),
                        default=d.learner_samples_per_s)  # fmt: skip
    parser.add_argument("--link-gbps", type=pfloat("--link-gbps"), default=d.link_gbps)
    parser.add_argument("--replay-capacity", type=pint("--replay-capacity"),
                        default=d.replay_capacity)  # fmt: skip
    parser.add_argument("--replay-placement", choices=PLACEMENTS, default=d.placement)
    parser.add_argument(
        "--wire",
        choices=("auto", *WIRE_FORMATS),
        default="auto",
        help="auto: what --replay-wire auto picks, raw on the learner's node, zstd across nodes",
    )
    parser.add_argument(
        "--target-replay-ratio",
        type=pfloat("--target-replay-ratio"),
        default=d.target_replay_ratio,
        help="sampled per inserted transition",
    )
    parser.add_argument("--actors-per-node", type=pint("--actors-per-node"),
                        default=d.actors_per_node)  # fmt: skip
    parser.add_argument(
        "--batch-size",
        type=pint("--batch-size"),
        default=d.batch_size,
        help="the cluster learner's batch (for the weight broadcasts)",
    )
    parser.add_argument(
        "--cores",
        type=float,
        default=d.cores,
        help="cores the whole program shares on one machine (0: a core per actor and learner)",
    )
    parser.add_argument("--network", default="nature", choices=("nature", "dqn2013"))
    parser.add_argument("--envs", type=pint("--envs"), default=d.envs_per_actor)
    parser.add_argument("--quick", action="store_true", help="a ~20 s run with rough figures")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run benchmarks.actor and .learner here, beside the predictions",
    )
    parser.add_argument(
        "--costs",
        metavar="FILE",
        help="take the per-core costs from a previous run's last line instead of measuring",
    )
    args = parser.parse_args(argv)
    if args.cores < 0:
        parser.error(f"argument --cores: must be 0 or more, got {args.cores:g}")
    # The learner reads from its own node under "learner", from other nodes under "spread".
    reader = "shard node" if args.replay_placement == "learner" else "learner node"
    args.wire = wire_for(args.wire, "shard node", reader)
    if args.costs and args.compare:
        parser.error("--compare measures on this machine; it cannot be used with --costs")
    if args.quick:
        args.actor_seconds, args.rounds, args.shard_capacity, args.reps = 1.0, 1, 2_000, 10
        args.learner_seconds, args.learner_batch = 1.5, 64
    else:
        args.actor_seconds, args.rounds, args.shard_capacity, args.reps = 10.0, 4, 20_000, 30
        args.learner_seconds, args.learner_batch = 8.0, 64
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.costs:
        costs, raw = load_costs(args.costs), {}
    else:
        costs, raw = measure(args)
    cluster = Cluster(
        actors=args.actors, shards=args.shards, learner_samples_per_s=args.learner_samples_per_s,
        link_gbps=args.link_gbps, replay_capacity=args.replay_capacity,
        placement=args.replay_placement, wire=args.wire,
        target_replay_ratio=args.target_replay_ratio, actors_per_node=args.actors_per_node,
        batch_size=args.batch_size, envs_per_actor=args.envs, cores=args.cores,
    )  # fmt: skip
    pred = predict(costs, cluster)
    print(table(costs, cluster, pred), flush=True)
    result: dict = {"costs": asdict(costs), "measured": raw, "cluster": asdict(cluster),
                    "prediction": asdict(pred)}  # fmt: skip
    if args.compare:
        result["single_machine"] = compare(costs, args)
        for name, value in result["single_machine"].items():
            print(f"{name:<42}  {value:,.2f}", flush=True)
    result.update(cpus=os.cpu_count(), load_avg_1m=os.getloadavg()[0], quick=args.quick)
    print(json.dumps(rounded(result)), flush=True)
    return result


def rounded(d: Any) -> Any:
    """``d`` with its floats rounded (4 decimals, 9 below 1e-3), for the JSON line."""
    if isinstance(d, dict):
        return {k: rounded(v) for k, v in d.items()}
    if isinstance(d, list):
        return [rounded(v) for v in d]
    if isinstance(d, float):
        return round(d, 9) if abs(d) < 1e-3 else round(d, 4)
    return d


if __name__ == "__main__":
    main()
