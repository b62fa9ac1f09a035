"""The evaluation protocol, and published scores measured under it.

The protocol (to compare with published scores): unclipped game score; up to 30 random
no-op starts; epsilon 0.05 (DQN Nature) unless set; episodes capped at 108,000 emulator
frames (30 minutes of play); the full game, all lives. Sticky actions (Machado et al.
2018) are the config's choice. The scores below were collected in the Ape-X and Rainbow
papers under no-op starts.
"""

from __future__ import annotations

EVAL_EPSILON = 0.05
EVAL_NOOP_MAX = 30
EVAL_MAX_EPISODE_FRAMES = 108_000
ALE_FPS = 60.0  # emulator frames per second of real play

REFERENCE_SCORES: dict[str, dict[str, float]] = {
    "space_invaders": {
        "random": 148.0,
        "human": 1_652.0,
        "DQN 2013": 581.0,
        "DQN Nature": 1_976.0,
        "Double DQN": 3_155.0,
        "Dueling": 6_427.0,
        "Prioritized Dueling": 15_312.0,
        "Rainbow": 18_789.0,
        "Ape-X": 54_681.0,
    },
    "breakout": {
        "random": 1.7,
        "human": 30.5,
        "DQN 2013": 168.0,
        "DQN Nature": 401.2,
        "Rainbow": 417.5,
        "Ape-X": 800.9,
    },
    "boxing": {
        "random": 0.1,
        "human": 12.1,
        "DQN Nature": 71.8,
        "Rainbow": 99.6,
        "Ape-X": 100.0,
    },
    "pong": {
        "random": -20.7,
        "human": 14.6,
        "DQN Nature": 18.9,
        "Rainbow": 20.9,
        "Ape-X": 20.9,
    },
}


def reference_scores(game: str) -> dict[str, float]:
    """Published scores for ``game`` (snake_case ROM id), empty when none are recorded."""
    return dict(REFERENCE_SCORES.get(game, {}))


def human_normalized(score: float, game: str) -> float | None:
    """``(score - random) / (human - random)``: 0 is random play, 1 is the human tester."""
    ref = REFERENCE_SCORES.get(game)
    if not ref or "random" not in ref or "human" not in ref:
        return None
    return (score - ref["random"]) / (ref["human"] - ref["random"])
