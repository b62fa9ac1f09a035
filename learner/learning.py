"""Double DQN with n-step returns, importance weights, Huber loss and gradient clipping.

For a sampled transition (s, a, R, d, s') with d = gamma^h, or 0 after a terminal:

    a*     = argmax_b Q_online(s', b)                  (double DQN: online net chooses)
    y      = R + d * Q_target(s', a*)                  (target net evaluates)
    delta  = y - Q_online(s, a)
    loss   = mean_i( w_i * huber(delta_i) )            (w: importance weights, max 1)

The new priority of each transition is |delta|. The target network is a copy of the
online network, refreshed every ``target_update_period`` updates.

Precision (``--amp``, :func:`choose_amp`): the weights, the optimizer and everything
after the torso are float32. With amp on, both networks run their torso (convolutions
and hidden layer, where nearly all the arithmetic is) in bfloat16 under autocast, and
their output layer in float32 (:class:`common.networks.QNetwork`), so Q, y, delta, the
loss and the priorities are float32 computed from bf16 hidden activations: their error
is a few 2^-8 of the output layer's |W| |h|, not of |Q|. ``auto`` turns it on where
bf16 is fast: CUDA GPUs with bf16 units, and CPUs with native bf16 dot products
(:data:`NATIVE_BF16_FLAGS`); elsewhere bf16 would be emulated, slower than float32.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from apex_dqn.common.checkpoint import CheckpointError, check_network_state
from apex_dqn.common.config import AMP_MODES, RMSPROP_ALPHA, Config, resolve_optimizer
from apex_dqn.common.networks import build_network
from apex_dqn.common.schedules import linear

# /proc/cpuinfo flags of native bf16 arithmetic (bf16 pairs multiplied, accumulated in
# float32): AMX tiles (Intel Sapphire Rapids and later) and AVX512-BF16 (Intel Cooper
# Lake, AMD Zen 4 and later). Without them oneDNN emulates bf16 with conversions.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The :data:`NATIVE_BF16_FLAGS` this CPU has, from ``cpuinfo`` (the text of
    /proc/cpuinfo; read here when None). Empty where /proc/cpuinfo does not exist (not
    Linux) or torch has no oneDNN, whose kernels are the ones that use them."""
    if cpuinfo is None:
        if not torch.backends.mkldnn.is_available():
            return []
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return [flag for flag in NATIVE_BF16_FLAGS if flag in flags]


@dataclass(frozen=True)
class AmpChoice:
    """Whether the learner's torso runs in bf16, and why (printed when a run starts)."""

    enabled: bool
    reason: str

    def __str__(self) -> str:
        what = "bf16 torso, float32 head and targets" if self.enabled else "float32"
        return f"{what} ({self.reason})"


def choose_amp(setting: str, device_type: str, cpu_flags: list[str] | None = None) -> AmpChoice:
    """What ``--amp`` (``auto``, ``on`` or ``off``) means on a learner of ``device_type``.

    ``auto``: on for a CUDA GPU with bf16 units (Ampere and later; assumed where this
    process sees no GPU, as a driver on a cluster's head node may not), and for a CPU
    with native bf16 (``cpu_flags``, :func:`native_bf16_flags` when None); off elsewhere,
    where bf16 is emulated and slower than float32. ``on`` and ``off`` are obeyed; the
    reason says when ``on`` is likely slower than float32.
    """
    if setting not in AMP_MODES:
        raise ValueError(f"unknown --amp {setting!r}: choose one of {', '.join(AMP_MODES)}")
    if setting == "off":
        return AmpChoice(False, "--amp off")
    if device_type == "cuda":
        fast = not torch.cuda.is_available() or torch.cuda.is_bf16_supported(False)
        where = "CUDA" if fast else "this GPU has no bf16 units"
    else:
        flags = native_bf16_flags() if cpu_flags is None else cpu_flags
        fast = bool(flags)
        where = (
            f"this CPU has native bf16: {', '.join(flags)}"
            if fast
            else f"this CPU has neither {' nor '.join(NATIVE_BF16_FLAGS)}"
        )
    if setting == "on":
        return AmpChoice(True, f"--amp on: {where}" + ("" if fast else ", so slower than float32"))
    return AmpChoice(fast, f"--amp auto: {where}")


@dataclass
class TorchBatch:
    """A batch on the learner's device."""

    obs: torch.Tensor  # uint8 (B, 4, 84, 84)
    actions: torch.Tensor  # int64 (B,)
    returns: torch.Tensor  # float32 (B,)
    discounts: torch.Tensor  # float32 (B,)
    next_obs: torch.Tensor  # uint8 (B, 4, 84, 84)
    weights: torch.Tensor  # float32 (B,)


def double_dqn_targets(online: nn.Module, target: nn.Module, batch: TorchBatch) -> torch.Tensor:
    """``R + d * Q_target(s', argmax_b Q_online(s', b))``, without gradient."""
    with torch.no_grad():
        best = online(batch.next_obs).argmax(dim=1, keepdim=True)
        next_q = target(batch.next_obs).gather(1, best).squeeze(1).float()
        return batch.returns + batch.discounts * next_q


def td_loss(
    online: nn.Module, target: nn.Module, batch: TorchBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weighted Huber loss, |TD errors|, Q(s, .)) for a batch."""
    y = double_dqn_targets(online, target, batch)
    q = online(batch.obs).float()
    q_taken = q.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    delta = y - q_taken
    loss = (batch.weights * F.huber_loss(q_taken, y, reduction="none", delta=1.0)).mean()
    return loss, delta.detach().abs(), q.detach()


def build_optimizer(params: Iterable[nn.Parameter], cfg: Config) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, with ``cfg.lr`` and ``cfg.optimizer_eps`` (resolved).

    ``rmsprop`` is torch's centred RMSProp without momentum. For a gradient g it keeps,
    with alpha = :data:`RMSPROP_ALPHA` = 0.95,

        v     <- alpha * v     + (1 - alpha) * g^2          (E[g^2])
        g_bar <- alpha * g_bar + (1 - alpha) * g            (E[g])
        theta <- theta - lr * g / (sqrt(v - g_bar^2) + eps)

    so alpha is the decay the papers call "squared gradient momentum" and "gradient
    momentum" (both 0.95), and eps is added outside the square root. DeepMind's Lua DQN
    (Mnih et al. 2015, "min squared gradient" 0.01) and TensorFlow's centred RMSProp add
    it inside, dividing by sqrt(v - g_bar^2 + e). The two agree up to a factor of at most
    sqrt(2) when eps = sqrt(e), since sqrt(x + e) <= sqrt(x) + sqrt(e) <= sqrt(2(x + e)):
    Nature's 0.01 inside is eps = 0.1 here. The default eps, Ape-X's 1.5e-7 (Horgan et al.
    2018), is used as torch's eps; were it meant inside the root, the matching value here
    would be sqrt(1.5e-7) ~= 3.9e-4, which ``--optimizer-eps`` can give.
    """
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.optimizer_eps)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, alpha=RMSPROP_ALPHA, eps=cfg.optimizer_eps, centered=True
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class Learner:
    """Owns the online and target networks and the optimizer; one ``update`` per batch.

    ``amp``: whether both networks run their torso in bf16 here, and why (:func:`choose_amp`
    of ``cfg.amp`` on this learner's device and CPU).
    """

    def __init__(self, cfg: Config, num_actions: int, device: str | torch.device = "cpu"):
        # Settings left at auto take the optimizer's defaults, as they do in a run.
        cfg = resolve_optimizer(cfg)
        self.cfg = cfg
        self.device = torch.device(device)
        self.amp = choose_amp(cfg.amp, self.device.type)
        torso_dtype = torch.bfloat16 if self.amp.enabled else None
        self.online = build_network(num_actions, cfg.network, cfg.dueling, torso_dtype)
        self.online.to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.optimizer = build_optimizer(self.online.parameters(), cfg)
        self.updates = 0
        self._forward = torch.compile(self.online) if cfg.compile else self.online

    @property
    def beta(self) -> float:
        return linear(self.cfg.priority_beta, 1.0, self.cfg.beta_anneal_updates, self.updates)

    def update(self, batch: TorchBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One gradient step. Returns new priorities (|TD|, on device) and metric tensors.

        Metrics stay tensors so that a GPU step needs no synchronisation; the caller
        reads them when it logs.
        """
        self.online.train()
        loss, priorities, q = td_loss(self._forward, self.target, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.cfg.target_update_period == 0:
            self.sync_target()
        metrics = {
            "losses/td_loss": loss.detach(),
            "losses/q_values": q.mean(),
            "losses/q_max": q.max(),
            "losses/abs_td": priorities.mean(),  # the new priorities' mean
            "replay/new_priority_max": priorities.max(),
            "losses/grad_norm": grad_norm.detach(),
            "replay/importance_weight": batch.weights.mean(),
        }
        return priorities, metrics

    def sync_target(self) -> None:
        self.target.load_state_dict(self.online.state_dict())

    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        """Networks, optimizer moments and update count from ``state``; the learning rate
        and epsilon stay this learner's (``cfg``): torch's ``Optimizer.load_state_dict``
        takes them from the saved state, so a rate changed on resume would be ignored."""
        self.online.load_state_dict(state["online"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"], group["eps"] = self.cfg.lr, self.cfg.optimizer_eps
        self.updates = int(state["updates"])


def check_learner_state(cfg: Config, num_actions: int, state: dict[str, Any], path: str) -> None:
    """Refuse a learner state that does not fit the networks and optimizer ``cfg`` names.

    Checked before Ray starts because the learner loads the state in its own process,
    where a mismatch would fail it again at every restart. Each network's tensors must
    have the names and shapes of the ``cfg.network`` network for the game's action count;
    the optimizer state must load into ``cfg.optimizer`` over those parameters, with
    moments of the parameters' shapes.
    """
    for key in ("online", "target", "optimizer", "updates"):
        if key not in state:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: its learner state lacks {key!r}"
            )
    head = "dueling " if cfg.dueling else ""
    what = f"a {cfg.network} {head}network for {cfg.game}"
    learner = Learner(cfg.replace(compile=False, amp="off"), num_actions, "cpu")
    for name in ("online", "target"):
        expected = getattr(learner, name).state_dict()
        check_network_state(state[name], expected, path, what, name)
    try:
        learner.load_state_dict(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit {what}: its optimizer state is not that of "
            f"{cfg.optimizer} over this network ({type(exc).__name__})"
        ) from exc
    for group in learner.optimizer.param_groups:
        for param in group["params"]:
            for value in learner.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    raise CheckpointError(
                        f"checkpoint {path} does not fit {what}: its optimizer state has "
                        f"{tuple(value.shape)} for a parameter of {tuple(param.shape)}"
                    )
