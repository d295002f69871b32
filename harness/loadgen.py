"""Client-side driver for load and fault runs: Recommend requests over grpc.aio at a fixed concurrency,
every one bounded in time, every outcome sorted into completed / clear error / hung / wrong output."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from orchestrator.errors import PUSHBACK_KEY
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

# Errors a client can act on (back off, go elsewhere); anything else, say UNKNOWN or INTERNAL, is a
# server that broke without saying why, and counts as a lost request.
CLEAR_ERRORS = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"})
HUNG = "HUNG"  # no answer within the client's bound (its gRPC deadline, or the outer guard)
CANCELLED = "CANCELLED"  # the client itself walked away


@dataclass
class Outcome:
    key: int  # which request (the user)
    code: str  # "OK", a gRPC status name, or HUNG
    items: list[str] = field(default_factory=list)
    latency_s: float = 0.0
    details: str = ""
    retry_after_ms: str | None = None


def recommend_request(history: Sequence[str], num_items: int = 10, policy: str = "") -> pb.RecommendRequest:
    return pb.RecommendRequest(history=list(history), num_items=num_items,
                               options=pb.DecodingOptions(policy=policy))


async def _retry_after(call: grpc.aio.Call) -> str | None:
    """The refusal's retry hint: the `grpc-retry-pushback-ms` trailer (what gRPC's retry policy obeys)."""
    try:
        md = await call.trailing_metadata() or ()
    except grpc.aio.AioRpcError:
        return None
    return dict(md).get(PUSHBACK_KEY)


async def call_once(stub: pb_grpc.RecommenderServiceStub, key: int, request: pb.RecommendRequest, timeout_s: float,
                    stream: bool = False, cancel_after_s: float | None = None) -> Outcome:
    """One request: Recommend, or StreamRecommend collecting its items; optionally cancelled by the client."""
    t0 = time.perf_counter()
    call = stub.StreamRecommend(pb.StreamRecommendRequest(request=request), timeout=timeout_s) if stream \
        else stub.Recommend(request, timeout=timeout_s)

    async def finish() -> list[str]:
        if not stream:
            return [i.item_id for i in (await call).items]
        items = []
        async for chunk in call:
            if chunk.WhichOneof("kind") == "item":
                items.append(chunk.item.item_id)
        return items

    task = asyncio.ensure_future(finish())
    try:
        if cancel_after_s is not None:
            done, _ = await asyncio.wait({task}, timeout=cancel_after_s)
            if not done:
                call.cancel()
        items = await asyncio.wait_for(task, timeout_s + 5)  # the outer guard: a deadline that never fired
        return Outcome(key, "OK", items, time.perf_counter() - t0)
    except (asyncio.CancelledError, TimeoutError) as e:
        if isinstance(e, asyncio.CancelledError) and cancel_after_s is None:
            raise
        call.cancel()
        code = CANCELLED if cancel_after_s is not None and isinstance(e, asyncio.CancelledError) else HUNG
        return Outcome(key, code, latency_s=time.perf_counter() - t0)
    except grpc.aio.AioRpcError as e:
        latency = time.perf_counter() - t0
        # DEADLINE_EXCEEDED before the client's own deadline is the server giving up (a clear error);
        # at the client's deadline it is a request nobody answered.
        hung = e.code() is grpc.StatusCode.DEADLINE_EXCEEDED and latency >= 0.99 * timeout_s
        return Outcome(key, HUNG if hung else e.code().name, latency_s=latency, details=e.details() or "",
                       retry_after_ms=await _retry_after(call))


async def run_requests(addr: str, requests: Sequence[tuple[int, pb.RecommendRequest]], concurrency: int,
                       timeout_s: float, stream: bool = False,
                       cancel_after_s: Mapping[int, float] | None = None,
                       on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send `requests` with at most `concurrency` outstanding; outcomes in the order of `requests`.

    `cancel_after_s` maps a request's index to the delay after which the client cancels it;
    `on_outcome` sees each outcome as it arrives (fault runs use it to strike mid-run).
    """
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def one(i: int, key: int, request: pb.RecommendRequest) -> Outcome:
            async with gate:
                cancel = (cancel_after_s or {}).get(i)
                outcome = await call_once(stub, key, request, timeout_s, stream=stream, cancel_after_s=cancel)
            if on_outcome is not None:
                on_outcome(outcome)
            return outcome

        return list(await asyncio.gather(*(one(i, k, r) for i, (k, r) in enumerate(requests))))


def run_requests_sync(*args, **kwargs) -> list[Outcome]:
    """run_requests from synchronous code (tests, benches): its own event loop."""
    return asyncio.run(run_requests(*args, **kwargs))


@dataclass
class Tally:
    """What happened to every request of a run; `lost` must be 0."""

    sent: int = 0
    completed: int = 0  # OK, and the list equals the reference
    erred: int = 0  # a clear error the client can act on (CLEAR_ERRORS)
    cancelled: int = 0  # the client cancelled it on purpose
    hung: int = 0  # no answer within the bound
    wrong: int = 0  # OK, but not the reference list
    unclear: int = 0  # an error status a client cannot act on
    codes: Counter = field(default_factory=Counter)

    @property
    def lost(self) -> int:
        return self.hung + self.wrong + self.unclear

    @classmethod
    def of(cls, outcomes: Sequence[Outcome], reference: Mapping[int, list[str]] | None = None) -> Tally:
        t = cls(sent=len(outcomes), codes=Counter(o.code for o in outcomes))
        for o in outcomes:
            if o.code == "OK":
                ok = reference is None or reference.get(o.key) == o.items
                t.completed += ok
                t.wrong += not ok
            elif o.code == CANCELLED:
                t.cancelled += 1
            elif o.code == HUNG:
                t.hung += 1
            elif o.code in CLEAR_ERRORS:
                t.erred += 1
            else:
                t.unclear += 1
        return t

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.sent + other.sent, self.completed + other.completed, self.erred + other.erred,
                     self.cancelled + other.cancelled, self.hung + other.hung, self.wrong + other.wrong,
                     self.unclear + other.unclear, self.codes + other.codes)

    def summary(self) -> str:
        return (f"sent {self.sent}: completed {self.completed}, clear errors {self.erred}, cancelled "
                f"{self.cancelled}, hung {self.hung}, wrong {self.wrong}, unclear {self.unclear} -> lost {self.lost}"
                f" (codes {dict(self.codes)})")


async def closed_loop(addr: str, requests: Sequence[tuple[int, pb.RecommendRequest]], concurrency: int, count: int,
                      max_seconds: float, timeout_s: float) -> list[Outcome]:
    """`concurrency` clients, each sending its next request when the last one ended, cycling through
    `requests`, until `count` were sent or `max_seconds` passed. A client told to retry later waits
    the hint, as a well-behaved caller would, instead of spinning on refusals."""
    outcomes: list[Outcome] = []
    sent = 0
    stop_at = time.monotonic() + max_seconds
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)

        async def client() -> None:
            nonlocal sent
            while sent < count and time.monotonic() < stop_at:
                key, request = requests[sent % len(requests)]
                sent += 1
                outcome = await call_once(stub, key, request, timeout_s)
                outcomes.append(outcome)
                if outcome.retry_after_ms:
                    await asyncio.sleep(int(outcome.retry_after_ms) / 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes
