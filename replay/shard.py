"""One replay shard: frames stored once, transitions as frame references, FIFO eviction.

Storage. A naive replay keeps two stacks of 4 x 84 x 84 bytes per transition (56,448 B).
Here every frame an actor sees is written once into a pool of 84x84 slots; a transition
holds eight int32 slot numbers (its observation stack and its bootstrap stack), so a
transition costs about one frame (7,056 B), ~90 B of bookkeeping (slots, action, return,
discount, sum and min trees, reference count, free list) and the pool's slack below:
~7,290 B in a full shard of 200k items, ~7,260 B at 1M. Stacks are rebuilt at sample time
with one gather, ``np.take(frames, slots)``, straight into the batch's contiguous arrays. That
gather is the copy the learner's batch needs anyway: a naive buffer copies the same
29 MB per batch of 512, in rows of 28 KB rather than 7 KB, which makes it only ~1.4x
faster (``benchmarks/replay.py``). Storage has no codec: compressing stacks would cost a
decode per sampled stack and still store each frame up to 8 times.

On the wire. A stacked batch is 56,448 B per transition, what crosses the network when
the learner is on another node. ``sample(..., wire="frames")`` sends a
:class:`CompactBatch` instead: the batch's distinct frames once (a stack and its n-step
bootstrap stack share frames, 7 distinct of 8 at n = 3) and each stack as four row
numbers, which the learner expands with one gather; ``wire="zstd"`` also compresses
those frames as one zstd frame, ~740 B per transition on Space Invaders.

Frame slots. An episode of L steps brings L + 1 frames for its L transitions, the
oldest live items still name up to 3 frames of evicted ones, and each stream pins its
tail; the pool has ``capacity + capacity // 64 + 1024`` slots, enough for episodes of
~64 steps and more on average. With shorter episodes the oldest items leave before the
item capacity is reached (a chunk that finds too few free slots evicts until it fits),
so the shard holds fewer items but stays correct.

Frame slots are reference counted. A slot is held by every live transition that names
it, and by the last ``tail`` frames of each stream, which the stream's next chunk may
still name (a stack reaches 3 frames back and a bootstrap n frames ahead across a push).
A stream's tail is the last ``tail`` frames of the *stream*, joined across chunks, so
chunks shorter than their tail (small push periods) lose nothing. A slot whose count
drops to zero goes back to the free list. The tails of streams that stopped pushing (a
restarted actor starts a new stream) are let go after ``STREAM_TIMEOUT_CHUNKS`` chunks
from other streams, or when more than ``MAX_STREAMS`` streams are remembered, so dead
streams cannot pin frames for long.

Keys. Each stored transition gets a key that only grows; its item slot is
``key % capacity``. Items with keys in ``[oldest_key, next_key)`` are live. A priority
update for a key outside that range (the item was evicted, perhaps its slot reused)
is dropped. Inserting and evicting touch runs of consecutive items, so the sum tree is
written with range updates (``SumTree.set_range``), one slice per tree level.

Why a sampled index is always valid here: (1) empty and evicted item slots have zero
priority, and the sum tree never descends into zero mass; (2) a live item's frames
cannot be reused while it lives, because it holds their reference counts; (3) a stack
that crosses an episode start was padded with the zero slot by the actor, so it never
mixes two episodes; (4) transitions whose frames could not be resolved (the stream's
previous chunk was lost, e.g. after this shard restarted) are dropped and counted in
``dropped`` at insertion, never stored.

Saving and restoring: ``replay/persist.py``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import (
    WIRE_FORMATS,
    ZERO_FRAME,
    CompactBatch,
    SampledBatch,
    ShardStats,
    TransitionChunk,
    compress_frames,
)
from apex_dqn.replay.sum_tree import SumTree

MAX_STREAMS = 4096  # stream tails remembered; the least recently pushing is forgotten first
STREAM_TIMEOUT_CHUNKS = 4096  # a stream silent for this many chunks is forgotten


def importance_weights(
    probs: np.ndarray, size: int, beta: float, min_prob: float | None = None
) -> np.ndarray:
    """``w_i = (N * P(i)) ** -beta / max_j (N * P(j)) ** -beta``, clipped at 1.

    The maximum is over the whole replay (Schaul et al. 2016): it is the weight of the
    item of least probability, ``(N * min_prob) ** -beta``, so ``w_i = (P(i) / min_prob)
    ** -beta`` (N cancels). Every batch is then scaled by the same constant and the
    step size means the same from one batch to the next. Normalising by the *batch*
    maximum instead rescales each batch by its own factor; over several shards that
    factor absorbs the shard's probability P(s), so batches of high-mass shards would
    weigh more than one unsharded replay weighs them.

    ``min_prob`` is the least sampling probability in the replay; None normalises by the
    batch's own least probability, for a caller that cannot know the replay's. The clip
    at 1 matters when ``min_prob`` and ``probs`` are not from one moment, as in a sampler
    over shards (P(s) from the shard masses it last saw, the shards' least priorities as
    last seen, the probabilities within the shard from when it drew): P(i) can then come
    out below ``min_prob``, and no item may weigh more than the largest weight the
    replay can give.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if min_prob is None:
        min_prob = float(probs.min())
    weights = (size * probs) ** (-beta) / (size * min_prob) ** (-beta)
    return np.minimum(weights, 1.0).astype(np.float32)


@dataclass
class StreamTail:
    first_frame: int  # frame number of slots[0]
    slots: np.ndarray  # int32 frame slots of the stream's last `tail` frames
    last_chunk: int  # the shard's chunk counter when the stream last pushed


class ReplayShard:
    """Proportional prioritized replay over frame-deduplicated transitions."""

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        frame_capacity: int | None = None,
        seed: int = 0,
        eps: float = 1e-6,
    ):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.alpha = alpha
        self.eps = eps
        self.frame_capacity = frame_capacity or capacity + capacity // 64 + 1024
        if self.frame_capacity < 4:
            raise ValueError(f"frame_capacity must be >= 4, got {self.frame_capacity}")
        self._zero_slot = self.frame_capacity  # never allocated, never freed
        self.frames = np.zeros((self.frame_capacity + 1, *FRAME_SHAPE), dtype=np.uint8)
        self._refcount = np.full(self.frame_capacity + 1, -1, dtype=np.int32)  # -1: free
        self._refcount[self._zero_slot] = 0
        self._free = np.arange(self.frame_capacity - 1, -1, -1, dtype=np.int32)  # a stack
        self._num_free = self.frame_capacity

        # slots[i, 0] is item i's observation stack, slots[i, 1] its bootstrap stack.
        self.slots = np.zeros((capacity, 2, STACK), dtype=np.int32)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.tree = SumTree(capacity)

        self.oldest_key = 0
        self.next_key = 0
        self.dropped = 0  # transitions refused because their frames were unknown
        self.added = 0
        self.chunks = 0
        self._tails: OrderedDict[int, StreamTail] = OrderedDict()  # least recent first
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        return self.next_key - self.oldest_key

    @property
    def total_priority(self) -> float:
        return self.tree.total

    @property
    def min_priority(self) -> float:
        """The smallest priority of a live item (+inf when empty): the item of largest
        importance weight, which normalises every weight (``importance_weights``)."""
        return self.tree.min

    @property
    def frames_used(self) -> int:
        return self.frame_capacity - self._num_free

    @property
    def nbytes(self) -> int:
        """Bytes held by every array of the shard."""
        arrays = (
            self.frames, self._refcount, self._free, self.slots,
            self.actions, self.returns, self.discounts,
        )  # fmt: skip
        tails = sum(t.slots.nbytes for t in self._tails.values())
        return sum(a.nbytes for a in arrays) + self.tree.nbytes + tails

    def stats(self) -> ShardStats:
        return ShardStats(
            size=len(self),
            added=self.added,
            dropped=self.dropped,
            total_priority=self.total_priority,
            min_priority=self.min_priority,
            frames_used=self.frames_used,
            streams=len(self._tails),
            nbytes=self.nbytes,
        )

    def _runs(self, first_key: int, count: int) -> list[tuple[int, int]]:
        """The items of keys ``first_key ..`` as at most two runs (item start, length)."""
        start = first_key % self.capacity
        head = min(count, self.capacity - start)
        return [(start, head), (0, count - head)] if count > head else [(start, head)]

    # ----------------------------------------------------------------------- insertion
    def add(self, chunk: TransitionChunk) -> int:
        """Store a chunk; returns how many of its transitions were stored."""
        num_frames = len(chunk.frames)
        if num_frames > self.frame_capacity // 2 or chunk.tail > self.frame_capacity // 4:
            raise ValueError(
                f"a chunk of {num_frames} frames and a tail of {chunk.tail} is too large "
                f"for a shard of {self.frame_capacity} frame slots"
            )
        tail = self._tails.get(chunk.stream)
        refs = np.concatenate([chunk.obs, chunk.next_obs], axis=1)  # (T, 8) frame numbers
        valid = self._known(refs, chunk, tail)
        count = int(valid.sum())
        if count > self.capacity:
            raise ValueError(f"a chunk of {count} transitions exceeds the capacity")
        if tail is not None:  # out of the LRU order while we make room: it must survive
            del self._tails[chunk.stream]
        self.dropped += len(chunk) - count

        # Make room: first for the items, then for the frames (evicting frees frames).
        self._evict(len(self) + count - self.capacity)
        while self._num_free < num_frames:
            if len(self) == 0:
                self._forget_oldest_stream()
            self._evict(num_frames - self._num_free)
        new_slots = self._free[self._num_free - num_frames : self._num_free][::-1].copy()
        self._num_free -= num_frames
        self._refcount[new_slots] = 0
        self.frames[new_slots] = chunk.frames

        # Frame numbers to slots: the chunk's own frames, the tail's, or the zero frame.
        refs = refs[valid] if count < len(valid) else refs
        slots = np.full(refs.shape, self._zero_slot, dtype=np.int32)
        new = refs >= chunk.first_frame
        slots[new] = new_slots[refs[new] - chunk.first_frame]
        old = ~new & (refs != ZERO_FRAME)
        if old.any():
            slots[old] = tail.slots[refs[old] - tail.first_frame]
        np.add.at(self._refcount, slots.ravel(), 1)
        self._refcount[self._zero_slot] = 0  # the zero frame is shared, never counted

        priorities = self._scaled(chunk.priorities[valid])
        done = 0
        for start, length in self._runs(self.next_key, count):
            items = slice(start, start + length)
            part = slice(done, done + length)
            self.slots[items] = slots[part].reshape(length, 2, STACK)
            self.actions[items] = chunk.actions[valid][part]
            self.returns[items] = chunk.returns[valid][part]
            self.discounts[items] = chunk.discounts[valid][part]
            self.tree.set_range(start, priorities[part])
            done += length
        self.next_key += count
        self.added += count
        self.chunks += 1

        # The stream's new tail: its last `tail` frames, across chunks when this one is
        # shorter. Hold the new tail, then let go of the old one, so shared slots survive.
        if tail is not None and tail.first_frame + len(tail.slots) == chunk.first_frame:
            joined, joined_first = np.concatenate([tail.slots, new_slots]), tail.first_frame
        else:
            joined, joined_first = new_slots, chunk.first_frame
        keep = min(chunk.tail, len(joined))
        tail_slots = joined[len(joined) - keep :].copy()
        self._refcount[tail_slots] += 1
        self._tails[chunk.stream] = StreamTail(
            joined_first + len(joined) - keep, tail_slots, self.chunks
        )
        released = [new_slots]
        if tail is not None:
            self._refcount[tail.slots] -= 1
            released.append(tail.slots)
        self._release(np.concatenate(released))
        while len(self._tails) > MAX_STREAMS or (
            next(iter(self._tails.values())).last_chunk < self.chunks - STREAM_TIMEOUT_CHUNKS
        ):
            self._forget_oldest_stream()
        return count

    def _forget_oldest_stream(self) -> None:
        """Unpin the tail of the stream that pushed least recently."""
        if not self._tails:
            raise RuntimeError("replay shard has no frame slots left to free")
        _, forgotten = self._tails.popitem(last=False)
        self._refcount[forgotten.slots] -= 1
        self._release(forgotten.slots)

    @staticmethod
    def _known(refs: np.ndarray, chunk: TransitionChunk, tail: StreamTail | None) -> np.ndarray:
        """Which transitions name only frames we have: this chunk's, the tail's, or zero."""
        known = (refs >= chunk.first_frame) & (refs < chunk.first_frame + len(chunk.frames))
        known |= refs == ZERO_FRAME
        if tail is not None:
            known |= (refs >= tail.first_frame) & (refs < tail.first_frame + len(tail.slots))
        return known.all(axis=1)

    def _evict(self, count: int) -> None:
        """Drop the ``count`` oldest items and release the frames they alone held."""
        count = min(count, len(self))
        if count <= 0:
            return
        runs = self._runs(self.oldest_key, count)
        slots = np.concatenate([self.slots[s : s + n].ravel() for s, n in runs])
        for start, length in runs:
            self.tree.set_range(start, np.zeros(length))
        np.subtract.at(self._refcount, slots, 1)
        self._refcount[self._zero_slot] = 0
        self.oldest_key += count
        self._release(slots)

    def _release(self, slots: np.ndarray) -> None:
        """Return to the free list the slots among ``slots`` that nothing references."""
        slots = np.unique(slots)
        slots = slots[(self._refcount[slots] == 0) & (slots != self._zero_slot)]
        # A slot is on the free list at most once: it reaches zero once per allocation,
        # and freshly allocated slots are referenced before this runs.
        self._free[self._num_free : self._num_free + len(slots)] = slots
        self._num_free += len(slots)
        self._refcount[slots] = -1  # marks "free"; an allocation sets it back to 0

    def _scaled(self, priorities: np.ndarray) -> np.ndarray:
        return (np.abs(np.asarray(priorities, dtype=np.float64)) + self.eps) ** self.alpha

    # ------------------------------------------------------------------------ sampling
    def sample(
        self, batch_size: int, beta: float, wire: str = "raw"
    ) -> SampledBatch | CompactBatch:
        """Draw ``batch_size`` items with probability p_i^alpha / sum_k p_k^alpha.

        ``weights`` treat this shard as the whole replay (normalised by its own least
        priority); a sampler over several shards recomputes them over all of them.
        ``wire`` (:data:`WIRE_FORMATS`): ``"raw"`` returns stacked obs and next_obs,
        ``"frames"`` and ``"zstd"`` a :class:`CompactBatch` of the same draw (the same
        random numbers, so the same keys for the same seed).
        """
        if wire not in WIRE_FORMATS:
            raise ValueError(f"unknown wire format {wire!r}: one of {', '.join(WIRE_FORMATS)}")
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay shard")
        total = self.tree.total
        items = self.tree.sample(batch_size, self._rng)
        probs = self.tree.get(items) / total
        keys = self.oldest_key + (items - self.oldest_key) % self.capacity
        weights = importance_weights(probs, len(self), beta, self.tree.min / total)
        return self._batch(items, keys, probs, weights, total, wire)

    def lookup(self, keys: np.ndarray, wire: str = "raw") -> SampledBatch | CompactBatch:
        """The transitions stored under live ``keys``, rebuilt exactly as ``sample`` does.

        Weights are 1 and ``probs`` the probabilities ``sample`` would draw them with.
        Raises ``KeyError`` if a key is not live (never stored, or evicted).
        """
        if wire not in WIRE_FORMATS:
            raise ValueError(f"unknown wire format {wire!r}: one of {', '.join(WIRE_FORMATS)}")
        keys = np.asarray(keys, dtype=np.int64).ravel()
        if np.any((keys < self.oldest_key) | (keys >= self.next_key)):
            raise KeyError(f"keys outside the live range [{self.oldest_key}, {self.next_key})")
        items = keys % self.capacity
        total = self.tree.total
        probs = self.tree.get(items) / total
        ones = np.ones(len(keys), dtype=np.float32)
        return self._batch(items, keys, probs, ones, total, wire)

    def _batch(
        self, items: np.ndarray, keys: np.ndarray, probs: np.ndarray, weights: np.ndarray,
        total: float, wire: str = "raw",
    ) -> SampledBatch | CompactBatch:  # fmt: skip
        meta = dict(
            actions=self.actions[items].astype(np.int64),
            returns=self.returns[items],
            discounts=self.discounts[items],
            weights=weights,
            keys=keys,
            probs=probs,
            shard_size=len(self),
            shard_total=total,
            shard_min=self.tree.min,
        )
        if wire != "raw":
            return self._compact(items, wire == "zstd", meta)
        # One gather for both stacks, laid out (2, B, 4, 84, 84): obs and next_obs are
        # each a contiguous half of it.
        slots = self.slots[items].transpose(1, 0, 2).ravel()
        stacks = np.take(self.frames, slots, axis=0).reshape(2, len(items), STACK, *FRAME_SHAPE)
        return SampledBatch(obs=stacks[0], next_obs=stacks[1], **meta)

    def _compact(self, items: np.ndarray, compress: bool, meta: dict) -> CompactBatch:
        """The batch's distinct frame slots, gathered once, and each stack as (B, 4) rows of
        them: ``np.unique`` over the batch's 8 B slots, the zero slot among them if used.

        Rows are in the order the slots first appear in the batch (item by item, obs then
        bootstrap stack), so a transition's frames, consecutive screens of one episode, lie
        side by side whatever the slots' layout in the pool: that is what lets zstd's
        window find them alike.
        """
        slots = self.slots[items].ravel()  # (B * 2 * 4,): item, then obs/next, then frame
        distinct, first, inverse = np.unique(slots, return_index=True, return_inverse=True)
        order = np.argsort(first)
        rows = np.empty(len(order), dtype=np.int32)
        rows[order] = np.arange(len(order), dtype=np.int32)
        index = rows[inverse.ravel()].reshape(len(items), 2, STACK)
        frames = np.take(self.frames, distinct[order], axis=0)
        return CompactBatch(
            frames=compress_frames(frames) if compress else frames,
            codec="zstd" if compress else "none",
            num_frames=len(order),
            obs_index=np.ascontiguousarray(index[:, 0]),
            next_index=np.ascontiguousarray(index[:, 1]),
            **meta,
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set new |TD| priorities by key; keys of evicted items are ignored."""
        keys = np.asarray(keys, dtype=np.int64)
        live = (keys >= self.oldest_key) & (keys < self.next_key)
        self.tree.set(keys[live] % self.capacity, self._scaled(np.asarray(priorities)[live]))
        return int(live.sum())

    # ------------------------------------------------------------------ save / restore
    def _extra_state(self) -> dict[str, int]:
        """Integers a subclass saves with the shard (none here)."""
        return {}

    def _load_extra_state(self, extra: dict[str, int]) -> None:
        """Take back what :meth:`_extra_state` saved (nothing here)."""

    def save_state(self, path: str | os.PathLike) -> int:
        """Write the shard's contents to ``path``, atomically; returns the file's bytes
        (:func:`apex_dqn.replay.persist.save`)."""
        from apex_dqn.replay import persist

        return persist.save(self, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Fill this new, empty shard with what ``path`` holds
        (:func:`apex_dqn.replay.persist.load`)."""
        from apex_dqn.replay import persist

        persist.load(self, path)
