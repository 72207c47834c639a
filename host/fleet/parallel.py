"""Fan-out over many devices with a bound on how many run at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from host.fleet.errors import DeviceError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Outcome(Generic[T, R]):
    """What happened on one item of :func:`run_all`: a value, or the device's error."""

    item: T
    value: R | None = None
    error: DeviceError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def run_all(
    items: Iterable[T], fn: Callable[[T], Awaitable[R]], *, limit: int = 8
) -> list[Outcome[T, R]]:
    """Run ``fn(item)`` for every item, at most ``limit`` at once; results in input order.

    A :class:`DeviceError` is recorded in that item's outcome and the others carry on (one
    unreachable doorbell must not stop the fleet). Any other exception is a bug: it cancels
    the rest and propagates.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    gate = asyncio.Semaphore(limit)

    async def one(item: T) -> Outcome[T, R]:
        async with gate:
            try:
                return Outcome(item, value=await fn(item))
            except DeviceError as exc:
                return Outcome(item, error=exc)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(item)) for item in items]
    return [task.result() for task in tasks]
