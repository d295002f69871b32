"""Request ids: the client's (checked) or a new one, kept in a context variable so every log line of the request
carries it, and set on the request's trace span (sampled or not, the id joins a client's logs to ours)."""

from __future__ import annotations

import re
import uuid

from opentelemetry import trace

from orchestrator.errors import RequestInvalid
from specrec.telemetry import request_id as current  # the id every log line of the request carries

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: safe in logs and span attributes
SPAN_ATTRIBUTE = "specrec.request_id"


def request_id_of(given: str) -> str:
    """The request's id: `given` when well formed, a new uuid4 (32 hex digits) when empty."""
    if not given:
        return uuid.uuid4().hex
    if not REQUEST_ID.fullmatch(given):
        raise RequestInvalid(f"request_id must be 1..128 printable ASCII characters without spaces, got {given[:40]!r}"
                             f"{'...' if len(given) > 40 else ''} ({len(given)} characters)", "request_id")
    return given


def bind(request_id: str) -> None:
    """This request's task (and the tasks it starts) logs with `request_id`; its server span carries it."""
    current.set(request_id)
    trace.get_current_span().set_attribute(SPAN_ATTRIBUTE, request_id)
