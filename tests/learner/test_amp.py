"""The bf16-torso learner (``--amp``) against float32, and when ``--amp auto`` turns it on.

Bounds. bf16 keeps 8 significant bits: each rounding to bf16 has a relative error of at
most u = 2^-8. With amp on, each of the L layers of the torso (the 2013 network: two
convolutions and the hidden layer, L = 3) rounds its input, its weights and its output
(products are accumulated in float32), so the hidden activations h carry a relative
error of at most eps = 3 L u = 9u ~ 3.5% (per sample, in 2-norm). Everything after the
torso is float32, so from there on errors only propagate:

* Q = W h + b (dueling: V + A - mean A, where subtracting the mean has norm 1), so
  |dQ| <= eps * (|W_v| |h_v| + |W_a| |h_a|) =: B_Q per sample, with |W| the spectral
  norm. B_Q scales with the varying part W h, not with Q: Q-values near 20 (where bf16
  spacing is 0.125) keep errors far below it, which the whole-network autocast does not.
* delta = y - Q(s, a) with y = R + d Q_target(s', argmax Q_online(s')): with the
  target a copy of the online network, a changed argmax swaps two actions whose values
  differ by at most 2 B_Q, so |d delta| <= B_Q + d (B_Q + 2 B_Q) = (1 + 3d) B_Q.
* the Huber loss is 1-Lipschitz in delta: |d loss| <= mean(w) * max |d delta|.
* the output layer's gradient, sum_i g_i h_i^T with g_i = dloss/dQ_i in float32, has a
  relative error of at most eps. The gradient of the whole network takes roundings in
  the backward pass as well (the incoming gradient and the weights or inputs of each
  bf16 layer: eps again) and is a sum over the batch, where terms of both signs cancel
  and a relative error grows by the ratio of sum |terms| to |sum|, here about 2: so
  |d grad| <= 2 * 2 eps = 36u ~ 14% of |grad|. Measured on this batch: the hidden
  activations 1.2u; Q ~70 and delta ~200 times below their bounds; the output layer's
  gradient 1.0-1.3u, the whole gradient 10-11u (3-26u over other seeds at batch 16).

These run on any CPU: without native bf16, oneDNN emulates it (slowly: ~9 s in all on a
2-core AMD EPYC shared with other work).
"""

from __future__ import annotations

import pytest
import torch

from apex_dqn.common.config import Config
from apex_dqn.learner.learning import (
    NATIVE_BF16_FLAGS,
    Learner,
    TorchBatch,
    choose_amp,
    double_dqn_targets,
    native_bf16_flags,
    td_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

U = 2.0**-8  # bf16's unit roundoff: 8 significant bits
LAYERS = 3  # bf16 layers of the 2013 network's torso: two convolutions, the hidden layer
EPS = 3 * LAYERS * U  # relative error of the hidden activations
ACTIONS = 6
Q_MEAN = 20.0  # Q-values of a trained Space Invaders agent are 8-32
D = 0.99**3


def q_batch(b: int = 32, seed: int = 0) -> TorchBatch:
    """Returns chosen so that y - Q is of order 1, as TD errors are, with Q near 20."""
    g = torch.Generator().manual_seed(seed)
    return TorchBatch(
        obs=torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
        actions=torch.randint(0, ACTIONS, (b,), generator=g),
        returns=(1 - D) * Q_MEAN + torch.randn(b, generator=g),
        discounts=torch.full((b,), D),
        next_obs=torch.randint(0, 256, (b, 4, 84, 84), dtype=torch.uint8, generator=g),
        weights=torch.rand(b, generator=g) * 0.5 + 0.5,
    )


def output_layers(net) -> list[torch.nn.Linear]:
    return [net.value[2], net.advantage[2]] if net.dueling else [net.head[2]]


def twin_learners(dueling: bool) -> tuple[Learner, Learner]:
    """A float32 learner and a bf16-torso one with the same weights, Q-values near 20."""
    torch.manual_seed(0)
    plain = Learner(Config(network="dqn2013", dueling=dueling, amp="off"), ACTIONS)
    with torch.no_grad():
        for net in (plain.online, plain.target):
            output_layers(net)[0].bias.add_(Q_MEAN)
    amp = Learner(Config(network="dqn2013", dueling=dueling, amp="on"), ACTIONS)
    amp.online.load_state_dict(plain.online.state_dict())
    amp.target.load_state_dict(plain.target.state_dict())
    return plain, amp


def loss_and_grads(learner: Learner, batch: TorchBatch):
    learner.online.zero_grad(set_to_none=True)
    loss, abs_td, q = td_loss(learner.online, learner.target, batch)
    loss.backward()
    return loss.detach(), abs_td, q, [p.grad.clone() for p in learner.online.parameters()]


@pytest.mark.parametrize("dueling", [False, True], ids=["plain", "dueling"])
def test_bf16_torso_stays_within_the_stated_bounds_of_float32(dueling):
    plain, amp = twin_learners(dueling)
    batch = q_batch()
    assert amp.amp.enabled and not plain.amp.enabled
    loss32, td32, q32, grads32 = loss_and_grads(plain, batch)
    loss16, td16, q16, grads16 = loss_and_grads(amp, batch)

    h32 = plain.online.hidden(batch.obs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = amp.online.hidden(batch.obs)
    assert all(h.dtype == torch.bfloat16 for h in h16)  # the torso did run in bf16
    for a, b in zip(h32, h16, strict=True):
        relative = (b.float() - a).norm(dim=1) / a.norm(dim=1)
        assert relative.max().item() <= EPS

    norms = [torch.linalg.matrix_norm(layer.weight, ord=2) for layer in output_layers(plain.online)]
    b_q = EPS * sum(n * h.norm(dim=1) for n, h in zip(norms, h32, strict=True))  # per sample
    assert ((q16 - q32).abs().max(dim=1).values <= b_q).all()
    bound_td = (1 + 3 * D) * b_q.max().item()
    assert (td16 - td32).abs().max().item() <= bound_td
    assert abs(loss16.item() - loss32.item()) <= batch.weights.mean().item() * bound_td

    def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        diff = torch.cat([(y - x).flatten() for x, y in zip(a, b, strict=True)])
        return (diff.norm() / torch.cat([x.flatten() for x in a]).norm()).item()

    names = [name for name, _ in plain.online.named_parameters()]
    head = [i for i, n in enumerate(names) if n.endswith("2.weight") and n[:5] != "torso"]
    assert len(head) == (2 if dueling else 1)
    assert relative([grads32[i] for i in head], [grads16[i] for i in head]) <= EPS
    assert relative(grads32, grads16) <= 2 * 2 * EPS

    # The bound on Q is the point: autocasting the whole network, head included,
    # rounds Q-values near 20 to multiples of 0.125 and breaks it.
    amp.online.torso_dtype = amp.target.torso_dtype = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_whole = amp.online(batch.obs).float()
    assert (q_whole - q32).abs().max().item() > b_q.max().item()


def test_head_targets_td_errors_loss_and_priorities_are_float32():
    _, amp = twin_learners(dueling=True)
    batch = q_batch(b=8)
    net = amp.online
    q = net(batch.obs)
    assert q.dtype == torch.float32
    # The output layer ran in float32 on the bf16 activations, cast: exactly this.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = net.hidden(batch.obs)
    assert torch.equal(q, net.q_values([h.float() for h in hidden]))
    assert double_dqn_targets(amp.online, amp.target, batch).dtype == torch.float32
    loss, abs_td, q_values = td_loss(amp.online, amp.target, batch)
    assert (loss.dtype, abs_td.dtype, q_values.dtype) == (torch.float32,) * 3
    priorities, metrics = amp.update(batch)
    assert priorities.dtype == torch.float32
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in metrics.values())
    for model in (amp.online, amp.target):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_torso_learner_trains():
    torch.manual_seed(0)
    amp = Learner(Config(network="dqn2013", dueling=False, amp="on", lr=1e-3), ACTIONS)
    batch = q_batch(b=8)
    losses = [amp.update(batch)[1]["losses/td_loss"].item() for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    assert amp.target.torso_dtype == torch.bfloat16  # the target network's torso too


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 {extra}\nbogomips\t: 4890\n"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("", []),
        ("avx512f avx512bw", []),
        ("avx512f avx512_bf16", ["avx512_bf16"]),
        ("amx_tile amx_bf16 avx512_bf16", ["amx_bf16", "avx512_bf16"]),
    ],
)
def test_native_bf16_flags_come_from_cpuinfo(extra, expected):
    assert native_bf16_flags(CPUINFO.format(extra=extra)) == expected
    assert set(expected) <= set(NATIVE_BF16_FLAGS)


# (--amp, device, the CPU's native bf16 flags) -> bf16 torso
AMP_TABLE = [
    ("auto", "cpu", [], False),
    ("auto", "cpu", ["avx512_bf16"], True),
    ("auto", "cpu", ["amx_bf16"], True),
    ("on", "cpu", [], True),
    ("off", "cpu", ["amx_bf16"], False),
    ("off", "cuda", [], False),
]


@pytest.mark.parametrize(("setting", "device", "flags", "enabled"), AMP_TABLE, ids=str)
def test_amp_auto_is_on_where_bf16_is_native(setting, device, flags, enabled):
    choice = choose_amp(setting, device, flags)
    assert choice.enabled is enabled
    assert choice.reason.startswith(f"--amp {setting}")
    assert str(choice).startswith("bf16 torso" if enabled else "float32")


def test_amp_auto_on_cuda():
    # On a GPU: on where it has bf16 units; a process that sees no GPU assumes it does.
    fast = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(False)
    assert choose_amp("auto", "cuda", []).enabled is fast


def test_amp_says_when_on_is_slower_and_refuses_an_unknown_setting():
    assert "slower than float32" in choose_amp("on", "cpu", []).reason
    assert "slower" not in choose_amp("on", "cpu", ["amx_bf16"]).reason
    with pytest.raises(ValueError, match="--amp"):
        choose_amp("True", "cpu", [])
