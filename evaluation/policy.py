"""A checkpoint's policy: its config and its online Q-network, for scoring and watching.

The online network (not the target network) is the one the learner trains and the
actors act with, so it is the policy a checkpoint stands for.
"""

from __future__ import annotations

import os
from typing import Any

from apex_dqn.common.cli import CommandError
from apex_dqn.common.config import Config, normalize_game
from apex_dqn.common.networks import QNetwork, build_network


class PolicyError(CommandError):
    """A checkpoint holds no network this version can play; the message is one line."""


def config_from_dict(saved: dict[str, Any]) -> Config:
    """The checkpoint's config as this version reads it (:meth:`Config.from_dict`: renamed
    settings followed, removed ones dropped, new ones at their defaults), game normalised."""
    cfg = Config.from_dict(saved)
    return cfg.replace(game=normalize_game(cfg.game))


def load_policy(path: str | os.PathLike) -> tuple[Config, QNetwork, dict[str, Any]]:
    """Rebuild the online Q-network of a checkpoint file (or a run directory's newest).

    Returns the config, the network in eval mode, and the checkpoint's payload. Raises
    :class:`~apex_dqn.common.checkpoint.CheckpointError` when the file is missing or
    unreadable, and :class:`PolicyError` when it holds no network fit for its game.
    """
    from apex_dqn.common import checkpoint
    from apex_dqn.common.envs import available_games, num_actions

    payload = checkpoint.load(path)
    cfg = config_from_dict(payload["config"])
    if cfg.game not in available_games():
        raise PolicyError(f"checkpoint {payload['path']} is for an unknown game {cfg.game!r}")
    learner = payload["learner"]
    if not isinstance(learner, dict) or "online" not in learner:
        raise PolicyError(f"checkpoint {payload['path']} has no online network")
    net = build_network(num_actions(cfg.game), cfg.network, cfg.dueling)
    try:
        net.load_state_dict(learner["online"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PolicyError(
            f"checkpoint {payload['path']} does not fit a {cfg.network} network for "
            f"{cfg.game}: {first}"
        ) from exc
    net.eval()
    return cfg, net, payload
