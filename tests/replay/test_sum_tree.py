"""The sum tree against brute-force prefix sums."""

from __future__ import annotations

import numpy as np
import pytest

from apex_dqn.replay.sum_tree import SumTree

# Upper 0.1% point of the chi-square distribution with 15 degrees of freedom
# (scipy.stats.chi2.ppf(0.999, 15)).
CHI2_999_DF15 = 37.697


def leaves(tree: SumTree) -> np.ndarray:
    return tree.get(np.arange(tree.capacity))


def assert_consistent(tree: SumTree) -> None:
    """Every internal node is exactly the sum of its two children, and the least
    positive leaf is the least positive value stored (+inf when there is none)."""
    nodes, n = tree._nodes, tree._leaves
    for i in range(1, n):
        assert nodes[i] == nodes[2 * i] + nodes[2 * i + 1], f"node {i}"
    assert not nodes[n + tree.capacity :].any(), "padding leaves hold no mass"
    values = leaves(tree)
    assert tree.min == (values[values > 0].min() if (values > 0).any() else np.inf)


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 64, 100, 1000])
def test_find_matches_brute_force_prefix_sums(capacity):
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity)
    # Integer priorities, some zero, keep every prefix sum exact in float64.
    values = rng.integers(0, 20, capacity).astype(np.float64)
    values[rng.random(capacity) < 0.3] = 0.0
    values[rng.integers(capacity)] = 5.0  # at least some mass
    tree.set(np.arange(capacity), values)
    assert tree.total == values.sum()
    cumsum = np.cumsum(values)
    # Half-integer targets never sit on a boundary; integer ones sit exactly on one.
    targets = np.concatenate([np.arange(values.sum()) + 0.5, np.arange(values.sum())])
    want = np.searchsorted(cumsum, targets, side="right")
    assert np.array_equal(tree.find(targets), want)
    assert_consistent(tree)


def test_scattered_and_range_writes_keep_every_node_exact():
    rng = np.random.default_rng(1)
    capacity = 37
    tree, ref = SumTree(capacity), np.zeros(capacity)
    for _ in range(300):
        if rng.random() < 0.5:
            idx = rng.integers(0, capacity, rng.integers(1, 60))
            vals = rng.random(len(idx)) * (rng.random(len(idx)) < 0.8)
            tree.set(idx, vals)
            for i, v in zip(idx, vals, strict=True):
                ref[i] = v
        else:
            start = int(rng.integers(0, capacity))
            vals = rng.random(int(rng.integers(0, capacity - start + 1)))
            tree.set_range(start, vals)
            ref[start : start + len(vals)] = vals
        assert np.array_equal(leaves(tree), ref)
    assert_consistent(tree)
    assert tree.total == pytest.approx(ref.sum(), rel=1e-12)


def test_least_positive_leaf_after_scattered_and_range_writes():
    rng = np.random.default_rng(4)
    capacity = 100
    tree, ref = SumTree(capacity), np.zeros(capacity)
    assert tree.min == np.inf
    for _ in range(400):
        if rng.random() < 0.5:
            idx = rng.integers(0, capacity, rng.integers(1, 30))
            vals = rng.random(len(idx)) * (rng.random(len(idx)) < 0.7)
            tree.set(idx, vals)
            for i, v in zip(idx, vals, strict=True):
                ref[i] = v
        else:  # a run, as a replay inserts (positive) and evicts (zero)
            start = int(rng.integers(0, capacity))
            vals = rng.random(int(rng.integers(0, capacity - start + 1)))
            vals *= rng.random() < 0.7
            tree.set_range(start, vals)
            ref[start : start + len(vals)] = vals
        positive = ref[ref > 0]
        assert tree.min == (positive.min() if len(positive) else np.inf)
    tree.set_range(0, np.zeros(capacity))  # all evicted: no least priority
    assert tree.min == np.inf and tree.total == 0.0


def test_duplicate_indices_last_value_wins():
    tree = SumTree(8)
    tree.set(np.array([3, 5, 3, 3, 5]), np.array([1.0, 2.0, 4.0, 7.0, 0.5]))
    assert tree.get(np.array([3, 5])).tolist() == [7.0, 0.5]
    assert tree.total == 7.5
    assert_consistent(tree)
    tree.set(np.array([3, 3]), np.array([0.0, 0.0]))
    assert tree.total == 0.5


def test_bad_priorities_and_indices_are_refused():
    tree = SumTree(4)
    with pytest.raises(ValueError):
        tree.set(np.array([0]), np.array([-1.0]))
    with pytest.raises(ValueError):
        tree.set(np.array([0]), np.array([np.nan]))
    with pytest.raises(IndexError):
        tree.set(np.array([4]), np.array([1.0]))
    with pytest.raises(IndexError):
        tree.set_range(3, np.ones(2))
    assert tree.total == 0.0
    with pytest.raises(ValueError):
        tree.sample(4, np.random.default_rng(0))


def test_zero_priority_leaves_are_never_sampled():
    rng = np.random.default_rng(2)
    capacity = 1000
    tree = SumTree(capacity)
    values = rng.random(capacity) * 1e-3 + rng.random(capacity) ** 8
    values[rng.random(capacity) < 0.5] = 0.0
    values[-300:] = 0.0  # a long empty tail, like an unfilled replay
    tree.set(np.arange(capacity), values)
    zero = values == 0
    # Random targets, every boundary, and the very top of the range.
    cumsum = np.cumsum(values)
    targets = np.concatenate(
        [
            rng.random(100_000) * tree.total,
            cumsum[:-1],
            np.nextafter(cumsum[:-1], 0),
            [0.0, np.nextafter(tree.total, 0), tree.total],
        ]
    )
    found = tree.find(np.minimum(targets, np.nextafter(tree.total, 0)))
    assert not zero[found].any()
    for _ in range(50):
        assert not zero[tree.sample(512, rng)].any()


def test_stratified_sampling_frequencies_match_priorities():
    rng = np.random.default_rng(3)
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3, 2, 1], dtype=np.float64)
    tree = SumTree(20)  # 4 empty leaves
    tree.set(np.arange(16), values)
    batch, rounds = 64, 400
    counts = np.zeros(20)
    for _ in range(rounds):
        drawn = tree.sample(batch, rng)
        # Stratification: a leaf spanning m strata of mass is drawn within one of m times
        # in every batch (it fully covers at least ceil(m) - 2 strata, touches at most
        # ceil(m) + 1).
        per_batch = np.bincount(drawn, minlength=20)
        strata = values * batch / values.sum()
        assert (per_batch[:16] >= np.ceil(strata) - 2).all()
        assert (per_batch[:16] <= np.ceil(strata) + 1).all()
        counts += per_batch
    assert counts[16:].sum() == 0
    expected = values / values.sum() * batch * rounds
    chi2 = ((counts[:16] - expected) ** 2 / expected).sum()
    assert chi2 < CHI2_999_DF15
