"""RecommendBatch's fan-out: many users' requests served side by side, each result out as soon as it is ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from orchestrator.errors import RequestInvalid
from specrec.batch_client import MAX_BATCH
from specrec.v1 import recommend_pb2 as pb

BATCH_CONCURRENCY = 16  # users of one batch decoded at once by default: enough to fill Triton's batches of 8
T = TypeVar("T")
R = TypeVar("R")


def batch_width(request: pb.RecommendBatchRequest, max_in_flight: int) -> int:
    """Users of the batch decoded at once; RequestInvalid for a batch the server will not take."""
    n = len(request.requests)
    if not 1 <= n <= MAX_BATCH:
        raise RequestInvalid(f"a batch holds 1..{MAX_BATCH} requests, got {n}: split it", "requests")
    if request.concurrency < 0:
        raise RequestInvalid(f"concurrency must be >= 0 (0 = the server's {BATCH_CONCURRENCY}), got "
                             f"{request.concurrency}", "concurrency")
    return max(1, min(request.concurrency or BATCH_CONCURRENCY, max_in_flight, n))


async def fan_out(items: list[T], width: int, serve: Callable[[int, T], Awaitable[R]]) -> AsyncIterator[R]:
    """serve(index, item) for every item, `width` at a time, results in order of completion. Each item runs in its
    own task (its own request id in the logs); leaving early (the client went away) cancels the unfinished."""
    gate, done = asyncio.Semaphore(width), asyncio.Queue[R]()

    async def one(index: int, item: T) -> None:
        async with gate:
            done.put_nowait(await serve(index, item))

    tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
    try:
        for _ in tasks:
            yield await done.get()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
