"""Telemetry library: tracing setup, grpc.aio interceptors against real servers, Prometheus metrics, OTLP receiver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once
from prometheus_client.parser import text_string_to_metric_families

from harness.otlp_receiver import OtlpReceiver
from specrec.telemetry import (
    LOG_FORMAT,
    DrafterMetrics,
    OrchestratorMetrics,
    TraceContextFilter,
    build_tracer_provider,
    client_interceptors,
    current_trace_id,
    extract_context,
    inject_metadata,
    request_id,
    sampled_metadata,
    server_interceptors,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
    tracing_enabled,
)

_OTEL_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# ---------------------------------------------------------------- fixtures


def _reset_global_tracer_provider() -> None:
    # The API allows one set_tracer_provider per process; tests need a fresh one each (as contrib's test utils do).
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def clean_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in _OTEL_ENV:
        monkeypatch.delenv(name, raising=False)
    _reset_global_tracer_provider()
    yield monkeypatch
    _reset_global_tracer_provider()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as started:
        yield started


@pytest.fixture
def otlp_tracing(clean_otel: pytest.MonkeyPatch, receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    """setup_tracing exactly as a service calls it, exporting by OTLP/gRPC to the local receiver."""
    clean_otel.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.grpc_endpoint)
    clean_otel.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # ms; the default 5 s would dominate the test
    provider = setup_tracing("specrec-test")
    assert provider is not None
    yield provider
    shutdown_tracing()


@pytest.fixture
def memory_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider that is never installed globally: the interceptors take it explicitly."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# ---------------------------------------------------------------- a tiny grpc.aio service (raw bytes, no protos)


def _echo_handlers(tracer: trace.Tracer) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        with tracer.start_as_current_span("handler.work"):
            pass
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("boom")

    async def reject(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no such user")

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            trace.get_current_span().add_event("tree")
            if request == b"crash":
                raise RuntimeError("drafter exploded")
            yield request

    async def bidi_writer(requests: None, context: grpc.aio.ServicerContext) -> None:
        # Reader/writer style: a coroutine, not an async generator.
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(request)

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Reject": grpc.unary_unary_rpc_method_handler(reject),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "BidiWriter": grpc.stream_stream_rpc_method_handler(bidi_writer),
    })


@asynccontextmanager
async def _echo_channel(
    tracer: trace.Tracer, provider: TracerProvider | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=server_interceptors(provider))
    server.add_generic_rpc_handlers([_echo_handlers(tracer)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors(provider)) as ch:
            yield ch
    finally:
        await server.stop(None)


async def _bidi(channel: grpc.aio.Channel, method: str, messages: list[bytes]) -> grpc.aio.StreamStreamCall:
    """Drive a bidi stream with write/read as the orchestrator does, then half-close and wait for the status."""
    call = channel.stream_stream(method)()
    for message in messages:
        await call.write(message)
        assert await call.read() == message
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await call.code()
    return call


def _by_name(spans: list[dict]) -> dict[str, list[dict]]:
    named: dict[str, list[dict]] = {}
    for span in spans:
        named.setdefault(span["name"], []).append(span)
    return named


def _one(spans: list[ReadableSpan], name: str, kind: trace.SpanKind) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name and s.kind == kind]
    return span


# ---------------------------------------------------------------- (a) interceptors


async def test_one_trace_across_client_and_server_over_otlp(otlp_tracing: TracerProvider, receiver: OtlpReceiver):
    tracer = trace.get_tracer("test")
    async with _echo_channel(tracer) as channel:
        with tracer.start_as_current_span("request"):
            trace_id = current_trace_id()
            assert await channel.unary_unary("/test.Echo/Unary")(b"hi") == b"hi"
            await _bidi(channel, "/test.Echo/Bidi", [b"a", b"b"])
    otlp_tracing.force_flush()

    expected = {"request", "test.Echo/Unary", "handler.work", "test.Echo/Bidi"}
    def in_trace(spans: list[dict]) -> list[dict]:
        return [s for s in spans if s["trace_id"] == trace_id]

    # request, handler.work, and a client and a server span per RPC.
    spans = in_trace(receiver.wait_for(lambda spans: len(in_trace(spans)) >= 6))
    named = _by_name(spans)
    assert len(trace_id) == 32 and len(spans) == 6 and set(named) == expected
    assert {s["service_name"] for spans in named.values() for s in spans} == {"specrec-test"}
    (root,) = named["request"]
    for method in ("test.Echo/Unary", "test.Echo/Bidi"):
        client, server = sorted(named[method], key=lambda s: s["kind"])  # "client" < "server"
        assert (client["kind"], server["kind"]) == ("client", "server")
        assert client["parent_span_id"] == root["span_id"]
        assert server["parent_span_id"] == client["span_id"]
        # OpenTelemetry's current RPC conventions: no rpc.system / rpc.service / rpc.grpc.status_code any more
        assert server["attributes"] == {
            "rpc.system.name": "grpc", "rpc.method": method, "rpc.response.status_code": "OK",
        }
        assert client["attributes"] == server["attributes"]
    # Code inside the handler runs under the server span: a child span for unary, events on the stream's span.
    unary_server = next(s for s in named["test.Echo/Unary"] if s["kind"] == "server")
    assert named["handler.work"][0]["parent_span_id"] == unary_server["span_id"]
    bidi_server = next(s for s in named["test.Echo/Bidi"] if s["kind"] == "server")
    assert bidi_server["events"] == ["tree", "tree"]


async def test_remote_parent_from_metadata_without_client_interceptor(memory_provider):
    provider, exporter = memory_provider
    server = grpc.aio.server(interceptors=server_interceptors(provider))
    server.add_generic_rpc_handlers([_echo_handlers(provider.get_tracer("test"))])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        # A plain channel, as Triton's or a foreign client would send it: only the traceparent header.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.unary_unary("/test.Echo/Unary")(b"x", metadata=(("traceparent", TRACEPARENT),))
    finally:
        await server.stop(None)
    server_span = _one(exporter.get_finished_spans(), "test.Echo/Unary", trace.SpanKind.SERVER)
    assert trace.format_trace_id(server_span.context.trace_id) == TRACEPARENT.split("-")[1]
    assert trace.format_span_id(server_span.parent.span_id) == TRACEPARENT.split("-")[2]
    assert server_span.parent.is_remote


async def test_errors_aborts_and_stream_failures_are_recorded(memory_provider):
    provider, exporter = memory_provider
    async with _echo_channel(provider.get_tracer("test"), provider) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary("/test.Echo/Fail")(b"x")
        assert failed.value.code() == grpc.StatusCode.UNKNOWN
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await channel.unary_unary("/test.Echo/Reject")(b"x")
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        crashed = channel.stream_stream("/test.Echo/Bidi")()
        await crashed.write(b"crash")
        assert await crashed.code() == grpc.StatusCode.UNKNOWN
        await asyncio.sleep(0.01)  # client spans end from the calls' done callbacks
    spans = exporter.get_finished_spans()

    # An uncaught exception: recorded on the server span, ERROR, status UNKNOWN (2) on both sides.
    fail_server = _one(spans, "test.Echo/Fail", trace.SpanKind.SERVER)
    assert [e.name for e in fail_server.events] == ["exception"]
    assert fail_server.events[0].attributes["exception.type"] == "ValueError"
    assert fail_server.status.status_code == trace.StatusCode.ERROR
    assert fail_server.attributes["error.type"] == "UNKNOWN"
    assert fail_server.attributes["rpc.response.status_code"] == "UNKNOWN"
    fail_client = _one(spans, "test.Echo/Fail", trace.SpanKind.CLIENT)
    assert fail_client.status.status_code == trace.StatusCode.ERROR
    assert fail_client.attributes["rpc.response.status_code"] == "UNKNOWN"

    # An abort is the servicer's answer, not a crash: no exception event; INVALID_ARGUMENT is not a server error.
    reject_server = _one(spans, "test.Echo/Reject", trace.SpanKind.SERVER)
    assert reject_server.events == ()
    assert reject_server.attributes["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert reject_server.status.status_code == trace.StatusCode.UNSET
    assert "error.type" not in reject_server.attributes  # the caller's fault, not the server's
    reject_client = _one(spans, "test.Echo/Reject", trace.SpanKind.CLIENT)
    assert reject_client.status.status_code == trace.StatusCode.ERROR
    assert reject_client.status.description == "no such user"

    # A stream that dies mid-way: one span for the stream, with its event and the exception.
    bidi_server = _one(spans, "test.Echo/Bidi", trace.SpanKind.SERVER)
    assert [e.name for e in bidi_server.events] == ["tree", "exception"]
    assert bidi_server.status.status_code == trace.StatusCode.ERROR


async def test_writer_style_stream_and_concurrent_calls_keep_their_parents(memory_provider):
    provider, exporter = memory_provider
    tracer = provider.get_tracer("test")

    async def one_request(index: int) -> None:
        with tracer.start_as_current_span(f"request-{index}"):
            await channel.unary_unary("/test.Echo/Unary")(b"x")

    async with _echo_channel(tracer, provider) as channel:
        call = await _bidi(channel, "/test.Echo/BidiWriter", [b"a", b"b", b"c"])
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.gather(*(one_request(i) for i in range(4)))
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        await asyncio.sleep(0.01)
    spans = exporter.get_finished_spans()

    # Probes are not traced on the server (skip_prefixes); the client side has no such filter.
    assert [s.kind for s in spans if s.name == "grpc.health.v1.Health/Check"] == [trace.SpanKind.CLIENT]

    writer_server = _one(spans, "test.Echo/BidiWriter", trace.SpanKind.SERVER)
    assert writer_server.parent.span_id == _one(spans, "test.Echo/BidiWriter", trace.SpanKind.CLIENT).context.span_id
    assert writer_server.attributes["rpc.response.status_code"] == "OK"
    by_id = {s.context.span_id: s for s in spans}
    for i in range(4):
        (root,) = [s for s in spans if s.name == f"request-{i}"]
        (client,) = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        (server,) = [s for s in spans if s.parent is not None and s.parent.span_id == client.context.span_id]
        (work,) = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
        assert (client.kind, server.kind, work.name) == (trace.SpanKind.CLIENT, trace.SpanKind.SERVER, "handler.work")
        assert len({s.context.trace_id for s in (root, client, server, work)}) == 1
    assert all(s.parent is None or s.parent.span_id in by_id or s.parent.is_remote for s in spans)


# ---------------------------------------------------------------- (b) setup and helpers


async def test_tracing_off_installs_nothing_and_traces_nothing(clean_otel, receiver: OtlpReceiver):
    receiver.clear()
    assert setup_tracing("specrec-test") is None
    assert not tracing_enabled()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    assert server_interceptors() == [] and client_interceptors() == []
    tracer = trace.get_tracer("test")
    async with _echo_channel(tracer) as channel:
        with tracer.start_as_current_span("request") as span:
            assert not span.is_recording()
            assert current_trace_id() == ""
            assert inject_metadata([("x-user", "7")]) == (("x-user", "7"),)
            await channel.unary_unary("/test.Echo/Unary")(b"x")
    shutdown_tracing()  # harmless when off
    assert receiver.spans() == []


def test_sdk_disabled_wins_over_endpoint(clean_otel, receiver: OtlpReceiver):
    clean_otel.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
    clean_otel.setenv("OTEL_SDK_DISABLED", "true")
    assert setup_tracing("specrec-test") is None
    assert not tracing_enabled()


def test_env_sets_service_name_and_parent_based_ratio(clean_otel, receiver: OtlpReceiver):
    clean_otel.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
    clean_otel.setenv("OTEL_SERVICE_NAME", "renamed")
    clean_otel.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider("specrec-test")
    try:
        assert provider.resource.attributes["service.name"] == "renamed"
        assert provider.sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.25}")
        assert not tracing_enabled()  # build_* never installs
    finally:
        provider.shutdown()
    # An explicit sampler name is the SDK's to interpret.
    clean_otel.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = build_tracer_provider("specrec-test")
    try:
        assert provider.sampler.get_description() == "AlwaysOffSampler"
    finally:
        provider.shutdown()


def test_inject_copies_and_replaces_stale_traceparent_and_extract_reads_it(memory_provider):
    provider, _ = memory_provider
    original = [("x-user", "7"), ("traceparent", TRACEPARENT)]
    with provider.get_tracer("test").start_as_current_span("request") as span:
        carried = inject_metadata(original)
        trace_id = current_trace_id()
    assert original == [("x-user", "7"), ("traceparent", TRACEPARENT)]  # not mutated
    assert [key for key, _ in carried] == ["x-user", "traceparent"]
    assert trace_id == trace.format_trace_id(span.get_span_context().trace_id)
    remote = trace.get_current_span(extract_context(carried + (("data-bin", b"\x00"),))).get_span_context()
    assert (remote.trace_id, remote.span_id, remote.is_remote) == (
        span.get_span_context().trace_id, span.get_span_context().span_id, True)
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid


def test_sampled_metadata_carries_a_trace_context_only_for_sampled_spans(memory_provider):
    provider, _ = memory_provider
    stale = (("x-user", "7"), ("traceparent", TRACEPARENT))
    with provider.get_tracer("test").start_as_current_span("request") as span:
        carried = dict(sampled_metadata(stale))
    assert carried["traceparent"].split("-")[1] == trace.format_trace_id(span.get_span_context().trace_id)
    unsampled = trace.NonRecordingSpan(trace.SpanContext(
        0x1234, 0x5678, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT)))
    with trace.use_span(unsampled):
        assert sampled_metadata(stale) == (("x-user", "7"),)  # nothing a server could start a trace from
    assert sampled_metadata(stale) == (("x-user", "7"),)  # no span at all (tracing off)


def test_log_lines_carry_the_trace_and_request_ids(memory_provider):
    provider, _ = memory_provider
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(TraceContextFilter())
    log = logging.getLogger("specrec.test.logs")
    log.addHandler(handler)
    try:
        log.warning("outside")
        with provider.get_tracer("test").start_as_current_span("request") as span:
            token = request_id.set("req-42")
            log.warning("inside")
            request_id.reset(token)
    finally:
        log.removeHandler(handler)
    trace_id = trace.format_trace_id(span.get_span_context().trace_id)
    assert "[trace=- request=-]: outside" in lines[0]
    assert f"[trace={trace_id} request=req-42]: inside" in lines[1]


# ---------------------------------------------------------------- (c) metrics


def test_orchestrator_counters_follow_the_rounds_per_drafter_policy_and_mode():
    metrics, other = OrchestratorMetrics(), OrchestratorMetrics()  # separate registries: no duplicate errors
    model = metrics.for_request("model", "adaptive", "greedy")
    retrieval = metrics.for_request("retrieval", "fixed:4:16", "greedy")
    model.observe_round(depth=3, n_nodes=7, accepted=2, accepted_per_depth=[True, True, False], seconds=0.004)
    model.observe_round(depth=2, n_nodes=3, accepted=0, accepted_per_depth=[False, False], seconds=0.002)
    retrieval.observe_round(depth=1, n_nodes=1, accepted=1, accepted_per_depth=[True], seconds=0.001)
    model.observe_request(seconds=0.05, rounds=2, tokens=4)
    model.fallback("drafter_timeout")
    metrics.set_target_live_sequences(3)
    metrics.requests_in_flight.inc()

    value = metrics.registry.get_sample_value
    m = {"drafter": "model", "policy": "adaptive", "mode": "greedy"}
    r = {"drafter": "retrieval", "policy": "fixed", "mode": "greedy"}  # the policy's kind: bounded label values
    assert value("specrec_spec_decode_num_drafts_total", m) == 2
    assert value("specrec_spec_decode_num_drafts_total", r) == 1
    assert value("specrec_spec_decode_num_draft_tokens_total", m) == 10
    assert value("specrec_spec_decode_num_accepted_tokens_total", m) == 2
    per_pos = [value("specrec_spec_decode_num_accepted_tokens_per_pos_total", {**m, "position": str(p)})
               for p in range(3)]
    assert per_pos == [1, 1, 0]  # position 2 was drafted but never accepted: present at 0
    assert value("specrec_spec_decode_depth_sum", m) == 5
    assert value("specrec_spec_decode_depth_bucket", {**m, "le": "2.0"}) == 1
    assert value("specrec_round_latency_seconds_count", m) == 2
    assert value("specrec_request_latency_seconds_count", m) == 1
    assert value("specrec_generation_tokens_total", m) == 4
    assert value("specrec_fallback_rounds_total", {**m, "reason": "drafter_timeout"}) == 1
    assert value("specrec_target_live_sequences") == 3 and value("specrec_requests_in_flight") == 1
    assert other.registry.get_sample_value("specrec_spec_decode_num_drafts_total", m) is None


def test_metrics_endpoint_serves_prometheus_text_with_process_metrics():
    orchestrator, drafter = OrchestratorMetrics(), DrafterMetrics()
    orchestrator.for_request("model", "adaptive", "greedy").observe_round(
        depth=1, n_nodes=1, accepted=1, accepted_per_depth=[True], seconds=0.001)
    drafter.session_opened()
    drafter.observe_tree(n_nodes=5, seconds=0.0003)
    drafter.draft_ahead(hit=True)
    drafter.draft_ahead(hit=False, reason="wrong_guess")

    port = start_metrics_server(0, orchestrator.registry, addr="127.0.0.1")
    drafter_port = start_metrics_server(0, drafter.registry, addr="127.0.0.1")
    assert port > 0 and drafter_port not in (0, port)
    orchestrator_samples, drafter_samples = _scrape(port), _scrape(drafter_port)
    samples = orchestrator_samples | drafter_samples
    assert samples["specrec_spec_decode_num_drafts_total"] == 1
    assert samples["specrec_spec_decode_num_accepted_tokens_per_pos_total"] == 1
    assert samples["specrec_draft_sessions"] == 1
    assert samples["specrec_draft_trees_total"] == 1 and samples["specrec_draft_tree_nodes_total"] == 5
    assert samples["specrec_draft_ahead_hits_total"] == 1 and samples["specrec_draft_ahead_misses_total"] == 1
    assert samples["specrec_draft_latency_seconds_count"] == 1
    for own in (orchestrator_samples, drafter_samples):  # what an SRE needs besides ours: memory, CPU, restarts
        assert own["process_resident_memory_bytes"] > 1e6 and own["process_start_time_seconds"] > 1.6e9
        assert "process_cpu_seconds_total" in own and "python_info" in own


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    # Last sample per name wins; the names checked above are unlabelled or have a single series.
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


# ---------------------------------------------------------------- (d) receiver


def _otlp_json(trace_id: str, span_id: str, parent_span_id: str) -> bytes:
    """Shaped like Triton's opentelemetry-cpp export: camelCase keys, int enums, int64 as strings."""
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "triton"}}]},
        "scopeSpans": [{"scope": {"name": "triton-server"}, "spans": [{
            "traceId": trace_id, "spanId": span_id, "parentSpanId": parent_span_id,
            "name": "specrec_target", "kind": 2, "startTimeUnixNano": "1700000000000000000",
            "endTimeUnixNano": "1700000000001000000",
            "attributes": [{"key": "triton.model_version", "value": {"intValue": "1"}},
                           {"key": "triton.model_name", "value": {"stringValue": "specrec_target"}}],
            "events": [{"name": "COMPUTE_START", "timeUnixNano": "1700000000000500000"}],
            "status": {"code": 0},
        }]}],
    }]}).encode()


def _post(url: str, body: bytes, content_type: str) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


@pytest.mark.parametrize("encode", [bytes.hex, lambda raw: base64.b64encode(raw).decode()], ids=["hex", "base64"])
def test_receiver_decodes_otlp_http_json_ids(receiver: OtlpReceiver, encode):
    trace_id, span_id, parent_id = bytes.fromhex("0af7651916cd43dd8448eb211c80319c"), b"\x01" * 8, b"\xab" * 8
    receiver.clear()
    assert _post(receiver.http_endpoint, _otlp_json(encode(trace_id), encode(span_id), encode(parent_id)),
                 "application/json") == 200
    (span,) = receiver.wait_for(lambda spans: len(spans) == 1, timeout=5)
    assert span == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "0101010101010101", "parent_span_id": "ab" * 8,
        "name": "specrec_target", "service_name": "triton", "scope": "triton-server", "kind": "server",
        "status": "unset", "attributes": {"triton.model_version": 1, "triton.model_name": "specrec_target"},
        "events": ["COMPUTE_START"], "event_attributes": [{}],
        "start_ns": 1700000000000000000, "end_ns": 1700000000001000000,
    }
    assert receiver.exports["http/json"] >= 1


def test_receiver_decodes_otlp_http_protobuf(receiver: OtlpReceiver, memory_provider):
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    provider, exporter = memory_provider
    with provider.get_tracer("test").start_as_current_span("encoded") as span:
        pass
    receiver.clear()
    body = encode_spans(exporter.get_finished_spans()).SerializeToString()
    assert _post(receiver.http_endpoint, body, "application/x-protobuf") == 200
    (received,) = receiver.wait_for(lambda spans: len(spans) == 1, timeout=5)
    assert received["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert (received["name"], received["kind"], received["parent_span_id"]) == ("encoded", "internal", "")
