"""The learner's input pipeline: sample requests in flight, batches ready on the device.

``LocalSampler`` draws from in-process ``ReplayShard`` objects (tests, benchmarks, a GPU
machine without Ray); ``RaySampler`` keeps ``prefetch`` sample requests in flight across
shard actors. Both pick a shard with probability proportional to its total priority
mass, so a batch drawn from shard s has items with marginal probability

    P(i) = P(s) * p_i / total_s = p_i / total          when P(s) = total_s / total,

the distribution of one unsharded replay. A whole batch comes from one shard (items of a
batch are correlated by shard, not biased). ``P(s)`` uses the shard totals last seen, so
the importance weights ``(N * P(s) * p_i / total_s) ** -beta`` are computed with the
P(s) actually used to choose the shard; N is the sum of the shard sizes last seen.

The weights are normalised as in one unsharded replay: by the largest weight of the whole
replay, that of its least-priority item, ``(N * p_min / total) ** -beta`` with p_min the
least of the shards' least live priorities (last seen; the batch's own shard reports its
own with the batch). So

    w_i = (P(i) * total / p_min) ** -beta,

one constant for every batch whatever shard it came from. Normalising each batch by its
own maximum instead would cancel P(s): a batch of a high-mass shard would be weighted as
if its shard were the whole replay, i.e. more than one unsharded replay weights it.

A shard sends a batch stacked (``SampledBatch``) or compact (``CompactBatch``: its
distinct frames once, perhaps compressed, and each stack as rows of them), in the format
the run's ``--replay-wire`` gives for a learner on this node (``replay.worker.wire_for``;
the sampler tells each shard its node). ``to_torch`` takes both: a compact batch is
expanded with one gather, on the host with numpy, or on a GPU after one copy of its
distinct frames (:func:`expand_on_device`).

``Prefetcher`` runs the sampler on a background thread and turns batches into device
tensors (pinned memory and non-blocking copies on a side CUDA stream) into a small
bounded queue, so the train step finds its next batch ready; ``hand_over`` makes a
batch safe to read on the train step's stream.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from apex_dqn.common.inflight import InFlight
from apex_dqn.common.messages import CompactBatch, SampledBatch
from apex_dqn.learner.learning import TorchBatch
from apex_dqn.replay.rate_limiter import SampleToInsertRatio
from apex_dqn.replay.shard import ReplayShard, importance_weights


@dataclass
class Drawn:
    """A batch, where it came from, and its importance weights over all shards."""

    shard: int
    batch: SampledBatch | CompactBatch
    weights: np.ndarray


class Sampler(Protocol):
    def draw(self, beta: float) -> Drawn | None: ...
    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None: ...
    def replay_size(self) -> int: ...


def _choose(totals: np.ndarray, rng: np.random.Generator) -> tuple[int, float]:
    """Pick a shard in proportion to its priority mass; returns (shard, probability)."""
    p = totals / totals.sum()
    s = int(rng.choice(len(p), p=p))
    return s, float(p[s])


def _least_priority(batch: SampledBatch | CompactBatch) -> float:
    """The shard's least live priority when it drew ``batch``: the one it reported, or
    the least among the batch's own items if that is lower (or none was reported), since
    the shard's minimum is at most the priority of any item it holds."""
    return min(batch.shard_min, float((batch.probs * batch.shard_total).min()))


def _global_weights(
    batch: SampledBatch | CompactBatch, shard_prob: float, mass: float, min_priority: float,
    size: int, beta: float,
) -> np.ndarray:  # fmt: skip
    """Weights of ``batch`` over all shards: ``P(i) = shard_prob * probs_i``, normalised
    by the replay's largest weight, that of ``P_min = min_priority / mass``; ``mass`` is
    the total of the shard masses ``shard_prob`` was computed from."""
    return importance_weights(
        batch.probs * shard_prob, max(size, batch.shard_size), beta, min_priority / mass
    )


class LocalSampler:
    """Samples in-process shards synchronously, batches in ``wire`` format.

    With a ``ratio`` (``--samples-per-insert``) ``draw`` returns None while a batch would
    take the learner ahead of the ratio, and :meth:`may_insert` says whether a push may
    go in; inserts are the shards' own ``added`` counts, exact here, from the first draw
    (when learning begins) on.
    """

    def __init__(
        self, shards: list[ReplayShard], batch_size: int, seed: int = 0, wire: str = "raw",
        ratio: SampleToInsertRatio | None = None,
    ):  # fmt: skip
        self.shards, self.batch_size, self.wire = shards, batch_size, wire
        self.rng = np.random.default_rng(seed)
        self.ratio = ratio
        self.sampled = 0  # transitions drawn since learning began
        self._base: int | None = None  # the shards' inserts when learning began

    def replay_size(self) -> int:
        return sum(len(s) for s in self.shards)

    def inserted(self) -> int:
        """Transitions the shards took since learning began (all of them before)."""
        return sum(s.added for s in self.shards) - (self._base or 0)

    def may_insert(self, n: int) -> bool:
        """Whether a push of ``n`` transitions keeps the replay ratio; always before
        learning begins, and with no ratio."""
        if self.ratio is None or self._base is None:
            return True
        return self.ratio.can_insert(self.inserted(), self.sampled, n)

    def draw(self, beta: float) -> Drawn | None:
        totals = np.array([s.total_priority for s in self.shards])
        mass = totals.sum()
        if mass <= 0:
            return None
        if self.ratio is not None:
            if self._base is None:
                self._base = sum(s.added for s in self.shards)
            if not self.ratio.can_sample(self.inserted(), self.sampled, self.batch_size):
                return None
        s, prob = _choose(totals, self.rng)
        batch = self.shards[s].sample(self.batch_size, beta, self.wire)
        self.sampled += self.batch_size
        least = min(sh.min_priority for sh, t in zip(self.shards, totals, strict=True) if t > 0)
        weights = _global_weights(batch, prob, mass, least, self.replay_size(), beta)
        return Drawn(s, batch, weights)

    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.shards[shard].update_priorities(keys, priorities)


@dataclass(frozen=True)
class _Request:
    """A sample request in flight: its shard, the probability it was chosen with, and
    the total mass that probability was a share of."""

    shard: int
    prob: float
    mass: float


class RaySampler:
    """Keeps ``prefetch`` sample requests in flight over shard actors; never unbounded.

    Shards come and go: Ray restarts one that died, empty. A request to it fails, so its
    mass is set to 0 and it is not chosen, and the others serve every batch meanwhile;
    its priority updates are dropped while it is down (their items are gone, and their
    keys would name the restarted shard's new items). Every ``refresh_s`` seconds each
    shard is asked for its size and mass without waiting for the answer, so a restarted
    shard is sampled again once it holds data. Requests, stats calls and priority updates
    in flight are each bounded.

    Per shard it keeps the total mass, the size and the least live priority last seen
    (from its stats, and from every batch it serves); a shard marked down counts for
    none of them.

    Every sample request names this process's node, so each shard answers in the wire
    format the run set for a reader there (stacked on the shard's own node, compressed
    from another: ``replay.worker.wire_for``); ``draw`` returns either kind of batch.

    The replay ratio (``ratio``, ``--samples-per-insert``): from its first draw, when
    learning begins, the sampler counts the transitions it requests (``sampled``) and
    those the shards report inserting (``inserted``, summed over each shard's
    incarnations), sends a request only while :meth:`SampleToInsertRatio.can_sample`
    allows it, and every ``pace_s`` seconds tells each shard how many more transitions
    it may take (``HostedShard.pace``, at most one call in flight per shard), whose
    answer brings the shard's count back. It keeps pacing while it waits, so the two
    sides' views of the counts meet within a round trip and one of them can go on.
    """

    def __init__(self, shards: list[Any], batch_size: int, prefetch: int, seed: int = 0,
                 max_updates_in_flight: int = 64, refresh_s: float = 5.0,
                 ratio: SampleToInsertRatio | None = None, pace_s: float = 0.02):  # fmt: skip
        import ray

        self._ray = ray
        self.node = ray.get_runtime_context().get_node_id()  # where batches are read
        self.shards, self.batch_size, self.prefetch = shards, batch_size, prefetch
        self.refresh_s = refresh_s
        self.rng = np.random.default_rng(seed)
        self.totals = np.zeros(len(shards))
        self.sizes = np.zeros(len(shards), dtype=np.int64)
        self.mins = np.full(len(shards), np.inf)  # least live priority; inf: none known
        self.failures = 0  # sample requests that failed: a shard died or was empty
        self._requests: InFlight[_Request] = InFlight()  # at most ``prefetch``
        self._stats: InFlight[int] = InFlight()  # tagged by shard, at most one each
        self._asked = float("-inf")
        self._updates: InFlight[int] = InFlight()  # shard of each update in flight
        self._max_updates = max_updates_in_flight
        # The replay ratio's counts (kept without a ratio too: they cost nothing).
        self.ratio, self.pace_s = ratio, pace_s
        self._seen: list[tuple[int, int] | None] = [None] * len(shards)  # (incarnation, added)
        self._inserted = 0  # transitions the shards reported, over all their incarnations
        self._base: int | None = None  # ``_inserted`` when learning began
        self.sampled = 0  # transitions requested since learning began
        self.refused = 0  # pushes the shards answered "not yet", over their incarnations
        self._refused: list[tuple[int, int] | None] = [None] * len(shards)
        self._limited_s = 0.0  # seconds with no request out: the ratio held it back
        self._limited_since: float | None = None  # since when, while it lasts
        self._paces: InFlight[int] = InFlight()  # tagged by shard, at most one each
        self._paced = float("-inf")
        self._metrics_at = (0.0, time.monotonic())  # (limited seconds, when) last reported
        self.refresh()

    # ------------------------------------------------------------------ shard stats
    def _ask_stats(self) -> None:
        asking = set(self._stats)
        for s, shard in enumerate(self.shards):
            if s not in asking:
                self._stats.add(shard.stats.remote(), s)
        self._asked = time.monotonic()

    def _mark_down(self, s: int) -> None:
        self.totals[s], self.sizes[s], self.mins[s] = 0.0, 0, np.inf

    def _read_stats(self, answered: list[tuple[int, Any]]) -> None:
        for s, ref in answered:
            try:
                stats = self._ray.get(ref)
            except self._ray.exceptions.RayError:  # down or restarting: not sampled
                self._mark_down(s)
                continue
            self.totals[s], self.sizes[s] = stats.total_priority, stats.size
            self.mins[s] = stats.min_priority
            self._count(s, stats.incarnation, stats.added)

    def _count(self, s: int, incarnation: int, added: int) -> None:
        """Take shard ``s``'s insert count: a new incarnation counts from 0, and an
        answer older than one already taken (stats and pace calls cross) changes nothing."""
        seen = self._seen[s]
        if seen is None or seen[0] != incarnation:
            self._inserted += added
        elif added > seen[1]:
            self._inserted += added - seen[1]
        else:
            return
        self._seen[s] = (incarnation, added)

    def _poll_stats(self) -> None:
        """Take the stats answers that are in, and ask again when due. Never waits."""
        if time.monotonic() - self._asked >= self.refresh_s:
            self._ask_stats()
        self._read_stats(self._stats.take(timeout=0))

    def refresh(self, timeout: float = 30.0) -> None:
        """Ask every shard for its size, mass and least priority; wait up to ``timeout`` s
        for the answers.

        A shard that does not answer in time keeps its last known numbers; its answer is
        taken later by ``draw``.
        """
        self._ask_stats()
        self._read_stats(self._stats.take(timeout=timeout))

    def replay_size(self) -> int:
        return int(self.sizes.sum())

    def inserted(self) -> int:
        """Transitions the shards reported inserting since learning began (all of them
        before it began)."""
        return self._inserted - (self._base or 0)

    def in_flight(self) -> dict[str, int]:
        """Calls awaiting an answer, per kind: each is bounded."""
        return {
            "sample_requests": len(self._requests),
            "stats_requests": len(self._stats),
            "priority_updates": len(self._updates),
            "pace_calls": len(self._paces),
        }

    # ------------------------------------------------------------------ replay ratio
    def pace(self) -> None:
        """Tell each shard how many more transitions it may take, when due; take the
        answers that are in (their counts). Never waits."""
        if self.ratio is None or self._base is None:
            return
        self._read_paces(self._paces.take(timeout=0))
        now = time.monotonic()
        if now - self._paced < self.pace_s:
            return
        self._paced = now
        share = self.ratio.shard_headroom(self.inserted(), self.sampled, len(self.shards))
        asking = set(self._paces)
        for s, shard in enumerate(self.shards):
            if s not in asking:
                self._paces.add(shard.pace.remote(self._seen[s], share), s)

    def _read_paces(self, answered: list[tuple[int, Any]]) -> None:
        for s, ref in answered:
            try:
                incarnation, added, refused = self._ray.get(ref)
            except self._ray.exceptions.RayError:  # down or restarting: its stats tell
                continue
            self._count(s, incarnation, added)
            last = self._refused[s]
            same = last is not None and last[0] == incarnation
            self.refused += refused - last[1] if same else refused
            self._refused[s] = (incarnation, refused)

    def _begin(self) -> None:
        """Learning begins: counts of the replay ratio start here, from fresh counts."""
        if self.ratio is not None and self._base is None:
            self.refresh()
            self._base = self._inserted

    def owed(self) -> float:
        """``X * inserted - sampled``: sampled transitions the learner is behind the ratio
        (negative: ahead); 0 with no ratio or before learning began."""
        if self.ratio is None or self._base is None:
            return 0.0
        return self.ratio.owed(self.inserted(), self.sampled)

    def ratio_metrics(self) -> dict[str, float]:
        """The replay ratio's state, as TensorBoard scalars (none without a ratio):
        sampled transitions owed (kept within +-tolerance), pushes the shards refused,
        and the share of the time since the last call that the ratio held the learner
        back (no sample request out)."""
        if self.ratio is None:
            return {}
        now, limited = time.monotonic(), self.limited_s
        last, then = self._metrics_at
        self._metrics_at = (limited, now)
        return {
            "replay/samples_owed": self.owed(),
            "replay/refused_pushes": float(self.refused),
            "learner/ratio_wait_fraction": min(1.0, (limited - last) / max(now - then, 1e-9)),
        }

    @property
    def limited_s(self) -> float:
        """Seconds the learner had no sample request out because the ratio held it back."""
        since = self._limited_since
        return self._limited_s + (time.monotonic() - since if since is not None else 0.0)

    def _may_sample(self) -> bool:
        if self.ratio is None:
            return True
        allowed = self.ratio.can_sample(self.inserted(), self.sampled, self.batch_size)
        now = time.monotonic()
        if allowed and self._limited_since is not None:
            self._limited_s += now - self._limited_since
            self._limited_since = None
        elif not allowed and not self._requests and self._limited_since is None:
            self._limited_since = now
        return allowed

    # --------------------------------------------------------------------- sampling
    def _fill(self, beta: float) -> None:
        while len(self._requests) < self.prefetch and (mass := self.totals.sum()) > 0:
            if not self._may_sample():
                return
            s, prob = _choose(self.totals, self.rng)
            ref = self.shards[s].sample.remote(self.batch_size, beta, reader=self.node)
            self._requests.add(ref, _Request(s, prob, float(mass)))
            self.sampled += self.batch_size

    def _least_priority(self) -> float:
        """The least live priority over the shards not marked down, as last seen."""
        return float(self.mins[self.totals > 0].min(initial=np.inf))

    def draw(self, beta: float, timeout: float = 1.0) -> Drawn | None:
        self._begin()
        self._poll_stats()
        self.pace()
        self._fill(beta)
        if not self._requests and self.ratio is not None:
            # Held back by the ratio: wait a little for the shards' new counts.
            self._read_paces(self._paces.take(timeout=min(timeout, 0.05), num=1))
            self._fill(beta)
        answered = self._requests.take(timeout=timeout, num=1)
        if not answered:
            return None
        request, ref = answered[0]
        s = request.shard
        try:
            batch: SampledBatch | CompactBatch = self._ray.get(ref)
        except self._ray.exceptions.RayError:
            # Shard down, restarting or empty: skip it until its stats show data again.
            self._mark_down(s)
            self.failures += 1
            self.sampled -= self.batch_size  # nothing was sampled
            return None
        self.totals[s], self.sizes[s] = batch.shard_total, batch.shard_size
        self.mins[s] = _least_priority(batch)
        self._fill(beta)
        weights = _global_weights(
            batch, request.prob, request.mass, self._least_priority(), self.replay_size(), beta
        )
        return Drawn(s, batch, weights)

    def update_priorities(self, shard: int, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Send and forget; only waits if ``max_updates_in_flight`` are unanswered.

        Dropped while the shard is marked down: its items are lost with it.
        """
        if self.totals[shard] <= 0:
            return
        self._updates.add(self.shards[shard].update_priorities.remote(keys, priorities), shard)
        if len(self._updates) >= self._max_updates:
            self._updates.take(timeout=None, num=len(self._updates) // 2)


def expand_on_device(
    frames: torch.Tensor, obs_index: torch.Tensor, next_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A compact batch's stacks, rebuilt where ``frames`` (F, 84, 84) are: obs[i, j] =
    frames[obs_index[i, j]], next_obs[i, j] = frames[next_index[i, j]].

    One ``index_select`` for both, into one (2, B, 4, 84, 84) tensor whose halves they
    are: on a GPU the host copies only the F distinct frames (F <= 8 B, ~7 B at n = 3)
    and the gather runs on the device, where it is cheap.
    """
    index = torch.stack([obs_index, next_index])  # (2, B, 4)
    stacks = frames.index_select(0, index.reshape(-1)).view(*index.shape, *frames.shape[1:])
    return stacks[0], stacks[1]


def to_torch(drawn: Drawn, device: torch.device) -> TorchBatch:
    """Device tensors for a batch; pinned, non-blocking copies when the device is CUDA.

    A compact batch is expanded on the host with numpy (``CompactBatch.expand``) for the
    CPU, and on the device (:func:`expand_on_device`) for CUDA, after one copy of its
    distinct frames.
    """
    b = drawn.batch
    cuda = device.type == "cuda"

    def t(array: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        if cuda:
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor

    if isinstance(b, CompactBatch) and cuda:
        frames = t(b.distinct_frames())
        obs, next_obs = expand_on_device(frames, t(b.obs_index), t(b.next_index))
    else:
        if isinstance(b, CompactBatch):
            b = b.expand()
        obs, next_obs = t(b.obs), t(b.next_obs)
    return TorchBatch(
        obs=obs,
        actions=t(b.actions),
        returns=t(b.returns),
        discounts=t(b.discounts),
        next_obs=next_obs,
        weights=t(drawn.weights),
    )


def hand_over(batch: TorchBatch, copied: torch.cuda.Event, consumer: torch.cuda.Stream) -> None:
    """Make ``batch``, copied to the device on a side stream, safe to use on ``consumer``.

    Two orderings are needed. (1) The consumer's kernels must not read the batch before
    its copies have landed: ``consumer`` waits for the event recorded after them. (2) The
    batch's memory must not be reused before the consumer's kernels are done with it. The
    tensors were allocated on the side stream, and PyTorch's caching allocator ties a
    freed block to the stream it was allocated on: as soon as the last reference to a
    tensor goes, which is right after the train step was *queued* (long before the GPU
    ran it), the block is handed to the next allocation on the side stream, the next
    batch's copy, and that copy may run while the train step queued on ``consumer``
    still reads the old data. ``record_stream(consumer)`` tells the allocator the block
    is in use on ``consumer`` too, so it is reused only once the work queued there by
    the time the tensor is freed has finished. (The pinned host buffers need nothing:
    the host allocator keeps each one until the copy that read it is done.)
    """
    consumer.wait_event(copied)
    for field in fields(batch):
        getattr(batch, field.name).record_stream(consumer)


_FAILED = object()  # put in the queue by a failed prefetch thread, to wake get()


class Prefetcher:
    """A background thread that keeps up to ``depth`` device batches ready."""

    def __init__(
        self, sampler: Sampler, device: torch.device, beta_fn: Callable[[], float], depth: int = 2
    ):
        self.sampler, self.device, self.beta_fn = sampler, device, beta_fn
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="prefetcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        try:
            while not self._stop.is_set():
                drawn = self.sampler.draw(self.beta_fn())
                if drawn is None:
                    self._stop.wait(0.05)
                    continue
                if stream is not None:
                    with torch.cuda.stream(stream):
                        tb = to_torch(drawn, self.device)
                    event = torch.cuda.Event()
                    event.record(stream)
                else:
                    tb, event = to_torch(drawn, self.device), None
                while not self._stop.is_set():
                    try:
                        self._queue.put((drawn, tb, event), timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the consumer by get()
            self.error = exc
            # Wake a consumer waiting in get(); a full queue means none is waiting.
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_FAILED)

    def get(self, timeout: float = 1.0) -> tuple[Drawn, TorchBatch] | None:
        """The next ready batch, or None if none came within ``timeout`` seconds.

        Raises ``RuntimeError`` (from the thread's error) once the prefetch thread failed.
        On CUDA the batch is handed over to the calling thread's current stream
        (:func:`hand_over`), the stream the train step will read it on.
        """
        if self.error is None:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return None
            if item is not _FAILED:
                drawn, tb, event = item
                if event is not None:
                    hand_over(tb, event, torch.cuda.current_stream(self.device))
                return drawn, tb
        raise RuntimeError("the batch prefetcher failed") from self.error

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
