"""Counts every finished RPC of a grpc.aio server by method and status code, refusals and errors included."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from specrec.telemetry.grpc_aio import DEFAULT_SKIP_PREFIXES
from specrec.telemetry.metrics import RequestCounter


def status_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with: what the handler set or aborted with, CANCELLED, or UNKNOWN for a crash."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.OK
    return grpc.StatusCode.UNKNOWN  # what grpc.aio answers an uncaught handler exception with


class RequestCounting(grpc.aio.ServerInterceptor):
    """Put it first in the server's interceptor list: it then also counts what later interceptors refuse
    (UNAUTHENTICATED, undecodable requests). Health checks and reflection are not counted (probes would drown
    the clients' calls). Coroutine-style streaming handlers are wrapped by a coroutine, so streamed messages
    pass untouched: the count costs one label lookup per RPC, not per message."""

    def __init__(self, counter: RequestCounter, skip_prefixes: tuple[str, ...] = DEFAULT_SKIP_PREFIXES) -> None:
        self._counter = counter
        self._skip_prefixes = skip_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._skip_prefixes):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        serdes = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        for kind, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                              ("stream_unary", grpc.stream_unary_rpc_method_handler),
                              ("unary_stream", grpc.unary_stream_rpc_method_handler),
                              ("stream_stream", grpc.stream_stream_rpc_method_handler)):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return factory(self._wrap(behavior, method), **serdes)
        return handler

    def _wrap(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            return self._wrap_generator(behavior, method)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                self._counter.finished(method, status_of(context, exc).name)
                raise
            self._counter.finished(method, status_of(context, None).name)
            return response

        return counted

    def _wrap_generator(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as exc:
                self._counter.finished(method, status_of(context, exc).name)
                raise
            self._counter.finished(method, status_of(context, None).name)

        return counted
