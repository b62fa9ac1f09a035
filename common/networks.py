"""Q-networks over stacks of four 84x84 uint8 frames.

* ``dqn2013``: Mnih et al. 2013 ("Playing Atari"): conv 16x8x8/4, conv 32x4x4/2, fc 256.
* ``nature``: Mnih et al. 2015: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, fc 512.
* ``dueling``: Wang et al. 2016 head, Q = V + A - mean(A), on either torso.

Inputs stay uint8 until the network, which scales them to [0, 1] itself, so replay,
actors and the input pipeline never hold float frames. Actors run these networks
rebuilt for inference (:mod:`actors.inference`). The learner trains them in float32, or
with the torso (convolutions and hidden layer) in bfloat16 (:attr:`QNetwork.torso_dtype`):
the output layer, and so the Q-values, stay float32 either way.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from apex_dqn.common.envs import FRAME_SHAPE, STACK

# Per network: its convolutions as (out channels, kernel, stride), and its hidden width.
CONVS = {
    "nature": ((32, 8, 4), (64, 4, 2), (64, 3, 1)),
    "dqn2013": ((16, 8, 4), (32, 4, 2)),
}
HIDDEN = {"nature": 512, "dqn2013": 256}


def conv_layers(name: str) -> list[tuple[int, int, tuple[int, int, int]]]:
    """(index in the torso, stride, output shape (C, H, W)) of each convolution."""
    if name not in CONVS:
        raise ValueError(f"unknown network {name!r}")
    layers, side = [], FRAME_SHAPE[0]
    for i, (channels, kernel, stride) in enumerate(CONVS[name]):
        side = (side - kernel) // stride + 1
        layers.append((2 * i, stride, (channels, side, side)))
    return layers


def _torso(name: str) -> tuple[nn.Module, int, int]:
    """Return (conv torso: conv, ReLU, conv, ReLU, ..., flatten; flattened size; hidden width)."""
    flat = int(np.prod(conv_layers(name)[-1][2]))  # raises for an unknown name
    modules: list[nn.Module] = []
    channels = STACK
    for out, kernel, stride in CONVS[name]:
        modules += [nn.Conv2d(channels, out, kernel, stride=stride), nn.ReLU()]
        channels = out
    return nn.Sequential(*modules, nn.Flatten()), flat, HIDDEN[name]


class QNetwork(nn.Module):
    """Maps uint8 observations (B, 4, 84, 84) to float32 Q-values (B, num_actions).

    ``torso_dtype``: None computes everything in float32 (the weights' dtype). With
    ``torch.bfloat16`` the torso (convolutions and the hidden layer, or both streams'
    hidden layers) runs under autocast, and its output is cast back to float32 for the
    output layer, which runs with autocast off. The reason is the Q-values' scale: bf16
    keeps 8 significant bits, so Q-values of 8-32 would be rounded to multiples of
    0.0625-0.125, errors as large as a typical TD error. Computed in float32 from bf16
    hidden activations h, a Q-value's error is a few 2^-8 of |W| |h| (the output layer's
    weights times the activations), whatever the bias and the Q-values' mean.
    """

    def __init__(
        self,
        num_actions: int,
        network: str = "nature",
        dueling: bool = True,
        torso_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.torso, flat, hidden = _torso(network)
        self.network, self.dueling = network, dueling
        self.torso_dtype = torso_dtype
        if dueling:
            self.value = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.advantage = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )
        else:
            self.head = nn.Sequential(
                nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )

    def hidden(self, obs: torch.Tensor) -> list[torch.Tensor]:
        """The torso's output: the hidden layer after its ReLU (the value stream's and the
        advantage stream's, in that order, for a dueling network)."""
        x = self.torso(obs.to(torch.float32) * (1.0 / 255.0))
        streams = (self.value, self.advantage) if self.dueling else (self.head,)
        return [stream[1](stream[0](x)) for stream in streams]

    def q_values(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """The output layer on :meth:`hidden`'s result: Q = V + A - mean(A) when dueling."""
        if not self.dueling:
            return self.head[2](hidden[0])
        advantage = self.advantage[2](hidden[1])
        return self.value[2](hidden[0]) + advantage - advantage.mean(dim=1, keepdim=True)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.torso_dtype is None:
            return self.q_values(self.hidden(obs))
        device = obs.device.type
        with torch.autocast(device, dtype=self.torso_dtype):
            hidden = self.hidden(obs)
        with torch.autocast(device, enabled=False):
            return self.q_values([h.float() for h in hidden])


def build_network(
    num_actions: int, network: str, dueling: bool, torso_dtype: torch.dtype | None = None
) -> QNetwork:
    return QNetwork(num_actions, network, dueling, torso_dtype)


def state_dict_to_numpy(net: nn.Module) -> dict[str, object]:
    """CPU numpy copy of the weights: cheap to put in Ray's object store and share."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in net.state_dict().items()}


def load_numpy_state(net: nn.Module, state: dict[str, object]) -> None:
    """Load weights from :func:`state_dict_to_numpy`; read-only arrays are fine (copied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
