"""Double DQN targets, the weighted Huber loss, and the Learner's update loop."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from apex_dqn.common.config import Config, from_args
from apex_dqn.learner.learning import (
    Learner,
    TorchBatch,
    build_optimizer,
    double_dqn_targets,
    td_loss,
)

NUM_ACTIONS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TableQ(nn.Module):
    """Q(s, .) = table[s]: a state is the integer in obs[:, 0]."""

    def __init__(self, rows):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(rows, dtype=torch.float32))

    def forward(self, obs):
        return self.table[obs[:, 0].long()]


ONLINE = [
    [1.0, 2.0, 3.0],  # s0
    [4.0, 0.0, 1.0],  # s1: online argmax 0
    [0.0, 5.0, 2.0],  # s2: online argmax 1
]
TARGET = [
    [0.0, 0.0, 0.0],
    [10.0, 20.0, 30.0],  # s1: target's own max would be 30
    [7.0, 8.0, 9.0],
]


def table_batch(obs, actions, returns, discounts, next_obs, weights) -> TorchBatch:
    return TorchBatch(
        obs=torch.tensor(obs, dtype=torch.uint8)[:, None],
        actions=torch.tensor(actions, dtype=torch.int64),
        returns=torch.tensor(returns, dtype=torch.float32),
        discounts=torch.tensor(discounts, dtype=torch.float32),
        next_obs=torch.tensor(next_obs, dtype=torch.uint8)[:, None],
        weights=torch.tensor(weights, dtype=torch.float32),
    )


HAND_BATCH = dict(
    obs=[0, 0, 0],
    actions=[0, 2, 1],
    returns=[1.0, 0.5, 2.5],
    discounts=[0.5, 0.25, 0.0],
    next_obs=[1, 2, 1],
    weights=[1.0, 0.5, 0.25],
)


def test_double_dqn_targets_online_chooses_target_evaluates():
    batch = table_batch(**HAND_BATCH)
    y = double_dqn_targets(TableQ(ONLINE), TableQ(TARGET), batch)
    # 1 + 0.5 * TARGET[1][argmax ONLINE[1] = 0]; 0.5 + 0.25 * TARGET[2][1]; discount 0: R.
    assert y.tolist() == [6.0, 2.5, 2.5]
    assert not y.requires_grad


def test_discount_zero_ignores_the_bootstrap():
    batch = table_batch([0, 0], [0, 0], [1.5, 1.5], [0.0, 0.0], [1, 2], [1.0, 1.0])
    y = double_dqn_targets(TableQ(ONLINE), TableQ([[1e6] * 3] * 3), batch)
    assert y.tolist() == [1.5, 1.5]


def test_td_loss_hand_computed():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    loss, abs_td, q = td_loss(online, target, table_batch(**HAND_BATCH))
    # deltas y - Q(s, a): 6 - 1 = 5, 2.5 - 3 = -0.5, 2.5 - 2 = 0.5
    assert abs_td.tolist() == [5.0, 0.5, 0.5]
    # Huber: 5 - 0.5 (linear), 0.5 * 0.25 (quadratic), 0.5 * 0.25; weights 1, 0.5, 0.25
    assert loss.item() == pytest.approx((4.5 * 1.0 + 0.125 * 0.5 + 0.125 * 0.25) / 3)
    assert torch.equal(q, torch.tensor([ONLINE[0]] * 3))
    loss.backward()
    grad = online.table.grad
    # d loss / d Q(s, a) = w * clip(Q - y, -1, 1) / B; no gradient through the target.
    assert grad[0].tolist() == pytest.approx([-1.0 / 3, -0.5 * 0.25 / 3, 0.5 * 0.5 / 3])
    assert grad[1:].abs().sum().item() == 0.0
    assert target.table.grad is None


@pytest.mark.parametrize(
    ("delta", "huber"),
    [
        (0.0, 0.0),
        (0.3, 0.5 * 0.09),
        (-0.8, 0.5 * 0.64),
        (1.0, 0.5),
        (2.0, 1.5),
        (-3.0, 2.5),
        (10.0, 9.5),
    ],
)
def test_huber_quadratic_below_one_linear_above(delta, huber):
    # Q(s0, a0) = 1 and no bootstrap: delta = R - 1.
    batch = table_batch([0], [0], [1.0 + delta], [0.0], [1], [1.0])
    loss, abs_td, _ = td_loss(TableQ(ONLINE), TableQ(TARGET), batch)
    assert loss.item() == pytest.approx(huber)
    assert abs_td.item() == pytest.approx(abs(delta))


def test_importance_weights_scale_the_loss():
    online, target = TableQ(ONLINE), TableQ(TARGET)
    base = dict(HAND_BATCH, weights=[1.0, 1.0, 1.0])
    full, _, _ = td_loss(online, target, table_batch(**base))
    halved, _, _ = td_loss(online, target, table_batch(**dict(base, weights=[0.5] * 3)))
    only_first, td, _ = td_loss(online, target, table_batch(**dict(base, weights=[1, 0, 0])))
    assert halved.item() == pytest.approx(full.item() / 2)
    assert only_first.item() == pytest.approx(4.5 / 3)
    assert td.tolist() == [5.0, 0.5, 0.5]  # priorities do not depend on the weights


# --------------------------------------------------------------------------- Learner
def small_cfg(**changes) -> Config:
    base = dict(
        network="dqn2013",
        dueling=False,
        lr=1e-3,
        target_update_period=1000,
        grad_clip=40.0,
    )
    return Config(**{**base, **changes})


def image_batch(b: int = 8, seed: int = 0) -> TorchBatch:
    g = torch.Generator().manual_seed(seed)
    return TorchBatch(
        obs=torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
        actions=torch.randint(0, NUM_ACTIONS, (b,), generator=g),
        returns=torch.rand(b, generator=g) * 3,
        discounts=torch.full((b,), 0.99**3),
        next_obs=torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
        weights=torch.rand(b, generator=g) * 0.5 + 0.5,
    )


def make_learner(cfg: Config, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    return Learner(cfg, NUM_ACTIONS, "cpu")


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_update_decreases_loss_on_a_fixed_batch(optimizer):
    learner = make_learner(small_cfg(optimizer=optimizer, lr=5e-4))
    batch = image_batch()
    losses = [learner.update(batch)[1]["losses/td_loss"].item() for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0]
    assert learner.updates == 12


def test_rmsprop_option_is_centered_rmsprop():
    learner = make_learner(small_cfg(optimizer="rmsprop", lr=2.5e-4, optimizer_eps=0.01))
    assert isinstance(learner.optimizer, torch.optim.RMSprop)
    group = learner.optimizer.param_groups[0]
    assert group["centered"] is True
    assert group["alpha"] == 0.95
    assert group["lr"] == 2.5e-4 and group["eps"] == 0.01
    before = copy.deepcopy(learner.online)
    learner.update(image_batch())
    assert not params_equal(before, learner.online)
    state = learner.optimizer.state[next(learner.online.parameters())]
    assert "grad_avg" in state and "square_avg" in state


def test_adam_option():
    learner = make_learner(small_cfg(optimizer="adam", lr=3e-4, optimizer_eps=1e-5))
    assert isinstance(learner.optimizer, torch.optim.Adam)
    group = learner.optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["eps"] == 1e-5


# (command line, torch optimizer, the param_group values it must get). --optimizer rmsprop
# alone gives Ape-X's centred RMSProp, not Adam's learning rate and epsilon.
RMSPROP = {"alpha": 0.95, "centered": True, "momentum": 0, "weight_decay": 0}
OPTIMIZER_GROUPS = [
    ([], torch.optim.Adam, {"lr": 1e-4, "eps": 1.5e-4}),
    (["--optimizer", "rmsprop"], torch.optim.RMSprop, {"lr": 6.25e-5, "eps": 1.5e-7, **RMSPROP}),
    (
        ["--optimizer", "rmsprop", "--lr", "2.5e-4"],
        torch.optim.RMSprop,
        {"lr": 2.5e-4, "eps": 1.5e-7, **RMSPROP},
    ),
    (
        ["--optimizer", "rmsprop", "--optimizer-eps", "0.1"],
        torch.optim.RMSprop,
        {"lr": 6.25e-5, "eps": 0.1, **RMSPROP},
    ),
    (["--optimizer", "adam", "--lr", "3e-4"], torch.optim.Adam, {"lr": 3e-4, "eps": 1.5e-4}),
    (["--optimizer-eps", "1e-8"], torch.optim.Adam, {"lr": 1e-4, "eps": 1e-8}),
]


@pytest.mark.parametrize(("argv", "kind", "expected"), OPTIMIZER_GROUPS, ids=str)
def test_learner_optimizer_gets_the_chosen_optimizers_settings(argv, kind, expected):
    # A config straight from the command line, autos unresolved, as tests and tools build it.
    learner = make_learner(from_args(["--network", "dqn2013", "--no-dueling", *argv]))
    assert type(learner.optimizer) is kind
    (group,) = learner.optimizer.param_groups
    assert {k: group[k] for k in expected} == expected
    assert (learner.cfg.lr, learner.cfg.optimizer_eps) == (expected["lr"], expected["eps"])


def test_rmsprop_step_adds_eps_outside_the_root_of_the_centred_variance():
    # theta -= lr * g / (sqrt(v - g_bar^2) + eps), v and g_bar decayed by alpha = 0.95.
    lr, eps, alpha = 0.5, 0.25, 0.95
    theta = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = build_optimizer([theta], small_cfg(optimizer="rmsprop", lr=lr, optimizer_eps=eps))
    expected, v, g_bar = 0.0, 0.0, 0.0
    for g in (1.0, -3.0, 2.0):
        theta.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        v = alpha * v + (1 - alpha) * g * g
        g_bar = alpha * g_bar + (1 - alpha) * g
        expected -= lr * g / ((v - g_bar**2) ** 0.5 + eps)
        assert theta.item() == pytest.approx(expected, rel=1e-12)


def test_build_optimizer_refuses_an_unknown_optimizer():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer([nn.Parameter(torch.zeros(1))], small_cfg(optimizer="sgd", lr=1e-3))


def test_update_returns_priorities_and_metrics():
    learner = make_learner(small_cfg())
    batch = image_batch(b=6)
    online, target = copy.deepcopy(learner.online), copy.deepcopy(learner.target)
    expected_loss, expected_td, _ = td_loss(online, target, batch)
    priorities, metrics = learner.update(batch)
    assert priorities.shape == (6,)
    assert torch.allclose(priorities, expected_td)
    assert metrics["losses/td_loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert metrics["replay/importance_weight"].item() == pytest.approx(batch.weights.mean().item())
    assert all(torch.isfinite(v).all() for v in metrics.values())


def test_target_synced_exactly_every_target_update_period():
    learner = make_learner(small_cfg(target_update_period=3))
    initial = copy.deepcopy(learner.online)
    assert params_equal(learner.target, initial)
    batch = image_batch()
    for _ in range(2):
        learner.update(batch)
        assert params_equal(learner.target, initial)
        assert not params_equal(learner.target, learner.online)
    learner.update(batch)
    assert learner.updates == 3
    assert params_equal(learner.target, learner.online)
    snapshot = copy.deepcopy(learner.online)
    for _ in range(2):
        learner.update(batch)
        assert params_equal(learner.target, snapshot)
        assert not params_equal(learner.target, learner.online)
    learner.update(batch)
    assert params_equal(learner.target, learner.online)
    # The target is a copy, not the same tensors, and takes no gradient.
    assert all(not p.requires_grad for p in learner.target.parameters())
    assert learner.target.state_dict()["torso.0.weight"].data_ptr() != (
        learner.online.state_dict()["torso.0.weight"].data_ptr()
    )


def test_gradient_clipping_bounds_the_norm():
    clip = 1e-3
    learner = make_learner(small_cfg(grad_clip=clip))
    _, metrics = learner.update(image_batch())
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in learner.online.parameters()])
    ).item()
    assert metrics["losses/grad_norm"].item() > 10 * clip  # the raw norm, before clipping
    assert norm <= clip * (1 + 1e-4)
    assert norm == pytest.approx(clip, rel=1e-3)


def test_no_clipping_below_the_bound():
    learner = make_learner(small_cfg(grad_clip=1e9))
    _, metrics = learner.update(image_batch())
    norm = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in learner.online.parameters()])
    ).item()
    assert norm == pytest.approx(metrics["losses/grad_norm"].item(), rel=1e-5)


def test_state_dict_round_trip():
    cfg = small_cfg(target_update_period=2)
    a = make_learner(cfg, seed=0)
    batch = image_batch()
    for _ in range(3):
        a.update(batch)
    b = make_learner(cfg, seed=1)
    assert not params_equal(a.online, b.online)
    # As a checkpoint carries it: serialized, and loaded back with weights_only.
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.updates == 3
    assert params_equal(a.online, b.online)
    assert params_equal(a.target, b.target)
    assert not params_equal(b.online, b.target)  # synced at 2, trained at 3
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][key][name]), name
    # Training goes on identically from the restored state.
    pa, _ = a.update(batch)
    pb, _ = b.update(batch)
    assert torch.equal(pa, pb)
    assert params_equal(a.online, b.online)
    assert params_equal(a.target, b.target)  # both synced at update 4
    assert a.updates == b.updates == 4


def test_beta_anneals_linearly_with_updates():
    learner = make_learner(small_cfg(priority_beta=0.4, beta_anneal_updates=4))
    betas = []
    for _ in range(5):
        betas.append(learner.beta)
        learner.updates += 1
    betas.append(learner.beta)
    assert betas == pytest.approx([0.4, 0.55, 0.7, 0.85, 1.0, 1.0])


def test_networks_and_heads_build():
    for network in ("nature", "dqn2013"):
        for dueling in (True, False):
            learner = make_learner(small_cfg(network=network, dueling=dueling))
            priorities, _ = learner.update(image_batch(b=2))
            assert priorities.shape == (2,)
            assert torch.isfinite(priorities).all()
