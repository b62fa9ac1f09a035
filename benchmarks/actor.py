"""Actor throughput against the raw emulator, side by side in one run.

    python -m benchmarks.actor [--envs 8] [--threads 1] [--lanes 2] [--seconds 20]

``raw``: ale-py's vector env with the same envs, threads and preprocessing, random
actions, nothing else. ``actor``: the real :class:`actors.actor.Actor` (forward pass
of the configured network, epsilon-greedy, n-step building, first priorities, episode
bookkeeping) pushing its chunks through the real bounded pusher to a replay shard in
another Ray process. Both count agent steps per wall-clock second; ``cpu_cores`` is
process CPU time over wall time, so the per-core figures are honest when the actor's
inference thread overlaps the emulator thread. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def _raw(cfg, envs: int, threads: int, seconds: float) -> dict[str, float]:
    from common.envs import make_vector_env

    env = make_vector_env(cfg, envs, threads)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = env.single_action_space.n
    steps, c0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(rng.integers(0, actions, envs))
        steps += envs
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    env.close()
    return {"steps_per_s": steps / wall, "cpu_cores": cpu / wall}


def _actor(cfg, seconds: float) -> dict[str, float]:
    import ray

    from actors.actor import Actor
    from actors.worker import BoundedPusher
    from common.envs import make_vector_env, num_actions
    from common.networks import build_network, inference_dtype
    from common.schedules import actor_epsilons
    from replay.worker import ReplayShardWorker

    shard = ReplayShardWorker.options(num_cpus=0).remote(200_000, cfg.priority_alpha)
    ray.get(shard.stats.remote())
    env = make_vector_env(cfg, cfg.envs_per_actor, cfg.actor_threads, cfg.actor_lanes)
    net = build_network(num_actions(cfg.game), cfg.network, cfg.dueling)
    net = net.to(inference_dtype(cfg.actor_precision))
    eps = actor_epsilons(0, 1, cfg.envs_per_actor, "env")
    pusher = BoundedPusher(shard, cfg.max_pushes_in_flight)
    actor = Actor(cfg, 0, env, net, eps, pusher, lambda: None, stream=1, seed=0)
    actor.run(cfg.push_period)  # warm up, first pushes
    for key in vars(actor.times):
        setattr(actor.times, key, 0.0)
    steps0, c0, t0 = actor.env_steps, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        actor.run(10)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = actor.env_steps - steps0
    ray.get(list(pusher.in_flight))
    stored = ray.get(shard.stats.remote())["added"]
    per_step = {f"ms_per_step_{k}": 1e3 * v / (steps / cfg.envs_per_actor)
                for k, v in vars(actor.times).items()}  # fmt: skip
    return {"steps_per_s": steps / wall, "cpu_cores": cpu / wall, "stored": stored, **per_step}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="emulator and torch threads")
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--network", default="nature")
    parser.add_argument("--no-dueling", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)

    import ray

    from common.config import Config
    from common.networks import inference_dtype

    torch.set_num_threads(args.threads)
    cfg = Config(
        envs_per_actor=args.envs, actor_threads=args.threads, actor_lanes=args.lanes,
        network=args.network, dueling=not args.no_dueling, actor_precision=args.precision,
    )  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        raw = _raw(cfg, args.envs, args.threads, args.seconds)
        actor = _actor(cfg, args.seconds)
    finally:
        ray.shutdown()
    result = {
        "raw_steps_per_s": round(raw["steps_per_s"], 1),
        "actor_steps_per_s": round(actor["steps_per_s"], 1),
        "ratio": round(actor["steps_per_s"] / raw["steps_per_s"], 3),
        "raw_cpu_cores": round(raw["cpu_cores"], 2),
        "actor_cpu_cores": round(actor["cpu_cores"], 2),
        "ratio_per_core": round(
            (actor["steps_per_s"] / actor["cpu_cores"]) / (raw["steps_per_s"] / raw["cpu_cores"]), 3
        ),
        "envs": args.envs,
        "threads": args.threads,
        "lanes": args.lanes,
        "precision": str(inference_dtype(args.precision)).removeprefix("torch."),
        "network": args.network + ("" if args.no_dueling else "+dueling"),
        "transitions_stored": actor["stored"],
        **{k: round(v, 3) for k, v in actor.items() if k.startswith("ms_per_step")},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
