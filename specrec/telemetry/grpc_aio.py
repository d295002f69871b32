"""Explicit grpc.aio tracing interceptors: a SERVER span per RPC (parent from metadata), a CLIENT span per call.

Attributes follow OpenTelemetry's current RPC conventions (rpc.system.name, a fully-qualified rpc.method,
rpc.response.status_code as the status name, error.type on failures), which replace rpc.system, rpc.service and
rpc.grpc.status_code. Hand-written rather than opentelemetry-instrumentation-grpc (0.66b2): its aio server
interceptor iterates every streaming handler with `async for`, which fails on the coroutine-style writers our
streaming RPCs are (context.write), and it still emits the deprecated names with no opt-in to the new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.semconv._incubating.attributes.rpc_attributes import (
    RPC_METHOD,
    RPC_RESPONSE_STATUS_CODE,
    RPC_SYSTEM_NAME,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from specrec.telemetry.tracing import extract_context, inject_metadata, tracing_enabled

_INSTRUMENTATION_NAME = "specrec.telemetry.grpc_aio"
_Continuation = Callable[..., Any]
_CallDetails = grpc.aio.ClientCallDetails
# Probes and reflection would flood the trace store with one-span traces (Kubernetes checks every few seconds).
DEFAULT_SKIP_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Server-side codes that mean the server failed (OpenTelemetry RPC semconv); the rest are the caller's fault.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def server_interceptors(tracer_provider: TracerProvider | None = None) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for `grpc.aio.server(interceptors=...)`: none at all when tracing is off, so it costs nothing."""
    if tracer_provider is None and not tracing_enabled():
        return []
    return [TracingServerInterceptor(tracer_provider)]


def client_interceptors(tracer_provider: TracerProvider | None = None) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for `grpc.aio.insecure_channel(..., interceptors=...)`; empty when tracing is off."""
    if tracer_provider is None and not tracing_enabled():
        return []
    return [
        TracingUnaryUnaryClientInterceptor(tracer_provider),
        TracingUnaryStreamClientInterceptor(tracer_provider),
        TracingStreamUnaryClientInterceptor(tracer_provider),
        TracingStreamStreamClientInterceptor(tracer_provider),
    ]


def start_client_span(full_method: str, metadata: Any = ()) -> tuple[trace.Span | None, tuple]:
    """A CLIENT span for a call made on a channel without the interceptors, and `metadata` carrying it.

    For long bidirectional streams: grpc.aio's intercepted stream call costs ~70 us per message, paid on
    every round even for unsampled requests. (None, metadata) when tracing is off.
    """
    if not tracing_enabled():
        return None, tuple(metadata)
    name, attributes = _rpc_attributes(full_method)
    span = _get_tracer(None).start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    return span, inject_metadata(metadata, context=trace.set_span_in_context(span))


def end_client_span(span: trace.Span | None, code: grpc.StatusCode, details: str | None = None) -> None:
    """End a span from start_client_span with the call's outcome."""
    if span is not None:
        _set_status(span, code, details, code != grpc.StatusCode.OK)
        span.end()


def _rpc_attributes(full_method: str) -> tuple[str, dict[str, str]]:
    """Span name and rpc.* attributes from "/pkg.Service/Method": both the fully-qualified "pkg.Service/Method"."""
    name = full_method.lstrip("/")
    return name, {RPC_SYSTEM_NAME: "grpc", RPC_METHOD: name}


def _get_tracer(tracer_provider: TracerProvider | None) -> trace.Tracer:
    return trace.get_tracer(_INSTRUMENTATION_NAME, tracer_provider=tracer_provider)


def _set_status(span: trace.Span, code: grpc.StatusCode, details: str | None, is_error: bool) -> None:
    span.set_attribute(RPC_RESPONSE_STATUS_CODE, code.name)
    if is_error:
        span.set_attribute(ERROR_TYPE, code.name)
        span.set_status(Status(StatusCode.ERROR, details or code.name))


class TracingServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each handler so one SERVER span covers the RPC (the whole stream for streaming handlers).

    The servicer runs with that span current, so its own spans and events attach to it.
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, skip_prefixes: tuple[str, ...] = DEFAULT_SKIP_PREFIXES
    ) -> None:
        self._tracer = _get_tracer(tracer_provider)
        self._skip_prefixes = skip_prefixes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        # None means UNIMPLEMENTED: let grpc answer it untraced.
        if handler is None or handler_call_details.method.startswith(self._skip_prefixes):
            return handler
        return self._wrap_handler(handler, handler_call_details)

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._wrap_unary(handler.unary_unary, details), **serdes)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._wrap_unary(handler.stream_unary, details), **serdes)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._wrap_stream(handler.unary_stream, details), **serdes)
        return grpc.stream_stream_rpc_method_handler(self._wrap_stream(handler.stream_stream, details), **serdes)

    def _start_span(self, details: grpc.HandlerCallDetails) -> trace.Span:
        name, attributes = _rpc_attributes(details.method)
        parent = extract_context(details.invocation_metadata)
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def _wrap_unary(self, behavior: Callable[..., Any], details: grpc.HandlerCallDetails) -> Callable[..., Any]:
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._start_span(details)
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                response = await behavior(request, context)
                _finish_server_span(span, context, None)
                return response
            except BaseException as exc:
                _finish_server_span(span, context, exc)
                raise
            finally:
                otel_context.detach(token)
                span.end()

        return traced

    def _wrap_stream(self, behavior: Callable[..., Any], details: grpc.HandlerCallDetails) -> Callable[..., Any]:
        # grpc.aio drives this generator from the RPC's own task, so the attach/detach pair shares one Context.
        async def traced(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span = self._start_span(details)
            token = otel_context.attach(trace.set_span_in_context(span))
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async with contextlib.aclosing(result) as responses:
                        async for response in responses:
                            yield response
                else:
                    # Reader/writer-style handler: a coroutine that calls context.write() itself.
                    await result
                _finish_server_span(span, context, None)
            except BaseException as exc:
                _finish_server_span(span, context, exc)
                raise
            finally:
                otel_context.detach(token)
                span.end()

        return traced


def _finish_server_span(span: trace.Span, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
    """Status code on the span; unexpected exceptions recorded (an abort is a chosen status, not a crash)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        code = grpc.StatusCode.CANCELLED
    elif exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code() or grpc.StatusCode.OK
    else:
        span.record_exception(exc)
        # grpc.aio answers an uncaught handler exception with UNKNOWN.
        _set_status(span, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}", is_error=True)
        return
    _set_status(span, code, context.details(), is_error=code in _SERVER_ERROR_CODES)


class _TracingClientInterceptor:
    """Shared by the four client interceptor kinds: a CLIENT span ended when the call completes."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._tracer = _get_tracer(tracer_provider)
        # Tasks that finish spans; asyncio keeps only weak references to tasks.
        self._finishers: set[asyncio.Task[None]] = set()

    async def _traced_call(self, continuation: _Continuation, details: _CallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        name, attributes = _rpc_attributes(method)
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        try:
            call = await continuation(_with_trace_metadata(details, span), request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        self._end_span_when_done(span, call)
        return call

    def _end_span_when_done(self, span: trace.Span, call: Any) -> None:
        loop = asyncio.get_running_loop()

        def on_done(done_call: Any) -> None:
            # Done callbacks cannot await call.code(); the status is already there, so the task finishes at once.
            task = loop.create_task(_end_client_span(span, done_call))
            self._finishers.add(task)
            task.add_done_callback(self._finishers.discard)

        try:
            call.add_done_callback(on_done)
        except NotImplementedError:
            # An inner interceptor answered without a real call (grpc.aio's UnaryUnaryCallResponse).
            span.set_attribute(RPC_RESPONSE_STATUS_CODE, grpc.StatusCode.OK.name)
            span.end()


def _with_trace_metadata(details: _CallDetails, span: trace.Span) -> _CallDetails:
    """A copy of the call details whose metadata carries the CLIENT span as traceparent."""
    carried = inject_metadata(tuple(details.metadata or ()), context=trace.set_span_in_context(span))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, grpc.aio.Metadata(*carried), details.credentials, details.wait_for_ready
    )


async def _end_client_span(span: trace.Span, call: Any) -> None:
    try:
        code = await call.code()
        _set_status(span, code, await call.details(), code != grpc.StatusCode.OK)
    finally:
        span.end()


class TracingUnaryUnaryClientInterceptor(_TracingClientInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: _Continuation, details: _CallDetails, request: Any) -> Any:
        return await self._traced_call(continuation, details, request)


class TracingUnaryStreamClientInterceptor(_TracingClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: _Continuation, details: _CallDetails, request: Any) -> Any:
        return await self._traced_call(continuation, details, request)


class TracingStreamUnaryClientInterceptor(_TracingClientInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: _Continuation, details: _CallDetails, requests: Any) -> Any:
        return await self._traced_call(continuation, details, requests)


class TracingStreamStreamClientInterceptor(_TracingClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: _Continuation, details: _CallDetails, requests: Any) -> Any:
        return await self._traced_call(continuation, details, requests)
