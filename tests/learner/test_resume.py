"""Exact resume: a learner restored from a checkpoint file continues bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from apex_dqn.common import checkpoint
from apex_dqn.common.config import Config
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
