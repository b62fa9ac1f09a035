"""Messages that cross process boundaries: a chunk of transitions, a sampled batch.

Both are plain dataclasses of numpy arrays, so Ray moves them through its object store
with zero-copy reads and they need no Ray to build in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZERO_FRAME = -1
"""Frame number meaning "an all-zero frame": the padding of a stack at an episode start."""


@dataclass
class TransitionChunk:
    """Transitions from one actor since its last push, with each new frame stored once.

    Frames are numbered per *stream* (one stream per actor incarnation) in the order the
    actor saw them; ``frames[j]`` is frame number ``first_frame + j``. A transition names
    the four frames of its observation and of its bootstrap observation by number:
    numbers below ``first_frame`` refer to the last ``tail`` frames of the stream's
    previous chunk, and ``ZERO_FRAME`` to padding. The replay shard turns numbers into
    storage slots, so a stack is never stored, and a frame never twice.
    """

    stream: int
    first_frame: int
    frames: np.ndarray  # (F, 84, 84) uint8
    tail: int  # how many trailing frames the stream's next chunk may refer to
    obs: np.ndarray  # (T, 4) int64 frame numbers
    next_obs: np.ndarray  # (T, 4) int64 frame numbers
    actions: np.ndarray  # (T,) uint8
    returns: np.ndarray  # (T,) float32, clipped n-step return
    discounts: np.ndarray  # (T,) float32, gamma**k, 0 after a terminal
    priorities: np.ndarray  # (T,) float32, |TD error| from the actor's net

    def __len__(self) -> int:
        return len(self.actions)


@dataclass
class SampledBatch:
    """A minibatch ready to train on, plus what is needed to send priorities back."""

    obs: np.ndarray  # (B, 4, 84, 84) uint8
    actions: np.ndarray  # (B,) int64
    returns: np.ndarray  # (B,) float32
    discounts: np.ndarray  # (B,) float32
    next_obs: np.ndarray  # (B, 4, 84, 84) uint8
    weights: np.ndarray  # (B,) float32 importance weights, max 1
    keys: np.ndarray  # (B,) int64 replay keys, for priority updates
    probs: np.ndarray  # (B,) float64 sampling probability within the shard
    shard_size: int  # items in the shard when sampled
    shard_total: float  # the shard's total priority mass when sampled

    def __len__(self) -> int:
        return len(self.actions)
