"""The actor's inference copy computes the learner's network: every layout, precision and path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_dqn.actors.inference import InferenceNet, onednn_usable
from apex_dqn.common.networks import QNetwork, state_dict_to_numpy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_ACTIONS = 6
PATHS = [False, True] if onednn_usable() else [False]
BF16 = onednn_usable() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _net(network: str, dueling: bool, seed: int) -> QNetwork:
    torch.manual_seed(seed)
    return QNetwork(NUM_ACTIONS, network, dueling).eval()


def _obs(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 4, 84, 84), dtype=np.uint8)


def _reference(net: QNetwork, obs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return net(torch.from_numpy(obs)).double().numpy()


def _policy(net: QNetwork, precision: str, packed: bool) -> InferenceNet:
    state = state_dict_to_numpy(net)
    policy = InferenceNet(NUM_ACTIONS, net.network, net.dueling, precision, state)
    policy.packed = packed
    return policy


@pytest.mark.parametrize("packed", PATHS)
@pytest.mark.parametrize(
    "network,dueling", [("nature", True), ("nature", False), ("dqn2013", True), ("dqn2013", False)]
)
def test_float32_matches_the_network(network, dueling, packed):
    net = _net(network, dueling, seed=1)
    obs = _obs(16)
    q = _policy(net, "float32", packed)(obs)
    assert q.dtype == np.float32 and q.shape == (16, NUM_ACTIONS)
    np.testing.assert_allclose(q, _reference(net, obs), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not BF16, reason="no native bfloat16 kernels on this CPU")
@pytest.mark.parametrize("packed", PATHS)
@pytest.mark.parametrize("network,dueling", [("nature", True), ("dqn2013", False)])
def test_bfloat16_is_within_its_precision_and_keeps_clear_argmaxes(network, dueling, packed):
    """bf16 keeps 8 bits of mantissa: Q within 1% of the Q scale; a greedy action whose
    margin over the runner-up is larger than that error is always the same."""
    net = _net(network, dueling, seed=2)
    obs = _obs(32, seed=3)
    expected = _reference(net, obs)
    q = _policy(net, "bfloat16", packed)(obs)
    err = np.abs(q - expected).max()
    assert err <= 0.01 * np.abs(expected).max()
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * err
    assert clear.sum() >= 8
    assert np.array_equal(q.argmax(1)[clear], expected.argmax(1)[clear])


@pytest.mark.parametrize("packed", PATHS)
def test_new_weights_replace_the_old_for_every_batch_size(packed):
    first, second = _net("nature", True, seed=3), _net("nature", True, seed=4)
    policy = _policy(first, "float32", packed)
    for batch in (16, 1, 16):
        obs = _obs(batch, seed=batch)
        np.testing.assert_allclose(policy(obs), _reference(first, obs), rtol=1e-4, atol=1e-6)
    policy.load_state(state_dict_to_numpy(second))
    for batch in (16, 5):
        obs = _obs(batch, seed=batch)
        np.testing.assert_allclose(policy(obs), _reference(second, obs), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packed", PATHS)
@pytest.mark.parametrize("dueling", [True, False])
def test_weights_are_copied_not_shared_with_the_state(dueling, packed):
    """Ray hands the actor arrays in its object store, freed later: never keep them."""
    net = _net("dqn2013", dueling, seed=5)
    state = state_dict_to_numpy(net)
    policy = _policy(net, "float32", packed)
    policy.load_state(state)
    for value in state.values():
        value[...] = 0.0
    obs = _obs(4)
    np.testing.assert_allclose(policy(obs), _reference(net, obs), rtol=1e-4, atol=1e-6)


def test_read_only_state_loads():
    state = state_dict_to_numpy(_net("dqn2013", True, seed=6))
    for value in state.values():
        value.setflags(write=False)
    policy = InferenceNet(NUM_ACTIONS, "dqn2013", True, "float32", state)
    assert np.isfinite(policy(_obs(2))).all()
