"""The speculation loop of one request, transport-free: budget, draft, verify, commit, emit; until the list ends.

A round asks the policy for a budget, gets a tree from the proposer (or, at depth 0, without a proposer or
when it fails, just the tokens the grammar forces), has the verifier check it, commits the accepted path
plus the bonus token and emits it. The first round is the verifier's START: it carries the first tree, so
the target's prefill and the first verification are one forward. One `RoundStats` per round feeds the
policy, the metrics, an event on the request's span and the request's `RequestStats`.

The orchestrator plugs gRPC transports in (a draft stream, a Triton sequence on its pod); tests, offline
evaluation and benchmarks plug the library's drafters and verifier in directly (specrec.speculation.local),
and all run this same loop.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from opentelemetry import trace

from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.speculation.policy import N_SLOTS, NO_SPECULATION, Budget, Policy, RoundStats
from specrec.tree_shape import node_depths, path_scores


@dataclass
class Proposal:
    """A drafted tree: nodes parents first (parents[i] = -1: a child of the root)."""

    tokens: list[int]
    parents: list[int]
    logprobs: list[float] = field(default_factory=list)  # drafter log q of each node at its parent (may be empty)
    ready: bool = False  # the proposer had it ready when asked (drafted while the target verified)

    def path_logq(self) -> list[float]:
        return path_scores(self.parents, self.logprobs) if len(self.logprobs) == len(self.tokens) else []


class Proposer(Protocol):
    async def propose(self, committed: Sequence[int], news: list[list[int]], budget: Budget) -> Proposal | None:
        """A tree after `committed` within `budget`; `news`: what was committed since the last proposal, one
        list per round (the first follows the last tree; the others came from rounds run without one).
        None: the proposer failed (the round falls back to plain decoding; the proposer decides whether it
        is asked again)."""
        ...

    @property
    def available(self) -> bool: ...


@dataclass(frozen=True)
class Verdict:
    accepted_tokens: list[int]  # the accepted path's tokens, then the bonus token
    accepted_nodes: list[int]  # tree indices of the accepted path
    logprobs: list[float] = field(default_factory=list)  # the target's score of each accepted token


# Where committed tokens go, a round at a time, with their scores (one per token; empty if the verifier has none).
Emit = Callable[[list[int], list[float]], Awaitable[None]]


class Verifier(Protocol):
    async def verify(self, tokens: list[int], parents: list[int], committed: Sequence[int],
                     start: bool) -> Verdict:
        """Verify a tree after `committed` (start: the sequence's first request, with the whole context)."""
        ...


@dataclass
class RequestStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    draft_s: float = 0.0  # drafting the proposer kept the request waiting for
    verify_s: float = 0.0
    total_s: float = 0.0
    fallback_rounds: int = 0
    tree_rounds: int = 0  # rounds that verified a drafted tree
    ready_trees: int = 0  # of those, trees the proposer had ready when asked (drafted ahead)
    start_trees: int = 0  # of those, the first tree riding on START: no verification ran before it to hide behind
    policy: str = ""

    @property
    def tau(self) -> float:
        return self.committed / self.rounds if self.rounds else 0.0


class RoundObserver(Protocol):
    """Where rounds are reported besides the policy (the orchestrator's Prometheus metrics)."""

    def observe_round(self, depth: int, n_nodes: int, accepted: int, accepted_per_depth: Sequence[bool],
                      seconds: float) -> None: ...

    def fallback(self, reason: str, rounds: int = 1) -> None: ...


def forced_chain(constraint: ListConstraint, state: ListState) -> tuple[list[int], list[int]]:
    """The tokens the grammar forces from `state`, as a chain tree: the target checks them for free."""
    tokens: list[int] = []
    while not state.finished and (tok := constraint.forced(state)) is not None:
        state = constraint.advance(state, tok)  # type: ignore[assignment]
        tokens.append(tok)
    return tokens, list(range(-1, len(tokens) - 1))


def tree_depth(parents: Sequence[int]) -> int:
    return max(node_depths(parents), default=-1) + 1


class Speculation:
    """One request's loop. `in_flight()`: requests in flight now (this one included), for the policy;
    `max_len`: the target's positions (no tree past them)."""

    def __init__(self, prompt: Sequence[int], constraint: ListConstraint, policy: Policy,
                 proposer: Proposer | None, verifier: Verifier, emit: Emit,
                 *, max_len: int, max_nodes: int = 0, in_flight: Callable[[], int] = lambda: 1,
                 observer: RoundObserver | None = None):
        self.constraint, self.policy, self.proposer, self.verifier = constraint, policy, proposer, verifier
        self.emit, self.max_len, self.max_nodes = emit, max_len, max_nodes
        self.in_flight, self.observer = in_flight, observer
        self.state = constraint.start(list(prompt))
        self.committed = list(prompt)
        self.news: list[list[int]] = []  # committed since the last proposal, one list per round
        self.stats = RequestStats(policy=policy.name)
        self.req_state = policy.new_request(self.next_slot)

    @property
    def next_slot(self) -> int:
        return self.state.node[0]  # depth inside the current item = the slot of the next token

    async def run(self) -> RequestStats:
        t0 = time.perf_counter()
        try:
            start = True
            while start or not self.state.finished:
                await self.round(start)
                start = False
        finally:
            self.stats.total_s = time.perf_counter() - t0
        return self.stats

    def trace_round(self, stats: RoundStats, start: bool, draft_s: float, verify_s: float) -> None:
        """A round is an event on the request's span, not a span of its own: at ~30 rounds a request, spans were
        most of what tracing cost the orchestrator's CPU (1.8 ms a request for 31 round spans, SDK and OTLP encoding
        alone; 0.55 ms as events). Triton's spans (by default the START's only) join the request's span."""
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("speculation_round", {
                "specrec.round": self.stats.rounds, "specrec.policy": self.policy.name,
                "specrec.depth": stats.budget.depth, "specrec.nodes": stats.n_nodes,
                "specrec.accepted": stats.accepted, "specrec.ready": stats.ready, "specrec.start": start,
                "specrec.draft_ms": round(draft_s * 1e3, 3), "specrec.verify_ms": round(verify_s * 1e3, 3)})

    def budget(self) -> Budget:
        budget = self.policy.choose(self.req_state, self.next_slot, self.in_flight())
        if self.proposer is None or not self.proposer.available or budget.depth == 0:
            return NO_SPECULATION
        # no tree past the target's last position: it would refuse the round, and the request with it
        cap = min(self.max_nodes or budget.max_nodes, self.max_len - len(self.committed) - 1)
        if cap <= 0:
            return NO_SPECULATION
        return replace(budget, depth=min(budget.depth, cap), max_nodes=cap) if budget.max_nodes > cap else budget

    async def propose(self, budget: Budget) -> tuple[Proposal | None, float]:
        if not budget.depth or self.proposer is None:
            return None, 0.0
        t0 = time.perf_counter()
        tree = await self.proposer.propose(self.committed, self.news, budget)
        if tree is not None:
            self.news = []
        return tree, time.perf_counter() - t0

    async def round(self, start: bool) -> RoundStats:
        """One round: a tree within the policy's budget (or the grammar's forced chain), verified and committed.
        A START round teaches the policy acceptance, not costs: its time is mostly the two prefills."""
        budget, slot = self.budget(), self.next_slot
        tree, draft_s = await self.propose(budget)
        lost_s = 0.0
        if budget.depth and tree is None:  # the proposer failed: a plain round, its time charged apart
            self.stats.fallback_rounds += 1
            if self.observer is not None:
                self.observer.fallback("drafter")
            budget, lost_s, draft_s = NO_SPECULATION, draft_s, 0.0
        drafted = tree is not None and bool(tree.tokens)
        tokens, parents = (tree.tokens, tree.parents) if tree is not None and drafted \
            else forced_chain(self.constraint, self.state)
        t0 = time.perf_counter()
        verdict = await self.verifier.verify(tokens, parents, self.committed, start)
        verify_s = time.perf_counter() - t0
        depth, accepted = tree_depth(parents), len(verdict.accepted_nodes)
        on_path = set(verdict.accepted_nodes)
        stats = RoundStats(budget=budget, accepted=accepted, accepted_per_depth=[d < accepted for d in range(depth)],
                           slots=[(slot + d) % N_SLOTS for d in range(depth)],
                           draft_s=0.0 if start else draft_s, verify_s=0.0 if start else verify_s,
                           n_nodes=len(tokens), in_flight=self.in_flight(),
                           path_logq=tree.path_logq() if tree is not None and drafted else [],
                           node_accepted=[i in on_path for i in range(len(tokens))] if drafted else [],
                           ready=drafted and tree is not None and tree.ready, lost_s=lost_s)
        self.policy.observe(self.req_state, stats)
        self.stats.drafted += len(tokens)
        self.stats.draft_s += draft_s
        self.stats.verify_s += verify_s
        self.stats.tree_rounds += drafted
        self.stats.ready_trees += stats.ready
        self.stats.start_trees += drafted and start
        if self.observer is not None and not start:
            self.observer.observe_round(depth, len(tokens), accepted, stats.accepted_per_depth, draft_s + verify_s)
        await self.commit(verdict)
        self.trace_round(stats, start, draft_s + lost_s, verify_s)
        return stats

    async def commit(self, verdict: Verdict) -> None:
        for tok in verdict.accepted_tokens:
            nxt = self.constraint.advance(self.state, tok)
            if nxt is None:
                raise RuntimeError(f"the target committed token {tok}, which the list grammar forbids")
            self.state = nxt
        self.committed += verdict.accepted_tokens
        self.news.append(list(verdict.accepted_tokens))
        self.stats.rounds += 1
        self.stats.accepted += len(verdict.accepted_nodes)
        self.stats.committed += len(verdict.accepted_tokens)
        await self.emit(list(verdict.accepted_tokens), list(verdict.logprobs))
