"""Environment construction: ale-py's C++ vector env with the DQN preprocessing.

ale-py does the whole DQN pipeline in C++ (frame skip with max-pool over the last two
frames, grayscale, 84x84 area resize, 4-frame stack, up to 30 no-op starts), so no image
code lives here. Protocol choices are explicit: rewards arrive *unclipped* (we log the
real game score and clip for learning ourselves), sticky actions are a config option,
and life loss is reported through ``info["lives"]`` rather than by ending the episode,
so the game always runs to game over.

Stacks at an episode start are zero-padded, ``[0, 0, 0, f0]``; gymnasium's reference
``FrameStackObservation`` does the same with ``padding_type="zero"``.

Against that reference (``make_reference_env``: ``frameskip=1`` + ``AtariPreprocessing``
+ ``FrameStackObservation``), with no-op starts and sticky actions off, one seed and one
action sequence, our observations are identical bit for bit (checked on Space Invaders
in ``tests/common/test_envs.py``): the reset stack, every stack after it (max-pool of
frames 3 and 4 of each skip, grayscale, ``INTER_AREA`` resize), the observation of the
step that ends an episode, and the first stack of the next episode; so are rewards,
``terminated``, ``truncated`` (frame cap) and lives. With no-op starts or sticky actions
on, the two follow the same protocol but not the same random draws: gymnasium takes the
no-op count from ``env.np_random`` and seeds the emulator through a ``SeedSequence``,
while ale-py's vector env seeds each environment's emulator in C++, so their episodes
diverge from the reset (no-ops) or from the first repeated action (sticky actions).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import numpy as np

from apex_dqn.common.config import Config

FRAME_SHAPE = (84, 84)
STACK = 4


class VectorEnv(Protocol):
    """What an actor needs of a batch of environments (ale-py's ``AtariVectorEnv`` API).

    Autoreset is *next-step*: the step that ends an episode returns its final
    observation; the following ``send``/``recv`` ignores the action and returns the
    first observation of a new episode with reward 0.
    """

    num_envs: int

    def reset(self, *, seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]: ...
    def send(self, actions: np.ndarray) -> None: ...
    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]: ...
    def close(self) -> None: ...


@functools.cache
def available_games() -> tuple[str, ...]:
    import ale_py.roms

    return tuple(sorted(ale_py.roms.get_all_rom_ids()))


@functools.cache
def num_actions(game: str) -> int:
    """Size of the game's minimal action set."""
    env = make_vector_env(Config(game=game, noop_max=0), num_envs=1, threads=1)
    try:
        return int(env.single_action_space.n)
    finally:
        env.close()


def make_vector_env(cfg: Config, num_envs: int, threads: int = 1) -> Any:
    """ale-py's vector env with the DQN preprocessing and the config's protocol.

    ``send`` returns at once and the emulator threads step while the caller works;
    ``recv`` waits for every env and returns them in env order, whatever thread stepped
    which (each result lands in its env's slot).
    """
    from ale_py.vector_env import AtariVectorEnv

    return AtariVectorEnv(
        cfg.game,
        num_envs,
        num_threads=threads,
        frameskip=cfg.frame_skip,
        stack_num=STACK,
        img_height=FRAME_SHAPE[0],
        img_width=FRAME_SHAPE[1],
        grayscale=True,
        maxpool=True,
        noop_max=cfg.noop_max,
        max_num_frames_per_episode=cfg.max_episode_frames,
        repeat_action_probability=cfg.sticky_action_prob,
        reward_clipping=False,
        episodic_life=False,
        life_loss_info=False,
        autoreset_mode="NextStep",
        # No FIRE at reset: gymnasium's reference pipeline and Machado et al. (2018) take
        # none, and the agent learns to press FIRE itself.
        use_fire_reset=False,
    )


def make_lane_envs(cfg: Config) -> list[Any]:
    """The lanes of an actor (``actors/actor.py``): ``actor_lanes`` vector envs of
    ``envs_per_actor / actor_lanes`` envs, the ``actor_threads`` emulator threads split
    between them, at least one each."""
    width = cfg.envs_per_actor // cfg.actor_lanes
    threads = max(1, cfg.actor_threads // cfg.actor_lanes)
    return [make_vector_env(cfg, width, threads) for _ in range(cfg.actor_lanes)]


def _gymnasium_id(game: str) -> str:
    """gymnasium's id for an ALE ROM: ``space_invaders`` -> ``ALE/SpaceInvaders-v5``."""
    import gymnasium as gym

    from apex_dqn.common.config import normalize_game

    for env_id in gym.registry:
        if env_id.startswith("ALE/") and env_id.endswith("-v5") and normalize_game(env_id) == game:
            return env_id
    raise ValueError(f"gymnasium registers no ALE/...-v5 env for the ROM {game!r}")


def make_reference_env(cfg: Config, seed: int | None = None, render_mode: str | None = None) -> Any:
    """gymnasium's reference pipeline (``AtariPreprocessing`` + ``FrameStackObservation``).

    Used to check our observations, and by tools that need a single ``gym.Env``;
    ``render_mode="rgb_array"`` makes ``render()`` return the emulator's RGB screen.
    """
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    gym.register_envs(ale_py)
    env_id = _gymnasium_id(cfg.game)
    env = gym.make(
        env_id,
        frameskip=1,
        repeat_action_probability=cfg.sticky_action_prob,
        max_num_frames_per_episode=cfg.max_episode_frames,
        render_mode=render_mode,
    )
    env = AtariPreprocessing(env, noop_max=cfg.noop_max, frame_skip=cfg.frame_skip)
    return FrameStackObservation(env, STACK, padding_type="zero")
