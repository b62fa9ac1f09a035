"""Learner updates/s: synthetic in-memory batches against batches from real replay shards.

    python -m apex_dqn.benchmarks.learner [--device auto] [--batch-size N] [--shards 2]
                                          [--seconds 20]
    python -m apex_dqn.benchmarks.learner --device cuda --batch-size 512 --local   # GPU box, no Ray

``synthetic``: the train step (:meth:`Learner.update`) on one batch already on the
device, repeated: the ceiling. ``pipeline``: the same learner fed by the real input
pipeline (:class:`learner.loop.TrainLoop`: sample requests in flight, a prefetch thread,
pinned non-blocking copies on CUDA, priorities sent back) from replay shards filled
with synthetic chunks: Ray shard processes by default, in-process shards with
``--local`` (for machines without Ray). ``float32`` and ``bf16``: the synthetic step of
two learners with the same weights, one in float32 and one with its torso in bf16
(``--amp on``: head, targets and loss in float32), so ``bf16_vs_fp32_updates_ratio`` is
what ``--amp`` buys on this machine; ``bf16_native`` says whether it has bf16 units (a
CUDA GPU with them, or a CPU with ``cpu_bf16_flags``): elsewhere bf16 is emulated and
the ratio is below 1. ``synthetic`` and ``pipeline`` use the learner ``--amp`` (auto
by default) picks. Same process, same threads, one run, in alternating rounds; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from apex_dqn.benchmarks import synthetic
from apex_dqn.common.config import Config
from apex_dqn.learner.learning import Learner, choose_amp, native_bf16_flags
from apex_dqn.learner.loop import TrainLoop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_for(step, seconds: float, device: torch.device) -> tuple[int, float]:
    """(updates, seconds) of ``step`` called for about ``seconds``."""
    _sync(device)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        if step() is not None:
            done += 1
    _sync(device)
    return done, time.perf_counter() - t0


def _interleaved(steps: dict, seconds: float, rounds: int, device) -> dict[str, float]:
    """Updates/s of each step function, measured in alternating short rounds so that a
    change in the machine's load falls on both alike."""
    for step in steps.values():
        for _ in range(3):
            step()  # warm up: allocations, first batches in flight
    totals = {name: [0, 0.0] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            done, took = run_for(step, seconds / rounds, device)
            totals[name][0] += done
            totals[name][1] += took
    return {name: done / took for name, (done, took) in totals.items()}


def _shards(args, cfg: Config):
    """Filled shards and a sampler over them (Ray processes, or in-process)."""
    per_shard = args.capacity // args.shards
    if args.local:
        from apex_dqn.learner.pipeline import LocalSampler
        from apex_dqn.replay.shard import ReplayShard

        shards = [ReplayShard(per_shard, seed=i) for i in range(args.shards)]
        for i, shard in enumerate(shards):
            synthetic.fill(shard.add, int(per_shard * 0.9), stream_base=i * 100)
        return LocalSampler(shards, cfg.batch_size, seed=0), None

    import ray

    from apex_dqn.learner.pipeline import RaySampler
    from apex_dqn.replay.worker import ReplayShardWorker

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    shards = [ReplayShardWorker.options(num_cpus=0).remote(per_shard, seed=i)
              for i in range(args.shards)]  # fmt: skip
    refs = []
    for i, shard in enumerate(shards):
        synthetic.fill(lambda c, s=shard: refs.append(s.add.remote(c)), int(per_shard * 0.9),
                       stream_base=i * 100)  # fmt: skip
    ray.get(refs)
    return RaySampler(shards, cfg.batch_size, cfg.prefetch_batches, seed=0), ray


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = [line for line in info if line.startswith("model name")]
    except OSError:
        return ""
    return lines[0].split(":", 1)[1].strip() if lines else ""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--network", default="nature", choices=("nature", "dqn2013"))
    parser.add_argument("--no-dueling", action="store_true")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 512 on CUDA, 64 on CPU")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=60_000, help="over all shards")
    parser.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch threads (0: 1 on CPU, as a learner given one CPU by Ray; default on GPU)",
    )  # fmt: skip
    parser.add_argument("--local", action="store_true", help="in-process shards, no Ray")
    parser.add_argument(
        "--amp", default="auto", choices=("auto", "on", "off"),
        help="bf16 torso for the synthetic and pipeline runs (auto: where bf16 is native)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch_size or (512 if device == "cuda" else 64)
    if args.threads or device == "cpu":
        torch.set_num_threads(args.threads or 1)
    choice = choose_amp(args.amp, device)
    cfg = Config(
        network=args.network, dueling=not args.no_dueling, batch_size=batch, device=device,
        amp="on" if choice.enabled else "off", compile=args.compile,
    )  # fmt: skip
    dev = torch.device(device)
    learners = {"float32": Learner(cfg.replace(amp="off"), num_actions=6, device=dev)}
    learners["bf16"] = Learner(cfg.replace(amp="on"), num_actions=6, device=dev)
    learners["bf16"].load_state_dict(learners["float32"].state_dict())  # the same weights
    chosen = "bf16" if choice.enabled else "float32"
    learner = learners[chosen]
    fixed = synthetic.torch_batch(batch, dev, np.random.default_rng(0))
    sampler, ray = _shards(args, cfg)
    loop = TrainLoop(learner, sampler)
    try:
        steps = {name: (lambda one=one: one.update(fixed)) for name, one in learners.items()}
        rates = _interleaved({**steps, "pipeline": loop.step}, args.seconds, args.rounds, dev)
        synthetic_ups, pipeline_ups = rates[chosen], rates["pipeline"]
        waiting = loop.waiting_s
    finally:
        loop.close()
        if ray is not None:
            ray.shutdown()
    result = {
        "device": torch.cuda.get_device_name(dev) if device == "cuda" else "cpu",
        "network": args.network + ("" if args.no_dueling else "+dueling"),
        "batch_size": batch,
        "cpu": cpu_model(),
        "amp": args.amp,
        "amp_on": choice.enabled,
        "amp_reason": choice.reason,
        "compile": args.compile,
        "torch_threads": torch.get_num_threads(),
        "synthetic_updates_per_s": round(synthetic_ups, 2),
        "fp32_updates_per_s": round(rates["float32"], 2),
        "bf16_updates_per_s": round(rates["bf16"], 2),
        "bf16_vs_fp32_updates_ratio": round(rates["bf16"] / rates["float32"], 3),
        "bf16_native": choose_amp("auto", device).enabled,
        "cpu_bf16_flags": native_bf16_flags(),
        "pipeline_updates_per_s": round(pipeline_ups, 2),
        "ratio": round(pipeline_ups / synthetic_ups, 3),
        "pipeline_samples_per_s": round(pipeline_ups * batch, 1),
        "pipeline_wait_s": round(waiting, 3),
        "shards": args.shards,
        "replay": "local" if args.local else "ray",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
