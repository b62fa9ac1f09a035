"""A vectorized sum tree for proportional prioritized sampling (Schaul et al. 2016).

The tree is a flat float64 array of ``2 * L`` nodes, ``L`` the smallest power of two
>= capacity; node 1 is the root, node ``i`` has children ``2i`` and ``2i + 1`` and the
leaves are nodes ``L .. 2L - 1``. Updates and sampling work on whole batches of indices
with one numpy operation per tree level, so a batch of 512 costs ~log2(L) array ops,
not 512 Python loops.

Parents are always recomputed as the sum of their two children, never adjusted by a
difference, so rounding errors cannot accumulate: a subtree whose leaves are all zero has
mass exactly zero, however many updates it has seen.

Two ways to write leaves: ``set`` for scattered indices (priority updates), and
``set_range`` for a run of consecutive leaves (a replay inserts and evicts items in
key order, so its writes are runs): a run's ancestors at each level are a run too, so
each level costs one strided slice sum instead of fancy indexing and a sort.

A min tree of the same shape is kept alongside: each of its nodes holds the smallest
*positive* leaf below it (+inf where every leaf below is zero). Proportional replay
normalises importance weights by the largest weight in the whole replay,
``max_j (N * P(j)) ** -beta = (N * p_min / total) ** -beta``, the weight of the item of
least positive priority; zero leaves are empty or evicted slots, never sampled, so they
do not count. The min tree gives ``p_min`` in O(1) at every sample, exactly (a minimum
is one of its inputs, so it never rounds), for the price of one more array op per level
on each write, sharing the sort and the ancestor indices the sums already need.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._leaves = 1 << max(0, (capacity - 1).bit_length())
        self._depth = self._leaves.bit_length() - 1
        self._nodes = np.zeros(2 * self._leaves, dtype=np.float64)
        self._mins = np.full(2 * self._leaves, np.inf)

    @property
    def total(self) -> float:
        return float(self._nodes[1])

    @property
    def min(self) -> float:
        """The smallest positive leaf value; +inf when every leaf is zero."""
        return float(self._mins[1])

    @property
    def nbytes(self) -> int:
        return self._nodes.nbytes + self._mins.nbytes

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self._nodes[self._leaves + np.asarray(indices)]

    @staticmethod
    def _check(values: np.ndarray) -> None:
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            raise ValueError("priorities must be finite and >= 0")

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaf values; with duplicate indices the last value wins."""
        indices = np.asarray(indices, dtype=np.int64).ravel()
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), indices.shape)
        if indices.size == 0:
            return
        self._check(values)
        if indices.min() < 0 or indices.max() >= self.capacity:
            raise IndexError(f"leaf index out of range [0, {self.capacity})")
        nodes, mins = self._nodes, self._mins
        # The last value given for an index wins: it is the first one in reverse order.
        leaves, first = np.unique(indices[::-1], return_index=True)
        idx = leaves + self._leaves  # sorted, so every level's parents are sorted too
        values = values[::-1][first]
        nodes[idx] = values
        mins[idx] = np.where(values > 0, values, np.inf)
        for _ in range(self._depth):
            idx >>= 1
            keep = np.empty(len(idx), dtype=bool)  # two siblings share a parent
            keep[0] = True
            np.not_equal(idx[1:], idx[:-1], out=keep[1:])
            idx = idx[keep]
            left = idx << 1
            right = left + 1
            nodes[idx] = nodes[left] + nodes[right]
            mins[idx] = np.minimum(mins[left], mins[right])

    def set_range(self, start: int, values: np.ndarray) -> None:
        """Set leaves ``start .. start + len(values) - 1`` (no wrap-around)."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0:
            return
        self._check(values)
        if start < 0 or start + values.size > self.capacity:
            raise IndexError(f"leaf range out of [0, {self.capacity})")
        nodes, mins = self._nodes, self._mins
        lo = start + self._leaves
        hi = lo + values.size  # exclusive
        nodes[lo:hi] = values
        mins[lo:hi] = np.where(values > 0, values, np.inf)
        while lo > 1:
            lo, hi = lo >> 1, ((hi - 1) >> 1) + 1
            np.add(nodes[2 * lo : 2 * hi : 2], nodes[2 * lo + 1 : 2 * hi : 2], out=nodes[lo:hi])
            np.minimum(mins[2 * lo : 2 * hi : 2], mins[2 * lo + 1 : 2 * hi : 2], out=mins[lo:hi])

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf indices whose prefix-sum interval contains each target in [0, total).

        Descending, go right when the target is >= the left child's mass *and* the right
        child has mass: the second condition keeps floating-point rounding from ever
        landing on a zero-priority leaf (an empty or evicted slot). A node entered always
        has mass: the left child is entered only when the target is below its mass, or
        when the right child has none.
        """
        nodes = self._nodes
        targets = np.array(targets, dtype=np.float64)
        idx = np.ones(targets.shape, dtype=np.int64)
        for _ in range(self._depth):
            idx <<= 1  # left child
            left_mass = nodes[idx]
            right = (targets >= left_mass) & (nodes[idx + 1] > 0)
            targets -= np.where(right, left_mass, 0.0)
            idx += right
        return idx - self._leaves

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified sampling: one uniform draw from each of ``count`` equal slices of mass."""
        total = self.total
        if total <= 0:
            raise ValueError("cannot sample from an empty sum tree")
        bounds = (np.arange(count) + rng.random(count)) * (total / count)
        return self.find(np.minimum(bounds, np.nextafter(total, 0)))
