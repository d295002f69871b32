"""The orchestrator's error answers: a status, a message for people, and google.rpc details for code.

Every error carries `google.rpc.Status` details (grpc-status-details-bin, read by grpc_status.rpc_status.from_call):
RequestInfo with the request id; BadRequest field violations on INVALID_ARGUMENT; RetryInfo on RESOURCE_EXHAUSTED,
whose delay also goes out as the `grpc-retry-pushback-ms` trailer that gRPC's own retry policy obeys.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's retry machinery waits this long before its next attempt
RETRY_AFTER_MS = 100  # the in-flight cap's hint: about one short request's time on this stack


class RequestInvalid(ValueError):
    """A client request that cannot be served; `field` is the request field at fault (a BadRequest path)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def error_trailers(code: grpc.StatusCode, message: str, details: list[Message]) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries `details` as a google.rpc.Status beside the plain status."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return tuple(rpc_status.to_status(status).trailing_metadata)


def request_info(request_id: str) -> error_details_pb2.RequestInfo:
    return error_details_pb2.RequestInfo(request_id=request_id)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, request_id: str,
                details: list[Message] | None = None, extra: tuple[tuple[str, str], ...] = ()) -> NoReturn:
    """End the call with `code`, `message` and the details (RequestInfo first, when the request has an id)."""
    all_details = ([request_info(request_id)] if request_id else []) + list(details or [])
    await context.abort(code, message, trailing_metadata=error_trailers(code, message, all_details) + extra)
    raise AssertionError("unreachable")  # context.abort raises


async def abort_invalid(context: grpc.aio.ServicerContext, error: ValueError, request_id: str,
                        default_field: str) -> NoReturn:
    """INVALID_ARGUMENT with a BadRequest naming the field (`default_field` for errors that name none)."""
    field = error.field if isinstance(error, RequestInvalid) else default_field
    violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=str(error))
    await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(error), request_id,
                [error_details_pb2.BadRequest(field_violations=[violation])])


async def abort_overloaded(context: grpc.aio.ServicerContext, message: str, retry_after_ms: int,
                           request_id: str) -> NoReturn:
    """RESOURCE_EXHAUSTED with RetryInfo and the pushback trailer: the client may retry after the delay."""
    delay = Duration()
    delay.FromMilliseconds(retry_after_ms)
    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, request_id,
                [error_details_pb2.RetryInfo(retry_delay=delay)], extra=((PUSHBACK_KEY, str(retry_after_ms)),))
