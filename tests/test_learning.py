"""A CI-sized learning check: the whole pipeline must learn a game that a working
learner masters in a few hundred updates. It catches a broken learner (wrong targets,
wrong action indexing, stacks rebuilt wrong, priorities or weights never flowing back)
without asserting on noisy Atari scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_dqn.common.config import Config
from apex_dqn.driver.serial import run_serial
from tests.fakes import ToyAtariVectorEnv


def greedy_accuracy(net: torch.nn.Module, samples: int = 256) -> float:
    env = ToyAtariVectorEnv(samples, seed=123)
    obs, _ = env.reset()
    with torch.no_grad():
        actions = net(torch.from_numpy(obs)).argmax(dim=1).numpy()
    return float(np.mean(actions == env.side))


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")  # small batches: one thread is faster
def test_pipeline_learns_the_toy_game():
    cfg = Config(
        network="dqn2013", dueling=True, n_step=3, gamma=0.9, batch_size=32, lr=1e-3,
        replay_capacity=10_000, replay_min_size=500, target_update_period=100,
        push_period=10, weight_sync_period=10, envs_per_actor=4, actor_lanes=2,
        epsilon_spread="env", priority_alpha=0.6,
    )  # fmt: skip
    envs = [ToyAtariVectorEnv(2, max_steps=20, seed=lane) for lane in range(2)]  # 2 lanes
    learner, actor = run_serial(cfg, envs, num_actions=4, steps=300, updates_per_step=2)
    assert learner.updates > 250
    assert actor.weights_version > 0  # the actor played with the learner's weights
    assert greedy_accuracy(learner.online) >= 0.95
    # The greedy actor (the env with the smallest epsilon) now scores near the maximum.
    best = [ep for ep in actor.drain_episodes() if ep.epsilon == actor.epsilons.min()]
    assert best and np.mean([ep.score for ep in best[-3:]]) >= 15  # of 20
