"""A grpc.aio server interceptor that answers request bytes which are no valid message with INVALID_ARGUMENT.

Left alone, grpc.aio reports a failed parse as UNKNOWN ("Unexpected DecodeError"); a client cannot tell that
from a crash. Unary-request methods only: a streaming request is parsed by `context.read()` in the servicer.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class UndecodableRequests(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary or handler.unary_stream
        method = details.method

        async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return parse(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{method}: the request is not a valid protobuf message ({e}); "
                                    "build it with the generated specrec.v1 classes")

        if handler.unary_unary:
            async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                return await behavior(await decode(raw, context), context)

            return grpc.unary_unary_rpc_method_handler(unary, None, handler.response_serializer)
        if inspect.isasyncgenfunction(behavior):
            async def streamed(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for resp in behavior(await decode(raw, context), context):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(streamed, None, handler.response_serializer)

        async def written(raw: bytes, context: grpc.aio.ServicerContext) -> Any:  # writes with context.write
            return await behavior(await decode(raw, context), context)

        return grpc.unary_stream_rpc_method_handler(written, None, handler.response_serializer)
