"""The Ray actor hosting one :class:`ReplayShard`: the shard's methods, called remotely.

A shard is single-threaded on purpose: Ray runs its calls one at a time, in order per
caller, so a stream's chunks arrive in the order its actor sent them and no lock is
needed. It asks for no CPU (it mostly holds memory and answers quickly); the driver
reserves for it the memory a full shard takes (``shard_memory_bytes``), so the scheduler
never stacks more shards on a node than it can hold.

It restarts on failure, empty: actors' first chunks after that lose their first few
transitions (counted in ``dropped``), and everything it held is gone. Its ``stats()``
carry an ``incarnation`` number, new in every process, so the driver can tell a restart
(and count what was lost) from a shard that merely evicted, and its keys start at an
offset drawn from it, so keys of two incarnations never meet; ``samples`` counts the
batches it served, so a restarted shard being sampled again is visible.
"""

from __future__ import annotations

import os

import ray
from apex_dqn.common.config import BYTES_PER_TRANSITION
from apex_dqn.common.messages import SampledBatch
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

    def stats(self) -> dict[str, float]:
        return {
            **super().stats(),
            "incarnation": self.incarnation,
            "first_key": self.first_key,  # the key of this incarnation's first item
            "samples": self.samples,
        }

    def where(self) -> dict[str, int | str]:
        """This shard's process and node, for logs and for finding it on a machine."""
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }


ReplayShardWorker = ray.remote(HostedShard)
