"""specrec-orchestrator: the client-facing Recommender gRPC server."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.backends import Backends, router_from_config
from orchestrator.catalog import Catalog, RequestInvalid
from orchestrator.config import OrchestratorConfig
from orchestrator.draft_client import DraftClient
from orchestrator.loop import LoopOptions, SpeculationLoop
from orchestrator.routing import DRAFT, TARGET, Router
from specrec.drafting.base import DRAFTER_NAME
from specrec.grpc_guard import UndecodableRequests
from specrec.security import add_port, start_probe_listener
from specrec.security import server_interceptors as auth_interceptors
from specrec.semantic_ids.vocab import SEP
from specrec.speculation.engine import RequestStats
from specrec.speculation.policy import Policy, PolicyRegistry
from specrec.target_client import TargetClient, TargetError, TargetInvalidArgument, TargetOverloaded
from specrec.telemetry import (
    OrchestratorMetrics,
    RequestCounter,
    RequestCounting,
    configure_service_logging,
    current_trace_id,
    server_interceptors,
    setup_tracing,
    shutdown_tracing,
    start_metrics_server,
)
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

log = logging.getLogger("specrec.orchestrator")
SERVICE = "specrec.v1.Recommender"
MODES = {pb.DecodingOptions.MODE_GREEDY: "greedy", pb.DecodingOptions.MODE_SAMPLING: "stochastic",
         pb.DecodingOptions.MODE_RELAXED: "relaxed"}
MAX_SEED = 2**63 - 1  # Triton's request parameters are int64


def stats_message(s: RequestStats) -> pb.Stats:
    return pb.Stats(rounds=s.rounds, drafted_tokens=s.drafted, accepted_tokens=s.accepted, tau=s.tau,
                    draft_ms=s.draft_s * 1e3, verify_ms=s.verify_s * 1e3,
                    network_ms=max(0.0, s.total_s - s.draft_s - s.verify_s) * 1e3, total_ms=s.total_s * 1e3,
                    fallback_rounds=s.fallback_rounds, policy=s.policy,
                    tree_rounds=s.tree_rounds, ready_trees=s.ready_trees)


class ItemEmitter:
    """Turns committed tokens into items: an item is out once its SEP is committed."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.partial: list[int] = []

    def feed(self, tokens: list[int]) -> list[pb.Item]:
        items = []
        for tok in tokens:
            if tok == SEP:
                item = self.catalog.item_of(self.partial)
                if item is not None:
                    sids = self.catalog.sids
                    items.append(pb.Item(item_id=sids.item_ids[item], title=sids.titles[item],
                                         semantic_id=[int(c) for c in sids.codes[item]]))
                self.partial = []
            else:
                self.partial.append(tok)
        return items


class FirstItemClock:
    """Observes the time from a streaming request's arrival to its first item, once per request."""

    def __init__(self, rpcs: RequestCounter, method: str):
        self.rpcs, self.method, self.t0 = rpcs, method, time.perf_counter()
        self.done = False

    def seen(self) -> None:
        if not self.done:
            self.done = True
            self.rpcs.first_item_after(self.method, time.perf_counter() - self.t0)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, config: OrchestratorConfig, catalog: Catalog, loop: SpeculationLoop):
        self.config = config
        self.catalog = catalog
        self.loop = loop
        # policies of one drafter and mode learn from each other's rounds; near the in-flight cap speculation shrinks
        self.policies = PolicyRegistry(config.policy, max_in_flight=config.max_in_flight)

    async def _validate(self, request, context: grpc.aio.ServicerContext, prompt: list[int] | None = None
                        ) -> tuple[list[int], LoopOptions, Policy]:
        try:
            n = request.num_items or 10
            if not 1 <= n <= self.config.max_items:
                raise RequestInvalid(f"num_items = {n} is out of range 1..{self.config.max_items}")
            opts = request.options
            if opts.mode not in MODES:
                raise RequestInvalid(f"options.mode = {opts.mode} is not a known mode")
            if not (math.isfinite(opts.temperature) and opts.temperature >= 0):  # NaN passes a plain "< 0"
                raise RequestInvalid(f"options.temperature must be a finite number >= 0, got {opts.temperature}")
            if opts.seed > MAX_SEED:
                raise RequestInvalid(f"options.seed = {opts.seed} is over 2**63-1, the largest seed the target takes")
            if opts.drafter and not DRAFTER_NAME.fullmatch(opts.drafter):  # else the drafter's refusal backs
                # every request off the drafter for a while, as if the service were down
                raise RequestInvalid(f"options.drafter = {opts.drafter!r} is not a drafter: use model, retrieval "
                                     "or hybrid (model and hybrid may add :drafter-<variant>), or leave it empty")
            if opts.max_tree_nodes < 0 or opts.max_tree_nodes > 128:
                raise RequestInvalid("options.max_tree_nodes must be in 0..128")
            drafter = opts.drafter or self.config.drafter
            try:
                policy = self.policies.get(opts.policy, drafter, MODES[opts.mode])
            except ValueError as e:
                raise RequestInvalid(f"options.policy: {e}") from None
            if prompt is None:
                prompt = self.catalog.prompt(list(request.history), self.config.max_history)
            loop_opts = LoopOptions(n_items=n, exclude_history=not opts.include_history, mode=MODES[opts.mode],
                                    temperature=opts.temperature or 1.0, seed=opts.seed,
                                    max_nodes=opts.max_tree_nodes, drafter=drafter)
            self.catalog.constraint(n, loop_opts.exclude_history).start(prompt)
            self.catalog.check_fits(prompt, n)
        except ValueError as e:  # RequestInvalid and the grammar's ConstraintError
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.loop.in_flight >= self.config.max_in_flight:
            await context.send_initial_metadata((("retry-after-ms", "100"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.loop.in_flight} requests in flight, the cap; retry after ~100 ms")
        return prompt, loop_opts, policy

    async def _generate(self, prompt, opts, policy, context, emit) -> RequestStats:
        try:
            return await self.loop.run(prompt, opts, policy, emit)
        except TargetInvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the target refused the request: {e}")
        except TargetOverloaded as e:
            # Trailing metadata: a stream may already have sent its initial metadata with the first items.
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the target model is at capacity: {e}",
                                trailing_metadata=(("retry-after-ms", str(e.retry_after_ms)),))
        except TargetError as e:
            code = e.code if e.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED) \
                else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"the target model (Triton) failed: {e}")
        raise AssertionError("unreachable")

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                        ) -> pb.RecommendResponse:
        prompt, opts, policy = await self._validate(request, context)
        emitter, items = ItemEmitter(self.catalog), []

        async def emit(tokens: list[int]) -> None:
            items.extend(emitter.feed(tokens))

        stats = await self._generate(prompt, opts, policy, context, emit)
        return pb.RecommendResponse(items=items, stats=stats_message(stats), trace_id=current_trace_id(),
                                    model_version=self.catalog.version)

    def _first_item_clock(self, method: str) -> FirstItemClock:
        return FirstItemClock(self.loop.metrics.rpcs, method)

    async def StreamRecommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.RecommendChunk]:
        first_item = self._first_item_clock("StreamRecommend")
        prompt, opts, policy = await self._validate(request, context)
        emitter, items = ItemEmitter(self.catalog), []

        async def emit(tokens: list[int]) -> None:
            for item in emitter.feed(tokens):
                first_item.seen()
                items.append(item)
                await context.write(pb.RecommendChunk(item=item))

        stats = await self._generate(prompt, opts, policy, context, emit)
        await context.write(pb.RecommendChunk(done=pb.RecommendResponse(items=items, stats=stats_message(stats),
                                                                      trace_id=current_trace_id(),
                                                                      model_version=self.catalog.version)))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateChunk]:
        first_tokens = self._first_item_clock("Generate")
        if not request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty: send BOS history REC tokens")
        prompt, opts, policy = await self._validate(request, context, prompt=list(request.prompt))

        async def emit(tokens: list[int]) -> None:
            first_tokens.seen()
            await context.write(pb.GenerateChunk(tokens=tokens))

        stats = await self._generate(prompt, opts, policy, context, emit)
        await context.write(pb.GenerateChunk(done=True, stats=stats_message(stats), model_version=self.catalog.version))


def build_backends(config: OrchestratorConfig, metrics: OrchestratorMetrics, router: Router | None = None,
                   model_version: str = "") -> Backends:
    """A client per Triton and draft pod; pods from `router`, else from the config (static or EndpointSlices).
    `model_version`: the catalog's; only pods serving it are used ("" = no pairing)."""
    if router is None:
        router = router_from_config(asyncio.get_running_loop(), target_addr=config.target_addr,
                                    draft_addr=config.draft_addr, routing=config.routing)
    return Backends(router,
                    lambda addr: TargetClient(addr, timeout_s=config.verify_timeout_s, tls=config.tls,
                                              tls_name=config.target_tls_name),
                    lambda addr: DraftClient(addr, config.draft_timeout_ms / 1000, tls=config.tls,
                                             tls_name=config.draft_tls_name),
                    registry=metrics.registry, model_version=model_version)


async def follow_target_readiness(health_servicer: health.aio.HealthServicer, backends: Backends) -> None:
    """Service SERVICE is SERVING while at least one Triton pod of the catalog's model version is known.

    The readiness probe asks for SERVICE, the liveness probe for "" (always SERVING while the process runs):
    with no such Triton pod (EndpointSlices not seen yet, every pod gone, or, during a model rollout, none of this
    orchestrator's version yet) the orchestrator takes itself out of its Service instead of answering every
    request UNAVAILABLE, and is not restarted for a peer's fault.
    """
    status = health_pb2.HealthCheckResponse
    loop = asyncio.get_running_loop()
    router = backends.router
    publishing: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def publish() -> None:  # reads the router when it runs, so out-of-order tasks still end right
        ready = any(backends.serves_our_version(TARGET, a) for a in router.endpoints(TARGET))
        await health_servicer.set(SERVICE, status.SERVING if ready else status.NOT_SERVING)

    def spawn() -> None:
        task = loop.create_task(publish())
        publishing.add(task)
        task.add_done_callback(publishing.discard)

    def on_change(service: str, endpoints: frozenset[str]) -> None:
        if service == TARGET:  # a Router without a loop calls this on its watcher thread
            loop.call_soon_threadsafe(spawn)

    router.subscribe(on_change)
    if TARGET in backends.versions:  # a probe that finds a pod's version may make the orchestrator ready
        backends.versions[TARGET].listeners.append(lambda: loop.call_soon_threadsafe(spawn))
    await publish()


async def build_server(config: OrchestratorConfig, router: Router | None = None,
                       health_servicer: health.aio.HealthServicer | None = None
                       ) -> tuple[grpc.aio.Server, int, SpeculationLoop]:
    """The server, bound but not started (port 0 = pick one): the seam tests use.

    `router` replaces the one the config describes (tests pass one fed by a local EndpointSlice API).
    """
    catalog = Catalog(config.artifacts)
    metrics = OrchestratorMetrics()
    metrics.model.set_version(catalog.version)
    backends = build_backends(config, metrics, router, model_version=catalog.version)
    await backends.start()
    loop = SpeculationLoop(catalog, backends, config.verify_timeout_s, metrics)
    if config.metrics_port:
        port = start_metrics_server(config.metrics_port, metrics.registry)
        log.info("metrics on http://%s:%d/metrics", config.host, port)
    # Counting first: it sees what the later interceptors refuse (UNAUTHENTICATED, undecodable requests).
    server = grpc.aio.server(interceptors=[RequestCounting(metrics.rpcs), *server_interceptors(),
                                           *auth_interceptors(config.auth), UndecodableRequests()])
    pb_grpc.add_RecommenderServicer_to_server(RecommenderServicer(config, catalog, loop), server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await follow_target_readiness(health_servicer, backends)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    return server, port, loop


async def serve(config: OrchestratorConfig) -> None:
    setup_tracing("specrec-orchestrator")
    health_servicer = health.aio.HealthServicer()
    server, port, loop = await build_server(config, health_servicer=health_servicer)
    await server.start()
    probes = await start_probe_listener(health_servicer, config.host, config.probe_port)
    router = loop.backends.router
    log.info("orchestrator listening on %s:%d (Triton pods %s, draft pods %s, policy %s, %s, token %s)",
             config.host, port, sorted(router.endpoints(TARGET)) or "none yet",
             sorted(router.endpoints(DRAFT)) or "none", config.policy, config.tls.describe(),
             "required" if config.auth.on else "off")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining for up to %.0f s", config.grace_s)
    # in-flight requests finish within the grace period; new ones are refused meanwhile
    await server.stop(config.grace_s)
    await loop.backends.close()
    if probes is not None:
        await probes.stop(None)
    shutdown_tracing()


def main(argv: list[str] | None = None) -> int:
    configure_service_logging()
    asyncio.run(serve(OrchestratorConfig.from_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
