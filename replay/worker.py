"""The Ray actor hosting one :class:`ReplayShard`: the shard's methods, called remotely.

A shard is single-threaded on purpose: Ray runs its calls one at a time, in order per
caller, so a stream's chunks arrive in the order its actor sent them and no lock is
needed. It asks for no CPU (it mostly holds memory and answers quickly); the driver
reserves for it the memory a full shard takes (``shard_memory_bytes``, :func:`start_shard`),
so the scheduler never stacks more shards on a node than it can hold.

It restarts on failure, empty: actors' first chunks after that lose their first few
transitions (counted in ``dropped``), and everything it held is gone. Its ``stats()``
carry an ``incarnation`` number, new in every process, so the driver can tell a restart
(and count what was lost) from a shard that merely evicted, and its keys start at an
offset drawn from it, so keys of two incarnations never meet; ``samples`` counts the
batches it served, so a restarted shard being sampled again is visible.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ray

from apex_dqn.common.config import BYTES_PER_TRANSITION
from apex_dqn.common.messages import Placement, SampledBatch, ShardStats
from apex_dqn.replay.shard import ReplayShard


def shard_memory_bytes(capacity: int) -> int:
    """Memory a full shard of ``capacity`` transitions takes, process overhead included."""
    return capacity * BYTES_PER_TRANSITION + (256 << 20)


class HostedShard(ReplayShard):
    """A :class:`ReplayShard` that also says which process holds it and what it served."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.incarnation = int.from_bytes(os.urandom(6), "little")
        self.samples = 0
        # Keys of each incarnation start at a random multiple of 2**40 (room for 2**40
        # transitions), so a late priority update for an item the previous incarnation
        # held names no item of this one and is dropped like any evicted key.
        self.first_key = self.oldest_key = self.next_key = (self.incarnation % (1 << 22)) << 40

    def sample(self, batch_size: int, beta: float) -> SampledBatch:
        batch = super().sample(batch_size, beta)
        self.samples += 1
        return batch

    def stats(self) -> ShardStats:
        return dataclasses.replace(super().stats(), incarnation=self.incarnation,
                                   first_key=self.first_key, samples=self.samples)  # fmt: skip

    def where(self) -> Placement:
        return Placement.here()


ReplayShardWorker = ray.remote(HostedShard)


def start_shard(index: int, capacity: int, alpha: float, seed: int, memory: int) -> Any:
    """Replay shard ``index`` as a Ray actor named ``shard-<index>``.

    No CPU (it answers short calls), but ``memory`` bytes reserved (what a full shard
    takes, :func:`reserved_memory`), so no node is given more shards than it can hold;
    SPREAD over nodes;
    restarted by Ray, empty (the driver counts what was lost). One call at a time.
    """
    return (
        ReplayShardWorker.options(
            name=f"shard-{index}",
            num_cpus=0,
            memory=memory,
            max_restarts=-1,
            scheduling_strategy="SPREAD",
        )
        .remote(capacity, alpha, seed=seed)
    )


def reserved_memory(capacity: int) -> int:
    """The memory a shard reserves: what a full one takes, or 0 if no node offers that
    much (a reservation nothing can meet would leave the shards waiting forever)."""
    need = shard_memory_bytes(capacity)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
    if need <= largest:
        return need
    print(
        f"note: a full replay shard takes {need / 2**30:.1f} GiB and no node offers Ray that "
        f"much ({largest / 2**30:.1f} GiB at most): shards reserve none, so Ray may put "
        "more on a node than it can hold (more --replay-shards make them smaller)",
        flush=True,
    )
    return 0
