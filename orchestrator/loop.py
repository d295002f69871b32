"""The speculation loop of one request: draft -> verify -> commit -> emit, until the list ends.

A round asks the policy for a budget, gets a tree from the drafter (or, at depth 0 or without a drafter,
just the tokens the grammar forces), has the target verify it, commits the accepted path plus the bonus
token and hands the commit to the drafter with the next budget. Rounds without a tree do not call the
drafter at all: the draft stream opens with the first tree wanted (the Triton sequence with the first
round), and is told the tokens of tree-less rounds with the next tree it is asked for (under load, when
the policy stops speculating, the drafter then costs nothing).
Both sessions are closed on every exit path.

Every round of a request goes to one Triton pod, the one holding its sequence; if that pod leaves or
fails UNAVAILABLE, the request moves to the next pod of its rendezvous ranking (orchestrator.backends)
and the sequence is rebuilt there from the committed context, so the output does not change.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import grpc
from opentelemetry import trace

from orchestrator.backends import Backends
from orchestrator.catalog import Catalog
from orchestrator.draft_client import DraftClient, DraftedTree, DraftSession, DraftUnavailable
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.speculation.policy import Budget, Policy, RoundStats
from specrec.target_client import TargetClient, TargetError, TargetSequenceUnknown, VerifyOutcome
from specrec.telemetry import OrchestratorMetrics, inject_metadata
from specrec.tree_shape import tree_problem

log = logging.getLogger(__name__)
tracer = trace.get_tracer("specrec.orchestrator")
NO_DRAFT = Budget(0, 0)
OPEN_TIMEOUT_FACTOR = 20  # an Open also prefills the drafter with the whole context: more time than a round


@dataclass
class LoopOptions:
    n_items: int = 10
    exclude_history: bool = True
    mode: str = "greedy"  # target verification mode: greedy | stochastic | relaxed
    temperature: float = 1.0
    seed: int = 0
    max_nodes: int = 0  # cap on tree size, 0 = the policy's choice
    drafter: str = ""


@dataclass
class LoopStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    fallback_rounds: int = 0
    tree_rounds: int = 0  # rounds that verified a drafted tree
    ready_trees: int = 0  # of those, trees the drafter had ready when asked (drafted ahead)
    policy: str = ""

    @property
    def tau(self) -> float:
        return self.committed / self.rounds if self.rounds else 0.0


def forced_chain(constraint: ListConstraint, state: ListState) -> tuple[list[int], list[int]]:
    """The tokens the grammar forces from `state`, as a chain tree: the target checks them for free."""
    tokens: list[int] = []
    while not state.finished and (tok := constraint.forced(state)) is not None:
        state = constraint.advance(state, tok)  # type: ignore[assignment]
        tokens.append(tok)
    return tokens, list(range(-1, len(tokens) - 1))


def tree_depth(parents: list[int]) -> int:
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth, default=0)


class SpeculationLoop:
    def __init__(self, catalog: Catalog, backends: Backends, verify_timeout_s: float,
                 metrics: OrchestratorMetrics | None = None):
        self.catalog = catalog
        self.metrics = metrics or OrchestratorMetrics()
        self.backends = backends
        self.verify_timeout_s = verify_timeout_s
        self.in_flight = 0
        self.sequences_open = 0
        self.draft_sessions_open = 0
        self._background: set[asyncio.Future[None]] = set()

    def in_background(self, work: Awaitable[None]) -> None:
        """Run `work` without waiting for it (a reference is kept until it ends)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run(self, prompt: list[int], opts: LoopOptions, policy: Policy,
                  emit: Callable[[list[int]], Awaitable[None]], metadata: tuple = ()) -> LoopStats:
        """Generate after `prompt`; `emit` gets each round's committed tokens. Raises TargetError."""
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            with self.metrics.requests_in_flight.track_inprogress():
                stats = await _Request(self, prompt, opts, policy, emit, metadata).run()
        finally:
            self.in_flight -= 1
        self.metrics.observe_request(time.perf_counter() - t0, stats.rounds, stats.committed)
        return stats


class _Request:
    def __init__(self, loop: SpeculationLoop, prompt: list[int], opts: LoopOptions, policy: Policy,
                 emit: Callable[[list[int]], Awaitable[None]], metadata: tuple):
        self.loop, self.opts, self.policy, self.emit, self.metadata = loop, opts, policy, emit, metadata
        self.constraint = loop.catalog.constraint(opts.n_items, opts.exclude_history)
        self.state = self.constraint.start(prompt)
        self.committed = list(prompt)
        self.seq_id = secrets.randbits(63) or 1
        self.key = f"{self.seq_id:016x}"  # places the request on pods (rendezvous hashing)
        self.pod: str | None = None  # the Triton pod holding the sequence
        self.drafts: DraftClient | None = None  # the draft pod's client, for this request
        self.session: DraftSession | None = None
        # Committed tokens the drafter has not been told yet, one list per round: the first followed its last
        # tree, the others came from rounds run without one (told in the same message, when it next drafts).
        self.unsent: list[list[int]] = []
        self.stats = LoopStats(policy=policy.name)
        self.req_state = policy.new_request(self.next_slot)
        self.started = False

    @property
    def next_slot(self) -> int:
        return self.state.node[0]  # depth inside the current item = the slot of the next token

    async def run(self) -> LoopStats:
        t0 = time.perf_counter()
        try:
            await self._open()
            while not self.state.finished:
                await self._round()
        finally:
            await asyncio.shield(self._close())
            self.stats.total_s = time.perf_counter() - t0
        return self.stats

    # -- sessions --------------------------------------------------------------------------------
    async def _open(self) -> None:
        """START on the target, carrying the first tree: the prefill and the first verification are one forward.
        The draft stream opens with the first tree the policy asks for: a request that never speculates (e.g.
        under load) costs the drafter nothing. The round teaches the policy acceptance, not costs (its time is
        mostly the two prefills)."""
        self.drafts = self.loop.backends.draft(self.key) if self.policy.name != "off" else None
        await self._speculate(start=True)

    async def _close(self) -> None:
        if self.session is not None:
            await self._drop_drafter(None)
        if self.started:
            self.started = False
            self.loop.sequences_open -= 1
            if self.pod is not None:  # off the critical path: the answer does not wait for END
                self.loop.in_background(self._end_on(self.pod))

    async def _end_on(self, pod: str, timeout_s: float | None = None) -> None:
        """END the sequence on `pod` if its client is still open; the sequence also expires on its own."""
        target = self.loop.backends.targets.find(pod)
        if target is None:
            return
        try:
            await target.end(self.seq_id, timeout_s=timeout_s)
        except Exception as e:  # never mask the real outcome
            log.debug("ending sequence %d on %s failed: %s", self.seq_id, pod, e)

    async def _drop_drafter(self, reason: str | None) -> None:
        """No more drafting for this request; `reason`: the draft pod failed (it backs off), None: it did not."""
        if self.session is not None:
            # a session already failed keeps its own status; one dropped here failed the loop's checks
            await self.session.close(grpc.StatusCode.OK if reason is None else grpc.StatusCode.INTERNAL, reason)
            self.session = None
            self.loop.draft_sessions_open -= 1
        if reason is not None and self.drafts is not None:
            self.drafts.failed(reason)  # this draft pod's backoff only: other pods keep drafting
        self.drafts = None

    # -- rounds ----------------------------------------------------------------------------------
    def _budget(self) -> Budget:
        budget = self.policy.choose(self.req_state, self.next_slot, self.loop.in_flight)
        if self.drafts is None or budget.depth == 0:
            return NO_DRAFT
        # no tree past the target's last position: it would refuse the round, and the request with it
        cap = min(self.opts.max_nodes or budget.max_nodes, self.loop.catalog.max_len - len(self.committed) - 1)
        if cap <= 0:
            return NO_DRAFT
        if budget.max_nodes > cap:
            budget = replace(budget, depth=min(budget.depth, cap), max_nodes=cap)
        return budget

    async def _draft(self, budget: Budget) -> tuple[DraftedTree | None, float]:
        if self.drafts is None:
            return None, 0.0
        t0 = time.perf_counter()
        opening = self.session is None
        try:
            if self.session is None:
                self.session = self.drafts.session(self.metadata)
                self.loop.draft_sessions_open += 1
                tree = await self.session.open(self.committed, self.opts.n_items, self.opts.exclude_history, budget,
                                               self.opts.drafter, self.drafts.timeout_s * OPEN_TIMEOUT_FACTOR)
            else:
                first, *plain = self.unsent or [[]]
                tree = await self.session.advance(first, budget, [t for r in plain for t in r])
        except DraftUnavailable as e:
            # A drafter name the service does not have is this request's fault, not the pod's.
            await self._drop_drafter(None if opening and e.refused_request else str(e))
            return None, time.perf_counter() - t0
        problem = tree_problem(tree.tokens, tree.parents, self.loop.catalog.sids.vocab.size)
        if problem:  # a broken drafter costs speed, never the request: the target would refuse the tree
            await self._drop_drafter(f"malformed tree: {problem}")
            return None, time.perf_counter() - t0
        self.unsent = []
        if self.drafts is not None:
            self.drafts.succeeded()
        return tree, time.perf_counter() - t0

    async def _round(self) -> None:
        with tracer.start_as_current_span("speculation_round") as span:
            stats = await self._traced_round()
            span.set_attributes({"specrec.round": self.stats.rounds, "specrec.policy": self.policy.name,
                                 "specrec.depth": stats.budget.depth, "specrec.nodes": stats.n_nodes,
                                 "specrec.accepted": stats.accepted})

    async def _traced_round(self) -> RoundStats:
        return await self._speculate(start=False)

    async def _speculate(self, start: bool) -> RoundStats:
        """One round: a tree within the policy's budget (or the grammar's forced chain), verified and committed."""
        budget = self._budget()
        slot = self.next_slot
        tree, draft_s = None, 0.0
        if budget.depth:
            with tracer.start_as_current_span("draft", attributes={"specrec.depth": budget.depth}):
                tree, draft_s = await self._draft(budget)
        lost_s = 0.0
        if budget.depth and tree is None:  # the drafter failed: a plain round, its time charged apart
            self.stats.fallback_rounds += 1
            self.loop.metrics.fallback("drafter")
            budget, lost_s, draft_s = NO_DRAFT, draft_s, 0.0
        if tree is not None and tree.tokens:
            tokens, parents = tree.tokens, tree.parents
        else:
            tokens, parents = forced_chain(self.constraint, self.state)
        t0 = time.perf_counter()
        with tracer.start_as_current_span("verify", attributes={"specrec.nodes": len(tokens)}):
            outcome = await self._verify(tokens, parents, start=start)
        verify_s = time.perf_counter() - t0
        depth = tree_depth(parents)
        accepted = len(outcome.accepted_nodes)
        on_path = set(outcome.accepted_nodes)
        stats = RoundStats(budget=budget, accepted=accepted,
                           accepted_per_depth=[d < accepted for d in range(depth)],
                           slots=[(slot + d) % 5 for d in range(depth)],
                           # a START round's time is mostly the prefills: it teaches acceptance, not costs
                           draft_s=0.0 if start else draft_s, verify_s=0.0 if start else verify_s,
                           n_nodes=len(tokens), in_flight=self.loop.in_flight,
                           path_logq=tree.path_logq() if tree is not None else [],
                           node_accepted=[i in on_path for i in range(len(tokens))] if tree is not None else [],
                           ready=tree is not None and tree.ahead_hit, lost_s=lost_s)
        self.policy.observe(self.req_state, stats)
        self.stats.drafted += len(tokens)
        self.stats.draft_s += draft_s
        self.stats.verify_s += verify_s
        if tree is not None and tree.tokens:
            self.stats.tree_rounds += 1
            self.stats.ready_trees += tree.ahead_hit
        if not start:
            self.loop.metrics.observe_round(depth, len(tokens), accepted, stats.accepted_per_depth,
                                            draft_s + verify_s)
        await self._commit(outcome)
        return stats

    async def _verify(self, tokens: list[int], parents: list[int], start: bool = False) -> VerifyOutcome:
        """Verify on the request's Triton pod; if the pod is gone, move to the next one and rebuild there."""
        if start:
            self.started = True
            self.loop.sequences_open += 1
        backends = self.loop.backends
        attempts = backends.attempts()
        for attempt in range(1, attempts + 1):
            pod, target = backends.target(self.key, self.pod)
            rebuild = start
            if self.pod is not None and pod != self.pod:
                backends.moved(self.pod, pod)
                # A pod that left may still be draining: free the sequence's KV there (in the background:
                # a dead pod would hold up the request until the timeout).
                self.loop.in_background(self._end_on(self.pod, timeout_s=1.0))
                rebuild = True  # the new pod has never seen this sequence: START it from the context
            self.pod = pod
            try:
                return await backends.call(pod, self._verify_on(target, tokens, parents, rebuild))
            except TargetError as e:
                if attempt == attempts or not backends.lost(pod, e):
                    raise
                log.warning("sequence %d lost its Triton pod %s after %d tokens (%s); moving", self.seq_id, pod,
                            self.stats.committed, e)
        raise AssertionError("unreachable")

    async def _verify_on(self, target: TargetClient, tokens: list[int], parents: list[int],
                         start: bool) -> VerifyOutcome:
        kw = dict(mode=self.opts.mode, temperature=self.opts.temperature, seed=self.opts.seed,
                  n_items=self.opts.n_items, exclude_history=self.opts.exclude_history,
                  timeout_s=self.loop.verify_timeout_s, headers=dict(inject_metadata(self.metadata)) or None)
        try:
            return await target.verify(self.seq_id, tokens, parents, start=start,
                                       context=self.committed if start else None, **kw)
        except TargetSequenceUnknown:
            # evicted, expired or a restarted Triton: rebuild the sequence from everything committed
            log.info("sequence %d lost by the target; rebuilding from %d tokens", self.seq_id, len(self.committed))
            return await target.verify(self.seq_id, tokens, parents, start=True, context=self.committed, **kw)

    async def _commit(self, outcome: VerifyOutcome) -> None:
        for tok in outcome.accepted_tokens:
            nxt = self.constraint.advance(self.state, tok)
            if nxt is None:
                raise RuntimeError(f"the target committed token {tok}, which the list grammar forbids")
            self.state = nxt
        self.loop.metrics.set_target_live_sequences(outcome.live_sequences)
        self.committed += outcome.accepted_tokens
        self.unsent.append(outcome.accepted_tokens)
        self.stats.rounds += 1
        self.stats.accepted += len(outcome.accepted_nodes)
        self.stats.committed += len(outcome.accepted_tokens)
        await self.emit(outcome.accepted_tokens)
