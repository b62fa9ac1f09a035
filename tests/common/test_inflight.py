"""InFlight: calls taken as they answer, with their tags, never waiting unless asked to."""

from __future__ import annotations

import threading

import pytest

from apex_dqn.common.inflight import InFlight

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def gate(ray_local):
    """A Ray actor whose ``wait(x)`` answers ``x`` only once ``open()`` was called."""
    ray = ray_local

    @ray.remote(max_concurrency=8)
    class Gate:
        def __init__(self) -> None:
            self.event = threading.Event()

        def wait(self, x: int) -> int:
            self.event.wait()
            return x

        def now(self, x: int) -> int:
            return x

        def fail(self) -> None:
            raise ValueError("no")

        def open(self) -> None:
            self.event.set()

    return Gate.remote()


def test_take_returns_only_the_answered_calls_with_their_tags(ray_local, gate):
    ray = ray_local
    calls: InFlight[str] = InFlight()
    calls.add(gate.wait.remote(1), "held")
    calls.add(gate.now.remote(2), "quick")
    assert len(calls) == 2 and "held" in calls and "quick" in calls
    got = calls.take(timeout=30, num=1)
    assert [(tag, ray.get(ref)) for tag, ref in got] == [("quick", 2)]
    assert calls.take() == []  # timeout 0: the held call is still out
    assert list(calls) == ["held"]
    ray.get(gate.open.remote())
    got = calls.take(timeout=30)
    assert [(tag, ray.get(ref)) for tag, ref in got] == [("held", 1)]
    assert len(calls) == 0 and calls.take() == []


def test_a_failed_call_is_taken_and_its_error_raised_by_get(ray_local, gate):
    ray = ray_local
    calls: InFlight[int] = InFlight()
    calls.add(gate.fail.remote(), 7)
    [(tag, ref)] = calls.take(timeout=30)
    assert tag == 7
    with pytest.raises(ray.exceptions.RayTaskError):
        ray.get(ref)


def test_drop_forgets_the_unwanted_calls(ray_local, gate):
    calls: InFlight[tuple[str, int]] = InFlight()
    for i in range(3):
        calls.add(gate.now.remote(i), ("actor", i))
    calls.add(gate.now.remote(9), ("shard", 0))
    assert calls.drop(lambda tag: tag[0] == "actor") == 3
    assert list(calls) == [("shard", 0)] and len(calls.refs()) == 1
