"""Ape-X epsilons per actor or per env, and the linear schedule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from apex_dqn.common.schedules import (
    actor_epsilons,
    apex_epsilon,
    linear,
    population_epsilons,
    spread_order,
)


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


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13, 64, 100])
def test_spread_order_is_a_permutation_whose_prefixes_span_the_range(count):
    order = spread_order(count)
    assert sorted(order) == list(range(count))
    assert order[: min(count, 2)] == [0, count - 1][: min(count, 2)]
    for n in range(2, count + 1):  # no gap in the first n is over twice an even spread's
        slots = sorted(order[:n])
        widest = max(b - a for a, b in itertools.pairwise(slots))
        assert widest <= 2 * -(-(count - 1) // (n - 1)), (n, slots)


def test_spread_order_hand_values():
    assert spread_order(8) == [0, 7, 3, 1, 5, 2, 4, 6]
    assert spread_order(5) == [0, 4, 2, 1, 3]


@pytest.mark.parametrize("spread", ["env", "actor"])
def test_fixed_population_epsilons_are_plain_ape_x(spread):
    for i in range(4):
        np.testing.assert_array_equal(
            population_epsilons(i, 4, 0, 3, spread), actor_epsilons(i, 4, 3, spread)
        )
        np.testing.assert_array_equal(
            population_epsilons(i, 4, 4, 3, spread), actor_epsilons(i, 4, 3, spread)
        )


@pytest.mark.parametrize("spread", ["env", "actor"])
def test_elastic_population_epsilons_are_distinct_fixed_and_span_the_range(spread):
    most, k = 16, 4
    every = [population_epsilons(i, 2, most, k, spread) for i in range(most)]
    flat = np.concatenate(every)
    distinct = len(set(flat.tolist()))
    assert distinct == (most * k if spread == "env" else most)
    # The same as a full Ape-X population of 16, in another order.
    full = np.concatenate([actor_epsilons(i, most, k, spread) for i in range(most)])
    np.testing.assert_array_equal(np.sort(flat), np.sort(full))
    # Whatever it has grown to, the population explores from 0.4 down to 0.4**8.
    for n in range(2, most + 1):
        grown = np.concatenate(every[:n])
        assert grown.max() == pytest.approx(0.4)
        assert grown.min() == pytest.approx(0.4**8, rel=1e-5)
    # An actor's epsilons depend on its index alone: a restart gives the same ones.
    np.testing.assert_array_equal(population_epsilons(5, 2, most, k, spread), every[5])


def test_population_epsilons_reject_an_index_outside_the_population():
    with pytest.raises(ValueError, match="outside"):
        population_epsilons(8, 2, 8, 4, "env")
