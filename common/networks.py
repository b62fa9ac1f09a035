"""Q-networks over stacks of four 84x84 uint8 frames.

* ``dqn2013``: Mnih et al. 2013 ("Playing Atari"): conv 16x8x8/4, conv 32x4x4/2, fc 256.
* ``nature``: Mnih et al. 2015: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, fc 512.
* ``dueling``: Wang et al. 2016 head, Q = V + A - mean(A), on either torso.

Inputs stay uint8 until the network, which scales them to [0, 1] itself, so replay,
actors and the input pipeline never hold float frames. A network cast to bfloat16 (the
actors' inference copy, where the CPU has native bf16 kernels) converts its input to
bfloat16 instead; see :func:`inference_dtype`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from common.envs import STACK


def _torso(name: str) -> tuple[nn.Module, int, int]:
    """Return (conv torso, flattened size, hidden width)."""
    if name == "nature":
        conv = nn.Sequential(
            nn.Conv2d(STACK, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        return conv, 64 * 7 * 7, 512
    if name == "dqn2013":
        conv = nn.Sequential(
            nn.Conv2d(STACK, 16, 8, stride=4), nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
            nn.Flatten(),
        )  # fmt: skip
        return conv, 32 * 9 * 9, 256
    raise ValueError(f"unknown network {name!r}")


class QNetwork(nn.Module):
    """Maps uint8 observations (B, 4, 84, 84) to Q-values (B, num_actions)."""

    def __init__(self, num_actions: int, network: str = "nature", dueling: bool = True):
        super().__init__()
        self.torso, flat, hidden = _torso(network)
        self.dueling = dueling
        if dueling:
            self.value = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.advantage = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )
        else:
            self.head = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        dtype = self.torso[0].weight.dtype
        x = self.torso(obs.to(dtype) * (1.0 / 255.0))
        if not self.dueling:
            return self.head(x)
        advantage = self.advantage(x)
        return self.value(x) + advantage - advantage.mean(dim=1, keepdim=True)


def build_network(num_actions: int, network: str, dueling: bool) -> QNetwork:
    return QNetwork(num_actions, network, dueling)


def inference_dtype(precision: str) -> torch.dtype:
    """The dtype for an actor's inference copy of the network.

    ``auto`` picks bfloat16 where oneDNN has native bf16 kernels for this CPU (about twice
    as fast as float32 for the Nature network at actor batch sizes) and float32
    elsewhere. bf16 Q-values carry ~3 significant digits: enough to pick greedy actions
    and first priorities; the learner always trains in float32.
    """
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def state_dict_to_numpy(net: nn.Module) -> dict[str, object]:
    """CPU numpy copy of the weights: cheap to put in Ray's object store and share."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in net.state_dict().items()}


def load_numpy_state(net: nn.Module, state: dict[str, object]) -> None:
    """Load weights from :func:`state_dict_to_numpy`; read-only arrays are fine (copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
