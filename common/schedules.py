"""Schedules: Ape-X's per-explorer epsilon and the importance-sampling beta."""

from __future__ import annotations

from collections import deque

import numpy as np


def apex_epsilon(index: int, count: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Ape-X's epsilon for explorer ``index`` of ``count``: ``base ** (1 + alpha * i / (N - 1))``.

    Spreads exploration from 0.4 (i = 0) down to 0.4**8 ~ 0.00066 (i = N - 1). With a
    single explorer the formula is undefined; it gets ``base``, Ape-X's most exploratory
    value.
    """
    if not 0 <= index < count:
        raise ValueError(f"explorer index {index} is outside 0..{count - 1}")
    if count == 1:
        return base
    return base ** (1.0 + alpha * index / (count - 1))


def actor_epsilons(actor: int, num_actors: int, envs_per_actor: int, spread: str) -> np.ndarray:
    """Epsilons for each env of one actor.

    ``spread="actor"`` is Ape-X as published: one epsilon per actor, shared by its envs.
    ``spread="env"`` spreads the same schedule over all ``num_actors * envs_per_actor``
    envs, so that even a single actor explores with the whole Ape-X range of epsilons.
    """
    if spread == "actor":
        return np.full(envs_per_actor, apex_epsilon(actor, num_actors), dtype=np.float32)
    total = num_actors * envs_per_actor
    first = actor * envs_per_actor
    return np.array(
        [apex_epsilon(first + k, total) for k in range(envs_per_actor)], dtype=np.float32
    )


def spread_order(count: int) -> list[int]:
    """The slots ``0 .. count - 1`` in an order whose every prefix spans the whole range.

    Both ends first, then the midpoint of every gap, level by level (``8``: 0, 7, 3, 1, 5,
    2, 4, 6). An elastic population that has grown to its first ``n`` actors thus explores
    with epsilons from 0.4 to 0.4**8 and evenly between, not only the top of the schedule.
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    order = [0] if count == 1 else [0, count - 1]
    gaps = deque([(0, count - 1)])
    while gaps:
        lo, hi = gaps.popleft()
        mid = (lo + hi) // 2
        if lo < mid < hi:
            order.append(mid)
            gaps.extend([(lo, mid), (mid, hi)])
    return order


def population_epsilons(
    actor: int, num_actors: int, max_actors: int, envs_per_actor: int, spread: str
) -> np.ndarray:
    """Epsilons for each env of actor ``actor`` in a population of up to ``max_actors``.

    A fixed population (``max_actors <= num_actors``) is plain Ape-X: actor i takes slot i
    of :func:`actor_epsilons`. An elastic one lays the schedule over ``max_actors`` slots
    and gives actor i slot ``spread_order(max_actors)[i]``: each actor keeps its own
    epsilons for life (a restarted or re-created actor i explores as before), no two
    actors share one, and however many have started, they span the whole range.
    """
    if max_actors <= num_actors:
        return actor_epsilons(actor, num_actors, envs_per_actor, spread)
    if not 0 <= actor < max_actors:
        raise ValueError(f"actor index {actor} is outside 0..{max_actors - 1}")
    return actor_epsilons(spread_order(max_actors)[actor], max_actors, envs_per_actor, spread)


def linear(start: float, end: float, steps: int, t: int) -> float:
    """Linear interpolation from ``start`` at t=0 to ``end`` at t>=steps."""
    frac = min(max(t / steps, 0.0), 1.0) if steps > 0 else 1.0
    return start + frac * (end - start)
