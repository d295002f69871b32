"""OpenTelemetry tracing configured by the standard OTEL_* env vars; W3C trace-context helpers for gRPC metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.environment_variables import (
    OTEL_SDK_DISABLED,
    OTEL_SERVICE_NAME,
    OTEL_TRACES_SAMPLER,
    OTEL_TRACES_SAMPLER_ARG,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, Sampler

# Either one turns tracing on; the exporter itself reads them (and the scheme: http:// means plaintext).
ENDPOINT_ENV_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

MetadataPairs = tuple[tuple[str, str | bytes], ...]
TRACE_CONTEXT_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def tracing_configured() -> bool:
    """True when the environment asks for traces: an OTLP endpoint is set and the SDK is not disabled."""
    if os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_ENV_VARS)


def build_tracer_provider(service_name: str) -> TracerProvider | None:
    """A TracerProvider exporting by OTLP/gRPC per the env, or None when tracing is off; installs nothing."""
    if not tracing_configured():
        return None
    # Imported here so a process with tracing off never loads the exporter's gRPC/protobuf stack.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    name = os.environ.get(OTEL_SERVICE_NAME, "").strip() or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}), sampler=_sampler_from_env())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _sampler_from_env() -> Sampler | None:
    """An explicit OTEL_TRACES_SAMPLER wins (None lets the SDK read it); otherwise parent-based ratio, default 1.0."""
    if os.environ.get(OTEL_TRACES_SAMPLER, "").strip():
        return None
    ratio = os.environ.get(OTEL_TRACES_SAMPLER_ARG, "").strip()
    return ParentBasedTraceIdRatio(float(ratio) if ratio else 1.0)


def setup_tracing(service_name: str) -> TracerProvider | None:
    """Install the global TracerProvider when an endpoint is configured; otherwise leave the no-op tracer in place.

    OTEL_SERVICE_NAME overrides `service_name`. Call once per process, before building gRPC servers and channels.
    """
    provider = build_tracer_provider(service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
    return provider


def tracing_enabled() -> bool:
    """True once an SDK TracerProvider is installed globally (i.e. setup_tracing found an endpoint)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def shutdown_tracing() -> None:
    """Flush pending spans and stop the exporter; a no-op when tracing is off."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush()
        provider.shutdown()


def inject_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None = None, context: otel_context.Context | None = None
) -> MetadataPairs:
    """A copy of `metadata` plus `traceparent` (and baggage) for `context` (default: the current one); never mutates."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    # Replace rather than duplicate: a stale traceparent from the caller must not shadow the current span.
    kept = tuple((key, value) for key, value in metadata or () if key not in carrier)
    return kept + tuple(carrier.items())


def sampled_metadata(metadata: Iterable[tuple[str, str | bytes]] | None = None) -> MetadataPairs:
    """`metadata` plus `traceparent` only when the current span is sampled; any traceparent in it dropped otherwise.

    For hops whose server traces whatever context arrives (Triton starts a trace for every propagated context,
    sampled flag or not): an unsampled request then costs that server no tracing at all.
    """
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and span_context.trace_flags.sampled:
        return inject_metadata(metadata)
    return tuple((key, value) for key, value in metadata or () if key not in TRACE_CONTEXT_KEYS)


def extract_context(invocation_metadata: Iterable[tuple[str, str | bytes]] | None) -> otel_context.Context:
    """The remote parent context carried by gRPC metadata (empty context when there is none)."""
    # Binary (-bin) values are bytes and never carry W3C headers; grpc's metadata items are (key, value) pairs.
    carrier = {key: value for key, value in invocation_metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def current_trace_id() -> str:
    """The current span's trace id as 32 lowercase hex digits, or "" when tracing is off or it is not sampled."""
    span_context = trace.get_current_span().get_span_context()
    if not (span_context.is_valid and span_context.trace_flags.sampled):
        return ""
    return trace.format_trace_id(span_context.trace_id)
