"""Serial mode under a replay ratio: the learner trains what the ratio allows, pushes wait
for it, and the ratio achieved stays within the band."""

from __future__ import annotations

import pytest

import apex_dqn.driver.serial as serial
from apex_dqn.common.config import Config
from apex_dqn.learner.pipeline import LocalSampler
from apex_dqn.replay.rate_limiter import SampleToInsertRatio
from tests.fakes import FakeAtariVectorEnv


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    ("spi", "tolerance", "waits"), [(0.25, 0.0, "learner"), (8.0, 250.0, "actor")]
)
def test_serial_mode_holds_the_replay_ratio(monkeypatch, spi, tolerance, waits):
    """One update of 16 per step of 4 transitions is 4 samples per insert free-running:
    a ratio of 0.25 holds the learner back, one of 8 makes pushes wait while the learner
    trains. Either way the learner trains exactly the batches it drew, and D = X *
    inserts - samples since learning began stays within the band (the auto one, and
    one just wider than the least, (8 * 52 + 16) / 2 = 216). ~2 s each."""
    samplers: list[LocalSampler] = []

    class Recorded(LocalSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(serial, "LocalSampler", Recorded)
    cfg = Config(
        network="dqn2013", batch_size=16, replay_capacity=5_000, replay_min_size=120,
        push_period=10, envs_per_actor=4, weight_sync_period=10, target_update_period=50,
        samples_per_insert=spi, samples_per_insert_tolerance=tolerance,
    )  # fmt: skip
    envs = [FakeAtariVectorEnv(4, seed=0)]
    learner, actor = serial.run_serial(cfg, envs, num_actions=6, steps=100, updates_per_step=1)
    (sampler,) = samplers
    ratio = SampleToInsertRatio.from_config(cfg)
    assert sampler.ratio == ratio and learner.updates * 16 == sampler.sampled
    learning_steps = 100 - 120 // 4  # at most: steps after replay reached its minimum
    if waits == "learner":  # far fewer updates than the one per step it was offered
        assert learner.updates < learning_steps / 2
    else:  # more updates than steps learning: pushes waited while it trained
        assert learner.updates > learning_steps
    inserted = sampler.inserted()
    assert inserted > 200 and actor.weights_version > 0
    # Over the run the learner sampled X per insert, give or take the band.
    assert -ratio.error_buffer <= ratio.owed(inserted, sampler.sampled) <= ratio.error_buffer
