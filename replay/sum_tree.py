"""A vectorized sum tree for proportional prioritized sampling (Schaul et al. 2016).

The tree is a flat float64 array of ``2 * L`` nodes, ``L`` the smallest power of two
>= capacity; node 1 is the root, node ``i`` has children ``2i`` and ``2i + 1`` and the
leaves are nodes ``L .. 2L - 1``. Updates and sampling work on whole batches of indices
with one numpy operation per tree level, so a batch of 512 costs ~log2(L) array ops,
not 512 Python loops.
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

    @property
    def total(self) -> float:
        return float(self._nodes[1])

    @property
    def nbytes(self) -> int:
        return self._nodes.nbytes

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self._nodes[self._leaves + np.asarray(indices)]

    def set(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Set leaf values; with duplicate indices the last value wins (numpy assignment)."""
        indices = np.asarray(indices, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if indices.size == 0:
            return
        if np.any(values < 0) or not np.all(np.isfinite(values)):
            raise ValueError("priorities must be finite and >= 0")
        nodes = self._nodes
        idx = indices + self._leaves
        nodes[idx] = values
        for _ in range(self._depth):
            idx = np.unique(idx >> 1)
            nodes[idx] = nodes[2 * idx] + nodes[2 * idx + 1]

    def find(self, targets: np.ndarray) -> np.ndarray:
        """Leaf indices whose prefix-sum interval contains each target in [0, total).

        Descending, go right when the target is >= the left child's mass *and* the right
        child has mass: the second condition keeps floating-point rounding from ever
        landing on a zero-priority leaf (an empty or evicted slot).
        """
        nodes = self._nodes
        targets = np.array(targets, dtype=np.float64)
        idx = np.ones(targets.shape, dtype=np.int64)
        for _ in range(self._depth):
            left = 2 * idx
            left_mass = nodes[left]
            right = (targets >= left_mass) & (nodes[left + 1] > 0)
            targets = np.where(right, targets - left_mass, targets)
            idx = left + right
        return idx - self._leaves

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified sampling: one uniform draw from each of ``count`` equal slices of mass."""
        total = self.total
        if total <= 0:
            raise ValueError("cannot sample from an empty sum tree")
        bounds = (np.arange(count) + rng.random(count)) * (total / count)
        return self.find(np.minimum(bounds, np.nextafter(total, 0)))
