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

With ``--samples-per-insert`` actors push with ``offer`` instead of ``add``: a push the
replay ratio does not allow yet is answered None at once and kept by its actor, never
dropped, and never left waiting in the shard, whose one thread must go on serving the
learner's samples. The learner says how many transitions the shard may take with
``pace`` (``replay/rate_limiter.py``).

Where shards run (:func:`plan_placement`, ``--replay-placement``): on the learner's node,
where a batch goes from the shard to the learner through shared memory, or spread over
the nodes, where each batch crosses the network. What a batch looks like on its way
(``--replay-wire``, :func:`wire_for`) follows from that: stacked (``raw``) for a learner
on the shard's node, compressed distinct frames (``zstd``, ~75x smaller) across nodes.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from apex_dqn.common.config import BYTES_PER_TRANSITION
from apex_dqn.common.messages import (
    CompactBatch,
    Placement,
    SampledBatch,
    ShardStats,
    TransitionChunk,
)
from apex_dqn.replay.persist import ReplayStateError
from apex_dqn.replay.rate_limiter import InsertGate
from apex_dqn.replay.shard import ReplayShard


def shard_memory_bytes(capacity: int) -> int:
    """Memory a full shard of ``capacity`` transitions takes, process overhead included."""
    return capacity * BYTES_PER_TRANSITION + (256 << 20)


def wire_for(setting: str, shard_node: str | None, reader_node: str | None) -> str:
    """The wire format of a batch from a shard on ``shard_node`` to a reader on
    ``reader_node``, for the ``--replay-wire`` ``setting``.

    ``auto``: ``raw`` when the two are on one node (the batch goes through that node's
    shared memory, so shrinking it saves nothing and its decoding would cost the learner
    a gather), ``zstd`` across nodes (~740 B per transition instead of 56,485 B on Atari
    screens, for ~10 ms of compression on the shard and ~7 ms of decoding). ``frames``
    saves only an eighth of a stacked batch, so ``auto`` never picks it. A reader that
    does not say where it is gets ``raw``.
    """
    if setting != "auto":
        return setting
    return "raw" if reader_node is None or reader_node == shard_node else "zstd"


class HostedShard(ReplayShard):
    """A :class:`ReplayShard` that also says which process holds it and what it served.

    ``wire`` is the run's ``--replay-wire``, resolved per call for the caller's node
    (:func:`wire_for`), so a shard that Ray restarted on another node answers in the
    format its new place calls for.
    """

    def __init__(self, *args, wire: str = "raw", restore: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.wire = wire
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.node = context.get_node_id() if context is not None else None
        self.incarnation = int.from_bytes(os.urandom(6), "little")
        self.samples = 0
        self.gate = InsertGate()  # the replay ratio's hold on pushes (offer, pace)
        # Keys of each incarnation start at a random multiple of 2**40 (room for 2**40
        # transitions), so a late priority update for an item the previous incarnation
        # held names no item of this one and is dropped like any evicted key.
        self.first_key = self.oldest_key = self.next_key = (self.incarnation % (1 << 22)) << 40
        self._restored: tuple[int, str | None] = (0, None)
        in_actor = context is not None and context.get_actor_id() is not None
        if restore and in_actor and context.was_current_actor_reconstructed:
            self._restored = (0, "Ray restarted it, and a restarted shard starts empty")
        elif restore:
            try:
                self.load_state(restore)
                self._restored = (len(self), None)
            except ReplayStateError as exc:
                self._restored = (0, str(exc))

    def _extra_state(self) -> dict[str, int]:
        """The key of the first item of the incarnation that saved: a restored shard
        continues its keys (its first item's key is its ``first_key``)."""
        return {"first_key": self.first_key}

    def _load_extra_state(self, extra: dict[str, int]) -> None:
        first_key = extra.get("first_key")
        if not isinstance(first_key, int) or first_key < 0:
            raise ReplayStateError(f"a saved shard's first key {first_key!r} is invalid")
        self.first_key = first_key

    def save_replay(self, path: str) -> tuple[int, int, float]:
        """Write the shard's contents to ``path`` (atomically, :meth:`save_state`);
        returns (transitions saved, bytes written, seconds taken)."""
        start = time.perf_counter()
        size = self.save_state(path)
        return len(self), size, time.perf_counter() - start

    def restored(self) -> tuple[int, str | None]:
        """What the shard got back from its ``restore`` file: (transitions, None), or
        (0, the one-line reason it starts empty: the file is bad, or Ray restarted the
        shard); (0, None) when it was given none."""
        return self._restored

    def sample(
        self, batch_size: int, beta: float, wire: str | None = None, reader: str | None = None
    ) -> SampledBatch | CompactBatch:
        """A batch in ``wire`` format (None: the shard's own), ``auto`` resolved for a
        reader on node ``reader``, the caller's Ray node id (:func:`wire_for`)."""
        batch = super().sample(batch_size, beta, wire_for(wire or self.wire, self.node, reader))
        self.samples += 1
        return batch

    def offer(self, chunk: TransitionChunk) -> int | None:
        """:meth:`add` the chunk if the replay ratio lets it in now (:class:`InsertGate`),
        and return how many transitions were stored; else None, "not yet": the actor
        keeps the chunk and offers it again. Answers at once either way, so a waiting
        push never holds up the calls queued behind it."""
        if not self.gate.admit(
            chunk.stream, chunk.first_frame, len(chunk.frames), len(chunk), self.added
        ):
            return None
        return self.add(chunk)

    def pace(self, seen: tuple[int, int] | None, headroom: int | None) -> tuple[int, int, int]:
        """The learner's word on the replay ratio: this shard may take ``headroom`` more
        transitions than the ``added`` count it last heard from this shard, ``seen`` =
        (incarnation, added); None lifts the limit. Returns (incarnation, added, pushes
        refused so far), the counts the learner's limiter runs on.

        A ``seen`` of another incarnation (the shard restarted since) counts from 0:
        the learner has heard of none of this incarnation's transitions.
        """
        if headroom is None:
            self.gate.set_limit(None)
        else:
            heard = seen[1] if seen is not None and seen[0] == self.incarnation else 0
            self.gate.set_limit(heard + headroom)
        return self.incarnation, self.added, self.gate.refused

    def stats(self) -> ShardStats:
        return dataclasses.replace(super().stats(), incarnation=self.incarnation,
                                   first_key=self.first_key, samples=self.samples)  # fmt: skip

    def where(self) -> Placement:
        return Placement.here()


ReplayShardWorker = ray.remote(HostedShard)


def start_shard(
    index: int, capacity: int, alpha: float, seed: int, memory: int,
    placement: ReplayPlacement | None = None, wire: str = "raw", restore: str | None = None,
) -> Any:  # fmt: skip
    """Replay shard ``index`` as a Ray actor named ``shard-<index>``.

    No CPU (it answers short calls), but ``memory`` bytes reserved (what a full shard
    takes, :func:`reserved_memory`), so no node is given more shards than it can hold;
    on the learner's node or SPREAD over nodes, as ``placement`` says (None: SPREAD);
    restarted by Ray, empty (the driver counts what was lost). One call at a time.
    ``wire`` is the run's ``--replay-wire`` (:func:`wire_for`). ``restore``: a saved
    shard file it loads before answering (:class:`HostedShard`), not after a restart.
    """
    strategy: Any = "SPREAD"
    if placement is not None and placement.on_learner_node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(
            node_id=placement.learner_node, soft=not placement.strict
        )
    return ReplayShardWorker.options(
        name=f"shard-{index}",
        num_cpus=0,
        memory=memory,
        max_restarts=-1,
        scheduling_strategy=strategy,
    ).remote(capacity, alpha, seed=seed, wire=wire, restore=restore)


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


# ------------------------------------------------------------------------ placement
@dataclass(frozen=True)
class ReplayPlacement:
    """Where the learner and the shards go (:func:`choose_placement`)."""

    learner_node: str | None  # Ray node id the learner is pinned to (softly); None: any
    on_learner_node: bool  # every shard pinned to the learner's node; else SPREAD
    strict: bool  # the pin is hard: that node's memory holds every shard
    message: str  # one line for the console, the choice and why


def choose_placement(
    setting: str, node: str | None, node_memory: float, shards: int, shard_bytes: int
) -> ReplayPlacement:
    """Where ``shards`` shards of ``shard_bytes`` each go, for ``--replay-placement``
    ``setting``, given the learner's node and Ray's ``memory`` resource there.

    ``learner``: on the learner's node, a hard pin when its memory holds them all, else a
    soft one (those that do not fit there go elsewhere). ``spread``: over the nodes.
    ``auto``: the learner's node when its memory holds every shard (their batches then
    cost no network and no encoding), else spread: shards that do not fit on one node
    are better spread evenly than piled where the learner is until it runs out. With no
    known learner's node (``node`` None) they spread.
    """
    need = shards * shard_bytes
    fits = node is not None and need <= node_memory
    amounts = f"{node_memory / 2**30:.1f} GiB for {need / 2**30:.1f} GiB"
    here = f"replay: {shards} shard(s) on the learner's node"
    spread = f"replay: {shards} shard(s) spread over the nodes"
    if setting == "spread":
        return ReplayPlacement(node, False, False, f"{spread} (spread)")
    if node is None:
        return ReplayPlacement(None, False, False, f"{spread} ({setting}: no node can host "
                                                   "the learner yet)")  # fmt: skip
    if setting == "learner":
        pin = "" if fits else ", pinned softly: those that do not fit go elsewhere"
        return ReplayPlacement(node, True, fits, f"{here} (learner: it has {amounts}{pin})")
    if setting == "auto":
        if fits:
            return ReplayPlacement(node, True, True, f"{here} (auto: it has {amounts})")
        return ReplayPlacement(node, False, False, f"{spread} (auto: the learner's node has "
                                                   f"{amounts})")  # fmt: skip
    raise ValueError(f"unknown replay placement {setting!r}: one of learner, spread, auto")


def learner_node(nodes: list[dict], driver_node: str, gpu: bool) -> str | None:
    """The node to pin the learner to: the driver's when it has what the learner asks of
    Ray (a CPU, and a GPU when ``gpu``), else the alive node with it and the most memory;
    None when no node has it (Ray will place the learner once one joins).

    ``nodes`` are ``ray.nodes()`` entries (``NodeID``, ``Alive``, ``Resources``); the
    learner asks ``start_learner``'s resources, a CPU and, for CUDA, a GPU.
    """

    def hosts(node: dict) -> bool:
        resources = node.get("Resources", {})
        return (
            bool(node.get("Alive"))
            and resources.get("CPU", 0) >= 1
            and (not gpu or resources.get("GPU", 0) >= 1)
        )

    able = [n for n in nodes if hosts(n)]
    for node in able:
        if node["NodeID"] == driver_node:
            return driver_node
    if not able:
        return None
    return max(able, key=lambda n: n["Resources"].get("memory", 0))["NodeID"]


def plan_placement(setting: str, shards: int, capacity: int, gpu: bool) -> ReplayPlacement:
    """:func:`choose_placement` on the cluster joined: the learner's node as
    :func:`learner_node` picks it, and the memory Ray reports for it."""
    nodes = ray.nodes()
    node = learner_node(nodes, ray.get_runtime_context().get_node_id(), gpu)
    memory = next((n["Resources"].get("memory", 0) for n in nodes if n["NodeID"] == node), 0)
    return choose_placement(setting, node, memory, shards, shard_memory_bytes(capacity))
