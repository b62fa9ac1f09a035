"""Serial mode: the same components as a distributed run, in one process, without Ray.

For tests and debugging (Sample Factory's serial mode): one actor, one replay shard and
the learner, stepped in turn, so a failure shows a plain traceback and a test needs no
cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from apex_dqn.actors.actor import Actor
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.common.config import Config
from apex_dqn.common.envs import VectorEnv
from apex_dqn.common.messages import TransitionChunk
from apex_dqn.common.networks import state_dict_to_numpy
from apex_dqn.common.schedules import actor_epsilons
from apex_dqn.learner.learning import Learner
from apex_dqn.learner.pipeline import LocalSampler, to_torch
from apex_dqn.replay.rate_limiter import SampleToInsertRatio
from apex_dqn.replay.shard import ReplayShard


def run_serial(cfg: Config, envs: Sequence[VectorEnv], num_actions: int, steps: int,
               updates_per_step: int = 1, seed: int = 0) -> tuple[Any, Any]:  # fmt: skip
    """The same components in one process, no Ray: for tests and debugging.

    One actor steps ``envs`` (its lanes), one replay shard stores its chunks, the learner
    trains ``updates_per_step`` batches after each actor step once ``replay_min_size``
    transitions are in, and the actor takes the learner's weights every
    ``weight_sync_period`` steps. Returns the learner and the actor.

    With ``--samples-per-insert`` the replay ratio holds both sides, ``updates_per_step``
    playing the learner's speed: an update the ratio does not allow is skipped (the
    learner waits for the actor; :class:`LocalSampler` returns None), and a push it does
    not allow waits while the learner trains (the actor waits for the learner), as in a
    distributed run. The band leaves room for a push whenever the learner may not
    sample, so that wait always ends.
    """
    torch.manual_seed(seed)
    shard = ReplayShard(cfg.replay_capacity, cfg.priority_alpha, seed=seed)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    learner = Learner(cfg, num_actions, device)
    sampler = LocalSampler([shard], cfg.batch_size, seed=seed,
                           ratio=SampleToInsertRatio.from_config(cfg))  # fmt: skip

    def train() -> bool:
        drawn = sampler.draw(learner.beta)
        if drawn is None:
            return False
        priorities, _ = learner.update(to_torch(drawn, learner.device))
        sampler.update_priorities(drawn.shard, drawn.batch.keys, priorities.numpy())
        return True

    def push(chunk: TransitionChunk) -> None:
        while not sampler.may_insert(len(chunk)):
            if not train():
                raise RuntimeError(  # the band's width (validate) rules this out
                    f"replay ratio: a push of {len(chunk)} and a batch both wait"
                )
        shard.add(chunk)

    epsilons = actor_epsilons(0, 1, sum(env.num_envs for env in envs), cfg.epsilon_spread)
    policy = InferenceNet(num_actions, cfg.network, cfg.dueling, cfg.actor_precision)
    actor = Actor(
        cfg, 0, envs, policy, epsilons, push,
        lambda: (learner.updates, state_dict_to_numpy(learner.online)),
        stream=0, seed=seed,
    )  # fmt: skip
    actor.sync_weights()
    for _ in range(steps):
        actor.run(1)
        if len(shard) < cfg.replay_min_size:
            continue
        for _ in range(updates_per_step):
            if not train():  # the ratio holds the learner back until the actor pushes
                break
    return learner, actor
