"""Actor throughput against the raw emulator, side by side in one run.

    python -m apex_dqn.benchmarks.actor [--envs 16] [--threads 1] [--lanes 1] [--seconds 20]

``raw``: ale-py's vector env with the same envs, threads and preprocessing, random
actions, nothing else. ``actor``: the real :class:`actors.actor.Actor` (forward pass
of the configured network, epsilon-greedy, n-step building, first priorities, episode
bookkeeping) pushing its chunks through the real bounded pusher to a replay shard in
another Ray process, and loading new weights at every weight check (every
``weight_sync_period`` actor steps, as if the learner always had newer ones). The two
run in alternating rounds in one process, so a change in the machine's load hits both
alike. Both count agent steps per wall-clock second; ``cpu_cores`` is process CPU time
over wall time, so the per-core figures are honest when the actor's inference thread
overlaps the emulator thread. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch


class _Clock:
    """Agent steps, wall seconds and process CPU seconds summed over rounds."""

    def __init__(self):
        self.steps, self.wall, self.cpu = 0, 0.0, 0.0

    def round(self, step, steps_per_call: int, seconds: float) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step()
            self.steps += steps_per_call
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0

    def rates(self) -> dict[str, float]:
        return {"steps_per_s": self.steps / self.wall, "cpu_cores": self.cpu / self.wall}


def measure(cfg, seconds: float, rounds: int) -> tuple[dict, dict]:
    """Raw env and actor in alternating rounds, so load changes hit both alike."""
    import ray

    from apex_dqn.actors.actor import Actor
    from apex_dqn.actors.inference import InferenceNet
    from apex_dqn.actors.worker import BoundedPusher
    from apex_dqn.common.envs import make_lane_envs, make_vector_env, num_actions
    from apex_dqn.common.networks import build_network, state_dict_to_numpy
    from apex_dqn.common.schedules import actor_epsilons
    from apex_dqn.replay.worker import ReplayShardWorker

    k = cfg.envs_per_actor
    raw_env = make_vector_env(cfg, k, cfg.actor_threads)
    raw_env.reset(seed=0)
    rng = np.random.default_rng(0)
    n_actions = raw_env.single_action_space.n

    shard = ReplayShardWorker.options(num_cpus=0).remote(200_000, cfg.priority_alpha)
    ray.get(shard.stats.remote())
    envs = make_lane_envs(cfg)
    policy = InferenceNet(num_actions(cfg.game), cfg.network, cfg.dueling, cfg.actor_precision)
    states = [state_dict_to_numpy(build_network(policy.num_actions, cfg.network, cfg.dueling))
              for _ in range(2)]  # fmt: skip
    versions = itertools.count(1)

    def newer_weights() -> tuple[int, dict]:
        """Every check finds newer weights: the worst case, a learner publishing faster."""
        version = next(versions)
        return version, states[version % 2]

    eps = actor_epsilons(0, 1, k, "env")
    pusher = BoundedPusher(shard, cfg.max_pushes_in_flight)
    actor = Actor(cfg, 0, envs, policy, eps, pusher, newer_weights, stream=1, seed=0)
    actor.run(cfg.push_period)  # warm up, first pushes
    for key in vars(actor.times):
        setattr(actor.times, key, 0.0)
    raw, act = _Clock(), _Clock()
    for _ in range(rounds):  # one actor step is k agent steps (reset steps too), as in raw
        raw.round(lambda: raw_env.step(rng.integers(0, n_actions, k)), k, seconds / rounds)
        act.round(lambda: actor.run(1), k, seconds / rounds)
    raw_env.close()
    steps = act.steps
    pusher.flush()
    stored = ray.get(shard.stats.remote()).added
    per_step = {f"ms_per_step_{key}": 1e3 * v / (steps / k) for key, v in vars(actor.times).items()}
    return raw.rates(), {**act.rates(), "stored": stored, **per_step}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="emulator and torch threads")
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--network", default="nature")
    parser.add_argument("--no-dueling", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--seconds", type=float, default=20.0, help="for each of raw and actor")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    args = parser.parse_args(argv)

    import ray

    from apex_dqn.actors.inference import inference_dtype
    from apex_dqn.common.config import Config

    torch.set_num_threads(args.threads)
    cfg = Config(
        envs_per_actor=args.envs, actor_threads=args.threads, actor_lanes=args.lanes,
        network=args.network, dueling=not args.no_dueling, actor_precision=args.precision,
    )  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        raw, actor = measure(cfg, args.seconds, args.rounds)
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
