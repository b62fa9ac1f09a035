"""Synthetic data for the benchmarks: chunks as actors push them, batches as the learner
trains on them.

Chunks are built by the real n-step accumulator from random frames: frames are drawn
from a small pool of random 84x84 images (their content does not matter for speed or
memory), episodes end at random with mean length ``episode_steps``, and priorities are
random: what a shard receives from actors. :func:`torch_batch` is one training batch of
random stacks, already on the learner's device: what ``Learner.update`` costs without
any input pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import TransitionChunk

if TYPE_CHECKING:
    import torch

    from apex_dqn.learner.learning import TorchBatch


def chunks(
    envs: int = 8,
    push_period: int = 50,
    episode_steps: int = 500,
    n: int = 3,
    stream: int = 0,
    seed: int = 0,
) -> Iterator[TransitionChunk]:
    """An endless stream of chunks from one actor with ``envs`` environments."""
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, (256, STACK, *FRAME_SHAPE), dtype=np.uint8)
    acc = NStepAccumulator(envs, n, 0.99, stream, terminal_on_life_loss=False)
    acc.start(pool[rng.integers(0, len(pool), envs)])
    while True:
        for _ in range(push_period):
            acc.bootstrap(rng.standard_normal(envs).astype(np.float32))
            actions = rng.integers(0, 6, envs)
            acc.record(actions, rng.standard_normal(envs).astype(np.float32))
            ended = rng.random(envs) < 1.0 / episode_steps
            obs = pool[rng.integers(0, len(pool), envs)]
            rewards = rng.integers(0, 2, envs).astype(np.float64)
            acc.observe(obs, rewards, ended, np.zeros(envs, bool), np.zeros(envs, bool))
        yield acc.flush()


def fill(add, transitions: int, streams: int = 4, stream_base: int = 0, **kwargs) -> int:
    """Call ``add(chunk)`` round-robin over ``streams`` actors until ``transitions`` were made."""
    ids = range(stream_base, stream_base + streams)
    sources = [chunks(stream=s, seed=s, **kwargs) for s in ids]
    made = 0
    while made < transitions:
        for source in sources:
            chunk = next(source)
            add(chunk)
            made += len(chunk)
    return made


def torch_batch(batch: int, device: torch.device, rng: np.random.Generator) -> TorchBatch:
    """A training batch of ``batch`` random stacks on ``device``: each next stack is
    another row's stack, actions of 6, random returns and importance weights."""
    import torch

    from apex_dqn.learner.learning import TorchBatch

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device)

    obs = rng.integers(0, 256, (batch, STACK, *FRAME_SHAPE), dtype=np.uint8)
    return TorchBatch(
        obs=t(obs),
        actions=t(rng.integers(0, 6, batch)),
        returns=t(rng.standard_normal(batch).astype(np.float32)),
        discounts=t(np.full(batch, 0.99**3, dtype=np.float32)),
        next_obs=t(np.roll(obs, 1, axis=0)),
        weights=t(rng.random(batch).astype(np.float32)),
    )
