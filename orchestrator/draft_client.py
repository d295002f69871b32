"""Client side of DraftService.Speculate: one stream per request, a deadline per tree, backoff when down."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc

from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.security import TlsConfig, aio_channel
from specrec.speculation.engine import Proposal
from specrec.speculation.policy import Budget
from specrec.telemetry import end_client_span, start_client_span

log = logging.getLogger(__name__)


class DraftUnavailable(Exception):
    """The drafter failed, answered late or broke the protocol: finish this request without it.

    refused_request: the service refused what this request asked for (e.g. a drafter name it does not
    have), so the fault is the request's: other requests keep the drafter.
    """

    def __init__(self, message: str, *, refused_request: bool = False) -> None:
        super().__init__(message)
        self.refused_request = refused_request


def _budget(b: Budget) -> draft_pb2.DraftBudget:
    return draft_pb2.DraftBudget(depth=b.depth, max_nodes=b.max_nodes, top_k=b.top_k, min_path_prob=b.min_path_prob)


_SPECULATE = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].methods_by_name["Speculate"]
SPECULATE_METHOD = f"/{_SPECULATE.containing_service.full_name}/{_SPECULATE.name}"


class DraftLate(Exception):
    """No tree this round: the tree asked for is past its deadline, or an earlier late tree is still owed. The round
    goes on without one; the stream stays open, and the late tree is dropped when it comes (the stream answers in
    order), before the next tree is asked for. `sent`: the request went out (the drafter has its commit and will
    draft the late tree from it), so the next request must not send that commit again."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


MAX_LATE = 3  # late trees in one request before its stream counts as failed (and the pod backs off)


class DraftSession:
    """A Speculate stream. A late tree is skipped (DraftLate); any other failure closes it.

    Traced by one CLIENT span of its own rather than a channel interceptor, which would cost every message;
    it ends OK when the request closes the stream, with the failure's status otherwise.
    """

    def __init__(self, stub: draft_pb2_grpc.DraftServiceStub, timeout_s: float, metadata: tuple = ()):
        self._span, metadata = start_client_span(SPECULATE_METHOD, metadata)
        self._call = stub.Speculate(metadata=metadata)
        self._timeout_s = timeout_s
        self._late: asyncio.Future | None = None  # the read of a tree that missed its deadline
        self.closed = False
        self.late_trees = 0

    async def _fail(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, *,
                    refused_request: bool = False) -> DraftUnavailable:
        await self.close(code, message)
        return DraftUnavailable(message, refused_request=refused_request)

    async def _exchange(self, request: draft_pb2.SpeculateRequest, timeout_s: float) -> Proposal:
        if self.closed:
            raise DraftUnavailable("draft stream already closed")
        if self._late is not None and not self._late.done():
            raise DraftLate("the previous tree is still late", sent=False)  # no waiting: this round goes without one
        try:
            if self._late is not None:  # it came meanwhile: drop it (a failed stream fails here)
                late, self._late = self._late, None
                if late.result() is grpc.aio.EOF:
                    raise await self._fail("draft service closed the stream")
            await asyncio.wait_for(self._call.write(request), timeout_s)
            # read in a task that outlives the deadline: cancelling a read could take the stream down with it
            read = asyncio.ensure_future(self._call.read())
            done, _ = await asyncio.wait({read}, timeout=timeout_s)
            if not done:
                self._late = read
                read.add_done_callback(_retrieve)
                self.late_trees += 1
                if self.late_trees >= MAX_LATE:
                    raise await self._fail(f"no tree within {timeout_s * 1000:.0f} ms, {self.late_trees} times",
                                           grpc.StatusCode.DEADLINE_EXCEEDED)
                raise DraftLate(f"no tree within {timeout_s * 1000:.0f} ms", sent=True)
            resp = read.result()
        except TimeoutError:  # the write
            raise await self._fail(f"could not send to the drafter within {timeout_s * 1000:.0f} ms",
                                   grpc.StatusCode.DEADLINE_EXCEEDED) from None
        except grpc.aio.AioRpcError as e:
            refused = e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            raise await self._fail(f"draft service: {e.code().name}: {e.details()}", e.code(),
                                   refused_request=refused) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError, asyncio.CancelledError) as e:
            # The draft pod left and its channel was closed under the stream, or the drafter died between two
            # rounds (write() says so); a cancellation of this request itself propagates.
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and (task is None or task.cancelling()):
                raise
            raise await self._fail(f"draft stream cut off: the channel closed ({type(e).__name__})") from None
        if resp is grpc.aio.EOF:
            raise await self._fail("draft service closed the stream")
        tree = resp.tree
        if len(tree.tokens) != len(tree.parents):
            raise await self._fail("malformed tree: tokens and parents differ in length", grpc.StatusCode.INTERNAL)
        return Proposal(list(tree.tokens), list(tree.parents), list(tree.draft_logprobs), resp.draft_ahead_hit)

    async def open(self, context: list[int], n_items: int, exclude_history: bool, budget: Budget,
                   drafter: str, timeout_s: float, banned: Sequence[int] = (), allowed: Sequence[int] = (),
                   single_tree: bool = False) -> Proposal:
        req = draft_pb2.SpeculateRequest(open=draft_pb2.OpenSession(
            context=context, n_items=n_items, exclude_history=exclude_history, budget=_budget(budget),
            drafter=drafter, banned_items=banned, allowed_items=allowed, single_tree=single_tree))
        return await self._exchange(req, timeout_s)

    async def advance(self, committed: list[int], budget: Budget, then_plain: list[int] = ()) -> Proposal:
        req = draft_pb2.SpeculateRequest(advance=draft_pb2.AdvanceSession(committed=committed, budget=_budget(budget),
                                                                           then_plain=then_plain))
        return await self._exchange(req, self._timeout_s)

    async def close(self, code: grpc.StatusCode = grpc.StatusCode.OK, details: str | None = None) -> None:
        """End the stream; `code`: why, for its trace span (OK: the request is done with it)."""
        if not self.closed:
            self.closed = True
            self._call.cancel()
            end_client_span(self._span, code, details)


def _retrieve(read: asyncio.Future) -> None:
    """A late read that ends in an error (the stream was closed meanwhile) is not an unhandled exception."""
    if not read.cancelled():
        read.exception()


class DraftClient:
    """Shared by all requests: the channel, and a backoff window after the service failed."""

    def __init__(self, addr: str, timeout_s: float, tls: TlsConfig | None = None, tls_name: str = ""):
        self.addr = addr
        self.timeout_s = timeout_s
        # No tracing interceptors: DraftSession traces its stream itself (see there).
        self._channel = aio_channel(addr, tls or TlsConfig(), tls_name) if addr else None
        self._stub = draft_pb2_grpc.DraftServiceStub(self._channel) if self._channel else None
        self._down_until = 0.0
        self._backoff_s = 0.5

    @property
    def available(self) -> bool:
        return self._stub is not None and time.monotonic() >= self._down_until

    def session(self, metadata: tuple = ()) -> DraftSession:
        assert self._stub is not None
        return DraftSession(self._stub, self.timeout_s, metadata)

    async def model_version(self) -> str:
        """The identity of the artifacts the draft pod serves (its Stats), asked before any session is opened."""
        assert self._stub is not None
        return (await self._stub.Stats(draft_pb2.StatsRequest(), timeout=max(self.timeout_s * 10, 2.0))).model_version

    def failed(self, reason: str) -> None:
        """Keep new requests off the drafter for a while; the window doubles up to 30 s."""
        if time.monotonic() >= self._down_until:
            log.warning("drafter at %s unavailable (%s); plain decoding for %.1f s", self.addr, reason,
                        self._backoff_s)
            self._down_until = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, 30.0)

    def succeeded(self) -> None:
        self._backoff_s = 0.5

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
