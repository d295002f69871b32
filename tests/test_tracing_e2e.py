"""One trace per request across orchestrator, drafter and Triton, and /metrics consistent with the stats.

Real processes on loopback; a local OTLP receiver stands in for the collector (gRPC from our
services, OTLP/HTTP JSON from Triton's own OpenTelemetry mode).
"""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from harness.otlp_receiver import OtlpReceiver
from harness.stack import LocalStack, StackConfig, free_port
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def traced(tiny_artifacts, tiny_drafter):
    with OtlpReceiver() as receiver:
        metrics_port = free_port()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint, "OTEL_TRACES_SAMPLER_ARG": "1.0",
               "OTEL_BSP_SCHEDULE_DELAY": "200", "SPECREC_TARGET_TRACE_URL": receiver.http_endpoint}
        config = StackConfig(artifacts=tiny_artifacts.directory, policy="fixed:3:8", metrics_port=metrics_port,
                             extra_env=env)
        with LocalStack(config) as stack:
            yield stack, receiver, metrics_port


def scrape(port: int) -> dict[str, float]:
    """Each sample name's value summed over its labels (drafter, policy, mode, ...)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


def test_one_trace_spans_all_three_services_with_round_attributes(traced, tiny_artifacts):
    stack, receiver, _ = traced
    history = [tiny_artifacts.data.item_ids[i] for i in tiny_artifacts.split.train[0][-20:]]
    # Triton leaves about 1 in 30 requests that carry a trace context untraced (seen with plain tritonclient calls
    # too: 58-60 of 60 STARTs traced; cause not found), and by default it gets the context on the START only: a
    # request whose START Triton did not trace is sent again, twice at most.
    for attempt in range(1, 4):
        with grpc.insecure_channel(stack.orchestrator_addr) as ch:
            request = pb.RecommendRequest(history=history, num_items=5, request_id=f"trace-me-{attempt}")
            resp = pb_grpc.RecommenderServiceStub(ch).Recommend(request, timeout=60)
        trace_id = resp.trace_id
        assert len(trace_id) == 32

        def complete(spans, trace_id: str = trace_id) -> bool:  # the server span ends last, after the response
            ours = [s for s in spans if s["trace_id"] == trace_id]
            return ({"specrec-orchestrator", "specrec-draft", "specrec-target"} <= {s["service_name"] for s in ours}
                    and any(s["name"] == "specrec.v1.RecommenderService/Recommend" for s in ours))

        try:
            receiver.wait_for(complete, timeout=10)
            break
        except TimeoutError:
            if attempt == 3:
                raise
    spans = [s for s in receiver.spans() if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    server = next(s for s in spans if s["name"] == "specrec.v1.RecommenderService/Recommend")
    assert server["attributes"]["specrec.request_id"] == resp.request_id == f"trace-me-{attempt}"
    # a round is an event on the request's span (a span each cost most of tracing's CPU)
    rounds = [attrs for name, attrs in zip(server["events"], server["event_attributes"], strict=True)
              if name == "speculation_round"]
    assert len(rounds) == resp.stats.rounds  # the opening START carries the first tree: a round too
    assert [r["specrec.round"] for r in rounds] == list(range(1, resp.stats.rounds + 1))
    for r in rounds:
        assert {"specrec.round", "specrec.policy", "specrec.depth", "specrec.nodes", "specrec.accepted",
                "specrec.draft_ms", "specrec.verify_ms"} <= set(r)
    assert any(r["specrec.draft_ms"] > 0 for r in rounds if r["specrec.depth"])  # drafting took time: it is there
    triton = [s for s in spans if s["service_name"] == "specrec-target"]
    triton_roots = [s for s in triton if by_id.get(s["parent_span_id"], {}).get("service_name") != "specrec-target"]
    assert triton_roots and all(s["parent_span_id"] == server["span_id"] for s in triton_roots), \
        "Triton's spans join the trace under the request's span"
    # by default (SPECREC_TRACE_TARGET_ROUNDS=start) Triton traces the START only: three spans a round cost ~2%
    assert [s["name"] for s in triton_roots] == ["InferRequest"]
    drafter = [s for s in spans if s["service_name"] == "specrec-draft" and s["name"].endswith("Speculate")]
    assert drafter and by_id.get(drafter[0]["parent_span_id"], {}).get("service_name") == "specrec-orchestrator"
    # The drafter stream's CLIENT span: the request closing its stream is no error.
    stream = by_id[drafter[0]["parent_span_id"]]
    assert (stream["name"], stream["kind"]) == ("specrec.draft.v1.DraftService/Speculate", "client")
    assert stream["status"] != "error", stream


def test_metrics_move_with_the_response_stats(traced, tiny_artifacts):
    stack, _, port = traced
    before = scrape(port)
    history = [tiny_artifacts.data.item_ids[i] for i in tiny_artifacts.split.train[1][-20:]]
    with grpc.insecure_channel(stack.orchestrator_addr) as ch:
        stats = pb_grpc.RecommenderServiceStub(ch).Recommend(pb.RecommendRequest(history=history, num_items=5),
                                                      timeout=60).stats
    after = scrape(port)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("specrec_spec_decode_num_drafts_total") == stats.rounds - 1  # START is not a draft round
    assert delta("specrec_spec_decode_num_accepted_tokens_total") <= stats.accepted_tokens
    assert delta("specrec_spec_decode_num_accepted_tokens_total") > 0
    assert delta("specrec_request_latency_seconds_count") == 1
