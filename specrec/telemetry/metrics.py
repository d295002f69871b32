"""Prometheus metrics in vLLM's spec-decode vocabulary: raw counters here, ratios in PromQL.

Vocabulary (per speculation round): one *draft* is one tree sent to the target; its *draft tokens* are the tree's
nodes (what the target verifies); *accepted tokens* are the draft tokens on the longest path the target agreed with.
Each round also emits one bonus token (the target's own next token), so a round yields accepted + 1 tokens.

Acceptance rate (per verified node; a tree can accept at most one path, so this is lower than a chain's):

    rate(specrec_spec_decode_num_accepted_tokens_total[5m]) / rate(specrec_spec_decode_num_draft_tokens_total[5m])

Mean accepted length, conventionally including the bonus token:

    1 + rate(specrec_spec_decode_num_accepted_tokens_total[5m]) / rate(specrec_spec_decode_num_drafts_total[5m])

Per-position acceptance rate (a vector over `position`, 0 = first drafted token):

    rate(specrec_spec_decode_num_accepted_tokens_per_pos_total[5m])
      / ignoring(position) group_left rate(specrec_spec_decode_num_drafts_total[5m])

Tokens/s: `rate(specrec_generation_tokens_total[1m])`; mean chosen depth:
`rate(specrec_spec_decode_depth_sum[5m]) / rate(specrec_spec_decode_depth_count[5m])`.

Round and request series carry `drafter`, `policy` and `mode` labels (one orchestrator serves several drafters);
their values are the drafter's and the policy's *kind* (`model`, `fixed`, ...), not the client's full spec, so a
client cannot grow the series count; `drafter="default"` is the draft service's own default (the orchestrator was
given no `--drafter`). Requests by RPC and status code: `specrec_requests_total{method,code}`
(refusals are `RESOURCE_EXHAUSTED`, bad requests `INVALID_ARGUMENT`). Every registry here also carries the
process_* and python_* collectors the default registry would have had.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# Rounds are a draft plus one target forward: sub-millisecond on loopback CPU up to ~1 s on a busy GPU.
ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DRAFT_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
# Integer depths: bucket le="d" counts rounds drafted at depth <= d (0 = no speculation).
DEPTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
ROUNDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# The first item of a stream comes after the prefill and one or two rounds.
FIRST_ITEM_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SPEC_LABELS = ("drafter", "policy", "mode")


def service_registry() -> CollectorRegistry:
    """A registry of our own that still exports process (CPU, RSS, fds, start time), GC and platform metrics.

    A custom registry keeps tests' and services' series apart; the default one's collectors are process-wide
    and stateless, so registering the same instances in several registries is safe.
    """
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def label_kind(name: str, default: str = "default") -> str:
    """A bounded label value: the part of a client-chosen spec before ':' ("fixed:4:16" -> "fixed")."""
    return name.split(":", 1)[0] or default


class ModelInfo:
    """`specrec_model_info{version} 1`: the artifact identity (specrec.model_identity) a process serves."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.info = Gauge("specrec_model_info", "Artifact identity served (hash of semantic IDs + target weights).",
                          ["version"], registry=registry)

    def set_version(self, version: str) -> None:
        self.info.clear()
        self.info.labels(version=version).set(1)


class RequestCounter:
    """`specrec_requests_total{method,code}` and the time to the first streamed item, for one service."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("specrec_requests", "Finished RPCs by method and gRPC status code.",
                                ["method", "code"], registry=registry)
        self.first_item = Histogram("specrec_time_to_first_item_seconds",
                                    "Time from a streaming request's arrival to its first item (or tokens).",
                                    ["method"], buckets=FIRST_ITEM_BUCKETS, registry=registry)

    def finished(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def first_item_after(self, method: str, seconds: float) -> None:
        self.first_item.labels(method=method).observe(seconds)


class OrchestratorMetrics:
    """The orchestrator's metrics, in a registry of their own (pass one to share, e.g. prometheus_client.REGISTRY)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else service_registry()
        r = self.registry
        labels = SPEC_LABELS
        # prometheus_client appends "_total" to counter names on exposition.
        self.num_drafts = Counter("specrec_spec_decode_num_drafts", "Speculation rounds (draft trees verified).",
                                  labels, registry=r)
        self.num_draft_tokens = Counter("specrec_spec_decode_num_draft_tokens",
                                        "Draft tokens verified by the target (tree nodes).", labels, registry=r)
        self.num_accepted_tokens = Counter("specrec_spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted by the target (bonus token excluded).", labels,
                                           registry=r)
        self.num_accepted_tokens_per_pos = Counter("specrec_spec_decode_num_accepted_tokens_per_pos",
                                                   "Accepted draft tokens per draft position.", (*labels, "position"),
                                                   registry=r)
        self.generation_tokens = Counter("specrec_generation_tokens", "Tokens returned to clients.", labels,
                                         registry=r)
        self.depth = Histogram("specrec_spec_decode_depth", "Draft depth chosen per round.", labels,
                               buckets=DEPTH_BUCKETS, registry=r)
        self.round_latency = Histogram("specrec_round_latency_seconds", "Speculation round latency (draft + verify).",
                                       labels, buckets=ROUND_BUCKETS, registry=r)
        self.request_latency = Histogram("specrec_request_latency_seconds", "End-to-end request latency.", labels,
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.request_rounds = Histogram("specrec_request_rounds", "Decoding rounds per request.", labels,
                                        buckets=ROUNDS_BUCKETS, registry=r)
        self.fallback_rounds = Counter("specrec_fallback_rounds", "Rounds decoded without speculation, by reason.",
                                       (*labels, "reason"), registry=r)
        self.rpcs = RequestCounter(r)
        self.model = ModelInfo(r)
        self.requests_in_flight = Gauge("specrec_requests_in_flight", "Requests being served.", registry=r)
        self.target_live_sequences = Gauge("specrec_target_live_sequences",
                                           "Sequences Triton holds state for (its LIVE_SEQUENCES output).", registry=r)

    def for_request(self, drafter: str, policy: str, mode: str) -> RequestMetrics:
        """The round and request series of one (drafter, policy, mode), as the speculation loop reports them."""
        return RequestMetrics(self, {"drafter": label_kind(drafter), "policy": label_kind(policy), "mode": mode})

    def set_target_live_sequences(self, count: int) -> None:
        self.target_live_sequences.set(count)


class RequestMetrics:
    """OrchestratorMetrics bound to one request's labels: the speculation engine's RoundObserver."""

    def __init__(self, metrics: OrchestratorMetrics, labels: dict[str, str]) -> None:
        self.metrics, self.labels = metrics, labels

    def observe_round(
        self, depth: int, n_nodes: int, accepted: int, accepted_per_depth: Sequence[bool], seconds: float
    ) -> None:
        """One speculation round: a tree of `n_nodes` drafted to `depth`; `accepted_per_depth[i]` = position i kept."""
        m, labels = self.metrics, self.labels
        m.num_drafts.labels(**labels).inc()
        m.num_draft_tokens.labels(**labels).inc(n_nodes)
        m.num_accepted_tokens.labels(**labels).inc(accepted)
        for position, kept in enumerate(accepted_per_depth):
            # labels() creates the series even when not incremented, so every drafted position shows up (at 0).
            child = m.num_accepted_tokens_per_pos.labels(**labels, position=str(position))
            if kept:
                child.inc()
        m.depth.labels(**labels).observe(depth)
        m.round_latency.labels(**labels).observe(seconds)

    def observe_request(self, seconds: float, rounds: int, tokens: int = 0) -> None:
        """One finished request: its latency, decoding rounds and tokens returned."""
        m, labels = self.metrics, self.labels
        m.request_latency.labels(**labels).observe(seconds)
        m.request_rounds.labels(**labels).observe(rounds)
        m.generation_tokens.labels(**labels).inc(tokens)

    def fallback(self, reason: str, rounds: int = 1) -> None:
        """Rounds decoded by the target alone because the drafter failed, e.g. reason="drafter"."""
        self.metrics.fallback_rounds.labels(**self.labels, reason=reason).inc(rounds)


class DrafterMetrics:
    """The draft service's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else service_registry()
        r = self.registry
        self.rpcs = RequestCounter(r)
        self.model = ModelInfo(r)
        self.sessions = Gauge("specrec_draft_sessions", "Open draft sessions (bidi streams).", registry=r)
        self.trees = Counter("specrec_draft_trees", "Draft trees produced.", registry=r)
        self.tree_nodes = Counter("specrec_draft_tree_nodes", "Nodes in the draft trees produced.", registry=r)
        self.draft_ahead_hits = Counter("specrec_draft_ahead_hits",
                                        "Trees served from a draft made ahead of the target's answer.", registry=r)
        self.draft_ahead_misses = Counter("specrec_draft_ahead_misses",
                                          "Trees drafted at request although draft-ahead ran before them, by why: "
                                          "not_drafted, plain_round, wrong_guess, unfinished, budget.",
                                          ["reason"], registry=r)
        self.draft_latency = Histogram("specrec_draft_latency_seconds", "Time to produce one draft tree.",
                                       buckets=DRAFT_BUCKETS, registry=r)

    def observe_tree(self, n_nodes: int, seconds: float) -> None:
        self.trees.inc()
        self.tree_nodes.inc(n_nodes)
        self.draft_latency.observe(seconds)

    def draft_ahead(self, hit: bool, reason: str = "") -> None:
        """`reason`: why a miss missed (specrec.drafting.base.AHEAD_MISSES)."""
        if hit:
            self.draft_ahead_hits.inc()
        else:
            self.draft_ahead_misses.labels(reason or "unknown").inc()

    def watch_batches(self, counts: Callable[[], dict[str, Any]]) -> None:
        """Export the drafters' batched forwards, read at scrape time: counts() = {drafter: BatchCounters (forwards,
        rows, seconds)}; steps / forwards is the mean number of sessions per drafter forward, seconds / forwards its
        mean time."""
        self.registry.register(_ForwardCounts(counts))

    def session_opened(self) -> None:
        self.sessions.inc()

    def session_closed(self) -> None:
        self.sessions.dec()


class _ForwardCounts(Collector):
    def __init__(self, counts: Callable[[], dict[str, Any]]):
        self.counts = counts

    def collect(self) -> Iterable[Metric]:
        forwards = CounterMetricFamily("specrec_draft_forwards", "Drafter forwards run (batched across sessions).",
                                       labels=["drafter"])
        steps = CounterMetricFamily("specrec_draft_forward_steps",
                                    "Session steps those forwards ran (steps / forwards = sessions per forward).",
                                    labels=["drafter"])
        seconds = CounterMetricFamily("specrec_draft_forward_seconds",
                                      "Time those forwards took (seconds / forwards = the mean drafter forward).",
                                      labels=["drafter"])
        for name, c in self.counts().items():
            forwards.add_metric([name], c.forwards)
            steps.add_metric([name], c.rows)
            seconds.add_metric([name], c.seconds)
        yield forwards
        yield steps
        yield seconds


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> int:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; port 0 picks a free port, returned."""
    # prometheus_client >= 0.20 returns (WSGIServer, Thread); the server lives as long as the process.
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_port
