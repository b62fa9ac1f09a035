"""A shard saved to a file and restored into a new one: the same contents, the same
draws bit for bit, pushes that continue the streams, and bad files refused in one line
with the shard left empty and usable."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

import apex_dqn.replay.shard as shard_module
from apex_dqn.common.envs import FRAME_SHAPE
from apex_dqn.replay.persist import ReplayStateError
from apex_dqn.replay.shard import ReplayShard
from tests.replay.recorder import RecordedStream, check_shard
from tests.replay.test_shard import CASES, check_invariants, run_streams

FRAME_BYTES = int(np.prod(FRAME_SHAPE))


def _streams(case: dict, seed: int) -> list[RecordedStream]:
    return [
        RecordedStream(
            stream=500 + i, num_envs=case["num_envs"], n=case["n"],
            push_period=case["push_period"], seed=seed + 3 * i,
            terminal_on_life_loss=case.get("terminal_on_life_loss", False), **case["env"],
        )
        for i in range(case["streams"])
    ]  # fmt: skip


def _new(case: dict, seed: int = 123) -> ReplayShard:
    return ReplayShard(case["capacity"], 0.6, frame_capacity=case["frame_capacity"], seed=seed)


def _filled(case: dict) -> tuple[ReplayShard, list[RecordedStream], list]:
    """A shard after ``steps`` of the case's streams, with some priorities updated, so
    that leaves differ from the ones insertion wrote and the generator has moved."""
    shard = _new(case, seed=4)
    streams = _streams(case, seed=11)
    emitted, _ = run_streams(shard, streams, case["steps"], check_every=10**9)
    batch = shard.sample(16, 0.4)
    shard.update_priorities(batch.keys, np.linspace(0.1, 3.0, len(batch.keys)))
    return shard, streams, emitted


def _same_batches(a: ReplayShard, b: ReplayShard) -> None:
    """Four draws, stacked and compact: the same keys, weights and frames, bit for bit."""
    for wire in ("raw", "zstd", "raw", "frames"):
        x, y = a.sample(24, 0.5, wire), b.sample(24, 0.5, wire)
        assert np.array_equal(x.keys, y.keys)
        assert np.array_equal(x.weights, y.weights) and np.array_equal(x.probs, y.probs)
        assert np.array_equal(x.actions, y.actions) and np.array_equal(x.returns, y.returns)
        assert np.array_equal(x.discounts, y.discounts)
        if wire == "raw":
            assert np.array_equal(x.obs, y.obs) and np.array_equal(x.next_obs, y.next_obs)
        else:
            assert np.array_equal(x.frames, y.frames)
            assert np.array_equal(x.obs_index, y.obs_index)
            assert np.array_equal(x.next_index, y.next_index)


def _same_state(a: ReplayShard, b: ReplayShard) -> None:
    """Everything that decides what the shard does next is equal."""
    assert (a.oldest_key, a.next_key, a.added, a.dropped, a.chunks) == (
        b.oldest_key, b.next_key, b.added, b.dropped, b.chunks
    )  # fmt: skip
    assert np.array_equal(a.tree._nodes, b.tree._nodes)  # sums, bit for bit
    assert np.array_equal(a.tree._mins, b.tree._mins)
    assert np.array_equal(a._refcount, b._refcount)
    assert np.array_equal(a._free[: a._num_free], b._free[: b._num_free])
    items = np.arange(a.oldest_key, a.next_key) % a.capacity
    for name in ("slots", "actions", "returns", "discounts"):
        assert np.array_equal(getattr(a, name)[items], getattr(b, name)[items]), name
    used = np.flatnonzero(a._refcount[: a.frame_capacity] > 0)
    assert np.array_equal(a.frames[used], b.frames[used])
    assert list(a._tails) == list(b._tails)  # the streams, in their LRU order
    for s, tail in a._tails.items():
        other = b._tails[s]
        assert (tail.first_frame, tail.last_chunk) == (other.first_frame, other.last_chunk)
        assert np.array_equal(tail.slots, other.slots)


@pytest.mark.parametrize("name", ["short-episodes", "lives"])
def test_a_restored_shard_draws_what_the_saved_one_would_have(tmp_path, name):
    case = CASES[name]
    saved, _, emitted = _filled(case)
    path = tmp_path / "shard.npz"
    size = saved.save_state(path)
    assert size == path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npz"]  # no temporary left

    restored = _new(case, seed=999)  # another seed: the generator's state is restored
    restored.load_state(path)
    check_invariants(restored)
    _same_state(saved, restored)
    check_shard(restored, emitted)  # every live item is what the actor saw
    _same_batches(saved, restored)
    _same_state(saved, restored)  # sampling changed neither, alike


@pytest.mark.parametrize("name", ["short-episodes", "n5-push1"])
def test_pushes_after_a_restore_continue_the_streams(tmp_path, name):
    """The streams go on pushing into both shards: the restored one joins each chunk to
    the stream's saved tail (nothing dropped) and stays equal to the saved one."""
    case = CASES[name]
    saved, streams, emitted = _filled(case)
    saved.save_state(tmp_path / "shard.npz")
    restored = _new(case)
    restored.load_state(tmp_path / "shard.npz")
    pushed = 0
    for _ in range(case["steps"] // 2):
        for rec in streams:
            before = len(rec.emitted)
            chunk = rec.step()
            if chunk is None:
                continue
            assert saved.add(chunk) == restored.add(chunk) == len(chunk)
            emitted.extend((chunk.stream, rec, e, s) for e, s in rec.emitted[before:])
            pushed += len(chunk)
    assert pushed > case["capacity"]  # every restored item was evicted by new ones since
    assert restored.dropped == 0
    check_invariants(restored)
    check_shard(restored, emitted)
    _same_state(saved, restored)
    _same_batches(saved, restored)


def test_a_file_holds_only_the_frames_in_use(tmp_path):
    """A shard a third full saves its live frames, not its pool of slots."""
    case = {**CASES["lives"], "capacity": 900, "frame_capacity": None, "steps": 60}
    shard, _, _ = _filled(case)
    assert shard.frames_used < shard.frame_capacity // 2
    path = tmp_path / "shard.npz"
    shard.save_state(path)
    with zipfile.ZipFile(path) as archive, archive.open("frames.zst") as member:
        frames = zstandard.ZstdDecompressor().stream_reader(member).read()
    assert len(frames) == shard.frames_used * FRAME_BYTES


def test_an_empty_shard_round_trips(tmp_path):
    shard = ReplayShard(50, seed=1)
    shard.save_state(tmp_path / "empty.npz")
    restored = ReplayShard(50, seed=2)
    restored.load_state(tmp_path / "empty.npz")
    _same_state(shard, restored)
    assert len(restored) == 0 and restored.frames_used == 0
    assert shard._rng.random() == restored._rng.random()


def test_another_alpha_rescales_the_saved_priorities(tmp_path):
    case = CASES["lives"]
    saved, _, _ = _filled(case)
    saved.save_state(tmp_path / "shard.npz")
    restored = ReplayShard(case["capacity"], 0.9, seed=0)
    restored.load_state(tmp_path / "shard.npz")
    items = np.arange(saved.oldest_key, saved.next_key) % saved.capacity
    want = saved.tree.get(items) ** (0.9 / 0.6)
    np.testing.assert_allclose(restored.tree.get(items), want, rtol=1e-12)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flipped(path: Path) -> None:
    """One byte changed in the middle of the frames: the zip's CRC no longer matches."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(5000))


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "spoil, message",
    [
        (_missing, "does not exist"),
        (_truncated, "is damaged"),
        (_flipped, "is damaged"),
        (_random_bytes, "is damaged"),
    ],
)
def test_a_bad_file_is_refused_in_one_line_and_the_shard_stays_empty(tmp_path, spoil, message):
    case = CASES["lives"]
    saved, _, _ = _filled(case)
    path = tmp_path / "shard.npz"
    saved.save_state(path)
    spoil(path)
    shard = _new(case)
    with pytest.raises(ReplayStateError, match=message) as error:
        shard.load_state(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert len(shard) == 0 and shard.frames_used == 0
    # Still a working shard: it takes new streams.
    run_streams(shard, _streams(case, seed=5), 40, check_every=5)


def test_a_shard_of_another_capacity_is_refused(tmp_path):
    case = CASES["lives"]
    saved, _, _ = _filled(case)
    saved.save_state(tmp_path / "shard.npz")
    other = ReplayShard(case["capacity"] * 2, seed=0)
    with pytest.raises(ReplayStateError, match="capacity 200, this one has 400"):
        other.load_state(tmp_path / "shard.npz")
    assert len(other) == 0


def test_only_a_new_shard_loads(tmp_path):
    case = CASES["lives"]
    saved, _, _ = _filled(case)
    saved.save_state(tmp_path / "shard.npz")
    with pytest.raises(ValueError, match="only a new, empty replay shard"):
        saved.load_state(tmp_path / "shard.npz")


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    case = CASES["lives"]
    saved, _, _ = _filled(case)
    path = tmp_path / "shard.npz"
    saved.save_state(path)
    before = path.read_bytes()
    batch = saved.sample(8, 0.4)  # the shard moves on; its next save fails half way
    saved.update_priorities(batch.keys, np.full(8, 7.0))

    def fail(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(shard_module.np.lib.format, "write_array", fail)
    with pytest.raises(OSError, match="no space"):
        saved.save_state(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npz"]
