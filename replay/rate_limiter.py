"""The replay ratio: sampled transitions per inserted one, held by slowing whichever side leads.

Free-running, the ratio of learning to collecting is whatever the machine's speeds give:
on a machine whose emulator is twice as fast, each transition is replayed half as often
and the learning curve per frame changes. ``--samples-per-insert X`` fixes it, in the
manner of Reverb's ``SampleToInsertRatio`` (Cassirer et al. 2021, ``reverb/cc/rate_limiter.cc``).

The rule. With ``I`` transitions inserted and ``S`` sampled since learning began, the
learner is behind by

    D = X * I - S        (sampled transitions owed),

and with the band half-width ``e`` (``--samples-per-insert-tolerance``, Reverb's
``error_buffer``) a sample of ``n`` may proceed while ``D - n >= -e`` and an insert of
``n`` while ``D + X * n <= e``. Whoever would leave the band waits: the actors' pushes
are answered "not yet" and kept, or the learner sends no sample request. Nothing is
ever dropped. Reverb counts from the table's first insert and centres the band on
``X * min_size_to_sample``, so the inserts that filled the table to its minimum are owed
no samples; counting from the moment learning begins is the same rule (here the
minimum is ``--replay-min-size``), and it stays right when learning begins at another
size: a learner restarted over a full replay, or one resumed with a saved replay.

No deadlock. Both sides wait only when ``D < -e + B`` (a batch of ``B`` would go below
the band) and ``D > e - X * C`` (a push of ``C`` would go above it). Both hold at once
only if ``2e < X * C + B``, so a band of at least ``(X * C + B) / 2`` on each side, with
``C`` the largest push (:func:`largest_push`), lets one side proceed in every state;
Reverb's own check, ``2e >= 2 max(1, X)``, is this one for pushes and batches of one.
``validate`` refuses a smaller band. The default (0, auto) is wider: room for every push
an actor may have in flight and every batch the learner prefetches
(:func:`auto_error_buffer`), so that in equilibrium neither pipeline drains.

Where it is held: the learner's sampler is the one authority, over all shards. It counts
its own samples exactly and the inserts every shard reports; it gates its sample
requests itself, and tells each shard how many more transitions it may take
(:meth:`SampleToInsertRatio.shard_headroom`). A count per shard would not do: the learner
picks a shard in proportion to its priority mass, so each shard's own ratio wanders, and
holding each at ``X`` would make the shard's insert rate, not its mass, decide how often
it is sampled; it could also leave the learner waiting on a shard no actor feeds while
actors wait on another. Views are stale by one round trip, always on the safe side for
the learner (inserts it has not heard of only make it wait longer), so ``D >= -e`` holds
exactly. Each of ``K`` shards gets an equal share of the insert headroom, but at least
one push: ``D`` may then exceed ``e`` by at most ``(K - 1)`` pushes (``X * (K - 1) * C``;
exact with one shard), and one side can always proceed once the learner has heard from
every shard, since it keeps asking while it waits.

Before learning begins no shard has a limit: actors fill the replay to its minimum
freely. While no learner runs (it died and the driver restarts it from a checkpoint) the
shards keep the last limit, so the actors wait for the new learner rather than fill the
replay with transitions nobody learns from; the new one counts afresh from its start. A
restarted shard starts with no limit until the learner's next word, 20 ms later.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_HELD_STREAMS = 4096  # streams with a refused push remembered; the oldest is forgotten


def largest_push(push_period: int, n_step: int, envs_per_lane: int) -> int:
    """The most transitions one push carries: ``(push_period + n_step) * envs_per_lane``.

    A lane pushes every ``push_period`` of its steps; each env opens at most one
    transition per step and has at most ``n_step`` still open from the previous push
    (:class:`apex_dqn.actors.nstep.NStepAccumulator`), so a push holds at most that many
    per env.
    """
    return (push_period + n_step) * envs_per_lane


def least_error_buffer(samples_per_insert: float, push: int, batch: int) -> float:
    """The narrowest band half-width that cannot stop both sides: ``(X * C + B) / 2``."""
    return (samples_per_insert * push + batch) / 2


def config_push(cfg: Any) -> int:
    """:func:`largest_push` for a config's push period, n and envs per lane."""
    return largest_push(cfg.push_period, cfg.n_step, cfg.envs_per_actor // cfg.actor_lanes)


def auto_error_buffer(cfg: Any) -> float:
    """The band half-width ``--samples-per-insert-tolerance 0`` gives, in sampled
    transitions: ``X * C * max_pushes_in_flight + B * prefetch_batches``.

    Either side may then have its whole pipeline in flight (an actor's pushes
    unanswered, the learner's sample requests outstanding) without the other waiting,
    while the ratio over any minute stays within a few batches of ``X``; it is always
    at least :func:`least_error_buffer`.
    """
    spi, push = cfg.samples_per_insert, config_push(cfg)
    wide = spi * push * cfg.max_pushes_in_flight + cfg.batch_size * cfg.prefetch_batches
    return max(wide, least_error_buffer(spi, push, cfg.batch_size))


@dataclass(frozen=True)
class SampleToInsertRatio:
    """Reverb's rule over counts since learning began (module docstring): may a sample
    or an insert of ``n`` proceed now?

    ``inserts`` and ``samples`` are transitions, counted from the moment learning began.
    """

    samples_per_insert: float  # X: sampled transitions per inserted one
    error_buffer: float  # e: how far D may stray either side, in sampled transitions
    push: int  # C: the most transitions one insert may carry
    batch: int  # B: the transitions one sample request takes

    def __post_init__(self) -> None:
        if not self.samples_per_insert > 0:
            raise ValueError(f"samples_per_insert must be > 0, got {self.samples_per_insert}")
        least = least_error_buffer(self.samples_per_insert, self.push, self.batch)
        if self.error_buffer < least:
            raise ValueError(
                f"error_buffer {self.error_buffer:g} is below {least:g}: a push of "
                f"{self.push} and a batch of {self.batch} could both wait forever"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> SampleToInsertRatio | None:
        """The run's limiter; None when ``--samples-per-insert`` is 0 (free-running)."""
        if cfg.samples_per_insert <= 0:
            return None
        buffer = cfg.samples_per_insert_tolerance or auto_error_buffer(cfg)
        return cls(cfg.samples_per_insert, buffer, config_push(cfg), cfg.batch_size)

    def owed(self, inserts: int, samples: int) -> float:
        """``D = X * inserts - samples``: how far the learner is behind (negative: ahead)."""
        return self.samples_per_insert * inserts - samples

    def can_sample(self, inserts: int, samples: int, n: int) -> bool:
        """Whether a sample of ``n`` keeps ``D`` within the band: ``D - n >= -e``."""
        return self.owed(inserts, samples) - n >= -self.error_buffer

    def can_insert(self, inserts: int, samples: int, n: int) -> bool:
        """Whether an insert of ``n`` keeps ``D`` within the band: ``D + X n <= e``."""
        return self.owed(inserts, samples) + self.samples_per_insert * n <= self.error_buffer

    def insert_headroom(self, inserts: int, samples: int) -> int:
        """The most transitions that may still be inserted: the largest ``n`` with
        ``can_insert(inserts, samples, n)``, or 0 when none may."""
        n = math.floor((self.error_buffer + samples) / self.samples_per_insert) - inserts
        while n > 0 and not self.can_insert(inserts, samples, n):  # float rounding
            n -= 1
        while self.can_insert(inserts, samples, n + 1):
            n += 1
        return max(n, 0)

    def shard_headroom(self, inserts: int, samples: int, shards: int) -> int:
        """What each of ``shards`` shards may take until it hears again: an equal share
        of :meth:`insert_headroom`, but one whole push when the headroom holds one.

        The floor keeps every shard able to take a push whenever the learner waits (the
        band then leaves room for one, module docstring); the shares together exceed
        the headroom by at most ``shards - 1`` pushes.
        """
        room = self.insert_headroom(inserts, samples)
        return max(room // max(shards, 1), min(room, self.push))

    def describe(self) -> str:
        """One line for the console at start."""
        return (
            f"replay ratio: {self.samples_per_insert:g} sampled per inserted transition, "
            f"+-{self.error_buffer:,.0f} samples (beyond, the actors or the learner wait)"
        )


def describe(cfg: Any) -> str:
    """The limiter setting, one line: what the driver prints at start."""
    ratio = SampleToInsertRatio.from_config(cfg)
    if ratio is None:
        return "replay ratio: free-running (--samples-per-insert 0)"
    return ratio.describe()


class InsertGate:
    """A shard's side of the limiter: takes a push only while the learner's limit allows.

    ``limit`` is the shard's own ``added`` count up to which it may take transitions,
    set by the learner (:meth:`set_limit`); None, until the learner first sets it (before
    learning begins), lets every push in. A refused push is kept by its actor and
    offered again, with the stream's later pushes behind it. A chunk names frames of the
    stream's previous one, so they must be stored in their order: once a push of a
    stream has been refused, the gate remembers the frame the stream's next chunk must
    start at (chunks of a stream follow each other frame for frame), and takes no other
    chunk of that stream, whatever the limit. A later push that reached the shard before
    the refused one was offered again is refused in turn and offered again after it.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self.refused = 0  # pushes answered "not yet"
        self._next: OrderedDict[int, int] = OrderedDict()  # stream -> its next chunk's frame

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit

    def admit(self, stream: int, first_frame: int, frames: int, n: int, added: int) -> bool:
        """Whether the chunk of ``n`` transitions and ``frames`` frames of ``stream``,
        starting at frame ``first_frame``, may be stored now, the shard having taken
        ``added`` so far."""
        expected = self._next.get(stream)
        in_order = expected is None or expected == first_frame
        if not in_order or (self.limit is not None and added + n > self.limit):
            if expected is None:  # the stream's first refusal: its order counts from here
                self._next[stream] = first_frame
                while len(self._next) > MAX_HELD_STREAMS:  # streams of actors gone away
                    self._next.popitem(last=False)
            self.refused += 1
            return False
        if expected is not None:
            self._next[stream] = first_frame + frames
            self._next.move_to_end(stream)
        return True
