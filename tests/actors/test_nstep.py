"""NStepAccumulator driven by hand, against hand-computed returns, discounts and frames.

Frames are numbered ``t * K + e`` for the frame env ``e`` produced at step ``t`` (the
reset is step 0); ``Z`` is the zero padding of a stack at an episode start. With
gamma = 0.5 every expected return and discount is exact in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from apex_dqn.actors.nstep import NStepAccumulator
from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.messages import ZERO_FRAME, TransitionChunk

Z = ZERO_FRAME
G = 0.5


@dataclass
class Step:
    """What the envs return at one step: per-env clipped rewards and the envs that ended."""

    rewards: list[float]
    terminated: set[int] = field(default_factory=set)
    truncated: set[int] = field(default_factory=set)
    life_lost: set[int] = field(default_factory=set)


def frame(number: int) -> np.ndarray:
    return np.full(FRAME_SHAPE, number % 256, dtype=np.uint8)


def observation(t: int, k: int) -> np.ndarray:
    """Stacks whose newest frame is frame number t*K+e; older slots hold junk the
    accumulator must never read."""
    obs = np.full((k, STACK, *FRAME_SHAPE), 77, dtype=np.uint8)
    for e in range(k):
        obs[e, -1] = frame(t * k + e)
    return obs


def q_max(step: int, k: int) -> np.ndarray:
    """Max Q of the observation returned at ``step``."""
    return np.array([10.0 + step + 100.0 * e for e in range(k)], dtype=np.float32)


def q_taken(step: int, k: int) -> np.ndarray:
    """Q of the action taken from the observation returned at ``step``."""
    return np.array([0.25 * step + e for e in range(k)], dtype=np.float32)


def action(step: int, e: int) -> int:
    """Action taken from the observation returned at ``step`` by env ``e``."""
    return (10 * e + step) % 256


def drive(k: int, n: int, steps: list[Step], life_terminal: bool = False) -> TransitionChunk:
    acc = NStepAccumulator(k, n, G, stream=7, terminal_on_life_loss=life_terminal)
    acc.start(observation(0, k))
    for t, step in enumerate(steps, start=1):
        acc.bootstrap(q_max(t - 1, k))
        acc.record(np.array([action(t - 1, e) for e in range(k)]), q_taken(t - 1, k))
        mask = [np.array([e in s for e in range(k)]) for s in (step.terminated, step.truncated)]
        acc.observe(
            observation(t, k),
            np.array(step.rewards, dtype=np.float32),
            mask[0],
            mask[1],
            np.array([e in step.life_lost for e in range(k)]),
        )
    acc.bootstrap(q_max(len(steps), k))
    return acc.flush()


def rows(chunk: TransitionChunk) -> list[tuple]:
    return sorted(
        (tuple(o), tuple(x), float(r), float(d))
        for o, x, r, d in zip(
            chunk.obs.tolist(), chunk.next_obs.tolist(), chunk.returns, chunk.discounts, strict=True
        )
    )


# (k, n, terminal_on_life_loss, steps, expected (obs, next_obs, return, discount))
CASES = {
    "full_window": (
        1,
        3,
        False,
        [Step([1]), Step([0]), Step([1]), Step([1]), Step([-1])],
        [
            ((Z, Z, Z, 0), (0, 1, 2, 3), 1 + 0 + 0.25, 0.125),
            ((Z, Z, 0, 1), (1, 2, 3, 4), 0 + 0.5 + 0.25, 0.125),
            ((Z, 0, 1, 2), (2, 3, 4, 5), 1 + 0.5 - 0.25, 0.125),
        ],
    ),
    "terminal_in_window": (
        1,
        3,
        False,
        # Step 3 is the reset step: its action is ignored and its reward is no one's.
        [Step([1]), Step([1], terminated={0}), Step([1]), Step([1]), Step([1]), Step([0])],
        [
            ((Z, Z, Z, 0), (Z, 0, 1, 2), 1 + 0.5, 0.0),
            ((Z, Z, 0, 1), (Z, 0, 1, 2), 1, 0.0),
            ((Z, Z, Z, 3), (3, 4, 5, 6), 1 + 0.5 + 0, 0.125),
        ],
    ),
    "truncation_in_window": (
        1,
        3,
        False,
        [Step([1]), Step([1], truncated={0}), Step([1]), Step([1]), Step([1]), Step([0])],
        [
            ((Z, Z, Z, 0), (Z, 0, 1, 2), 1 + 0.5, 0.25),
            ((Z, Z, 0, 1), (Z, 0, 1, 2), 1, 0.5),
            ((Z, Z, Z, 3), (3, 4, 5, 6), 1 + 0.5 + 0, 0.125),
        ],
    ),
    "truncation_at_window_end": (
        1,
        2,
        False,
        [Step([1]), Step([-1], truncated={0})],
        [
            ((Z, Z, Z, 0), (Z, 0, 1, 2), 1 - 0.5, 0.25),
            ((Z, Z, 0, 1), (Z, 0, 1, 2), -1, 0.5),
        ],
    ),
    "terminal_on_first_step": (
        1,
        3,
        False,
        [Step([1], terminated={0}), Step([0]), Step([1])],
        [
            ((Z, Z, Z, 0), (Z, Z, 0, 1), 1, 0.0),
        ],
    ),
    "episode_start_two_envs": (
        2,
        2,
        False,
        # Env 1 ends at step 1; at its reset step (2) a reward of 1 must be ignored.
        [Step([1, 0], terminated={1}), Step([0, 1]), Step([1, 1]), Step([1, 1])],
        [
            ((Z, Z, Z, 0), (Z, 0, 2, 4), 1 + 0, 0.25),
            ((Z, Z, 0, 2), (0, 2, 4, 6), 0 + 0.5, 0.25),
            ((Z, 0, 2, 4), (2, 4, 6, 8), 1 + 0.5, 0.25),
            ((Z, Z, Z, 1), (Z, Z, 1, 3), 0, 0.0),
            ((Z, Z, Z, 5), (Z, 5, 7, 9), 1 + 0.5, 0.25),
        ],
    ),
    "life_loss_terminal": (
        1,
        3,
        True,
        [Step([1]), Step([1], life_lost={0}), Step([1]), Step([1]), Step([1])],
        [
            ((Z, Z, Z, 0), (Z, 0, 1, 2), 1 + 0.5, 0.0),
            ((Z, Z, 0, 1), (Z, 0, 1, 2), 1, 0.0),
            # The game goes on: the stack is not reset after a lost life.
            ((Z, 0, 1, 2), (2, 3, 4, 5), 1 + 0.5 + 0.25, 0.125),
        ],
    ),
    "life_loss_not_terminal": (
        1,
        3,
        False,
        [Step([1]), Step([1], life_lost={0}), Step([1]), Step([1]), Step([1])],
        [
            ((Z, Z, Z, 0), (0, 1, 2, 3), 1.75, 0.125),
            ((Z, Z, 0, 1), (1, 2, 3, 4), 1.75, 0.125),
            ((Z, 0, 1, 2), (2, 3, 4, 5), 1.75, 0.125),
        ],
    ),
    "n1": (
        1,
        1,
        False,
        [Step([1]), Step([-1]), Step([1], terminated={0}), Step([1]), Step([0])],
        [
            ((Z, Z, Z, 0), (Z, Z, 0, 1), 1, 0.5),
            ((Z, Z, 0, 1), (Z, 0, 1, 2), -1, 0.5),
            ((Z, 0, 1, 2), (0, 1, 2, 3), 1, 0.0),
            ((Z, Z, Z, 4), (Z, Z, 4, 5), 0, 0.5),
        ],
    ),
    "n1_truncation": (
        1,
        1,
        False,
        [Step([1], truncated={0})],
        [((Z, Z, Z, 0), (Z, Z, 0, 1), 1, 0.5)],
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_transitions_match_hand_computed(case):
    k, n, life_terminal, steps, expected = case
    chunk = drive(k, n, steps, life_terminal)
    assert rows(chunk) == sorted(expected)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_actions_and_first_priorities(case):
    k, n, life_terminal, steps, _ = case
    chunk = drive(k, n, steps, life_terminal)
    assert len(chunk) > 0
    for o, x, a, r, d, p in zip(
        chunk.obs,
        chunk.next_obs,
        chunk.actions,
        chunk.returns,
        chunk.discounts,
        chunk.priorities,
        strict=True,
    ):
        e, obs_step, next_step = o[-1] % k, o[-1] // k, x[-1] // k
        assert x[-1] % k == e
        assert a == action(obs_step, e)
        expected = abs(r + d * q_max(next_step, k)[e] - q_taken(obs_step, k)[e])
        assert p == pytest.approx(expected, rel=1e-6)


def test_first_priority_hand_values():
    acc = NStepAccumulator(2, 1, 0.5, stream=0, terminal_on_life_loss=False)
    acc.start(observation(0, 2))
    acc.bootstrap(np.array([0.0, 0.0], dtype=np.float32))
    acc.record(np.array([3, 1]), np.array([0.5, 0.5], dtype=np.float32))
    acc.observe(
        observation(1, 2),
        np.array([1.0, 1.0], dtype=np.float32),
        np.array([False, True]),
        np.array([False, False]),
        np.array([False, False]),
    )
    acc.bootstrap(np.array([4.0, 4.0], dtype=np.float32))
    chunk = acc.flush()
    by_env = {int(o[-1]) % 2: p for o, p in zip(chunk.obs, chunk.priorities, strict=True)}
    assert by_env[0] == pytest.approx(2.5)  # |1 + 0.5 * 4 - 0.5|
    assert by_env[1] == pytest.approx(0.5)  # terminal: |1 - 0.5|
    assert chunk.priorities.dtype == np.float32
    assert sorted(chunk.actions.tolist()) == [1, 3]


def test_chunk_frames_and_numbering():
    k, n = 2, 3
    acc = NStepAccumulator(k, n, G, stream=5, terminal_on_life_loss=False)
    acc.start(observation(0, k))
    for t in range(1, 4):
        acc.bootstrap(q_max(t - 1, k))
        acc.record(np.zeros(k, dtype=np.int64), q_taken(t - 1, k))
        acc.observe(observation(t, k), np.zeros(k), *(np.zeros(k, dtype=bool),) * 3)
    first = acc.flush()
    assert first.stream == 5
    assert first.first_frame == 0
    assert first.frames.shape == (4 * k, *FRAME_SHAPE)
    assert first.frames.dtype == np.uint8
    for j, f in enumerate(first.frames):
        assert np.array_equal(f, frame(j))
    assert first.tail == (n + STACK) * k
    assert len(first) == 0  # no window is complete yet
    assert first.obs.shape == (0, STACK) and first.next_obs.shape == (0, STACK)

    acc.bootstrap(q_max(3, k))
    acc.record(np.zeros(k, dtype=np.int64), q_taken(3, k))
    acc.observe(observation(4, k), np.ones(k), *(np.zeros(k, dtype=bool),) * 3)
    acc.bootstrap(q_max(4, k))
    second = acc.flush()
    assert second.first_frame == 4 * k
    assert len(second.frames) == k
    for j, f in enumerate(second.frames):
        assert np.array_equal(f, frame(second.first_frame + j))
    # Windows opened in the first chunk's steps refer back to its frames.
    assert sorted(map(tuple, second.obs.tolist())) == [
        (Z, Z, Z, 0),
        (Z, Z, Z, 1),
        (Z, Z, 0, 2),
        (Z, Z, 1, 3),
    ]
    assert sorted(map(tuple, second.next_obs.tolist())) == [
        (0, 2, 4, 6),
        (1, 3, 5, 7),
        (2, 4, 6, 8),
        (3, 5, 7, 9),
    ]
    assert acc.pending_transitions() == 0

    empty = acc.flush()
    assert len(empty) == 0 and len(empty.frames) == 0
    assert empty.first_frame == 5 * k


def test_pending_transitions_counts_emitted_not_flushed():
    acc = NStepAccumulator(1, 1, G, stream=0, terminal_on_life_loss=False)
    acc.start(observation(0, 1))
    for t in range(1, 4):
        acc.bootstrap(q_max(t - 1, 1))
        assert acc.pending_transitions() == t - 1
        acc.record(np.zeros(1, dtype=np.int64), q_taken(t - 1, 1))
        acc.observe(observation(t, 1), np.zeros(1), *(np.zeros(1, dtype=bool),) * 3)
    assert len(acc.flush()) == 2
    assert acc.pending_transitions() == 0
