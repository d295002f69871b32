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
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Rounds are a draft plus one target forward: sub-millisecond on loopback CPU up to ~1 s on a busy GPU.
ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DRAFT_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
# Integer depths: bucket le="d" counts rounds drafted at depth <= d (0 = no speculation).
DEPTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)
ROUNDS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class OrchestratorMetrics:
    """The orchestrator's metrics, in a registry of their own (pass one to share, e.g. prometheus_client.REGISTRY)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        # prometheus_client appends "_total" to counter names on exposition.
        self.num_drafts = Counter("specrec_spec_decode_num_drafts", "Speculation rounds (draft trees verified).",
                                  registry=r)
        self.num_draft_tokens = Counter("specrec_spec_decode_num_draft_tokens",
                                        "Draft tokens verified by the target (tree nodes).", registry=r)
        self.num_accepted_tokens = Counter("specrec_spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted by the target (bonus token excluded).", registry=r)
        self.num_accepted_tokens_per_pos = Counter("specrec_spec_decode_num_accepted_tokens_per_pos",
                                                   "Accepted draft tokens per draft position.", ["position"],
                                                   registry=r)
        self.generation_tokens = Counter("specrec_generation_tokens", "Tokens returned to clients.", registry=r)
        self.depth = Histogram("specrec_spec_decode_depth", "Draft depth chosen per round.", buckets=DEPTH_BUCKETS,
                               registry=r)
        self.round_latency = Histogram("specrec_round_latency_seconds", "Speculation round latency (draft + verify).",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.request_latency = Histogram("specrec_request_latency_seconds", "End-to-end request latency.",
                                         buckets=REQUEST_BUCKETS, registry=r)
        self.request_rounds = Histogram("specrec_request_rounds", "Decoding rounds per request.",
                                        buckets=ROUNDS_BUCKETS, registry=r)
        self.fallback_rounds = Counter("specrec_fallback_rounds", "Rounds decoded without speculation, by reason.",
                                       ["reason"], registry=r)
        self.requests_in_flight = Gauge("specrec_requests_in_flight", "Requests being served.", registry=r)
        self.target_live_sequences = Gauge("specrec_target_live_sequences",
                                           "Sequences Triton holds state for (its LIVE_SEQUENCES output).", registry=r)

    def observe_round(
        self, depth: int, n_nodes: int, accepted: int, accepted_per_depth: Sequence[bool], seconds: float
    ) -> None:
        """One speculation round: a tree of `n_nodes` drafted to `depth`; `accepted_per_depth[i]` = position i kept."""
        self.num_drafts.inc()
        self.num_draft_tokens.inc(n_nodes)
        self.num_accepted_tokens.inc(accepted)
        for position, kept in enumerate(accepted_per_depth):
            # labels() creates the series even when not incremented, so every drafted position shows up (at 0).
            child = self.num_accepted_tokens_per_pos.labels(position=str(position))
            if kept:
                child.inc()
        self.depth.observe(depth)
        self.round_latency.observe(seconds)

    def observe_request(self, seconds: float, rounds: int, tokens: int = 0) -> None:
        """One finished request: its latency, decoding rounds and tokens returned."""
        self.request_latency.observe(seconds)
        self.request_rounds.observe(rounds)
        self.generation_tokens.inc(tokens)

    def fallback(self, reason: str, rounds: int = 1) -> None:
        """Rounds decoded by the target alone, e.g. reason="drafter_unavailable" or "drafter_timeout"."""
        self.fallback_rounds.labels(reason=reason).inc(rounds)

    def set_target_live_sequences(self, count: int) -> None:
        self.target_live_sequences.set(count)


class DrafterMetrics:
    """The draft service's metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("specrec_draft_sessions", "Open draft sessions (bidi streams).", registry=r)
        self.trees = Counter("specrec_draft_trees", "Draft trees produced.", registry=r)
        self.tree_nodes = Counter("specrec_draft_tree_nodes", "Nodes in the draft trees produced.", registry=r)
        self.draft_ahead_hits = Counter("specrec_draft_ahead_hits",
                                        "Trees served from a draft made ahead of the target's answer.", registry=r)
        self.draft_ahead_misses = Counter("specrec_draft_ahead_misses",
                                          "Drafts made ahead that the target's answer invalidated.", registry=r)
        self.draft_latency = Histogram("specrec_draft_latency_seconds", "Time to produce one draft tree.",
                                       buckets=DRAFT_BUCKETS, registry=r)

    def observe_tree(self, n_nodes: int, seconds: float) -> None:
        self.trees.inc()
        self.tree_nodes.inc(n_nodes)
        self.draft_latency.observe(seconds)

    def draft_ahead(self, hit: bool) -> None:
        (self.draft_ahead_hits if hit else self.draft_ahead_misses).inc()

    def session_opened(self) -> None:
        self.sessions.inc()

    def session_closed(self) -> None:
        self.sessions.dec()


def start_metrics_server(port: int, registry: CollectorRegistry, addr: str = "0.0.0.0") -> int:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; port 0 picks a free port, returned."""
    # prometheus_client >= 0.20 returns (WSGIServer, Thread); the server lives as long as the process.
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_port
