"""Remote calls in flight, each with a tag saying what it was for; taken without waiting.

The one pattern by which the driver, the learner's sampler, the actors' pushes and the
periodic evaluation talk to other processes: start a call, keep its object ref with a
tag (which shard, which actor, what kind of question), and later take the calls that
have answered, usually without blocking. Each user bounds what it keeps here (one call
per tag, or a fixed number), so nothing grows without limit.

Ray is imported only when a call is waited on, so modules that use this helper for
their Ray path still import on a machine without Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

Tag = TypeVar("Tag")


class InFlight(Generic[Tag]):
    """Object refs of calls in flight, in the order they were started, each with a tag."""

    def __init__(self) -> None:
        self._tags: dict[Any, Tag] = {}

    def add(self, ref: Any, tag: Tag) -> None:
        self._tags[ref] = tag

    def __len__(self) -> int:
        return len(self._tags)

    def __iter__(self) -> Iterator[Tag]:
        return iter(list(self._tags.values()))

    def __contains__(self, tag: object) -> bool:
        return tag in self._tags.values()

    def refs(self) -> list[Any]:
        return list(self._tags)

    def drop(self, unwanted: Callable[[Tag], bool]) -> int:
        """Forget the calls whose tag is ``unwanted`` (their answers no longer matter);
        returns how many were forgotten."""
        gone = [ref for ref, tag in self._tags.items() if unwanted(tag)]
        for ref in gone:
            del self._tags[ref]
        return len(gone)

    def take(self, timeout: float | None = 0.0, num: int | None = None) -> list[tuple[Tag, Any]]:
        """The calls that have answered, removed from here, as ``(tag, ref)``.

        Waits until ``num`` have answered (all of them when None) or ``timeout`` seconds
        have passed (``None``: no limit; ``0``: only what is in already). ``ray.get(ref)``
        then gives each answer, or raises the error that ended the call.
        """
        if not self._tags:
            return []
        import ray

        refs = list(self._tags)
        num = len(refs) if num is None else min(num, len(refs))
        ready, _ = ray.wait(refs, num_returns=num, timeout=timeout)
        return [(self._tags.pop(ref), ref) for ref in ready]
