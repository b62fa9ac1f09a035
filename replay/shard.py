"""One replay shard: frames stored once, transitions as frame references, FIFO eviction.

Storage. A naive replay keeps two stacks of 4 x 84 x 84 bytes per transition (56,448 B).
Here every frame an actor sees is written once into a pool of 84x84 slots; a transition
holds eight int32 slot numbers (its observation stack and its bootstrap stack), so a
transition costs about one frame (7,056 B) plus ~80 B of bookkeeping. Stacks are rebuilt
at sample time with one gather, ``frames[slots]``, which is as fast as copying stored
stacks and needs no decompression. This beats compressing stacks: the gather is a memcpy
the learner's batch needs anyway, and there is no codec on the sampling path.

Frame slots are reference counted. A slot is held by every live transition that names
it, and by the last ``tail`` frames of each stream, which the stream's next chunk may
still name (a stack reaches 3 frames back and a bootstrap n frames ahead across a push).
A slot whose count drops to zero goes back to the free list. Transitions are evicted
oldest first (FIFO) when the item capacity is reached, or when a chunk needs more frame
slots than are free; either way the frames they alone held come free.

Keys. Each stored transition gets a key that only grows; its item slot is
``key % capacity``. Items with keys in ``[oldest_key, next_key)`` are live. A priority
update for a key outside that range (the item was evicted, perhaps its slot reused)
is dropped.

Why a sampled index is always valid here: (1) empty and evicted item slots have zero
priority, and the sum tree never descends into zero mass; (2) a live item's frames
cannot be reused while it lives, because it holds their reference counts; (3) a stack
that crosses an episode start was padded with the zero slot by the actor, so it never
mixes two episodes; (4) transitions whose frames could not be resolved (the stream's
previous chunk was lost, e.g. after this shard restarted) are dropped and counted in
``dropped`` at insertion, never stored.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from common.envs import FRAME_SHAPE, STACK
from common.messages import ZERO_FRAME, SampledBatch, TransitionChunk
from replay.sum_tree import SumTree

MAX_STREAMS = 4096  # stream tails remembered; the least recently pushing is forgotten first


def importance_weights(probs: np.ndarray, size: int, beta: float) -> np.ndarray:
    """``w_i = (N * P(i)) ** -beta``, normalised by the batch maximum so that w <= 1."""
    weights = (size * np.asarray(probs, dtype=np.float64)) ** (-beta)
    return (weights / weights.max()).astype(np.float32)


@dataclass
class _StreamTail:
    first_frame: int  # frame number of slots[0]
    slots: np.ndarray  # int32 frame slots of the stream's last `tail` frames


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
        # A transition needs about one new frame; 1/32 more covers episode starts and
        # stream tails. If a chunk finds too few free slots, the oldest items go early.
        self.frame_capacity = frame_capacity or capacity + capacity // 32 + 1024
        self._zero_slot = self.frame_capacity  # never allocated, never freed
        self.frames = np.zeros((self.frame_capacity + 1, *FRAME_SHAPE), dtype=np.uint8)
        self._refcount = np.full(self.frame_capacity + 1, -1, dtype=np.int32)  # -1: free
        self._refcount[self._zero_slot] = 0
        self._free = np.arange(self.frame_capacity - 1, -1, -1, dtype=np.int32)  # a stack
        self._num_free = self.frame_capacity

        self.obs_slots = np.zeros((capacity, STACK), dtype=np.int32)
        self.next_slots = np.zeros((capacity, STACK), dtype=np.int32)
        self.actions = np.zeros(capacity, dtype=np.uint8)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.tree = SumTree(capacity)

        self.oldest_key = 0
        self.next_key = 0
        self.dropped = 0  # transitions refused because their frames were unknown
        self.added = 0
        self._tails: OrderedDict[int, _StreamTail] = OrderedDict()
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        return self.next_key - self.oldest_key

    @property
    def total_priority(self) -> float:
        return self.tree.total

    @property
    def nbytes(self) -> int:
        """Bytes held by every array of the shard."""
        arrays = (
            self.frames, self._refcount, self._free, self.obs_slots, self.next_slots,
            self.actions, self.returns, self.discounts,
        )  # fmt: skip
        return sum(a.nbytes for a in arrays) + self.tree.nbytes

    def stats(self) -> dict[str, float]:
        return {
            "size": len(self),
            "added": self.added,
            "dropped": self.dropped,
            "total_priority": self.total_priority,
            "frames_used": self.frame_capacity - self._num_free,
            "nbytes": self.nbytes,
        }

    # ----------------------------------------------------------------------- insertion
    def add(self, chunk: TransitionChunk) -> int:
        """Store a chunk; returns how many of its transitions were stored."""
        num_frames = len(chunk.frames)
        if num_frames > self.frame_capacity // 2:
            raise ValueError(
                f"a chunk of {num_frames} frames is too large for a shard of "
                f"{self.frame_capacity} frame slots"
            )
        tail = self._tails.pop(chunk.stream, None)
        obs, next_obs, valid = self._resolve(chunk, tail)
        count = int(valid.sum())
        if count > self.capacity:
            raise ValueError(f"a chunk of {count} transitions exceeds the capacity")
        self.dropped += len(chunk) - count

        # Make room: first for the items, then for the frames (evicting frees frames).
        self._evict(len(self) + count - self.capacity)
        while self._num_free < num_frames:
            if len(self) == 0:
                self._forget_oldest_stream()
            self._evict(max(num_frames - self._num_free, 1))
        new_slots = self._free[self._num_free - num_frames : self._num_free][::-1].copy()
        self._num_free -= num_frames
        self._refcount[new_slots] = 0
        self.frames[new_slots] = chunk.frames

        def to_slots(numbers: np.ndarray) -> np.ndarray:
            slots = np.full(numbers.shape, self._zero_slot, dtype=np.int32)
            new = numbers >= chunk.first_frame
            slots[new] = new_slots[numbers[new] - chunk.first_frame]
            old = (numbers < chunk.first_frame) & (numbers != ZERO_FRAME)
            if old.any():
                slots[old] = tail.slots[numbers[old] - tail.first_frame]
            return slots

        keys = np.arange(self.next_key, self.next_key + count)
        items = keys % self.capacity
        item_obs, item_next = to_slots(obs[valid]), to_slots(next_obs[valid])
        self.obs_slots[items] = item_obs
        self.next_slots[items] = item_next
        self.actions[items] = chunk.actions[valid]
        self.returns[items] = chunk.returns[valid]
        self.discounts[items] = chunk.discounts[valid]
        np.add.at(self._refcount, item_obs.ravel(), 1)
        np.add.at(self._refcount, item_next.ravel(), 1)
        self._refcount[self._zero_slot] = 0  # the zero frame is shared, never counted
        self.tree.set(items, self._scaled(chunk.priorities[valid]))
        self.next_key += count
        self.added += count

        # Hold the new tail, then let go of the old one: frames nothing names come free.
        keep = min(chunk.tail, num_frames)
        tail_slots = new_slots[num_frames - keep :]
        self._refcount[tail_slots] += 1
        self._tails[chunk.stream] = _StreamTail(chunk.first_frame + num_frames - keep, tail_slots)
        released = [new_slots]
        if tail is not None:
            self._refcount[tail.slots] -= 1
            released.append(tail.slots)
        self._release(np.concatenate(released))
        if len(self._tails) > MAX_STREAMS:
            self._forget_oldest_stream()
        return count

    def _forget_oldest_stream(self) -> None:
        """Unpin the tail of the stream that pushed least recently."""
        if not self._tails:
            raise RuntimeError("replay shard has no frame slots left to free")
        _, forgotten = self._tails.popitem(last=False)
        self._refcount[forgotten.slots] -= 1
        self._release(forgotten.slots)

    def _resolve(
        self, chunk: TransitionChunk, tail: _StreamTail | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Check every frame number a transition names; mark transitions we can store."""
        obs, next_obs = chunk.obs, chunk.next_obs
        end = chunk.first_frame + len(chunk.frames)
        refs = np.concatenate([obs, next_obs], axis=1)
        known = (refs == ZERO_FRAME) | ((refs >= chunk.first_frame) & (refs < end))
        if tail is not None:
            known |= (refs >= tail.first_frame) & (refs < tail.first_frame + len(tail.slots))
        return obs, next_obs, known.all(axis=1)

    def _evict(self, count: int) -> None:
        """Drop the ``count`` oldest items and release the frames they alone held."""
        count = min(count, len(self))
        if count <= 0:
            return
        items = np.arange(self.oldest_key, self.oldest_key + count) % self.capacity
        self.tree.set(items, np.zeros(count))
        slots = np.concatenate([self.obs_slots[items].ravel(), self.next_slots[items].ravel()])
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
        return (np.abs(priorities.astype(np.float64)) + self.eps) ** self.alpha

    # ------------------------------------------------------------------------ sampling
    def sample(self, batch_size: int, beta: float) -> SampledBatch:
        """Draw ``batch_size`` items with probability p_i^alpha / sum_k p_k^alpha."""
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay shard")
        total = self.tree.total
        items = self.tree.sample(batch_size, self._rng)
        probs = self.tree.get(items) / total
        keys = self.oldest_key + (items - self.oldest_key) % self.capacity
        return SampledBatch(
            obs=self.frames[self.obs_slots[items]],
            actions=self.actions[items].astype(np.int64),
            returns=self.returns[items],
            discounts=self.discounts[items],
            next_obs=self.frames[self.next_slots[items]],
            weights=importance_weights(probs, len(self), beta),
            keys=keys,
            probs=probs,
            shard_size=len(self),
            shard_total=total,
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set new |TD| priorities by key; keys of evicted items are ignored."""
        keys = np.asarray(keys, dtype=np.int64)
        live = (keys >= self.oldest_key) & (keys < self.next_key)
        self.tree.set(keys[live] % self.capacity, self._scaled(np.asarray(priorities)[live]))
        return int(live.sum())
