"""Log lines that find their trace: every record carries the current trace id and the request id, if one is set.

The request id is a context variable a service sets per request (the client API's request ids are issue 19's:
`request_id.set(...)` in the servicer is the hook); it follows the request into the tasks it starts.
"""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar

from opentelemetry import trace

request_id: ContextVar[str] = ContextVar("specrec_request_id", default="")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [trace=%(trace_id)s request=%(request_id)s]: %(message)s"
NONE = "-"


class TraceContextFilter(logging.Filter):
    """Adds `trace_id` (32 hex digits of the current span's trace, "-" without one) and `request_id` to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = trace.format_trace_id(span_context.trace_id) if span_context.is_valid else NONE
        record.request_id = request_id.get() or NONE
        return True


def configure_service_logging(level: str | None = None) -> None:
    """Root logging for a service process: LOG_FORMAT, level from `level` or SPECREC_LOG_LEVEL (INFO)."""
    logging.basicConfig(level=level or os.environ.get("SPECREC_LOG_LEVEL", "INFO"), format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:  # on the handlers, so records of every logger get the fields
        if not any(isinstance(f, TraceContextFilter) for f in handler.filters):
            handler.addFilter(TraceContextFilter())
