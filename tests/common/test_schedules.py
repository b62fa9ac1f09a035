"""Ape-X epsilons per actor or per env, and the linear schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from common.schedules import actor_epsilons, apex_epsilon, linear


@pytest.mark.parametrize(
    ("index", "count", "expected"),
    [
        (0, 1, 0.4),
        (0, 2, 0.4),
        (1, 2, 0.4**8),
        (0, 8, 0.4),
        (7, 8, 0.4**8),
        (1, 8, 0.4**2),  # 1 + 7 * 1 / 7
        (4, 8, 0.4**5),
        (2, 3, 0.4**8),
        (1, 3, 0.4**4.5),
        (10, 256, 0.4 ** (1 + 70 / 255)),
    ],
)
def test_apex_epsilon_hand_values(index, count, expected):
    assert apex_epsilon(index, count) == pytest.approx(expected, rel=1e-12)


def test_apex_epsilon_decreases_over_explorers():
    values = [apex_epsilon(i, 16) for i in range(16)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert values[-1] == pytest.approx(0.4**8)


@pytest.mark.parametrize(("index", "count"), [(-1, 4), (4, 4), (0, 0), (1, 1)])
def test_apex_epsilon_rejects_index_outside_range(index, count):
    with pytest.raises(ValueError, match="outside"):
        apex_epsilon(index, count)


def test_actor_spread_gives_one_distinct_epsilon_per_actor():
    n, k = 6, 4
    per_actor = [actor_epsilons(i, n, k, "actor") for i in range(n)]
    for i, eps in enumerate(per_actor):
        assert eps.shape == (k,)
        assert eps.dtype == np.float32
        assert np.all(eps == eps[0])
        assert eps[0] == pytest.approx(apex_epsilon(i, n), rel=1e-6)
    firsts = [eps[0] for eps in per_actor]
    assert len(set(firsts)) == n


def test_env_spread_gives_every_env_of_every_actor_a_distinct_epsilon():
    n, k = 3, 5
    all_eps = np.concatenate([actor_epsilons(i, n, k, "env") for i in range(n)])
    assert all_eps.shape == (n * k,)
    assert len(set(all_eps.tolist())) == n * k
    expected = np.array([0.4 ** (1 + 7 * j / (n * k - 1)) for j in range(n * k)])
    np.testing.assert_allclose(all_eps, expected, rtol=1e-6)
    assert all_eps[0] == pytest.approx(0.4)
    assert all_eps[-1] == pytest.approx(0.4**8, rel=1e-5)


def test_env_spread_with_one_actor_covers_the_whole_range():
    eps = actor_epsilons(0, 1, 8, "env")
    assert eps[0] == pytest.approx(0.4)
    assert eps[-1] == pytest.approx(0.4**8, rel=1e-5)
    assert np.all(np.diff(eps) < 0)


def test_single_actor_single_env():
    assert actor_epsilons(0, 1, 1, "env").tolist() == pytest.approx([0.4])
    assert actor_epsilons(0, 1, 1, "actor").tolist() == pytest.approx([0.4])


@pytest.mark.parametrize(
    ("start", "end", "steps", "t", "expected"),
    [
        (0.4, 1.0, 100, 0, 0.4),
        (0.4, 1.0, 100, 50, 0.7),
        (0.4, 1.0, 100, 100, 1.0),
        (0.4, 1.0, 100, 1000, 1.0),
        (0.4, 1.0, 100, -10, 0.4),
        (1.0, 0.0, 4, 1, 0.75),
        (0.4, 1.0, 0, 0, 1.0),
    ],
)
def test_linear(start, end, steps, t, expected):
    assert linear(start, end, steps, t) == pytest.approx(expected)
