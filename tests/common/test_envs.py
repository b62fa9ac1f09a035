"""Our training observations against gymnasium's reference Atari pipeline, on the real ROM.

``make_vector_env`` (ale-py's C++ ``AtariVectorEnv``) and ``make_reference_env``
(``AtariPreprocessing`` + ``FrameStackObservation(padding_type="zero")``) are stepped
with one seed and one action sequence, with no-op starts and sticky actions off (both
draw from RNGs the two pipelines do not share), and must agree bit for bit: every
stacked observation, reward, termination, truncation and life count, across an
autoreset.
"""

from __future__ import annotations

import numpy as np
import pytest

from apex_dqn.common.config import Config, ConfigError, normalize_game, validate
from apex_dqn.common.envs import (
    FRAME_SHAPE,
    STACK,
    make_reference_env,
    make_vector_env,
    num_actions,
)

pytestmark = pytest.mark.rom

DETERMINISTIC = Config(noop_max=0, sticky_action_prob=0.0)
SPACE_INVADERS_ALIEN_POINTS = {5.0, 10.0, 15.0, 20.0, 25.0, 30.0}


def _step(env, action: int):
    env.send(np.array([action], dtype=np.int64))
    obs, reward, terminated, truncated, info = env.recv()
    return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), int(info["lives"][0])


@pytest.mark.parametrize("seed", [0, 7])
def test_observations_match_gymnasium_reference_bit_for_bit(seed):
    ours = make_vector_env(DETERMINISTIC, num_envs=1)
    reference = make_reference_env(DETERMINISTIC)
    try:
        obs, info = ours.reset(seed=seed)
        ref_obs, ref_info = reference.reset(seed=seed)
        assert obs.shape == (1, STACK, *FRAME_SHAPE) and obs.dtype == np.uint8
        np.testing.assert_array_equal(obs[0], ref_obs)
        assert info["lives"][0] == ref_info["lives"]

        rng = np.random.default_rng(seed)
        episode_ends, steps_after_end, compared = 0, 0, 0
        ended = False
        while steps_after_end < 50:
            action = int(rng.integers(0, 6))
            got = _step(ours, action)
            if ended:  # ours resets itself on this step (next-step autoreset)
                ref_obs, _ = reference.reset()
                want = (ref_obs, 0.0, False, False, reference.unwrapped.ale.lives())
                ended = False
            else:
                ref_obs, r, term, trunc, ref_info = reference.step(action)
                want = (ref_obs, float(r), term, trunc, ref_info["lives"])
                ended = term or trunc
                episode_ends += ended
            np.testing.assert_array_equal(got[0], want[0], err_msg=f"step {compared}")
            assert got[1:] == want[1:], f"step {compared}: ours {got[1:]}, gymnasium {want[1:]}"
            compared += 1
            steps_after_end += episode_ends > 0
        assert episode_ends == 1 and compared > 300
    finally:
        ours.close()
        reference.close()


def test_reset_stack_is_zero_padded_and_shifts_in_new_frames():
    env = make_vector_env(DETERMINISTIC, num_envs=2)
    try:
        obs, _ = env.reset(seed=3)
        assert obs.shape == (2, STACK, *FRAME_SHAPE)
        assert not obs[:, :-1].any(), "a reset stack is [0, 0, 0, f0]"
        assert obs[:, -1].any(axis=(1, 2)).all()
        first = obs[:, -1].copy()
        env.send(np.zeros(2, dtype=np.int64))
        obs2, *_ = env.recv()
        assert not obs2[:, :2].any()
        np.testing.assert_array_equal(obs2[:, 2], first)
        assert obs2[:, 3].any(axis=(1, 2)).all()
    finally:
        env.close()


def test_rewards_arrive_unclipped_and_game_over_terminates():
    env = make_vector_env(DETERMINISTIC, num_envs=1)
    try:
        env.reset(seed=0)
        rng = np.random.default_rng(0)
        rewards, score = set(), 0.0
        for _ in range(5_000):
            obs, reward, terminated, truncated, lives = _step(env, int(rng.integers(0, 6)))
            if reward:
                rewards.add(reward)
            score += reward
            if terminated or truncated:
                break
        else:
            pytest.fail("no game over within 5,000 steps of random play")
        assert terminated and not truncated
        assert lives == 0
        assert rewards <= SPACE_INVADERS_ALIEN_POINTS
        assert max(rewards) > 1.0, "rewards were clipped"
        assert score > 100

        # Next-step autoreset: the action is ignored, a new episode begins with reward 0.
        obs, reward, terminated, truncated, lives = _step(env, 1)
        assert (reward, terminated, truncated, lives) == (0.0, False, False, 3)
        assert not obs[:-1].any() and obs[-1].any()
    finally:
        env.close()


def test_frame_cap_truncates_without_terminating():
    cfg = DETERMINISTIC.replace(max_episode_frames=400)
    env = make_vector_env(cfg, num_envs=1)
    try:
        env.reset(seed=0)
        flags = [_step(env, 0)[2:4] for _ in range(100)]
        assert flags[:-1] == [(False, False)] * 99
        assert flags[-1] == (False, True), "400 frames = 100 agent steps of 4 frames"
    finally:
        env.close()


def test_num_actions_space_invaders():
    assert num_actions("space_invaders") == 6


@pytest.mark.parametrize("given", ["SpaceInvaders", "ALE/SpaceInvaders-v5", "space_invaders"])
def test_normalized_game_names_build_the_vector_env(given):
    cfg = Config(game=normalize_game(given), noop_max=0)
    validate(cfg)
    env = make_vector_env(cfg, num_envs=1)
    try:
        obs, _ = env.reset(seed=0)
        assert env.single_action_space.n == 6
        assert obs.shape == (1, STACK, *FRAME_SHAPE)
    finally:
        env.close()


@pytest.mark.parametrize("game", ["space_invader", "NotAGame", "pong_v5"])
def test_unknown_games_are_refused(game):
    with pytest.raises(ConfigError, match="is not an ALE game"):
        validate(Config(game=game))
