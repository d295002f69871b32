"""A local OTLP trace receiver (tests, benches, debugging): OTLP/gRPC and OTLP/HTTP (protobuf or JSON) on loopback."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

TRACES_PATH = "/v1/traces"
_HEX = re.compile(r"[0-9a-fA-F]*")
_TRACE_ID_BYTES, _SPAN_ID_BYTES = 16, 8
# OTLP/JSON id fields (camelCase per the spec; snake_case is what some exporters emit) and their byte sizes.
_ID_FIELDS = {
    "traceId": _TRACE_ID_BYTES, "trace_id": _TRACE_ID_BYTES,
    "spanId": _SPAN_ID_BYTES, "span_id": _SPAN_ID_BYTES,
    "parentSpanId": _SPAN_ID_BYTES, "parent_span_id": _SPAN_ID_BYTES,
}
# Pre-1.0 OTLP names, still produced by older opentelemetry-cpp builds.
_LEGACY_KEYS = {"instrumentationLibrarySpans": "scopeSpans", "instrumentationLibrary": "scope"}

Span = dict[str, Any]
Request = trace_service_pb2.ExportTraceServiceRequest
Export = Request | Callable[[], Request]  # a decoded export, or how to decode it when spans are asked for


class OtlpReceiver:
    """Collects exported spans as plain dicts; use as a context manager or start()/stop().

    An export is kept as received and turned into dicts only when spans are asked for: a benchmark's receiver
    then costs the machine it measures little more than the decoding gRPC does anyway."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.grpc_port = 0
        self.http_port = 0
        # Export requests by transport, so a test can tell that e.g. Triton really sent JSON.
        self.exports = {"grpc": 0, "http/protobuf": 0, "http/json": 0}
        self._spans: list[Span] = []
        self._pending: list[Export] = []
        self._changed = threading.Condition()
        self._grpc_server: grpc.Server | None = None
        self._http_server: ThreadingHTTPServer | None = None

    @property
    def grpc_endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; the http:// scheme tells the exporter to skip TLS."""
        return f"http://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Full OTLP/HTTP traces URL (Triton's `--trace-config opentelemetry,url=` takes it without the scheme)."""
        return f"http://{self.host}:{self.http_port}{TRACES_PATH}"

    def start(self) -> OtlpReceiver:
        self._grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc_server)
        self.grpc_port = self._grpc_server.add_insecure_port(f"{self.host}:0")
        self._grpc_server.start()
        self._http_server = ThreadingHTTPServer((self.host, 0), _http_handler(self))
        self.http_port = self._http_server.server_address[1]
        # A short poll interval keeps stop() quick (shutdown waits for the loop to notice).
        serve = functools.partial(self._http_server.serve_forever, poll_interval=0.05)
        threading.Thread(target=serve, name="otlp-http", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None)
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def spans(self) -> list[Span]:
        with self._changed:
            return list(self._flattened())

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()
            self._pending.clear()

    def _flattened(self) -> list[Span]:
        """The spans of every export so far (call holding the lock)."""
        for request in self._pending:
            self._spans.extend(_flatten(request if isinstance(request, Request) else request()))
        self._pending.clear()
        return self._spans

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout: float = 10.0) -> list[Span]:
        """Block until predicate(spans) holds and return the spans; TimeoutError (listing span names) otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._flattened())):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted(span["name"] for span in self._spans)
                    raise TimeoutError(f"OTLP receiver: condition not met in {timeout}s; spans: {names}")
                self._changed.wait(remaining)
            return list(self._spans)

    def collect(self, request: Export, transport: str) -> None:
        with self._changed:
            self.exports[transport] += 1
            self._pending.append(request)
            self._changed.notify_all()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext):  # noqa: N802
        self._receiver.collect(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            if self.path.split("?")[0] != TRACES_PATH:
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            is_json = "json" in self.headers.get("Content-Type", "").lower()
            try:  # JSON is parsed here and read into spans later: the slow part costs no measured time
                request: Export = functools.partial(decode_json_document, json.loads(body)) if is_json \
                    else decode_protobuf(body)
            except (ValueError, json_format.ParseError) as exc:
                self.send_error(400, str(exc))
                return
            receiver.collect(request, "http/json" if is_json else "http/protobuf")
            self._reply(is_json)

        def _reply(self, is_json: bool) -> None:
            response = trace_service_pb2.ExportTraceServiceResponse()
            payload = b"{}" if is_json else response.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/json" if is_json else "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep test output clean

    return Handler


def decode_protobuf(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.ParseFromString(body)
    return request


def decode_json_document(document: Any) -> Request:
    """OTLP/JSON to the protobuf message; ids may be hex (the OTLP spec, Triton) or base64 (proto3 JSON mapping)."""
    return json_format.Parse(json.dumps(_normalise_json(document)), Request(), ignore_unknown_fields=True)


def _normalise_json(node: Any) -> Any:
    """Rename legacy keys and rewrite every id as base64, which is what json_format expects for bytes fields."""
    if isinstance(node, list):
        return [_normalise_json(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _ID_FIELDS and isinstance(value, str):
            out[key] = base64.b64encode(_id_bytes(value, _ID_FIELDS[key])).decode()
        else:
            out[_LEGACY_KEYS.get(key, key)] = _normalise_json(value)
    return out


def _id_bytes(value: str, size: int) -> bytes:
    """Hex and base64 never collide: a 16-byte id is 32 hex digits but 24 base64 characters (8 bytes: 16 vs 12)."""
    if len(value) == 2 * size and _HEX.fullmatch(value):
        return bytes.fromhex(value)
    return base64.b64decode(value, validate=True) if value else b""


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest):
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield _span_dict(span, resource.get("service.name", ""), scope_spans.scope.name)


def _span_dict(span: trace_pb2.Span, service_name: str, scope: str) -> Span:
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "service_name": service_name,
        "scope": scope,
        "kind": trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower(),
        "status": trace_pb2.Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_").lower(),
        "attributes": _attributes(span.attributes),
        "events": [event.name for event in span.events],
        "event_attributes": [_attributes(event.attributes) for event in span.events],
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
    }


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def _any_value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None
