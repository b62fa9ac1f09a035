"""Resume: a learner restored from a checkpoint file continues bit for bit, with the
run's settings; a resumed run's config is the saved one, changed only by the flags given.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import (
    PROCESS_SETTINGS,
    Config,
    ConfigError,
    resolve_auto,
    resume_config,
)
from apex_dqn.learner.learning import Learner, TorchBatch, td_loss


def _batch(seed: int, size: int = 8) -> TorchBatch:
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, (size, 4, 84, 84), dtype=np.uint8)
    return TorchBatch(
        obs=torch.from_numpy(obs),
        actions=torch.from_numpy(rng.integers(0, 4, size)),
        returns=torch.from_numpy(rng.standard_normal(size).astype(np.float32)),
        discounts=torch.from_numpy(rng.choice([0.0, 0.99**3], size).astype(np.float32)),
        next_obs=torch.from_numpy(np.roll(obs, 1, axis=0)),
        weights=torch.from_numpy(rng.random(size).astype(np.float32)),
    )


def test_restored_learner_continues_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = Config(network="dqn2013", target_update_period=3, beta_anneal_updates=10)
    reference = Learner(cfg, num_actions=4)
    restored_from = Learner(cfg, num_actions=4)
    restored_from.load_state_dict(reference.state_dict())
    for i in range(4):
        reference.update(_batch(i))
        restored_from.update(_batch(i))
    checkpoint.save(tmp_path, {"config": cfg.to_dict(), "learner": restored_from.state_dict(),
                               "counters": {"env_frames": 123}}, step=4, keep=2)  # fmt: skip
    del restored_from

    torch.manual_seed(1)  # a fresh process: different initial weights
    resumed = Learner(cfg, num_actions=4)
    payload = checkpoint.load(tmp_path)
    resumed.load_state_dict(payload["learner"])
    assert payload["counters"] == {"env_frames": 123}
    assert resumed.updates == reference.updates == 4
    assert resumed.beta == reference.beta  # the beta schedule continues where it was

    for i in range(4, 10):  # crosses two target syncs (updates 6 and 9)
        p_ref, _ = reference.update(_batch(i))
        p_res, _ = resumed.update(_batch(i))
        torch.testing.assert_close(p_res, p_ref, rtol=0, atol=0)
    for net in ("online", "target"):
        ref_state = getattr(reference, net).state_dict()
        for key, value in getattr(resumed, net).state_dict().items():
            torch.testing.assert_close(value, ref_state[key], rtol=0, atol=0)
    ref_opt = reference.optimizer.state_dict()["state"]
    for key, value in resumed.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(value["exp_avg"], ref_opt[key]["exp_avg"], rtol=0, atol=0)
        assert int(value["step"]) == int(ref_opt[key]["step"]) == 10


def test_amp_and_eager_compute_the_same_loss_and_gradients():
    """bf16 autocast (the GPU option) matches float32 within bf16 precision, on the CPU.

    bf16 keeps 8 bits of mantissa (~0.4% per value): the loss agrees to well under 1%,
    the gradient points the same way (cosine > 0.99) and differs by a few percent in norm.
    """
    torch.manual_seed(0)
    batch = _batch(0, size=16)
    learner = Learner(Config(network="dqn2013"), num_actions=4)
    losses, grads = [], []
    for amp in (False, True):
        learner.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = td_loss(learner.online, learner.target, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in learner.online.parameters()]))
    assert abs(losses[1] - losses[0]) <= 0.01 * abs(losses[0])
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 0.15


def test_compiled_and_eager_compute_the_same_loss_and_gradients(monkeypatch):
    """The ``compile`` option traces the network with torch.compile; the graph it runs
    gives the eager loss and gradients. The ``aot_eager`` backend keeps the test fast
    (inductor's C++ code generation takes minutes on 2 cores), tracing the same graph."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="aot_eager"))
    torch.manual_seed(0)
    batch = _batch(0, size=16)
    learner = Learner(Config(network="dqn2013", compile=True), num_actions=4)
    assert learner._forward is not learner.online
    losses, grads = [], []
    for forward in (learner.online, learner._forward):
        learner.optimizer.zero_grad()
        loss, _, _ = td_loss(forward, learner.target, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in learner.online.parameters()]))
    assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_a_learning_rate_changed_on_resume_is_the_one_used():
    """``Optimizer.load_state_dict`` restores the saved learning rate with the moments;
    ``Learner.load_state_dict`` keeps the resumed run's own rate and epsilon."""
    torch.manual_seed(0)
    cfg = Config(network="dqn2013", lr=1e-4, optimizer_eps=1e-3)
    trained = Learner(cfg, num_actions=4)
    trained.update(_batch(0))
    state = copy.deepcopy(trained.state_dict())  # as saved: no tensor shared with trained

    resumed = Learner(cfg.replace(lr=5e-5, optimizer_eps=1e-6), num_actions=4)
    resumed.load_state_dict(state)
    group = resumed.optimizer.param_groups[0]
    assert (group["lr"], group["eps"]) == (5e-5, 1e-6)
    assert state["optimizer"]["param_groups"][0]["lr"] == 1e-4  # the saved state is not changed
    # The moments are kept: the next update is the trained learner's with the new settings.
    for g in trained.optimizer.param_groups:
        g.update(lr=5e-5, eps=1e-6)
    p_ref, _ = trained.update(_batch(1))
    p_res, _ = resumed.update(_batch(1))
    torch.testing.assert_close(p_res, p_ref, rtol=0, atol=0)
    for a, b in zip(trained.online.parameters(), resumed.online.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


GIB = 1 << 30
# A run saved on a machine with a GPU: autos resolved there (device, batch size, sizes).
SAVED = resolve_auto(
    Config(network="dqn2013", logdir="runs/a", seed=3, total_frames=50_000, preset="none"),
    cpus=8, gpus=1, memory_bytes=16 * GIB,
)  # fmt: skip
LAPTOP_RUN = resolve_auto(
    Config(preset="laptop", network="dqn2013", dueling=True, batch_size=32, lr=2.5e-4,
           num_actors=1, envs_per_actor=16, replay_shards=1, replay_capacity=200_000,
           replay_min_size=10_000, target_update_period=1_000, eval_interval_s=300.0,
           samples_per_insert=0.6),
    cpus=4, gpus=0, memory_bytes=8 * GIB,
)  # fmt: skip
SOURCE = "checkpoint runs/a/checkpoint-0000000100.pt"

# (saved config, flags after --resume, lines printed, settings expected to differ from the
# saved ones besides the process settings)
MERGES = {
    "no flag": (SAVED, [], [], {}),
    "a changed setting": (SAVED, ["--lr", "5e-05"], ["--lr 0.0001 -> 5e-05"], {"lr": 5e-5}),
    "the same value": (SAVED, ["--lr", "0.0001", "--seed", "3"], [], {}),
    "auto learning rate": (
        SAVED.replace(lr=3e-4), ["--lr", "0"], ["--lr 0.0003 -> 0.0001"], {"lr": 1e-4},
    ),
    "several, in field order": (
        SAVED, ["--total-frames", "90000", "--no-eval-video", "--n-step", "5"],
        ["--n-step 3 -> 5", "--eval-video True -> False", "--total-frames 50000 -> 90000"],
        {"n_step": 5, "eval_video": False, "total_frames": 90_000},
    ),
    "the game by another name": (SAVED, ["--game", "SpaceInvaders"], [], {}),
    "a preset the run had": (LAPTOP_RUN, ["--preset", "laptop"], [], {}),
    "a preset given on resume": (
        SAVED, ["--preset", "laptop", "--batch-size", "128"],
        ["--num-actors 7 -> 1", "--replay-capacity 700000 -> 200000",
         "--replay-min-size 20000 -> 10000", "--samples-per-insert 0.0 -> 0.6",
         "--batch-size 512 -> 128", "--lr 0.0001 -> 0.00025",
         "--target-update-period 2000 -> 1000", "--eval-interval-s 600.0 -> 300.0",
         "--preset none -> laptop"],
        {"num_actors": 1, "replay_capacity": 200_000, "replay_min_size": 10_000,
         "batch_size": 128, "lr": 2.5e-4, "target_update_period": 1_000,
         "eval_interval_s": 300.0, "preset": "laptop", "samples_per_insert": 0.6},
    ),
    "process settings": (
        SAVED, ["--address", "10.0.0.1:6379", "--logdir", "elsewhere", "--device", "cpu"],
        [], {},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MERGES))
def test_resume_takes_the_saved_settings_and_the_flags_given(name):
    saved, flags, printed, differ = MERGES[name]
    argv = ["--resume", "runs/a", *flags]
    cfg, changes = resume_config(saved.to_dict(), argv, fixed=checkpoint.STRUCTURAL, source=SOURCE)
    assert changes == printed
    given = dict(zip(flags[::2], flags[1::2], strict=False))
    for f in dataclasses.fields(Config):
        if f.name in PROCESS_SETTINGS:
            flag = "--" + f.name.replace("_", "-")
            expected = "runs/a" if f.name == "resume" else given.get(flag, f.default)
            assert getattr(cfg, f.name) == expected, f.name
        else:
            assert getattr(cfg, f.name) == differ.get(f.name, getattr(saved, f.name)), f.name


# (flags after --resume, the start of the one line refusing them)
REFUSED = {
    "network": (["--network", "nature"],
                f"--network nature cannot change on resume: {SOURCE} was trained with "
                "network='dqn2013', and a run keeps its game, network, dueling, optimizer"),
    "dueling": (["--no-dueling"], "--dueling False cannot change on resume"),
    "game": (["--game", "breakout"], "--game breakout cannot change on resume"),
    "optimizer": (["--optimizer", "rmsprop"], "--optimizer rmsprop cannot change on resume"),
    "a preset's network": (["--preset", "laptop"],
                           "--network dqn2013 (from --preset laptop) cannot change on resume"),
    "an unknown preset": (["--preset", "desktop"], "--preset='desktop' is unknown"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REFUSED))
def test_resume_refuses_a_structural_change_in_one_line(name):
    flags, message = REFUSED[name]
    saved = SAVED.replace(network="nature") if name == "a preset's network" else SAVED
    with pytest.raises(ConfigError) as info:
        resume_config(
            saved.to_dict(), ["--resume", "runs/a", *flags], fixed=checkpoint.STRUCTURAL,
            source=SOURCE,
        )  # fmt: skip
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_resume_reads_a_config_saved_by_an_earlier_version():
    old = SAVED.to_dict()
    old["adam_eps"] = old.pop("optimizer_eps")
    old.pop("worker_charts", None)  # a setting this version added: its default
    old["retired_setting"] = 1  # a setting since removed: dropped
    cfg, changes = resume_config(old, ["--resume", "runs/a"], fixed=checkpoint.STRUCTURAL)
    assert changes == []
    assert cfg.optimizer_eps == SAVED.optimizer_eps
    assert cfg.replace(resume="", logdir=SAVED.logdir, device=SAVED.device) == SAVED


def test_resume_refuses_a_saved_config_of_the_wrong_types():
    bad = {**SAVED.to_dict(), "batch_size": "many"}
    with pytest.raises(ConfigError, match=f"^{SOURCE} is malformed: its setting batch_size="):
        resume_config(bad, ["--resume", "runs/a"], source=SOURCE)
