"""Messages that cross process boundaries: a chunk of transitions, a sampled batch
(stacked, or compact: its distinct frames once).

They are plain dataclasses of numpy arrays, so Ray moves them through its object store
with zero-copy reads and they need no Ray to build in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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


@dataclass(kw_only=True)
class BatchMeta:
    """What every sampled batch carries besides its observations: the transitions' other
    fields, and what the learner needs for importance weights and priority updates."""

    actions: np.ndarray  # (B,) int64
    returns: np.ndarray  # (B,) float32
    discounts: np.ndarray  # (B,) float32
    weights: np.ndarray  # (B,) float32 importance weights, max 1
    keys: np.ndarray  # (B,) int64 replay keys, for priority updates
    probs: np.ndarray  # (B,) float64 sampling probability within the shard
    shard_size: int  # items in the shard when sampled
    shard_total: float  # the shard's total priority mass when sampled
    shard_min: float = float("inf")  # its least live priority then; inf: not reported

    def __len__(self) -> int:
        return len(self.actions)

    def meta(self) -> dict:
        """The :class:`BatchMeta` fields, by name (to build another kind of batch)."""
        return {f.name: getattr(self, f.name) for f in fields(BatchMeta)}


@dataclass(kw_only=True)
class SampledBatch(BatchMeta):
    """A minibatch ready to train on, plus what is needed to send priorities back."""

    obs: np.ndarray  # (B, 4, 84, 84) uint8
    next_obs: np.ndarray  # (B, 4, 84, 84) uint8


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


# ---------------------------------------------------------------------- compact batches
WIRE_FORMATS = ("raw", "frames", "zstd")
"""How a shard sends a batch: stacked (``SampledBatch``), or its distinct frames once
(``CompactBatch``), as they are or compressed with zstd."""

ZSTD_LEVEL = 2
"""zstd level of a compact batch. On the distinct frames of batches of 512 from a shard of
Space Invaders frames (``wire_zstd_by_level`` in ``benchmarks/replay.py``), level 1 gave
~840 B per transition for ~10.6 ms of CPU, level 2 ~650 B for ~9.4 ms and level 3 ~560 B
for ~11.9 ms: level 2 is the fastest of the three, and the shard serves one call at a
time, so its encoding time bounds the batches it can serve."""


def compress_frames(frames: np.ndarray, level: int = ZSTD_LEVEL) -> np.ndarray:
    """``frames`` (F, 84, 84) uint8 as one zstd frame, a (C,) uint8 array.

    One frame for all of them, not one each: the frames of a transition's two stacks are
    up to seven consecutive screens of one episode, nearly alike, and only a window that
    spans several of them finds that (on Space Invaders ~650 B per transition, against
    ~7,200 B when every 84x84 frame is compressed alone).
    """
    import zstandard

    packed = zstandard.ZstdCompressor(level=level).compress(np.ascontiguousarray(frames))
    return np.frombuffer(packed, dtype=np.uint8)


@dataclass(kw_only=True)
class CompactBatch(BatchMeta):
    """A sampled batch as it crosses the network: the batch's distinct frames once, its
    stacks as indices into them.

    ``obs[i, j] = frames[obs_index[i, j]]`` and ``next_obs[i, j] = frames[next_index[i, j]]``
    rebuild the stacks of a ``SampledBatch`` bit for bit (:meth:`expand`; on a GPU,
    ``learner.pipeline.expand_on_device``). A stacked batch sends 8 frames per transition.
    Here a stack (frames t-3..t) and its n-step bootstrap stack (t+n-3..t+n) share 4 - n
    frames, so 7 are distinct at n = 3; the zero frame of episode starts goes once for the
    whole batch, and transitions close in time share frames too: F <= 8 B. With ``codec="zstd"``
    ``frames`` holds them compressed (:func:`compress_frames`), which on Atari screens
    takes them from ~7 KB to ~100 B each.
    """

    frames: np.ndarray  # (F, 84, 84) uint8 distinct frames; codec "zstd": (C,) uint8 of them
    codec: str  # "none" or "zstd"
    num_frames: int  # F
    obs_index: np.ndarray  # (B, 4) int32 rows of the distinct frames
    next_index: np.ndarray  # (B, 4) int32

    @property
    def wire(self) -> str:
        """Its format among :data:`WIRE_FORMATS`."""
        return "zstd" if self.codec == "zstd" else "frames"

    def distinct_frames(self) -> np.ndarray:
        """The (F, 84, 84) uint8 distinct frames, decompressed if they came compressed."""
        from apex_dqn.common.envs import FRAME_SHAPE

        if self.codec == "none":
            return self.frames
        if self.codec != "zstd":
            raise ValueError(f"unknown codec {self.codec!r} of a compact batch")
        import zstandard

        size = self.num_frames * FRAME_SHAPE[0] * FRAME_SHAPE[1]
        raw = zstandard.ZstdDecompressor().decompress(self.frames, max_output_size=size)
        if len(raw) != size:
            raise ValueError(f"a compact batch decompressed to {len(raw)} bytes, not {size}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.num_frames, *FRAME_SHAPE)

    def expand(self) -> SampledBatch:
        """The stacked batch: one gather, ``np.take``, into one contiguous (2, B, 4, 84, 84)
        array whose halves are obs and next_obs (the layout ``ReplayShard`` samples into)."""
        frames = self.distinct_frames()
        index = np.stack([self.obs_index, self.next_index])  # (2, B, 4)
        stacks = np.take(frames, index.ravel(), axis=0).reshape(*index.shape, *frames.shape[1:])
        return SampledBatch(obs=stacks[0], next_obs=stacks[1], **self.meta())
