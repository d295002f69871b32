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


class Refusal(Exception):
    """A request's error answer, raised where it is found; the RPC sends it as its status (abort_refused), a
    batch as that user's result. `field`: the request field at fault (INVALID_ARGUMENT); `retry_after_ms`: when
    the same request may succeed (RESOURCE_EXHAUSTED)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "", retry_after_ms: int = 0):
        super().__init__(message)
        self.code, self.message, self.field, self.retry_after_ms = code, message, field, retry_after_ms
        self.request_id = ""  # set once the request's id is known

    @classmethod
    def invalid(cls, error: ValueError, default_field: str) -> Refusal:
        """INVALID_ARGUMENT naming the field (`default_field` for errors that name none)."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, str(error),
                   error.field if isinstance(error, RequestInvalid) else default_field)

    @classmethod
    def overloaded(cls, message: str, retry_after_ms: int) -> Refusal:
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry_after_ms=retry_after_ms)

    def details(self) -> list[Message]:
        """The google.rpc details: RequestInfo, then BadRequest or RetryInfo where they apply."""
        found: list[Message] = [request_info(self.request_id)] if self.request_id else []
        if self.field:
            violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
            found.append(error_details_pb2.BadRequest(field_violations=[violation]))
        if self.retry_after_ms:
            delay = Duration()
            delay.FromMilliseconds(self.retry_after_ms)
            found.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return found


async def abort_refused(context: grpc.aio.ServicerContext, refusal: Refusal) -> NoReturn:
    """End the call with the refusal's status, message and google.rpc details (and the pushback trailer)."""
    trailers = error_trailers(refusal.code, refusal.message, refusal.details())
    if refusal.retry_after_ms:
        trailers += ((PUSHBACK_KEY, str(refusal.retry_after_ms)),)
    await context.abort(refusal.code, refusal.message, trailing_metadata=trailers)
    raise AssertionError("unreachable")  # context.abort raises
