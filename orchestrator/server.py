"""specrec-orchestrator: the client-facing Recommender gRPC server."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace

from orchestrator.backends import Backends, router_from_config
from orchestrator.batch import batch_width, fan_out
from orchestrator.catalog import Catalog
from orchestrator.config import OrchestratorConfig
from orchestrator.draft_client import DraftClient
from orchestrator.errors import RETRY_AFTER_MS, Refusal, RequestInvalid, abort_refused
from orchestrator.loop import LoopOptions, SpeculationLoop
from orchestrator.request_ids import bind, request_id_of
from orchestrator.responses import ItemEmitter, history_report, item_message, stats_message, user_error
from orchestrator.routing import DRAFT, TARGET, Router
from specrec.decoding.beam import MAX_BEAM_WIDTH, default_tree_nodes
from specrec.drafting.base import DRAFTER_NAME
from specrec.grpc_guard import UndecodableRequests
from specrec.security import add_port, start_probe_listener
from specrec.security import server_interceptors as auth_interceptors
from specrec.semantic_ids.constraint import TooFewItems
from specrec.speculation.beam_arms import PLAIN, BeamArms
from specrec.speculation.engine import Emit, RequestStats
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
from specrec.tree_shape import MAX_TREE_NODES
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

log = logging.getLogger("specrec.orchestrator")
SERVICE = "specrec.v1.RecommenderService"
MODES = {pb.DecodingOptions.MODE_UNSPECIFIED: "greedy", pb.DecodingOptions.MODE_GREEDY: "greedy",
         pb.DecodingOptions.MODE_SAMPLING: "stochastic", pb.DecodingOptions.MODE_RELAXED: "relaxed"}
MAX_SEED = 2**63 - 1  # Triton's request parameters are int64
tracer = trace.get_tracer("specrec.orchestrator")


@dataclass
class Plan:
    """A checked request: what the loop runs and what the response reports."""

    request_id: str
    prompt: list[int]
    opts: LoopOptions
    policy: Policy | None  # None: Retrieve (beam search drafts one tree, no policy)
    history: pb.HistoryReport | None  # Recommend, StreamRecommend and Retrieve only
    filters: pb.FilterReport | None = None


class FirstItemClock:
    """Observes the time from a streaming request's arrival to its first item, once per request."""

    def __init__(self, rpcs: RequestCounter, method: str):
        self.rpcs, self.method, self.t0 = rpcs, method, time.perf_counter()
        self.done = False

    def seen(self) -> None:
        if not self.done:
            self.done = True
            self.rpcs.first_item_after(self.method, time.perf_counter() - self.t0)


class RecommenderServicer(pb_grpc.RecommenderServiceServicer):
    def __init__(self, config: OrchestratorConfig, catalog: Catalog, loop: SpeculationLoop):
        self.config = config
        self.catalog = catalog
        self.loop = loop
        # policies of one drafter and mode learn from each other's rounds; near the in-flight cap speculation shrinks
        self.policies = PolicyRegistry(config.policy, max_in_flight=config.max_in_flight)
        self.beam_arms = BeamArms()  # Retrieve with SPECREC_BEAM_DRAFT=auto: plain or a tree, by measured latency

    def _options(self, request) -> tuple[int, LoopOptions, Policy]:
        """The request's list length, loop options and policy; RequestInvalid naming the field at fault."""
        n = request.num_items or 10
        if not 1 <= n <= self.config.max_items:
            raise RequestInvalid(f"num_items = {n} is out of range 1..{self.config.max_items}", "num_items")
        opts = request.options
        if opts.mode not in MODES:
            raise RequestInvalid(f"options.mode = {opts.mode} is not a known mode", "options.mode")
        if not (math.isfinite(opts.temperature) and opts.temperature >= 0):  # NaN passes a plain "< 0"
            raise RequestInvalid(f"options.temperature must be a finite number >= 0, got {opts.temperature}",
                                 "options.temperature")
        if opts.seed > MAX_SEED:
            raise RequestInvalid(f"options.seed = {opts.seed} is over 2**63-1, the largest seed the target takes",
                                 "options.seed")
        _check_drafter(opts.drafter, "options.drafter")
        if opts.max_tree_nodes < 0 or opts.max_tree_nodes > 128:
            raise RequestInvalid("options.max_tree_nodes must be in 0..128", "options.max_tree_nodes")
        drafter = opts.drafter or self.config.drafter
        try:
            policy = self.policies.get(opts.policy, drafter, MODES[opts.mode])
        except ValueError as e:
            raise RequestInvalid(f"options.policy: {e}", "options.policy") from None
        loop_opts = LoopOptions(n_items=n, exclude_history=not opts.include_history, mode=MODES[opts.mode],
                                temperature=opts.temperature or 1.0, seed=opts.seed,
                                max_nodes=opts.max_tree_nodes, drafter=drafter)
        return n, loop_opts, policy

    def _filters(self, request, opts: LoopOptions) -> pb.FilterReport | None:
        """The request's allow/deny filters into the loop's banned (or allowed) items; what was made of them."""
        if not request.HasField("filters"):
            return None
        f = request.filters
        found = self.catalog.item_filter(list(f.allow_item_ids), list(f.deny_item_ids), list(f.allow_categories),
                                         list(f.deny_categories))
        opts.banned, opts.allowed = found.banned, found.allowed
        return pb.FilterReport(eligible_items=found.eligible, unknown_ids=found.unknown_ids)

    def _prompt(self, request) -> tuple[list[int], pb.HistoryReport | None]:
        """A Generate request's prompt as sent; a Recommend request's from its history (and what was made of it)."""
        if isinstance(request, pb.GenerateRequest):
            if not request.prompt:
                raise RequestInvalid("prompt is empty: send BOS history REC tokens", "prompt")
            return list(request.prompt), None
        resolved = self.catalog.prompt(list(request.history), self.config.max_history, request.strict_history)
        return resolved.prompt, history_report(resolved)

    def _plan(self, request, check: Callable[[Any, str], Plan] | None = None) -> Plan:
        """The request checked (by `check`, default `_checked`) and turned into a plan; a Refusal
        (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED at the in-flight cap) otherwise. Binds the request's id to the
        logs and the current span."""
        try:
            request_id = request_id_of(request.request_id)
        except RequestInvalid as e:
            refusal = Refusal.invalid(e, "request_id")
            refusal.request_id = request_id_of("")  # the refusal still gets an id for the logs
            bind(refusal.request_id)
            log.info("refused: %s", e)
            raise refusal from None
        bind(request_id)
        try:
            return (check or self._checked)(request, request_id)
        except Refusal as refusal:
            refusal.request_id = request_id
            log.info("refused: %s", refusal)
            raise

    def _checked(self, request, request_id: str) -> Plan:
        prompt_field = "prompt" if isinstance(request, pb.GenerateRequest) else "history"
        try:
            n, opts, policy = self._options(request)
            filters = self._filters(request, opts)
            prompt, history = self._prompt(request)
            self.catalog.constraint(n, opts.exclude_history, opts.banned, opts.allowed).start(prompt)
            self.catalog.check_fits(prompt, n)
        except TooFewItems as e:
            raise Refusal.invalid(ValueError(f"{e}: relax the filters or ask for fewer items"),
                                  "filters" if opts.banned or opts.allowed else "num_items") from None
        except ValueError as e:  # RequestInvalid and the grammar's ConstraintError (a bad prompt)
            raise Refusal.invalid(e, prompt_field) from None
        self._admit()
        return Plan(request_id, prompt, opts, policy, history, filters)

    def _admit(self) -> None:
        if self.loop.in_flight >= self.config.max_in_flight:
            raise Refusal.overloaded(f"{self.loop.in_flight} requests in flight, the cap; retry after "
                                     f"~{RETRY_AFTER_MS} ms", RETRY_AFTER_MS)

    def _retrieve_options(self, request: pb.RetrieveRequest) -> LoopOptions:
        k = request.k or 10
        if not 1 <= k <= MAX_BEAM_WIDTH:
            raise RequestInvalid(f"k = {k} is out of range 1..{MAX_BEAM_WIDTH}", "k")
        width = request.beam_width or k
        if not k <= width <= MAX_BEAM_WIDTH:
            raise RequestInvalid(f"beam_width = {width} must be in k..{MAX_BEAM_WIDTH} (k = {k}; 0 takes k)",
                                 "beam_width")
        if not 0 <= request.max_tree_nodes <= MAX_TREE_NODES:
            raise RequestInvalid(f"max_tree_nodes = {request.max_tree_nodes} is out of range 0..{MAX_TREE_NODES}",
                                 "max_tree_nodes")
        _check_drafter(request.drafter, "drafter")
        return LoopOptions(n_items=k, exclude_history=not request.include_history, mode="beam",
                           drafter=request.drafter or self.config.drafter, beam_width=width)

    def _checked_retrieve(self, request: pb.RetrieveRequest, request_id: str) -> Plan:
        opts = LoopOptions()
        try:
            opts = self._retrieve_options(request)
            filters = self._filters(request, opts)
            prompt, history = self._prompt(request)
            self.catalog.constraint(opts.n_items, opts.exclude_history, opts.banned, opts.allowed).start(prompt)
            self.catalog.check_fits(prompt, 1)
        except TooFewItems as e:
            raise Refusal.invalid(ValueError(f"{e}: relax the filters or ask for a smaller k"),
                                  "filters" if opts.banned or opts.allowed else "k") from None
        except ValueError as e:
            raise Refusal.invalid(e, "history") from None
        self._admit()
        return Plan(request_id, prompt, opts, None, history, filters)

    def _beam_arm(self, request: pb.RetrieveRequest, width: int, in_flight: int) -> int:
        """The tree size this Retrieve runs with (PLAIN = none): asked, fixed by SPECREC_BEAM_DRAFT, or chosen."""
        mode = self.config.beam_draft
        if request.plain or mode == "off":
            return PLAIN
        if request.max_tree_nodes or mode != "auto":
            return request.max_tree_nodes or default_tree_nodes(width)
        return self.beam_arms.choose(width, in_flight)

    async def Retrieve(self, request: pb.RetrieveRequest, context: grpc.aio.ServicerContext
                       ) -> pb.RetrieveResponse:
        try:
            plan = self._plan(request, self._checked_retrieve)
            try:
                width, in_flight = plan.opts.beam_width, self.loop.in_flight
                arm = self._beam_arm(request, width, in_flight)
                run = await self.loop.retrieve(plan.prompt, plan.opts, arm != PLAIN, arm,
                                               overlap=self.config.beam_draft == "overlap")
                if self.config.beam_draft == "auto" and arm in self.beam_arms.arms(width):
                    # the load it ran under: a request that started alone as a burst arrived was queued behind it
                    self.beam_arms.observe(width, max(in_flight, self.loop.in_flight), arm, run.stats.total_s)
            except TargetError as e:
                refusal = target_refusal(e)
                refusal.request_id = plan.request_id
                log.warning("target failed: %s", e)
                raise refusal from None
        except Refusal as refusal:
            await abort_refused(context, refusal)
        s = run.stats
        log.info("retrieved %d items: %d rounds, %d tree nodes, %.1f ms", len(run.results), s.rounds, s.tree_nodes,
                 s.total_s * 1e3)
        return pb.RetrieveResponse(
            items=[item_message(self.catalog, r.item, r.score) for r in run.results],
            stats=pb.RetrieveStats(rounds=s.rounds, tree_nodes=s.tree_nodes, drafted_nodes=s.drafted,
                                   draft_ms=s.draft_s * 1e3, verify_ms=s.score_s * 1e3, total_ms=s.total_s * 1e3,
                                   tree_budget=arm),
            request_id=plan.request_id, history=plan.history, filters=plan.filters,
            model_version=self.catalog.version, trace_id=current_trace_id())

    async def _generate(self, plan: Plan, emit: Emit) -> RequestStats:
        """Run the plan; a Refusal (with the request's id) when the target refuses or fails."""
        try:
            assert plan.policy is not None
            stats = await self.loop.run(plan.prompt, plan.opts, plan.policy, emit)
        except TargetError as e:
            refusal = target_refusal(e)
            refusal.request_id = plan.request_id
            log.warning("target failed: %s", e)
            raise refusal from None
        log.info("done: %d rounds, %d tokens, %.1f ms", stats.rounds, stats.committed, stats.total_s * 1e3)
        return stats

    def _response(self, plan: Plan, items: list[pb.Item], stats: RequestStats) -> pb.RecommendResponse:
        return pb.RecommendResponse(items=items, stats=stats_message(stats), trace_id=current_trace_id(),
                                    request_id=plan.request_id, history=plan.history, filters=plan.filters,
                                    total_log_prob=sum(item.log_prob for item in items),
                                    model_version=self.catalog.version)

    async def _recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        plan = self._plan(request)
        emitter, items = ItemEmitter(self.catalog), []

        async def emit(tokens: list[int], logprobs: list[float]) -> None:
            items.extend(emitter.feed(tokens, logprobs))

        stats = await self._generate(plan, emit)
        return self._response(plan, items, stats)

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
                        ) -> pb.RecommendResponse:
        try:
            return await self._recommend(request)
        except Refusal as refusal:
            await abort_refused(context, refusal)

    async def StreamRecommend(self, request: pb.StreamRecommendRequest, context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.StreamRecommendResponse]:
        first_item = FirstItemClock(self.loop.metrics.rpcs, "StreamRecommend")
        try:
            plan = self._plan(request.request)
            emitter, items = ItemEmitter(self.catalog), []

            async def emit(tokens: list[int], logprobs: list[float]) -> None:
                for item in emitter.feed(tokens, logprobs):
                    first_item.seen()
                    items.append(item)
                    await context.write(pb.StreamRecommendResponse(item=item))

            stats = await self._generate(plan, emit)
        except Refusal as refusal:  # in the trailers: the first items may already be out
            await abort_refused(context, refusal)
        await context.write(pb.StreamRecommendResponse(done=self._response(plan, items, stats)))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        first_tokens = FirstItemClock(self.loop.metrics.rpcs, "Generate")
        try:
            plan = self._plan(request)

            async def emit(tokens: list[int], logprobs: list[float]) -> None:
                first_tokens.seen()
                await context.write(pb.GenerateResponse(tokens=tokens, log_probs=logprobs))

            stats = await self._generate(plan, emit)
        except Refusal as refusal:
            await abort_refused(context, refusal)
        await context.write(pb.GenerateResponse(done=True, stats=stats_message(stats), request_id=plan.request_id,
                                                model_version=self.catalog.version))

    async def RecommendBatch(self, request: pb.RecommendBatchRequest, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.RecommendBatchResponse]:
        try:
            width = batch_width(request, self.config.max_in_flight)
        except RequestInvalid as e:
            await abort_refused(context, Refusal.invalid(e, "requests"))
        async for result in fan_out(list(request.requests), width, self._batch_user):
            yield result

    async def _batch_user(self, index: int, user: pb.RecommendRequest) -> pb.RecommendBatchResponse:
        """One user's answer or error: what Recommend would answer, with no effect on the batch's other users."""
        with tracer.start_as_current_span("batch_user", attributes={"specrec.batch_index": index}):
            try:
                return pb.RecommendBatchResponse(index=index, response=await self._recommend(user))
            except Refusal as r:
                return pb.RecommendBatchResponse(index=index, error=user_error(r))
            except Exception as e:  # a bug for one user is that user's INTERNAL, not the batch's end
                log.exception("batch user %d failed", index)
                return pb.RecommendBatchResponse(index=index, error=pb.UserError(
                    code=grpc.StatusCode.INTERNAL.name, message=f"{type(e).__name__}: {e}"))


def _check_drafter(name: str, field: str) -> None:
    # refused here: else the drafter's refusal backs every request off the drafter for a while, as if it were down
    if name and not DRAFTER_NAME.fullmatch(name):
        raise RequestInvalid(f"{field} = {name!r} is not a drafter: use model, retrieval or hybrid (model and hybrid "
                             "may add :drafter-<variant>), or leave it empty", field)


def target_refusal(e: TargetError) -> Refusal:
    """What a client is told when the target refused or failed its request."""
    if isinstance(e, TargetInvalidArgument):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"the target refused the request: {e}")
    if isinstance(e, TargetOverloaded):
        return Refusal.overloaded(f"the target model is at capacity: {e}", e.retry_after_ms)
    code = e.code if e.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED) \
        else grpc.StatusCode.UNAVAILABLE
    return Refusal(code, f"the target model (Triton) failed: {e}")


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
    loop = SpeculationLoop(catalog, backends, config.verify_timeout_s, metrics, config.trace_target_rounds)
    if config.metrics_port:
        port = start_metrics_server(config.metrics_port, metrics.registry)
        log.info("metrics on http://%s:%d/metrics", config.host, port)
    # Counting first: it sees what the later interceptors refuse (UNAUTHENTICATED, undecodable requests).
    server = grpc.aio.server(interceptors=[RequestCounting(metrics.rpcs), *server_interceptors(),
                                           *auth_interceptors(config.auth), UndecodableRequests()],
                             options=connection_age_options(config))
    pb_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(config, catalog, loop), server)
    health_servicer = health_servicer or health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await follow_target_readiness(health_servicer, backends)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, f"{config.host}:{config.port}", config.tls)
    return server, port, loop


def connection_age_options(config: OrchestratorConfig) -> list[tuple[str, int]]:
    if config.max_connection_age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_s * 1000))]


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
