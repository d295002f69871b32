"""Orchestrator configuration: one schema, read from flags with SPECREC_* environment defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from specrec.security import (
    AuthConfig,
    SecurityConfigError,
    TlsConfig,
    add_auth_args,
    add_probe_port_arg,
    add_tls_args,
    auth_from_args,
    tls_from_args,
)

# How the orchestrator finds its Triton and draft pods (orchestrator.routing); "" = by environment.
ROUTING_MODES = ("static", "endpointslices")
BEAM_DRAFT_MODES = ("auto", "prefill", "overlap", "off")
TRACE_TARGET_ROUNDS = ("start", "all")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass
class OrchestratorConfig:
    artifacts: str  # directory with semantic_ids/ (the same artifacts the target and drafter load)
    port: int = 50051
    host: str = "127.0.0.1"
    metrics_port: int = 9100  # 0 = no /metrics endpoint
    target_addr: str = "127.0.0.1:8001"  # comma-separated: one Triton per address (static routing)
    draft_addr: str = "127.0.0.1:50052"  # comma-separated; empty = no drafter: plain decoding on the target
    # "static" (the addresses above), "endpointslices" (watch the Services named by SPECREC_TARGET_SERVICE /
    # SPECREC_DRAFT_SERVICE), or "" = endpointslices inside a cluster, static outside (orchestrator.routing)
    routing: str = ""
    policy: str = "adaptive"
    drafter: str = ""  # default drafter name sent to the draft service ("" = its own default)
    max_in_flight: int = 64  # requests decoding at once; past it RESOURCE_EXHAUSTED
    max_history: int = 50  # items per request history
    max_items: int = 50
    draft_timeout_ms: float = 200.0  # a tree later than this: the round goes on without it
    verify_timeout_s: float = 10.0
    grace_s: float = 30.0
    # Clients keep one HTTP/2 connection for good, so replicas added later get no traffic: past this age the
    # server asks a client to reconnect (GOAWAY, after in-flight calls finish) and its balancer picks again. 0 = never.
    max_connection_age_s: float = 0.0
    tls: TlsConfig = field(default_factory=TlsConfig)  # listener, and both clients (drafter, Triton)
    auth: AuthConfig = field(default_factory=AuthConfig)  # bearer token on the client API
    probe_port: int = 0  # plaintext health-only listener for kubelet probes; 0 = none
    draft_tls_name: str = ""  # name on the drafters' certificate, when not the dialled host
    target_tls_name: str = ""  # name on Triton's certificate, when not the dialled host
    # Retrieve: "auto" = plain or a tree of a few sizes, whichever has been fastest lately at this width and load
    # (specrec.speculation.beam_arms); "prefill" = the drafted tree rides along with the prompt's prefill;
    # "overlap" = drafted while Triton prefills, sent with the first level's beams (drafting off the critical path);
    # "off" = plain beam search for every request (where a tree's nodes cost more than the forwards they save)
    beam_draft: str = "auto"
    # Which verifications of a sampled request Triton traces: "start" (the prefill with the first tree, and a
    # rebuild), or "all" (every round: three Triton spans a round, ~2% more latency on the small profile)
    trace_target_rounds: str = "start"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> OrchestratorConfig:
        p = argparse.ArgumentParser(prog="specrec-orchestrator",
                                    description="specrec client-facing gRPC server: draft -> verify per request.")
        p.add_argument("--artifacts", default=_env("SPECREC_ARTIFACTS", ""),
                       help="artifact directory (semantic_ids/), env SPECREC_ARTIFACTS")
        p.add_argument("--host", default=_env("SPECREC_HOST", "127.0.0.1"), help="bind address (0.0.0.0 in a pod)")
        p.add_argument("--port", type=int, default=int(_env("SPECREC_ORCHESTRATOR_PORT", "50051")))
        metrics_port = _env("SPECREC_ORCHESTRATOR_METRICS_PORT", _env("SPECREC_METRICS_PORT", "9100"))
        p.add_argument("--metrics-port", type=int, default=int(metrics_port),
                       help="Prometheus /metrics port, 0 = off")
        p.add_argument("--target-addr", default=_env("SPECREC_TARGET_ADDR", "127.0.0.1:8001"),
                       help="Triton gRPC address, or a comma-separated list: requests spread over them")
        p.add_argument("--draft-addr", default=_env("SPECREC_DRAFT_ADDR", "127.0.0.1:50052"),
                       help="draft service address(es), comma-separated; empty = plain decoding only")
        p.add_argument("--routing", default=_env("SPECREC_ROUTING", ""), choices=("", *ROUTING_MODES),
                       help="static: the addresses above; endpointslices: watch the EndpointSlices of "
                            "SPECREC_TARGET_SERVICE / SPECREC_DRAFT_SERVICE; default: endpointslices in a cluster")
        p.add_argument("--policy", default=_env("SPECREC_POLICY", "adaptive"),
                       help="default speculation policy: adaptive | heuristic | off | fixed:DEPTH:NODES")
        p.add_argument("--drafter", default=_env("SPECREC_DRAFTER", ""), help="model | retrieval | hybrid")
        p.add_argument("--max-in-flight", type=int, default=int(_env("SPECREC_MAX_IN_FLIGHT", "64")))
        p.add_argument("--max-history", type=int, default=int(_env("SPECREC_MAX_HISTORY", "50")))
        p.add_argument("--draft-timeout-ms", type=float, default=float(_env("SPECREC_DRAFT_TIMEOUT_MS", "200")),
                       help="per-round drafting budget; slower trees are skipped")
        p.add_argument("--verify-timeout-s", type=float, default=float(_env("SPECREC_VERIFY_TIMEOUT_S", "10")),
                       help="per-round verification deadline on a Triton pod; past it the request moves to another "
                            "ready pod (a hung one), or fails DEADLINE_EXCEEDED if there is none")
        p.add_argument("--grace-s", type=float, default=float(_env("SPECREC_SHUTDOWN_GRACE_SECONDS", "30")))
        p.add_argument("--max-connection-age-s", type=float,
                       default=float(_env("SPECREC_MAX_CONNECTION_AGE_S", "0")),
                       help="ask clients to reconnect after this long, so new replicas get traffic; calls in flight "
                            "get --grace-s to finish; 0 = never (env SPECREC_MAX_CONNECTION_AGE_S)")
        add_tls_args(p)
        add_auth_args(p)
        add_probe_port_arg(p)
        p.add_argument("--draft-tls-name", default=_env("SPECREC_DRAFT_TLS_NAME", ""),
                       help="name the drafters' TLS certificate carries, if not the dialled host (pod IPs)")
        p.add_argument("--target-tls-name", default=_env("SPECREC_TARGET_TLS_NAME", ""),
                       help="name Triton's TLS certificate carries, if not the dialled host (pod IPs)")
        p.add_argument("--beam-draft", default=_env("SPECREC_BEAM_DRAFT", "auto"), choices=BEAM_DRAFT_MODES,
                       help="Retrieve's drafted tree: 'auto' runs plain or a tree of a few sizes, whichever has "
                            "been fastest lately at the request's width and load (retrying the others now and then); "
                            "'prefill' always rides along with the prompt's prefill (one target "
                            "forward when it covers every beam), 'overlap' is drafted while Triton prefills and "
                            "goes out with the first level's beams, 'off' runs plain beam search for every request "
                            "(on a CPU target a tree's nodes cost about what the forwards they save do: README) "
                            "(env SPECREC_BEAM_DRAFT)")
        p.add_argument("--trace-target-rounds", default=_env("SPECREC_TRACE_TARGET_ROUNDS", "start"),
                       choices=TRACE_TARGET_ROUNDS,
                       help="which verifications of a sampled request carry its trace context to Triton (which "
                            "traces what carries one): 'start', the prefill with the first tree (every round is an "
                            "event with its verify_ms on the request's span anyway), or 'all' rounds "
                            "(env SPECREC_TRACE_TARGET_ROUNDS)")
        a = p.parse_args(argv)
        if not a.artifacts:
            p.error("--artifacts (or SPECREC_ARTIFACTS) is required: the directory holding semantic_ids/")
        try:
            tls, auth = tls_from_args(a), auth_from_args(a)
        except SecurityConfigError as err:
            p.error(str(err))
        return cls(artifacts=a.artifacts, host=a.host, port=a.port, metrics_port=a.metrics_port,
                   target_addr=a.target_addr, draft_addr=a.draft_addr, routing=a.routing, policy=a.policy,
                   drafter=a.drafter,
                   max_in_flight=a.max_in_flight, max_history=a.max_history, draft_timeout_ms=a.draft_timeout_ms,
                   verify_timeout_s=a.verify_timeout_s,
                   grace_s=a.grace_s, max_connection_age_s=a.max_connection_age_s, tls=tls, auth=auth,
                   probe_port=a.probe_port,
                   draft_tls_name=a.draft_tls_name, target_tls_name=a.target_tls_name, beam_draft=a.beam_draft,
                   trace_target_rounds=a.trace_target_rounds)
