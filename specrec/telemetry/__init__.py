"""Telemetry for the specrec services: OTLP tracing, grpc.aio tracing interceptors and Prometheus metrics."""

from specrec.telemetry.grpc_aio import (
    TracingServerInterceptor,
    TracingStreamStreamClientInterceptor,
    TracingStreamUnaryClientInterceptor,
    TracingUnaryStreamClientInterceptor,
    TracingUnaryUnaryClientInterceptor,
    client_interceptors,
    end_client_span,
    server_interceptors,
    start_client_span,
)
from specrec.telemetry.log_context import LOG_FORMAT, TraceContextFilter, configure_service_logging, request_id
from specrec.telemetry.metrics import (
    DrafterMetrics,
    OrchestratorMetrics,
    RequestCounter,
    RequestMetrics,
    service_registry,
    start_metrics_server,
)
from specrec.telemetry.rpc_metrics import RequestCounting
from specrec.telemetry.tracing import (
    build_tracer_provider,
    current_trace_id,
    extract_context,
    inject_metadata,
    sampled_metadata,
    setup_tracing,
    shutdown_tracing,
    tracing_configured,
    tracing_enabled,
)

__all__ = [
    "LOG_FORMAT",
    "DrafterMetrics",
    "OrchestratorMetrics",
    "RequestCounter",
    "RequestCounting",
    "RequestMetrics",
    "TraceContextFilter",
    "TracingServerInterceptor",
    "TracingStreamStreamClientInterceptor",
    "TracingStreamUnaryClientInterceptor",
    "TracingUnaryStreamClientInterceptor",
    "TracingUnaryUnaryClientInterceptor",
    "build_tracer_provider",
    "client_interceptors",
    "configure_service_logging",
    "current_trace_id",
    "end_client_span",
    "extract_context",
    "inject_metadata",
    "sampled_metadata",
    "request_id",
    "server_interceptors",
    "service_registry",
    "setup_tracing",
    "shutdown_tracing",
    "start_client_span",
    "start_metrics_server",
    "tracing_configured",
    "tracing_enabled",
]
