"""The Ray actor hosting one :class:`ReplayShard`: the shard's methods, called remotely.

A shard is single-threaded on purpose: Ray runs its calls one at a time, in order per
caller, so a stream's chunks arrive in the order its actor sent them and no lock is
needed. It asks for no CPU by default (it mostly holds memory and answers quickly),
and restarts on failure empty; actors' first chunks after that lose their first few
transitions (counted in ``dropped``), nothing else.
"""

from __future__ import annotations

import ray

from replay.shard import ReplayShard

ReplayShardWorker = ray.remote(ReplayShard)
