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
    shard_min: float = float("inf")  # its least live priority then; inf: not reported

    def __len__(self) -> int:
        return len(self.actions)


# ---------------------------------------------------------------------- control plane
# What workers report to the driver. Small and typed: each field is read by someone.


@dataclass(frozen=True)
class Placement:
    """Where a component runs: its process and Ray node, for logs and to find it."""

    pid: int
    node: str  # Ray node id (hex)
    ip: str
    device: str = "cpu"  # where a learner computes
    epsilons: tuple[float, ...] = ()  # an actor's, one per env: they must survive restarts

    @classmethod
    def here(cls, device: str = "cpu", epsilons: tuple[float, ...] = ()) -> Placement:
        """The calling process's placement (inside a Ray worker)."""
        import os

        import ray

        node = ray.get_runtime_context().get_node_id()
        return cls(os.getpid(), node, ray.util.get_node_ip_address(), device, epsilons)

    def __str__(self) -> str:
        return f"pid {self.pid} node {self.node} ip {self.ip}"


@dataclass
class Episode:
    """One finished episode: unclipped game score, agent steps, and who played it."""

    score: float
    length: int
    epsilon: float
    actor: int
    env: int


@dataclass
class ActorReport:
    """What one actor did since the driver last asked (``ActorWorker.drain``)."""

    index: int
    episodes: list[Episode]  # finished since the last report
    env_steps: int  # agent steps over all its envs, reset steps included
    weights_version: int  # the version it acts with; -1 before the first weights
    pushes_in_flight: int  # pushes not yet answered by its shard
    pushes_failed: int  # pushes lost to a dead or restarting shard since the last report


@dataclass
class ShardStats:
    """A replay shard's gauges and counters (``ReplayShard.stats``)."""

    size: int  # transitions held
    added: int  # transitions stored since it started
    dropped: int  # transitions refused: their frames were unknown (a lost chunk)
    total_priority: float  # sum of p^alpha over the items held
    min_priority: float  # least p^alpha of an item held (+inf when empty)
    frames_used: int  # frame slots in use
    streams: int  # actor streams whose tails it remembers
    nbytes: int  # bytes of all its arrays
    incarnation: int = 0  # new in every process: a change means it restarted, empty
    first_key: int = 0  # the key of its first item in this incarnation
    samples: int = 0  # batches it served in this incarnation


@dataclass
class LearnerStats:
    """The learner's counters, and its train metrics averaged since the last report."""

    updates: int
    updates_since: int  # updates the averages in ``metrics`` are over
    beta: float
    replay_size: int  # transitions in all shards, as last seen by the sampler
    weights_version: int  # the version of the newest published weights
    input_wait_s: float  # seconds the train loop waited for a batch, since it started
    metrics: dict[str, float]  # TensorBoard tag -> mean since the last report
