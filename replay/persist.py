"""Saving a replay shard to a file and restoring it: what ``--save-replay`` writes.

A checkpoint may carry each shard's contents, so that a resumed run learns at once instead
of refilling ``--replay-min-size`` first. The file is a zip archive (stored, not zipped)
of zstd-compressed members (level :data:`STATE_ZSTD_LEVEL`): small ``.npy`` arrays and
one stream of frames. It is written to a temporary name in the target's directory,
flushed and renamed, so a reader sees the old file or the whole new one. It holds only
what the shard cannot rebuild: the frames of the slots in use (not the pool), in slot
order; the free list, in its order (it decides which slots the next chunks get); the
live items' slots, actions, returns, discounts and sum-tree leaves, in key order; the
keys and counters; each stream's tail and its place in the LRU order; and the state of
the random generator. The rest is rebuilt: a slot's reference count is the number of
live items and tails that name it, and every inner node of the sum and min trees is
the sum (minimum) of its two children, a function of the leaves alone, so the trees
rebuilt from the leaves equal the saved ones bit for bit and a restored shard draws the
very batches the saved one would have.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from apex_dqn.common.envs import FRAME_SHAPE, STACK
from apex_dqn.common.files import write_atomically
from apex_dqn.replay.shard import ReplayShard, StreamTail

STATE_FORMAT = 1  # version of the files save() writes
STATE_ZSTD_LEVEL = 1  # of every member of a saved shard: the fastest (README, Resuming)
_STATE_BLOCK = 4096  # frames compressed or decompressed at a time (29 MB)


class ReplayStateError(ValueError):
    """A saved shard file cannot be restored: missing, damaged, or of another shard."""


def save(shard: ReplayShard, path: str | os.PathLike) -> int:
    """Write the shard's contents to ``path``, atomically; returns the file's bytes.

    What is written and why is in the module docstring. Frames go through one zstd
    stream (level :data:`STATE_ZSTD_LEVEL`) in blocks of ``_STATE_BLOCK``, so saving
    needs no copy of the pool: ~29 MB of gathered frames at a time.
    """
    import zstandard

    final = Path(path)
    items = (np.arange(shard.oldest_key, shard.next_key, dtype=np.int64)) % shard.capacity
    free = shard._free[: shard._num_free]
    in_use = np.ones(shard.frame_capacity, dtype=bool)
    in_use[free] = False
    used = np.flatnonzero(in_use)
    tails = list(shard._tails.items())
    arrays: dict[str, np.ndarray] = {
        "format": np.array(STATE_FORMAT, dtype=np.int64),
        "sizes": np.array([shard.capacity, shard.frame_capacity], dtype=np.int64),
        "counters": np.array(
            [shard.oldest_key, shard.next_key, shard.dropped, shard.added, shard.chunks],
            dtype=np.int64,
        ),
        "alpha": np.array(shard.alpha, dtype=np.float64),
        "rng": np.array(json.dumps(shard._rng.bit_generator.state)),
        "extra": np.array(json.dumps(shard._extra_state())),
        "free": free,
        "slots": shard.slots[items],
        "actions": shard.actions[items],
        "returns": shard.returns[items],
        "discounts": shard.discounts[items],
        "priorities": shard.tree.get(items),
        "tail_streams": np.array([s for s, _ in tails], dtype=np.int64),
        "tail_first": np.array([t.first_frame for _, t in tails], dtype=np.int64),
        "tail_chunks": np.array([t.last_chunk for _, t in tails], dtype=np.int64),
        "tail_lengths": np.array([len(t.slots) for _, t in tails], dtype=np.int64),
        "tail_slots": np.concatenate([t.slots for _, t in tails] or [np.zeros(0, np.int32)]),
    }

    def write(f: io.BufferedWriter) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            compressor = zstandard.ZstdCompressor(level=STATE_ZSTD_LEVEL)
            for name, array in arrays.items():
                with (
                    archive.open(name + ".npy.zst", "w", force_zip64=True) as member,
                    compressor.stream_writer(member, closefd=False) as stream,
                ):
                    np.lib.format.write_array(stream, array, allow_pickle=False)
            with (
                archive.open("frames.zst", "w", force_zip64=True) as member,
                compressor.stream_writer(member, closefd=False) as stream,
            ):
                for start in range(0, len(used), _STATE_BLOCK):
                    stream.write(shard.frames[used[start : start + _STATE_BLOCK]].data)

    write_atomically(final, write)
    return final.stat().st_size


def load(shard: ReplayShard, path: str | os.PathLike) -> None:
    """Fill this shard, which must be new (empty), with what ``path`` holds.

    A file that is missing, damaged, of another format or of a shard of another size
    raises :class:`ReplayStateError` in one line and leaves the shard empty: every
    array is read and checked before the shard changes, and frames are decoded into
    slots the empty shard has free (their content is never read while free). Items
    saved under another ``alpha`` get their priorities ``p ** alpha_saved`` raised to
    ``alpha / alpha_saved``, which is ``p ** alpha`` (to rounding).
    """
    import zstandard

    if len(shard) or shard._tails or shard._num_free != shard.frame_capacity:
        raise ValueError("only a new, empty replay shard can load a saved one")
    p = Path(path)
    if not p.is_file():
        raise ReplayStateError(f"replay file {p} does not exist")
    try:
        with zipfile.ZipFile(p) as archive:
            arrays = {
                name[: -len(".npy.zst")]: _read_npy(archive, name)
                for name in archive.namelist()
                if name.endswith(".npy.zst")
            }
            state = _checked_state(shard, arrays, p)
            used = state["used"]
            with archive.open("frames.zst") as member:
                reader = zstandard.ZstdDecompressor().stream_reader(member, closefd=False)
                for start in range(0, len(used), _STATE_BLOCK):
                    slots = used[start : start + _STATE_BLOCK]
                    block = np.empty((len(slots), *FRAME_SHAPE), dtype=np.uint8)
                    _read_exactly(reader, memoryview(block).cast("B"))
                    shard.frames[slots] = block
                if reader.read(1):
                    raise ValueError("more frames than slots in use")
    except ReplayStateError:
        raise
    except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile,
            zstandard.ZstdError) as exc:  # fmt: skip
        raise ReplayStateError(
            f"replay file {p} is damaged: it cannot be read "
            f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})"
        ) from exc
    _commit_state(shard, state)


def _checked_state(shard: ReplayShard, a: dict[str, np.ndarray], p: Path) -> dict:
    """The saved arrays, checked against each other and this shard; raises
    :class:`ReplayStateError` (or ``KeyError``/``ValueError`` for what is missing or
    malformed) before anything of the shard changes."""
    version = int(a["format"])
    if version != STATE_FORMAT:
        raise ReplayStateError(
            f"replay file {p} has format version {version}, expected {STATE_FORMAT}"
        )
    capacity, frame_capacity = (int(x) for x in a["sizes"])
    if (capacity, frame_capacity) != (shard.capacity, shard.frame_capacity):
        raise ReplayStateError(
            f"replay file {p} holds a shard of capacity {capacity:,}, this one has "
            f"{shard.capacity:,} (--replay-capacity / --replay-shards changed)"
        )
    oldest, next_key, dropped, added, chunks = (int(x) for x in a["counters"])
    count = next_key - oldest
    if not 0 <= count <= capacity or min(dropped, added, chunks) < 0:
        raise ValueError(f"keys [{oldest}, {next_key}) for a capacity of {capacity}")
    free = a["free"].astype(np.int64)
    if free.ndim != 1 or np.any((free < 0) | (free >= frame_capacity)):
        raise ValueError("free slots out of range")
    in_use = np.ones(frame_capacity, dtype=bool)
    in_use[free] = False
    if int(in_use.sum()) != frame_capacity - len(free):
        raise ValueError("a slot is free twice")
    slots = a["slots"].astype(np.int64).reshape(count, 2, STACK)
    columns = {k: a[k].reshape(count) for k in ("actions", "returns", "discounts")}
    priorities = a["priorities"].astype(np.float64).reshape(count)
    if not np.all(np.isfinite(priorities) & (priorities > 0)):
        raise ValueError("priorities must be finite and positive")
    lengths = a["tail_lengths"].astype(np.int64)
    tail_slots = a["tail_slots"].astype(np.int64)
    streams, firsts, last = a["tail_streams"], a["tail_first"], a["tail_chunks"]
    if not len(streams) == len(firsts) == len(last) == len(lengths):
        raise ValueError("stream tails of different lengths")
    if lengths.min(initial=0) < 0 or lengths.sum() != len(tail_slots):
        raise ValueError("stream tails do not add up")
    # Reference counts, rebuilt: every slot in use is named by a live item or a tail,
    # and nothing names a free slot.
    named = np.concatenate([slots.ravel(), tail_slots])
    if np.any((named < 0) | (named > frame_capacity)) or np.any(tail_slots == frame_capacity):
        raise ValueError("slots out of range")
    refcount = np.bincount(named, minlength=frame_capacity + 1).astype(np.int32)
    refcount[frame_capacity] = 0
    if not np.array_equal(refcount[:frame_capacity] > 0, in_use):
        raise ValueError("the slots in use are not those the items and tails name")
    refcount[:frame_capacity][~in_use] = -1
    saved_alpha = float(a["alpha"])
    if saved_alpha != shard.alpha:
        priorities = priorities ** (shard.alpha / saved_alpha)
    extra = json.loads(str(a["extra"]))
    if not isinstance(extra, dict):
        raise ValueError("malformed extra state")
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(str(a["rng"]))  # raises on a foreign state
    tails = OrderedDict()
    ends = np.cumsum(lengths)
    for i, stream in enumerate(streams.tolist()):
        tail = tail_slots[ends[i] - lengths[i] : ends[i]].astype(np.int32)
        tails[int(stream)] = StreamTail(int(firsts[i]), tail, int(last[i]))
    return dict(
        keys=(oldest, next_key), counters=(dropped, added, chunks),
        free=free.astype(np.int32), used=np.flatnonzero(in_use), refcount=refcount,
        slots=slots.astype(np.int32), columns=columns,
        priorities=priorities, tails=tails, rng=rng, extra=extra,
    )  # fmt: skip


def _commit_state(shard: ReplayShard, state: dict) -> None:
    """Make the checked ``state`` the shard's. Only the subclass's part can still be
    refused (:class:`ReplayStateError`), and it goes first, before anything changed."""
    shard._load_extra_state(state["extra"])
    shard._rng = state["rng"]
    free = state["free"]
    shard._free[: len(free)] = free
    shard._num_free = len(free)
    shard._refcount[:] = state["refcount"]
    shard.oldest_key, shard.next_key = state["keys"]
    shard.dropped, shard.added, shard.chunks = state["counters"]
    items = np.arange(shard.oldest_key, shard.next_key, dtype=np.int64) % shard.capacity
    shard.slots[items] = state["slots"]
    for name, column in state["columns"].items():
        getattr(shard, name)[items] = column
    leaves = np.zeros(shard.capacity)
    leaves[items] = state["priorities"]
    shard.tree.set_range(0, leaves)
    shard._tails = state["tails"]


def _read_npy(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """The array in member ``name``: an ``.npy`` file, zstd-compressed."""
    import zstandard

    with archive.open(name) as member:
        stream = zstandard.ZstdDecompressor().stream_reader(member, closefd=False)
        array = np.lib.format.read_array(stream, allow_pickle=False)
        if stream.read(1):
            raise ValueError(f"{name} holds more than its array")
        return array


def _read_exactly(reader: io.RawIOBase, out: memoryview) -> None:
    """Fill ``out`` from ``reader``; ``EOFError`` if the stream ends first."""
    done = 0
    while done < len(out):
        n = reader.readinto(out[done:])
        if not n:
            raise EOFError(f"frames end after {done:,} of {len(out):,} bytes")
        done += n
