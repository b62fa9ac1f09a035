"""The Actor on the fake Atari vector env with a real (small) Q-network, no Ray.

Each lane is a vector env of its own, wrapped in a recording env that keeps every
result it returned and every action it was sent, in order, so each stored transition
can be checked against what the actor actually saw.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from apex_dqn.actors.actor import Actor
from apex_dqn.actors.inference import InferenceNet
from apex_dqn.common.config import Config
from apex_dqn.common.messages import ZERO_FRAME, TransitionChunk
from apex_dqn.common.networks import QNetwork, state_dict_to_numpy
from tests.fakes import FakeAtariVectorEnv, RowPolicy

NUM_ACTIONS = 6
STREAM, SEED = 9, 11  # the actor's; lane l's chunks carry stream STREAM * 16 + l


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingEnv:
    """Wraps one lane's vector env; keeps its results and the actions it was sent, in order.

    ``results[s]`` (a dict of arrays over the env's envs) is what it returned at step
    ``s`` (0: the reset) and ``sent[s]`` the actions sent after it. ``log``, shared by
    the lanes of one actor, records every call as ``(call, lane)``.
    """

    def __init__(self, env, lane: int = 0, log: list | None = None):
        self.env, self.lane = env, lane
        self.num_envs = env.num_envs
        self.results: list[dict[str, np.ndarray]] = []
        self.sent: list[np.ndarray] = []
        self.log = [] if log is None else log

    def _keep(self, obs, reward, terminated, truncated, info) -> None:
        # What the actor relies on: every env of the lane, in env order.
        assert np.array_equal(info["env_id"], np.arange(self.num_envs))
        self.results.append({
            "obs": obs.copy(),
            "reward": np.array(reward),
            "terminated": np.array(terminated, dtype=bool),
            "truncated": np.array(truncated, dtype=bool),
            "lives": np.array(info["lives"]),
        })  # fmt: skip

    def reset(self, *, seed=None):
        obs, info = self.env.reset(seed=seed)
        self.log.append(("reset", self.lane))
        k = len(obs)
        self._keep(obs, np.zeros(k, np.int32), np.zeros(k, bool), np.zeros(k, bool), info)
        return obs, info

    def send(self, actions):
        self.log.append(("send", self.lane))
        self.sent.append(np.array(actions))
        self.env.send(actions)

    def recv(self):
        result = self.env.recv()
        self.log.append(("recv", self.lane))
        self._keep(*result)
        return result

    def close(self):
        self.env.close()

    @property
    def recvs(self) -> int:
        return len(self.results) - 1


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
    policy=None,
    seed: int = SEED,
    **fake,
) -> tuple[Actor, list[RecordingEnv], list[TransitionChunk]]:
    """An actor on ``lanes`` fake envs of ``k / lanes`` envs each, every one recorded."""
    fake.setdefault("terminate_prob", 0.05)
    fake.setdefault("life_loss_prob", 0.05)
    fake.setdefault("max_steps", 25)
    log: list = []
    envs = [RecordingEnv(FakeAtariVectorEnv(k // lanes, NUM_ACTIONS, **fake), lane, log)
            for lane in range(lanes)]  # fmt: skip
    chunks: list[TransitionChunk] = []
    actor = Actor(
        cfg,
        index=4,
        envs=envs,
        policy=small_policy() if policy is None else policy,
        epsilons=np.full(k, 0.3) if epsilons is None else epsilons,
        sink=chunks.append,
        weights_source=weights_source or (lambda: None),
        stream=STREAM,
        seed=seed,
    )
    return actor, envs, chunks


def lane_of(chunk: TransitionChunk) -> int:
    return chunk.stream - 16 * STREAM


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


def check_transitions(
    env: RecordingEnv, chunks: list[TransitionChunk], n: int, gamma: float, life_terminal: bool
) -> tuple[int, int]:
    """Every transition of one lane's ``chunks`` is bit for bit what its env returned and
    was sent, with the right n-step return and discount, and every step whose window was
    complete by the lane's last push is stored. Returns how many cut windows and
    transitions starting at a reset were checked."""
    w, results, sent = env.num_envs, env.results, env.sent
    store: dict[int, np.ndarray] = {}
    seen: set[tuple[int, int]] = set()
    pushed_steps = 0
    checked_cut = checked_reset = 0
    for chunk in chunks:
        # Only the previous chunk's last `tail` frames may be referred to.
        store = {m: f for m, f in store.items() if m >= chunk.first_frame - chunk.tail}
        assert chunk.first_frame == (max(store) + 1 if store else 0)
        for i, f in enumerate(chunk.frames):
            store[chunk.first_frame + i] = f
        pushed_steps = (chunk.first_frame + len(chunk.frames)) // w - 1
        for idx in range(len(chunk)):
            o, x = chunk.obs[idx], chunk.next_obs[idx]
            s, j = divmod(int(o[-1]), w)
            s2, j2 = divmod(int(x[-1]), w)
            assert j2 == j
            assert (s, j) not in seen
            seen.add((s, j))
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

    # Every step of every env whose window was complete by the lane's last push is stored.
    for j in range(w):
        ends = episode_ends(results, j, life_terminal)
        for s in range(pushed_steps):
            if results[s]["terminated"][j] or results[s]["truncated"][j]:
                continue  # the final observation of an episode opens no transition
            nxt = min([s + n, *[t for t in ends if t > s]])
            if nxt <= pushed_steps:
                assert (s, j) in seen, (s, j)
    return checked_cut, checked_reset


def check_lanes(
    actor: Actor, envs: list[RecordingEnv], chunks: list[TransitionChunk], n: int,
    gamma: float, life_terminal: bool,
) -> tuple[int, int]:  # fmt: skip
    """Every lane pushed, each lane's transitions check against its own env, and every
    result each env returned was accounted for and answered."""
    assert sorted({lane_of(c) for c in chunks}) == list(range(len(envs)))
    checked_cut = checked_reset = 0
    for lane, env in enumerate(envs):
        lane_chunks = [c for c in chunks if lane_of(c) == lane]
        cut, reset = check_transitions(env, lane_chunks, n, gamma, life_terminal)
        checked_cut, checked_reset = checked_cut + cut, checked_reset + reset
        assert len(env.results) == len(env.sent) == actor.lanes[lane].acc.step + 1
    assert actor.env_steps == sum(env.recvs * env.num_envs for env in envs)
    return checked_cut, checked_reset


@pytest.mark.parametrize("lanes", [1, 2, 3])
@pytest.mark.parametrize("life_terminal", [False, True])
def test_stored_transitions_match_what_the_env_returned(lanes, life_terminal):
    n, gamma, period = 3, 0.9, 8
    cfg = Config(n_step=n, gamma=gamma, push_period=period, terminal_on_life_loss=life_terminal)
    actor, envs, chunks = make_actor(cfg, k=max(4, 2 * lanes), lanes=lanes)
    actor.run(150)
    assert len(chunks) >= 2 * lanes
    checked_cut, checked_reset = check_lanes(actor, envs, chunks, n, gamma, life_terminal)
    assert checked_cut > 0 and checked_reset > 0


@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_take_turns_each_in_flight_while_the_others_are_served(lanes):
    actor, envs, _ = make_actor(Config(), k=2 * lanes, lanes=lanes)
    actor.run(3)
    start = [(call, lane) for lane in range(lanes) for call in ("reset", "send")]
    turns = [(call, lane) for _ in range(3) for lane in range(lanes) for call in ("recv", "send")]
    assert envs[0].log == start + turns
    assert [env.recvs for env in envs] == [3] * lanes


def assert_same_chunk(a: TransitionChunk, b: TransitionChunk) -> None:
    """Bit for bit the same transitions and frames, whatever stream each belongs to."""
    for field in dataclasses.fields(TransitionChunk):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        elif field.name != "stream":
            assert x == y, field.name


@pytest.mark.parametrize("lanes", [2, 3])
def test_each_lane_gives_the_transitions_of_its_envs_stepped_alone(lanes):
    """A lane's chunks and episodes are bit for bit those of a one-lane actor stepping the
    lane's envs alone (same seeds). Greedy, with a policy exact per row, so an env's
    actions depend on its own observations alone."""
    cfg = Config(n_step=3, gamma=0.9, push_period=5, terminal_on_life_loss=True)
    w, steps = 2, 150
    actor, _, chunks = make_actor(cfg, k=w * lanes, lanes=lanes, epsilons=np.zeros(w * lanes),
                                  policy=RowPolicy(NUM_ACTIONS))  # fmt: skip
    actor.run(steps)
    compared = 0
    for lane in range(lanes):
        alone, _, alone_chunks = make_actor(cfg, k=w, epsilons=np.zeros(w), seed=SEED + lane * w,
                                            policy=RowPolicy(NUM_ACTIONS))  # fmt: skip
        alone.run(steps)
        got = [c for c in chunks if lane_of(c) == lane]
        assert len(got) == len(alone_chunks) == steps // cfg.push_period
        for a, b in zip(got, alone_chunks, strict=True):
            assert_same_chunk(a, b)
            compared += len(a)
        first = lane * w
        episodes = [(ep.env - first, ep.score, ep.length) for ep in actor.episodes
                    if first <= ep.env < first + w]  # fmt: skip
        assert episodes == [(ep.env, ep.score, ep.length) for ep in alone.episodes]
        assert len(episodes) >= w
    assert compared > 100 * lanes


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_each_env_explores_with_its_own_epsilon(lanes):
    k, steps = 2 * lanes, 150
    epsilons = np.resize([1.0, 0.0, 0.0, 1.0], k)
    policy = RowPolicy(NUM_ACTIONS)  # exact per row: its argmax is recomputed below
    actor, envs, _ = make_actor(Config(push_period=10), k=k, lanes=lanes, epsilons=epsilons,
                                policy=policy)  # fmt: skip
    actor.run(steps)
    for lane, env in enumerate(envs):
        sent = np.stack(env.sent)
        obs = np.stack([r["obs"] for r in env.results])
        assert sent.shape == (steps + 1, 2)
        greedy = policy(obs.reshape(-1, *obs.shape[2:])).argmax(axis=1).reshape(sent.shape)
        for j in range(2):
            matches = int((sent[:, j] == greedy[:, j]).sum())
            if epsilons[2 * lane + j] == 0.0:
                assert matches == steps + 1  # always the argmax of its own observation
            else:
                assert matches < steps / 2  # uniform: about 1 in 6 greedy
                assert set(sent[:, j].tolist()) == set(range(NUM_ACTIONS))
    assert {(ep.env, ep.epsilon) for ep in actor.episodes} <= {
        (e, float(epsilons[e])) for e in range(k)
    }


def expected_episodes(envs: list[RecordingEnv]) -> list[tuple[int, float, int]]:
    """(env, unclipped score, agent steps) of every episode the lanes' steps have ended."""
    expected = []
    first = 0
    for env in envs:
        results = env.results
        for j in range(env.num_envs):
            score, length = 0.0, 0
            for s in range(1, len(results)):
                prev, cur = results[s - 1], results[s]
                if prev["terminated"][j] or prev["truncated"][j]:
                    continue  # reset step
                score += float(cur["reward"][j])
                length += 1
                if cur["terminated"][j] or cur["truncated"][j]:
                    expected.append((first + j, score, length))
                    score, length = 0.0, 0
        first += env.num_envs
    return expected


@pytest.mark.rom
@pytest.mark.parametrize("threads", [2, 4])
def test_two_lanes_on_two_emulator_threads_of_the_real_env(threads):
    """ale-py, two lanes and one or two emulator threads per lane: each lane's env returns
    all its envs in env order, the actor stores exactly what each env returned and counts
    every env's episodes."""
    from apex_dqn.common.envs import make_lane_envs

    n, gamma, k, lanes, steps = 3, 0.9, 8, 2, 200
    # Episodes of 60 agent steps (truncated), so every env finishes a few.
    cfg = Config(n_step=n, gamma=gamma, push_period=10, max_episode_frames=240,
                 terminal_on_life_loss=True, envs_per_actor=k, actor_lanes=lanes,
                 actor_threads=threads)  # fmt: skip
    log: list = []
    envs = [RecordingEnv(env, lane, log) for lane, env in enumerate(make_lane_envs(cfg))]
    assert [env.num_envs for env in envs] == [k // lanes] * lanes
    chunks: list[TransitionChunk] = []
    try:
        actor = Actor(cfg, 4, envs, small_policy(), np.full(k, 0.5), chunks.append,
                      lambda: None, stream=STREAM, seed=SEED)  # fmt: skip
        actor.run(steps)
    finally:
        for env in envs:
            env.close()
    assert all(env.recvs == steps for env in envs)
    assert all(sum(lane_of(c) == lane for c in chunks) >= 5 for lane in range(lanes))
    _, checked_reset = check_lanes(actor, envs, chunks, n, gamma, True)
    assert checked_reset > 0
    got = sorted((ep.env, ep.score, ep.length) for ep in actor.episodes)
    assert got == sorted(expected_episodes(envs))
    # Truncated at 60 agent steps (a game over comes later): each env finished a few.
    assert all(length <= 60 for _, _, length in got)
    assert {e for e, _, _ in got} == set(range(k))
    assert len(got) >= 2 * k


def test_epsilon_count_must_match_envs():
    envs = [FakeAtariVectorEnv(2, NUM_ACTIONS)]
    with pytest.raises(ValueError, match="epsilons"):
        Actor(Config(), 0, envs, small_policy(), np.array([0.1, 0.2, 0.3]), print, print, 0, 0)


@pytest.mark.parametrize("lanes", [1, 2])
def test_episodes_record_unclipped_scores(lanes):
    epsilons = np.array([0.5, 0.1, 0.01, 0.001])
    actor, envs, _ = make_actor(Config(), k=4, lanes=lanes, epsilons=epsilons)
    actor.run(120)
    expected = [(e, score, length, float(np.float32(epsilons[e])), 4)
                for e, score, length in expected_episodes(envs)]  # fmt: skip
    got = [(ep.env, ep.score, ep.length, ep.epsilon, ep.actor) for ep in actor.drain_episodes()]
    assert len(expected) >= 8
    assert sorted(got) == sorted(expected)
    # Real game points (5, 10, 30), not clipped ones.
    assert any(score > length for _, score, length, _, _ in got)
    assert actor.drain_episodes() == []


def test_rewards_are_clipped_in_stored_returns():
    n, gamma = 3, 0.99
    cfg = Config(n_step=n, gamma=gamma, push_period=10)
    actor, _, chunks = make_actor(cfg, k=2, terminate_prob=0.0, life_loss_prob=0.0)
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
    actor, envs, chunks = make_actor(Config(push_period=period), k=4, lanes=lanes)
    actor.run(50)
    assert sorted({lane_of(c) for c in chunks}) == list(range(lanes))
    for lane, env in enumerate(envs):
        lane_chunks = [c for c in chunks if lane_of(c) == lane]
        w = env.num_envs
        assert len(lane_chunks) == env.recvs // period
        sizes = [len(c.frames) for c in lane_chunks]
        assert sizes == [(period + 1) * w] + [period * w] * (len(sizes) - 1)
        firsts = [c.first_frame for c in lane_chunks]
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
        calls.append(sum(env.recvs for env in holder["envs"]))
        versions.append(holder["actor"].weights_version)
        return replies[len(calls) - 1]

    cfg = Config(weight_sync_period=period, push_period=50)
    actor, envs, _ = make_actor(cfg, k=4, lanes=lanes, weights_source=source)
    holder["envs"], holder["actor"] = envs, actor
    assert calls == []
    actor.run(5 * period + 2)
    assert calls == [lanes * period * i for i in range(1, 6)]
    assert versions == [-1, -1, 3, 3, 3]
    assert actor.weights_version == 7
    assert_policy_is(actor.policy, nets[3])


def test_sync_weights_loads_newer_and_ignores_older():
    replies = []
    actor, _, _ = make_actor(Config(), weights_source=lambda: replies.pop(0))
    new, old = state_dict_to_numpy(small_net(7)), state_dict_to_numpy(small_net(8))
    replies += [(1, new), (0, old), None]
    assert actor.sync_weights() is True
    assert actor.sync_weights() is False
    assert actor.sync_weights() is False
    assert actor.weights_version == 1
    assert_policy_is(actor.policy, small_net(7))
