"""The Actor on the fake Atari vector env with a real (small) Q-network, no Ray.

A recording wrapper keeps every observation, reward and end flag the env returned and
every action sent, per lane (a group of envs the env returns together), so each stored
transition can be checked against what the actor actually saw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from apex_dqn.actors.actor import Actor
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.common.config import Config
from apex_dqn.common.messages import ZERO_FRAME, TransitionChunk
from apex_dqn.common.networks import QNetwork, state_dict_to_numpy

from tests.fakes import FakeAtariVectorEnv

NUM_ACTIONS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingEnv:
    """Wraps the fake env; keeps, per lane, each result returned and each action sent."""

    def __init__(self, env: FakeAtariVectorEnv):
        self.env = env
        self.num_envs = env.num_envs
        self.batch_size = env.batch_size
        lanes = env.num_envs // env.batch_size
        self.results: list[list[dict]] = [[] for _ in range(lanes)]
        self.sent: list[list[np.ndarray]] = [[] for _ in range(lanes)]
        self.recvs = 0
        self._last = -1

    def _keep(self, obs, reward, terminated, truncated, info) -> None:
        lane = int(info["env_id"][0]) // self.batch_size
        self.results[lane].append(
            {
                "obs": obs.copy(),
                "reward": np.asarray(reward).copy(),
                "terminated": np.asarray(terminated).copy(),
                "truncated": np.asarray(truncated).copy(),
                "lives": np.asarray(info["lives"]).copy(),
            }
        )
        self._last = lane

    def reset(self, *, seed=None):
        obs, info = self.env.reset(seed=seed)
        w = self.batch_size
        self._keep(obs, np.zeros(w), np.zeros(w, bool), np.zeros(w, bool), info)
        return obs, info

    def send(self, actions):
        self.sent[self._last].append(np.asarray(actions).copy())
        self.env.send(actions)

    def recv(self):
        result = self.env.recv()
        self.recvs += 1
        self._keep(*result)
        return result

    def close(self):
        self.env.close()


def small_net(seed: int = 0) -> QNetwork:
    torch.manual_seed(seed)
    return QNetwork(NUM_ACTIONS, "dqn2013", dueling=False).eval()


def small_policy(seed: int = 0) -> InferenceNet:
    return InferenceNet(NUM_ACTIONS, "dqn2013", False, "float32", small_net(seed).state_dict())


def assert_policy_is(policy: InferenceNet, net: QNetwork) -> None:
    """The policy computes ``net``'s Q-values (float32 inference: to rounding)."""
    obs = np.random.default_rng(5).integers(0, 256, (3, 4, 84, 84), dtype=np.uint8)
    with torch.inference_mode():
        expected = net(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(policy(obs), expected, rtol=1e-4, atol=1e-6)


def make_actor(
    cfg: Config,
    k: int = 2,
    lanes: int = 1,
    epsilons=None,
    weights_source=None,
    **fake,
):
    fake.setdefault("terminate_prob", 0.05)
    fake.setdefault("life_loss_prob", 0.05)
    fake.setdefault("max_steps", 25)
    env = RecordingEnv(FakeAtariVectorEnv(k, NUM_ACTIONS, seed=3, batch_size=k // lanes, **fake))
    chunks: list[TransitionChunk] = []
    sink_calls: list[int] = []

    def sink(chunk):
        chunks.append(chunk)
        sink_calls.append(env.recvs)

    actor = Actor(
        cfg,
        index=4,
        env=env,
        policy=small_policy(),
        epsilons=np.full(k, 0.3) if epsilons is None else epsilons,
        sink=sink,
        weights_source=weights_source or (lambda: None),
        stream=9,
        seed=11,
    )
    return actor, env, chunks, sink_calls


def lane_of_stream(env: RecordingEnv, chunks: list[TransitionChunk]) -> dict[int, int]:
    """Which lane each stream is, found by its first frames (the lane's reset frames)."""
    mapping = {}
    w = env.batch_size
    for chunk in chunks:
        if chunk.stream in mapping:
            continue
        assert chunk.first_frame == 0
        matches = [
            lane
            for lane, results in enumerate(env.results)
            if np.array_equal(chunk.frames[:w], results[0]["obs"][:, -1])
        ]
        assert len(matches) == 1
        mapping[chunk.stream] = matches[0]
    return mapping


def rebuild(frames: dict[int, np.ndarray], numbers) -> np.ndarray:
    zero = np.zeros((84, 84), dtype=np.uint8)
    return np.stack([zero if n == ZERO_FRAME else frames[int(n)] for n in numbers])


def episode_ends(results: list[dict], j: int, life_terminal: bool) -> list[int]:
    """Indices of the results after which env j's pending windows are cut short."""
    ends = []
    for s in range(1, len(results)):
        prev, cur = results[s - 1], results[s]
        reset_step = prev["terminated"][j] or prev["truncated"][j]
        if reset_step:
            continue
        lost = cur["lives"][j] < prev["lives"][j]
        if cur["terminated"][j] or cur["truncated"][j] or (life_terminal and lost):
            ends.append(s)
    return ends


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("life_terminal", [False, True])
def test_stored_transitions_match_what_the_env_returned(lanes, life_terminal):
    n, gamma, period = 3, 0.9, 8
    cfg = Config(n_step=n, gamma=gamma, push_period=period, terminal_on_life_loss=life_terminal)
    actor, env, chunks, _ = make_actor(cfg, k=4, lanes=lanes)
    actor.run(150)
    w = env.batch_size
    assert len(chunks) >= 2 * lanes
    lanes_by_stream = lane_of_stream(env, chunks)
    assert sorted(lanes_by_stream.values()) == list(range(lanes))

    frames: dict[int, dict[int, np.ndarray]] = {s: {} for s in lanes_by_stream}
    pushed_steps = {}
    seen: set[tuple[int, int, int]] = set()
    checked_cut = checked_reset = 0
    for chunk in chunks:
        lane = lanes_by_stream[chunk.stream]
        results, sent = env.results[lane], env.sent[lane]
        store = frames[chunk.stream]
        # Only the previous chunk's last `tail` frames may be referred to.
        keep = {m for m in store if m >= chunk.first_frame - chunk.tail}
        store = frames[chunk.stream] = {m: store[m] for m in keep}
        assert chunk.first_frame == (max(store) + 1 if store else 0)
        for i, f in enumerate(chunk.frames):
            store[chunk.first_frame + i] = f
        pushed_steps[lane] = (chunk.first_frame + len(chunk.frames)) // w - 1
        for idx in range(len(chunk)):
            o, x = chunk.obs[idx], chunk.next_obs[idx]
            s, j = divmod(int(o[-1]), w)
            s2, j2 = divmod(int(x[-1]), w)
            assert j2 == j
            assert (lane, s, j) not in seen
            seen.add((lane, s, j))
            # Bit for bit what the env returned at those steps.
            assert np.array_equal(rebuild(store, o), results[s]["obs"][j])
            assert np.array_equal(rebuild(store, x), results[s2]["obs"][j])
            assert chunk.actions[idx] == sent[s][j]
            h = s2 - s
            assert 1 <= h <= n
            rewards = [np.clip(results[s + 1 + i]["reward"][j], -1, 1) for i in range(h)]
            expected_return = sum(gamma**i * r for i, r in enumerate(rewards))
            assert chunk.returns[idx] == pytest.approx(expected_return, rel=1e-6)
            last = results[s2]
            lost = last["lives"][j] < results[s2 - 1]["lives"][j]
            if last["terminated"][j] or (life_terminal and lost):
                assert chunk.discounts[idx] == 0.0
                checked_cut += 1
            else:
                assert chunk.discounts[idx] == pytest.approx(gamma**h, rel=1e-6)
                if h < n:
                    assert last["truncated"][j]
            if o[0] == ZERO_FRAME and s > 0:
                checked_reset += 1
    assert checked_cut > 0 and checked_reset > 0

    # Every step of every env whose window was complete by the lane's last push is stored.
    for lane in range(lanes):
        results = env.results[lane]
        last = pushed_steps[lane]
        for j in range(w):
            ends = episode_ends(results, j, life_terminal)
            for s in range(last):
                if results[s]["terminated"][j] or results[s]["truncated"][j]:
                    continue  # the final observation of an episode opens no transition
                nxt = min([s + n, *[t for t in ends if t > s]])
                if nxt <= last:
                    assert (lane, s, j) in seen, (lane, s, j)


def test_each_env_explores_with_its_own_epsilon():
    cfg = Config(push_period=10)
    actor, env, _, _ = make_actor(cfg, k=2, epsilons=np.array([1.0, 0.0]))
    actor.run(120)
    results, sent = env.results[0], env.sent[0]
    assert len(sent) == 121
    random_env_greedy = 0
    random_env_actions = set()
    for result, actions in zip(results, sent, strict=False):
        greedy = actor.policy(result["obs"]).argmax(axis=1)
        assert actions[1] == greedy[1]  # epsilon 0: always the argmax
        random_env_greedy += int(actions[0] == greedy[0])
        random_env_actions.add(int(actions[0]))
    assert random_env_actions == set(range(NUM_ACTIONS))
    assert random_env_greedy < 60  # epsilon 1: uniform, about 1 in 6 greedy
    assert {ep.epsilon for ep in actor.episodes if ep.env == 0} <= {1.0}
    assert {ep.epsilon for ep in actor.episodes if ep.env == 1} <= {0.0}


def test_epsilon_count_must_match_envs():
    env = FakeAtariVectorEnv(2, NUM_ACTIONS)
    with pytest.raises(ValueError, match="epsilons"):
        Actor(Config(), 0, env, small_policy(), np.array([0.1, 0.2, 0.3]), print, print, 0, 0)


@pytest.mark.parametrize("lanes", [1, 2])
def test_episodes_record_unclipped_scores(lanes):
    epsilons = np.array([0.5, 0.1, 0.01, 0.001])
    actor, env, _, _ = make_actor(Config(), k=4, lanes=lanes, epsilons=epsilons)
    actor.run(120)
    w = env.batch_size
    expected = []
    for lane, results in enumerate(env.results):
        for j in range(w):
            score, length = 0.0, 0
            for s in range(1, len(results)):
                prev, cur = results[s - 1], results[s]
                if prev["terminated"][j] or prev["truncated"][j]:
                    continue  # reset step
                score += float(cur["reward"][j])
                length += 1
                if cur["terminated"][j] or cur["truncated"][j]:
                    e = lane * w + j
                    expected.append((e, score, length, float(np.float32(epsilons[e])), 4))
                    score, length = 0.0, 0
    got = [(ep.env, ep.score, ep.length, ep.epsilon, ep.actor) for ep in actor.drain_episodes()]
    assert len(expected) >= 8
    assert sorted(got) == sorted(expected)
    # Real game points (5, 10, 30), not clipped ones.
    assert any(score > length for _, score, length, _, _ in got)
    assert actor.drain_episodes() == []


def test_rewards_are_clipped_in_stored_returns():
    n, gamma = 3, 0.99
    cfg = Config(n_step=n, gamma=gamma, push_period=10)
    actor, _, chunks, _ = make_actor(cfg, k=2, terminate_prob=0.0, life_loss_prob=0.0)
    actor.run(60)
    returns = np.concatenate([c.returns for c in chunks])
    assert len(returns) > 50
    bound = sum(gamma**i for i in range(n))
    assert returns.max() <= bound + 1e-6
    assert returns.min() >= 0.0
    assert np.any(returns > 0)
    # With rewards of 0 or 1 after clipping, a return is a sum of distinct powers of gamma.
    possible = {round(sum(gamma**i for i in range(n) if mask >> i & 1), 5) for mask in range(2**n)}
    assert {round(float(r), 5) for r in returns} <= possible


@pytest.mark.parametrize("lanes", [1, 2])
def test_chunks_pushed_every_push_period_steps(lanes):
    period = 7
    actor, env, chunks, _ = make_actor(Config(push_period=period), k=4, lanes=lanes)
    actor.run(50)
    w = env.batch_size
    by_stream: dict[int, list[TransitionChunk]] = {}
    for chunk in chunks:
        by_stream.setdefault(chunk.stream, []).append(chunk)
    assert len(by_stream) == lanes
    lanes_by_stream = lane_of_stream(env, chunks)
    for stream, stream_chunks in by_stream.items():
        steps_taken = len(env.results[lanes_by_stream[stream]]) - 1
        assert len(stream_chunks) == steps_taken // period
        sizes = [len(c.frames) for c in stream_chunks]
        assert sizes == [(period + 1) * w] + [period * w] * (len(sizes) - 1)
        firsts = [c.first_frame for c in stream_chunks]
        assert firsts == [0, *np.cumsum(sizes)[:-1].tolist()]


@pytest.mark.parametrize("lanes", [1, 2])
def test_weights_source_consulted_every_sync_period_and_only_newer_loaded(lanes):
    period = 5
    nets = [small_net(seed) for seed in (100, 101, 102, 103)]
    states = [state_dict_to_numpy(net) for net in nets]
    replies = [
        None,
        (3, states[0]),  # newer: loaded
        (2, states[1]),  # older: ignored
        (3, states[2]),  # same version: ignored
        (7, states[3]),  # newer: loaded
    ]
    calls: list[int] = []
    versions: list[int] = []
    holder = {}

    def source():
        calls.append(holder["env"].recvs)
        versions.append(holder["actor"].weights_version)
        return replies[len(calls) - 1]

    cfg = Config(weight_sync_period=period, push_period=50)
    actor, env, _, _ = make_actor(cfg, k=4, lanes=lanes, weights_source=source)
    holder["env"], holder["actor"] = env, actor
    assert calls == []
    actor.run(5 * period + 2)
    assert calls == [lanes * period * i for i in range(1, 6)]
    assert versions == [-1, -1, 3, 3, 3]
    assert actor.weights_version == 7
    assert_policy_is(actor.policy, nets[3])


def test_sync_weights_loads_newer_and_ignores_older():
    replies = []
    actor, _, _, _ = make_actor(Config(), weights_source=lambda: replies.pop(0))
    new, old = state_dict_to_numpy(small_net(7)), state_dict_to_numpy(small_net(8))
    replies += [(1, new), (0, old), None]
    assert actor.sync_weights() is True
    assert actor.sync_weights() is False
    assert actor.sync_weights() is False
    assert actor.weights_version == 1
    assert_policy_is(actor.policy, small_net(7))
