"""The Actor on the fake Atari vector env with a real (small) Q-network, no Ray.

A recording wrapper keeps every observation, reward and end flag the env returned and
every action sent, per env in that env's own order, and gathers them per lane (a group
of envs the actor accounts for together), so each stored transition can be checked
against what the actor actually saw, whatever order the env returned its envs in.
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
from tests.fakes import FakeAtariVectorEnv, RowPolicy, ScrambledAtariVectorEnv

NUM_ACTIONS = 6
RESULT_KEYS = ("obs", "reward", "terminated", "truncated", "lives")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RecordingEnv:
    """Wraps a vector env; keeps each env's results and the actions it was sent, in order.

    ``results[lane][s]`` (a dict of arrays over the lane's envs) and ``sent[lane][s]``
    gather the lane's envs at their step ``s``, for every step all of them have
    returned: the steps the actor's accumulator for that lane has seen.
    """

    def __init__(self, env):
        self.env = env
        self.num_envs = env.num_envs
        self.batch_size = env.batch_size
        self.by_env: list[list[dict]] = [[] for _ in range(self.num_envs)]
        self.sent_by_env: list[list[int]] = [[] for _ in range(self.num_envs)]
        self.batches: list[np.ndarray] = []  # env ids of each batch returned, reset's first
        self.recvs = 0
        self._last = np.arange(self.num_envs)
        self._views: tuple[int, list, list] | None = None

    def _keep(self, obs, reward, terminated, truncated, info) -> None:
        ids = np.asarray(info.get("env_id", np.arange(len(obs)))).astype(np.int64)
        for j, e in enumerate(ids.tolist()):
            self.by_env[e].append(
                {
                    "obs": obs[j].copy(),
                    "reward": np.asarray(reward)[j],
                    "terminated": bool(terminated[j]),
                    "truncated": bool(truncated[j]),
                    "lives": int(np.asarray(info["lives"])[j]),
                }
            )
        self.batches.append(ids)
        self._last = ids

    def reset(self, *, seed=None):
        obs, info = self.env.reset(seed=seed)
        b = len(obs)
        self._keep(obs, np.zeros(b, np.int32), np.zeros(b, bool), np.zeros(b, bool), info)
        return obs, info

    def send(self, actions):
        for j, e in enumerate(self._last.tolist()):
            self.sent_by_env[e].append(int(actions[j]))
        self.env.send(actions)

    def recv(self):
        result = self.env.recv()
        self.recvs += 1
        self._keep(*result)
        return result

    def close(self):
        self.env.close()

    def _step_of(self, envs: range, s: int) -> dict[str, np.ndarray]:
        return {key: np.stack([np.asarray(self.by_env[e][s][key]) for e in envs])
                for key in RESULT_KEYS}  # fmt: skip

    def _lane_views(self) -> tuple[list, list]:
        sends = sum(len(s) for s in self.sent_by_env)
        if self._views is None or self._views[0] != (self.recvs, sends):
            results, sent = [], []
            for first in range(0, self.num_envs, self.batch_size):
                envs = range(first, first + self.batch_size)
                steps = min(len(self.by_env[e]) for e in envs)
                results.append([self._step_of(envs, s) for s in range(steps)])
                steps = min(len(self.sent_by_env[e]) for e in envs)
                sent.append(
                    [np.array([self.sent_by_env[e][s] for e in envs]) for s in range(steps)]
                )
            self._views = ((self.recvs, sends), results, sent)
        return self._views[1], self._views[2]

    @property
    def results(self) -> list[list[dict]]:
        return self._lane_views()[0]

    @property
    def sent(self) -> list[list[np.ndarray]]:
        return self._lane_views()[1]

    def mixed_batches(self) -> int:
        """Batches that were not one whole lane in order."""
        w = self.batch_size
        return sum(
            not np.array_equal(ids, np.arange(ids[0] // w * w, ids[0] // w * w + w))
            for ids in self.batches
        )


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
    scramble: bool = False,
    **fake,
):
    """An actor on the fake env, or with ``scramble`` on the fake that returns envs in
    any order and mix of lanes (``ScrambledAtariVectorEnv``)."""
    fake.setdefault("terminate_prob", 0.05)
    fake.setdefault("life_loss_prob", 0.05)
    fake.setdefault("max_steps", 25)
    if scramble:
        inner = ScrambledAtariVectorEnv(k, num_actions=NUM_ACTIONS, seed=3, batch_size=k // lanes,
                                        **fake)  # fmt: skip
    else:
        inner = FakeAtariVectorEnv(k, NUM_ACTIONS, seed=3, batch_size=k // lanes, **fake)
    env = RecordingEnv(inner)
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


def check_transitions(
    env: RecordingEnv, chunks: list[TransitionChunk], n: int, gamma: float, life_terminal: bool
) -> tuple[int, int]:
    """Every stored transition is bit for bit what its env returned and was sent, with the
    right n-step return and discount, and every step whose window was complete by its
    lane's last push is stored. Returns how many cut windows and transitions starting
    at a reset were checked."""
    w = env.batch_size
    lanes_by_stream = lane_of_stream(env, chunks)
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

    # Every step of every env whose window was complete by the lane's last push is stored.
    for lane, last in pushed_steps.items():
        results = env.results[lane]
        for j in range(w):
            ends = episode_ends(results, j, life_terminal)
            for s in range(last):
                if results[s]["terminated"][j] or results[s]["truncated"][j]:
                    continue  # the final observation of an episode opens no transition
                nxt = min([s + n, *[t for t in ends if t > s]])
                if nxt <= last:
                    assert (lane, s, j) in seen, (lane, s, j)
    return checked_cut, checked_reset


def check_accounting(actor: Actor, env: RecordingEnv) -> None:
    """Every result the env returned is either accounted for in its lane or still held."""
    w = env.batch_size
    holding = getattr(actor, "_held", None)  # created by the first batch not a whole lane
    held = holding.ahead if holding is not None else np.zeros(env.num_envs, int)
    for e in range(env.num_envs):
        lane = actor.lanes[e // w]
        assert len(env.by_env[e]) == lane.acc.step + 1 + held[e], e
    assert actor.env_steps == sum(lane.acc.step for lane in actor.lanes) * w


# (lanes, scramble): whole lanes in order as with one emulator thread, or any envs in any
# order as with several.
LANE_MODES = [(1, False), (2, False), (2, True), (3, True)]
FOUR_ENV_MODES = [(1, False), (2, False), (2, True)]


@pytest.mark.parametrize(("lanes", "scramble"), LANE_MODES)
@pytest.mark.parametrize("life_terminal", [False, True])
def test_stored_transitions_match_what_the_env_returned(lanes, scramble, life_terminal):
    n, gamma, period = 3, 0.9, 8
    cfg = Config(n_step=n, gamma=gamma, push_period=period, terminal_on_life_loss=life_terminal)
    actor, env, chunks, _ = make_actor(cfg, k=2 * lanes if lanes > 2 else 4, lanes=lanes,
                                       scramble=scramble)  # fmt: skip
    actor.run(150)
    assert len(chunks) >= 2 * lanes
    assert (env.mixed_batches() > 50) == scramble
    assert sorted(lane_of_stream(env, chunks).values()) == list(range(lanes))
    checked_cut, checked_reset = check_transitions(env, chunks, n, gamma, life_terminal)
    assert checked_cut > 0 and checked_reset > 0
    check_accounting(actor, env)


def run_on_fake(
    scramble: bool,
    lanes: int,
    k: int,
    steps: int,
    epsilons: np.ndarray | None = None,
    laggard: tuple[int, int] | None = None,
) -> tuple[Actor, RecordingEnv, list[TransitionChunk]]:
    """An actor with an exact per-row policy on ``ScrambledAtariVectorEnv``: envs whose
    results depend only on their own seed and actions, returned in order or scrambled."""
    cfg = Config(n_step=3, gamma=0.9, push_period=5, terminal_on_life_loss=True)
    fake = ScrambledAtariVectorEnv(
        k, num_actions=NUM_ACTIONS, batch_size=k // lanes, scramble=scramble, laggard=laggard,
        seed=3, terminate_prob=0.05, life_loss_prob=0.05, max_steps=25,
    )  # fmt: skip
    env = RecordingEnv(fake)
    chunks: list[TransitionChunk] = []
    eps = np.zeros(k) if epsilons is None else epsilons
    actor = Actor(cfg, 4, env, RowPolicy(NUM_ACTIONS), eps, chunks.append, lambda: None, 9, 11)
    actor.run(steps)
    return actor, env, chunks


def chunks_by_stream(chunks: list[TransitionChunk]) -> dict[int, list[TransitionChunk]]:
    by_stream: dict[int, list[TransitionChunk]] = {}
    for chunk in chunks:
        by_stream.setdefault(chunk.stream, []).append(chunk)
    return by_stream


def assert_same_chunk(a: TransitionChunk, b: TransitionChunk) -> None:
    for field in dataclasses.fields(TransitionChunk):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize(
    ("lanes", "k", "laggard"), [(2, 4, None), (3, 6, None), (2, 8, None), (2, 4, (1, 10))]
)
def test_scrambled_batches_give_the_transitions_of_envs_stepped_in_order(lanes, k, laggard):
    """Each env's chunks, episodes and stacks are bit for bit those of the same envs
    returned whole lane by whole lane, whatever order and mix of lanes the env returns."""
    steps = 150
    ref_actor, ref_env, ref_chunks = run_on_fake(False, lanes, k, steps)
    actor, env, chunks = run_on_fake(True, lanes, k, steps, laggard=laggard)
    assert ref_env.mixed_batches() == 0
    assert env.mixed_batches() > steps * lanes // 2
    if laggard is not None:  # env 1 fell far behind: the ring of held steps had to grow
        assert actor._held.capacity > 8
        assert actor._held.ahead.max() > 8

    ref_streams, streams = chunks_by_stream(ref_chunks), chunks_by_stream(chunks)
    assert sorted(streams) == sorted(ref_streams)
    compared = 0
    for stream, got in streams.items():
        # The runs account for different numbers of lane steps: compare what both pushed.
        ref = ref_streams[stream]
        assert min(len(got), len(ref)) >= 2
        for a, b in zip(got, ref, strict=False):
            assert_same_chunk(a, b)
            compared += len(a)
    assert compared > 100 * lanes

    # Episodes: per env, the scrambled run's are the first of the in-order run's.
    def per_env(episodes):
        out: dict[int, list] = {e: [] for e in range(k)}
        for ep in episodes:
            out[ep.env].append(dataclasses.astuple(ep))
        return out

    got_episodes, ref_episodes = per_env(actor.episodes), per_env(ref_actor.episodes)
    assert sum(map(len, got_episodes.values())) >= k
    for e in range(k):
        common = min(len(got_episodes[e]), len(ref_episodes[e]))
        assert got_episodes[e][:common] == ref_episodes[e][:common], e
    check_accounting(actor, env)
    check_accounting(ref_actor, ref_env)


def test_each_env_explores_with_its_own_epsilon_in_scrambled_batches():
    epsilons = np.array([1.0, 0.0, 0.0, 1.0])
    actor, env, _ = run_on_fake(True, 2, 4, 150, epsilons=epsilons)
    assert env.mixed_batches() > 100
    policy = RowPolicy(NUM_ACTIONS)
    for e in range(4):
        results, sent = env.by_env[e], env.sent_by_env[e]
        assert len(sent) == len(results) > 100
        greedy = policy(np.stack([r["obs"] for r in results])).argmax(axis=1)
        matches = int((np.array(sent) == greedy).sum())
        if epsilons[e] == 0.0:
            assert matches == len(sent), e  # always the argmax of its own observation
        else:
            assert matches < len(sent) / 2, e  # uniform: about 1 in 6 greedy
            assert set(sent) == set(range(NUM_ACTIONS))
    assert {(ep.env, ep.epsilon) for ep in actor.episodes} <= {
        (e, float(epsilons[e])) for e in range(4)
    }


@pytest.mark.rom
def test_two_lanes_on_two_emulator_threads_of_the_real_env():
    """ale-py with two emulator threads returns lanes mixed and out of order; the actor
    stores exactly what each env returned and counts every env's episodes."""
    from apex_dqn.common.envs import make_vector_env

    n, gamma, k, lanes = 3, 0.9, 8, 2
    # Episodes of 60 agent steps (truncated), so every env finishes a few.
    cfg = Config(n_step=n, gamma=gamma, push_period=10, max_episode_frames=240,
                 terminal_on_life_loss=True)  # fmt: skip
    env = RecordingEnv(make_vector_env(cfg, k, threads=2, lanes=lanes))
    chunks: list[TransitionChunk] = []
    try:
        actor = Actor(cfg, 4, env, small_policy(), np.full(k, 0.5), chunks.append,
                      lambda: None, stream=9, seed=11)  # fmt: skip
        actor.run(200)
    finally:
        env.close()
    assert env.mixed_batches() > 0
    assert sorted(lane_of_stream(env, chunks).values()) == list(range(lanes))
    by_stream = chunks_by_stream(chunks)
    assert all(len(c) >= 5 for c in by_stream.values())
    _, checked_reset = check_transitions(env, chunks, n, gamma, True)
    assert checked_reset > 0
    check_accounting(actor, env)
    for lane in actor.lanes:  # every env of a lane has taken the lane's steps
        assert lane.acc.step > 100
    got = sorted((ep.env, ep.score, ep.length) for ep in actor.episodes)
    assert got == sorted(expected_episodes(env))
    # Truncated at 60 agent steps (a game over comes later): each env finished a few.
    assert all(length <= 60 for _, _, length in got)
    assert {e for e, _, _ in got} == set(range(k))
    assert len(got) >= 2 * k


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


def expected_episodes(env: RecordingEnv) -> list[tuple[int, float, int]]:
    """(env, unclipped score, agent steps) of every episode the lanes' steps have ended."""
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
                    expected.append((lane * w + j, score, length))
                    score, length = 0.0, 0
    return expected


@pytest.mark.parametrize(("lanes", "scramble"), FOUR_ENV_MODES)
def test_episodes_record_unclipped_scores(lanes, scramble):
    epsilons = np.array([0.5, 0.1, 0.01, 0.001])
    actor, env, _, _ = make_actor(Config(), k=4, lanes=lanes, epsilons=epsilons, scramble=scramble)
    actor.run(120)
    expected = [(e, score, length, float(np.float32(epsilons[e])), 4)
                for e, score, length in expected_episodes(env)]  # fmt: skip
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


@pytest.mark.parametrize(("lanes", "scramble"), FOUR_ENV_MODES)
def test_chunks_pushed_every_push_period_steps(lanes, scramble):
    period = 7
    cfg = Config(push_period=period)
    actor, env, chunks, _ = make_actor(cfg, k=4, lanes=lanes, scramble=scramble)
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


@pytest.mark.parametrize(("lanes", "scramble"), FOUR_ENV_MODES)
def test_weights_source_consulted_every_sync_period_and_only_newer_loaded(lanes, scramble):
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
    actor, env, _, _ = make_actor(cfg, k=4, lanes=lanes, weights_source=source, scramble=scramble)
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
