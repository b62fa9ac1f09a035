"""The replay ratio's rule (Reverb's SampleToInsertRatio over counts since learning
began), its band, the shard's gate on pushes, and the flags that set them."""

from __future__ import annotations

import numpy as np
import pytest

from apex_dqn.common.config import Config, ConfigError, validate
from apex_dqn.replay.rate_limiter import (
    InsertGate,
    SampleToInsertRatio,
    auto_error_buffer,
    config_push,
    describe,
    largest_push,
    least_error_buffer,
)

# X = 0.5 sampled per inserted, band +-100, pushes of up to 100, batches of 32:
# D = 0.5 * inserts - samples; a sample of n needs D - n >= -100, an insert D + n/2 <= 100.
RATIO = SampleToInsertRatio(samples_per_insert=0.5, error_buffer=100, push=100, batch=32)


@pytest.mark.parametrize(
    ("inserts", "samples", "n", "can_sample", "can_insert"),
    [
        (0, 0, 32, True, True),  # D = 0: both free
        (0, 68, 32, True, True),  # D = -68: a batch lands exactly on -100
        (0, 69, 32, False, True),  # D = -69: a batch would reach -101
        (200, 0, 1, True, False),  # D = 100: at the top, no room for one more insert
        (199, 0, 1, True, True),  # D = 99.5: one more lands exactly on 100
        (201, 0, 1, True, False),  # D = 100.5: over already (several shards may overshoot)
        (0, 0, 200, False, True),  # an insert of 200 reaches exactly 100; a sample -200
        (0, 0, 201, False, False),  # and of 201 goes over
        (1000, 500, 32, True, True),  # D = 0 again, far along
        (1000, 632, 32, False, True),  # D = -132
        (1000, 300, 32, True, False),  # D = 200: learner far behind, actors wait
    ],
)
def test_the_rule_as_reverb_states_it(inserts, samples, n, can_sample, can_insert):
    assert RATIO.can_sample(inserts, samples, n) is can_sample
    assert RATIO.can_insert(inserts, samples, n) is can_insert
    assert RATIO.owed(inserts, samples) == 0.5 * inserts - samples


@pytest.mark.parametrize("spi", [0.25, 0.5, 1.0, 3.0, 8.0])
def test_insert_headroom_is_the_largest_insert_allowed(spi):
    ratio = SampleToInsertRatio(spi, least_error_buffer(spi, 50, 16) + 7.3, 50, 16)
    rng = np.random.default_rng(0)
    for _ in range(500):
        inserts = int(rng.integers(0, 10_000))
        samples = int(spi * inserts + rng.uniform(-2 * ratio.error_buffer, ratio.error_buffer))
        room = ratio.insert_headroom(inserts, max(samples, 0))
        assert room >= 0
        if room:
            assert ratio.can_insert(inserts, max(samples, 0), room)
        assert not ratio.can_insert(inserts, max(samples, 0), room + 1)


def test_each_shard_gets_an_equal_share_but_one_whole_push():
    # Headroom 400 (D = 0, e = 100, X = 0.25 -> 400 inserts), pushes of 50.
    ratio = SampleToInsertRatio(samples_per_insert=0.25, error_buffer=100, push=50, batch=16)
    assert ratio.insert_headroom(0, 0) == 400
    assert ratio.shard_headroom(0, 0, shards=1) == 400
    assert ratio.shard_headroom(0, 0, shards=4) == 100
    assert ratio.shard_headroom(0, 0, shards=16) == 50  # the floor: one push
    assert ratio.shard_headroom(360, 0, shards=16) == 40  # less than a push left: all of it
    assert ratio.shard_headroom(400, 0, shards=4) == 0
    assert ratio.shard_headroom(500, 0, shards=4) == 0  # over the band: nothing


@pytest.mark.parametrize(
    ("spi", "push", "batch"), [(0.5, 100, 32), (1.0, 46, 16), (8.0, 848, 32), (0.1, 3, 512)]
)
def test_the_least_band_never_stops_both_sides(spi, push, batch):
    """At every state a random schedule reaches, with the narrowest band allowed, the
    learner may sample a batch or an actor may push its largest chunk, and D stays in
    the band."""
    ratio = SampleToInsertRatio(spi, least_error_buffer(spi, push, batch), push, batch)
    rng = np.random.default_rng(1)
    inserts = samples = 0
    for _ in range(5_000):
        chunk = int(rng.integers(1, push + 1))
        sample_ok = ratio.can_sample(inserts, samples, batch)
        assert sample_ok or ratio.can_insert(inserts, samples, push), (inserts, samples)
        if ratio.can_insert(inserts, samples, chunk) and (not sample_ok or rng.random() < 0.5):
            inserts += chunk
        elif sample_ok:
            samples += batch
        assert -ratio.error_buffer <= ratio.owed(inserts, samples) <= ratio.error_buffer
    assert samples > 0 and inserts > 0


def test_a_band_too_narrow_or_a_ratio_not_positive_is_refused():
    with pytest.raises(ValueError, match="could both wait forever"):
        SampleToInsertRatio(1.0, least_error_buffer(1.0, 100, 32) - 1, 100, 32)
    with pytest.raises(ValueError, match="must be > 0"):
        SampleToInsertRatio(0.0, 1000, 100, 32)


def test_the_largest_push_bounds_every_chunk_an_actor_sends():
    """(push_period + n) * envs per lane: the chunks of a recorded stream never exceed it."""
    from tests.replay.recorder import RecordedStream

    rec = RecordedStream(stream=1, num_envs=4, n=3, push_period=7, seed=5, max_steps=9,
                         terminate_prob=0.2, life_loss_prob=0.1)  # fmt: skip
    sizes = [len(c) for c in (rec.step() for _ in range(400)) if c is not None]
    assert max(sizes) <= largest_push(7, 3, 4) and max(sizes) >= 7 * 4


def test_from_config_off_auto_and_given():
    base = dict(batch_size=32, push_period=50, envs_per_actor=16, n_step=3)
    assert SampleToInsertRatio.from_config(Config(**base, samples_per_insert=0.0)) is None
    cfg = Config(**base, samples_per_insert=0.5)
    ratio = SampleToInsertRatio.from_config(cfg)
    assert ratio.push == config_push(cfg) == 53 * 16
    # auto: every push an actor may have in flight and every batch prefetched fit
    assert ratio.error_buffer == auto_error_buffer(cfg) == 0.5 * 848 * 4 + 32 * 4
    given = SampleToInsertRatio.from_config(cfg.replace(samples_per_insert_tolerance=500.0))
    assert given.error_buffer == 500.0
    lanes = config_push(cfg.replace(actor_lanes=2))
    assert lanes == 53 * 8  # a lane pushes its own envs' transitions
    assert "free-running" in describe(Config(**base))
    assert "0.5 sampled per inserted transition" in describe(cfg)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"samples_per_insert": -1.0}, r"--samples-per-insert=-1.0 is invalid: must be a number"),
        ({"samples_per_insert": float("nan")}, r"--samples-per-insert=nan is invalid"),
        ({"samples_per_insert_tolerance": -5.0}, r"--samples-per-insert-tolerance=-5.0 is invalid"),
        (
            {"samples_per_insert": 1.0, "samples_per_insert_tolerance": 100.0},
            r"--samples-per-insert-tolerance=100 is too small: with --samples-per-insert=1, "
            r"pushes of up to 848 transitions and batches of 32 it must be >= 440",
        ),
    ],
)  # fmt: skip
def test_bad_ratio_flags_are_one_line_errors(changes, message):
    cfg = Config(batch_size=32, push_period=50, envs_per_actor=16, **changes)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_gate_takes_pushes_up_to_its_limit_and_keeps_each_streams_order():
    """Chunks of 10 frames; ``admit(stream, first_frame, frames, n, added)``."""
    gate = InsertGate()
    assert gate.admit(1, 0, 10, 40, added=0)  # no limit before learning begins
    gate.set_limit(100)
    assert gate.admit(1, 10, 10, 40, added=40)  # 80 <= 100
    assert not gate.admit(1, 20, 10, 40, added=80)  # 120 > 100: stream 1 resumes at frame 20
    assert not gate.admit(1, 30, 10, 10, added=80)  # its next chunk waits behind it
    assert gate.admit(2, 0, 10, 10, added=80)  # another stream's chunk fits: 90
    gate.set_limit(200)
    assert not gate.admit(1, 30, 10, 10, added=90)  # still behind frame 20
    assert gate.admit(1, 20, 10, 40, added=90)  # the refused chunk first
    # The chunk at 40 reached the shard before the one at 30 was offered again: it waits.
    assert not gate.admit(1, 40, 10, 10, added=130)
    assert gate.admit(1, 30, 10, 10, added=130)
    assert gate.admit(1, 40, 10, 10, added=140)
    assert gate.refused == 4
    gate.set_limit(None)
    assert gate.admit(1, 50, 10, 10_000, added=150)
    assert not gate.admit(1, 70, 10, 10, added=10_150)  # out of order, limit or not
