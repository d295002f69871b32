"""A request's speculation over the network: the library's loop (specrec.speculation.engine) with gRPC transports.

The proposer is a draft pod's Speculate stream, opened with the first tree a request wants (a request that
never speculates, e.g. under load, costs the drafter nothing) and told the tokens of tree-less rounds with
the next tree it is asked for; a failing or broken drafter is dropped for the rest of the request (its pod
backs off) and the request goes on by plain decoding. The verifier is the request's Triton sequence: every
round goes to one Triton pod, the one holding the sequence; if that pod leaves or fails UNAVAILABLE, the
request moves to the next pod of its rendezvous ranking (orchestrator.backends) and the sequence is rebuilt
there from the committed context, so the output does not change. Both are closed on every exit path; END
goes out in the background, off the critical path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import grpc

from orchestrator.backends import Backends
from orchestrator.catalog import Catalog
from orchestrator.draft_client import DraftClient, DraftLate, DraftSession, DraftUnavailable
from specrec.decoding.beam import BeamRun, Expansion, beam_retrieve, draft_shape
from specrec.speculation.engine import Emit, Proposal, RequestStats, Speculation, Verdict
from specrec.speculation.policy import Budget, Policy
from specrec.target_client import (
    TargetClient,
    TargetError,
    TargetSequenceUnknown,
    TargetUnavailable,
    VerifyOutcome,
)
from specrec.telemetry import OrchestratorMetrics, sampled_metadata
from specrec.tree_shape import tree_problem

log = logging.getLogger(__name__)
OPEN_TIMEOUT_FACTOR = 20  # an Open also prefills the drafter with the whole context: more time than a round


@dataclass
class LoopOptions:
    n_items: int = 10
    exclude_history: bool = True
    mode: str = "greedy"  # target verification mode: greedy | stochastic | relaxed | beam
    temperature: float = 1.0
    seed: int = 0
    max_nodes: int = 0  # cap on tree size, 0 = the policy's choice
    drafter: str = ""
    banned: tuple[int, ...] = ()  # item indices the request's filters rule out (grammar-enforced everywhere)
    allowed: tuple[int, ...] = ()  # if any: the only item indices they leave (whichever form is shorter is sent)
    beam_width: int = 0  # beam mode (Retrieve): children the target answers per row


class SpeculationLoop:
    """What the requests of one orchestrator share: catalog, backends, metrics, and in-flight counts."""

    def __init__(self, catalog: Catalog, backends: Backends, verify_timeout_s: float,
                 metrics: OrchestratorMetrics | None = None, trace_target_rounds: str = "start"):
        self.catalog = catalog
        self.trace_every_round = trace_target_rounds == "all"  # else Triton traces a sampled request's START
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

    async def settled(self) -> None:
        """Wait for the work sent in the background (ENDs) to finish."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def run(self, prompt: list[int], opts: LoopOptions, policy: Policy,
                  emit: Emit, metadata: tuple = ()) -> RequestStats:
        """Generate after `prompt`; `emit` gets each round's committed tokens and their scores. Raises TargetError."""
        self.in_flight += 1
        t0 = time.perf_counter()
        key_id = secrets.randbits(63) or 1
        drafts = self.backends.draft(f"{key_id:016x}") if policy.name != "off" else None
        proposer = DraftStream(self, drafts, opts, metadata)
        verifier = TritonSequence(self, key_id, opts, metadata)
        observer = self.metrics.for_request(opts.drafter, policy.name, opts.mode)
        try:
            with self.metrics.requests_in_flight.track_inprogress():
                constraint = self.catalog.constraint(opts.n_items, opts.exclude_history, opts.banned, opts.allowed)
                speculation = Speculation(prompt, constraint, policy,
                                          proposer, verifier, emit, max_len=self.catalog.max_len,
                                          max_nodes=opts.max_nodes, in_flight=lambda: self.in_flight,
                                          observer=observer)
                stats = await speculation.run()
        finally:
            await asyncio.shield(asyncio.gather(proposer.close(), verifier.close()))
            self.in_flight -= 1
        observer.observe_request(time.perf_counter() - t0, stats.rounds, stats.committed)
        return stats

    async def retrieve(self, prompt: list[int], opts: LoopOptions, speculative: bool, tree_nodes: int = 0,
                       overlap: bool = False, metadata: tuple = ()) -> BeamRun:
        """Top-`opts.n_items` items after `prompt` by beam search of `opts.beam_width` (mode "beam"); with
        `speculative`, a tree from a draft pod rides along with the prefill (or, `overlap`, is drafted while
        Triton prefills: specrec.decoding.beam.beam_retrieve). Raises TargetError."""
        self.in_flight += 1
        key_id = secrets.randbits(63) or 1
        proposer = DraftStream(self, self.backends.draft(f"{key_id:016x}") if speculative else None, opts, metadata)
        target = TritonSequence(self, key_id, opts, metadata)
        constraint = self.catalog.constraint(opts.n_items, opts.exclude_history, opts.banned, opts.allowed)
        budget = Budget(*draft_shape(opts.beam_width, constraint.trie.branching_depth, tree_nodes))

        async def score(tokens: list[int], parents: list[int], start: bool) -> list[Expansion | None]:
            return (await target.outcome(tokens, parents, prompt, start)).expansions

        async def draft() -> tuple[list[int], list[int]] | None:
            tree = await proposer.propose(prompt, [], budget)
            return None if tree is None else (tree.tokens, tree.parents)

        try:
            with self.metrics.requests_in_flight.track_inprogress():
                return await beam_retrieve(constraint, prompt, opts.beam_width, opts.n_items, score,
                                           draft if proposer.available else None, overlap)
        finally:
            await asyncio.shield(asyncio.gather(proposer.close(), target.close()))
            self.in_flight -= 1


class DraftStream:
    """Proposer over one draft pod's Speculate stream, opened with the first tree wanted."""

    def __init__(self, loop: SpeculationLoop, drafts: DraftClient | None, opts: LoopOptions, metadata: tuple):
        self.loop, self.drafts, self.opts, self.metadata = loop, drafts, opts, metadata
        self.session: DraftSession | None = None
        # leading entries of the engine's `news` the drafter already has: a request that went out but whose tree
        # came late carried them, and the engine keeps news until a tree is used
        self.delivered = 0

    @property
    def available(self) -> bool:
        return self.drafts is not None

    async def propose(self, committed: Sequence[int], news: list[list[int]], budget: Budget) -> Proposal | None:
        if self.drafts is None:
            return None
        opening = self.session is None
        try:
            if self.session is None:
                self.session = self.drafts.session(self.metadata)
                self.loop.draft_sessions_open += 1
                tree = await self.session.open(list(committed), self.opts.n_items, self.opts.exclude_history, budget,
                                               self.opts.drafter, self.drafts.timeout_s * OPEN_TIMEOUT_FACTOR,
                                               self.opts.banned, self.opts.allowed,
                                               single_tree=self.opts.mode == "beam")
            else:
                # after a late tree the drafter's last tree was never verified: the rounds since ran without one, and
                # the first of them commits against it as a tree-less round does (forced chain + bonus)
                first, *plain = news[self.delivered:] or [[]]
                tree = await self.session.advance(first, budget, [t for r in plain for t in r])
        except DraftLate as late:
            if late.sent:
                self.delivered = len(news)
            return None  # this round goes without a tree; the stream and the pod stay in use
        except DraftUnavailable as e:
            # A drafter name the service does not have is this request's fault, not the pod's.
            await self.drop(None if opening and e.refused_request else str(e))
            return None
        problem = tree_problem(tree.tokens, tree.parents, self.loop.catalog.sids.vocab.size)
        if problem:  # a broken drafter costs speed, never the request: the target would refuse the tree
            await self.drop(f"malformed tree: {problem}")
            return None
        if self.drafts is not None:
            self.drafts.succeeded()
        self.delivered = 0  # the engine clears its news now
        return tree

    async def drop(self, reason: str | None) -> None:
        """No more drafting for this request; `reason`: the draft pod failed (it backs off), None: it did not."""
        if self.session is not None:
            # a session already failed keeps its own status; one dropped here failed the loop's checks
            await self.session.close(grpc.StatusCode.OK if reason is None else grpc.StatusCode.INTERNAL, reason)
            self.session = None
            self.loop.draft_sessions_open -= 1
        if reason is not None and self.drafts is not None:
            self.drafts.failed(reason)  # this draft pod's backoff only: other pods keep drafting
        self.drafts = None

    async def close(self) -> None:
        if self.session is not None:
            await self.drop(None)


class TritonSequence:
    """Verifier over the request's Triton sequence, on the pod its key ranks first (moved when that pod goes)."""

    def __init__(self, loop: SpeculationLoop, seq_id: int, opts: LoopOptions, metadata: tuple):
        self.loop, self.seq_id, self.opts = loop, seq_id, opts
        # made once: every round verifies under the request's span (rounds are events on it), so the traceparent
        # Triton gets (sampled requests only) is the same each round
        self.trace_headers = dict(sampled_metadata(metadata)) or None
        self.key = f"{seq_id:016x}"  # places the request on pods (rendezvous hashing)
        self.pod: str | None = None  # the Triton pod holding the sequence
        self.started = False
        self.committed: Sequence[int] = ()

    async def verify(self, tokens: list[int], parents: list[int], committed: Sequence[int],
                     start: bool) -> Verdict:
        outcome = await self.outcome(tokens, parents, committed, start)
        return Verdict(outcome.accepted_tokens, outcome.accepted_nodes, outcome.logprobs)

    async def outcome(self, tokens: list[int], parents: list[int], committed: Sequence[int],
                      start: bool) -> VerifyOutcome:
        """Verify on the request's Triton pod; if the pod is gone, move to the next one and rebuild there."""
        self.committed = committed
        if start:
            self.started = True
            self.loop.sequences_open += 1
        backends = self.loop.backends
        attempts = backends.attempts()
        for attempt in range(1, attempts + 1):
            pod, target = await backends.target_for(self.key, self.pod)
            rebuild = start
            if self.pod is not None and pod != self.pod:
                backends.moved(self.pod, pod)
                # A pod that left may still be draining: free the sequence's KV there (in the background:
                # a dead pod would hold up the request until the timeout).
                self.loop.in_background(self._end_on(self.pod, timeout_s=1.0))
                rebuild = True  # the new pod has never seen this sequence: START it from the context
            self.pod = pod
            try:
                outcome = await backends.call(pod, self._verify_on(target, tokens, parents, rebuild))
            except TargetError as e:
                if attempt == attempts or not backends.lost(pod, e):
                    raise
                log.warning("sequence %d lost its Triton pod %s after %d tokens (%s); moving", self.seq_id, pod,
                            len(committed), e)
                continue
            if not backends.answered_by(pod, outcome.model_version):
                # Another training's target answered (a pod replaced in place): its tokens mean nothing in our
                # vocabulary. Drop its sequence and rebuild on a pod of our version.
                self.loop.in_background(self._end_on(pod, timeout_s=1.0))
                if attempt == attempts:
                    raise TargetUnavailable(f"Triton pod {pod} serves model version {outcome.model_version}, not "
                                            f"{self.loop.catalog.version}, and no other pod is left",
                                            grpc.StatusCode.UNAVAILABLE)
                continue
            self.loop.metrics.set_target_live_sequences(outcome.live_sequences)
            return outcome
        raise AssertionError("unreachable")

    async def _verify_on(self, target: TargetClient, tokens: list[int], parents: list[int],
                         start: bool) -> VerifyOutcome:
        kw = dict(mode=self.opts.mode, temperature=self.opts.temperature, seed=self.opts.seed,
                  beam_width=self.opts.beam_width,
                  n_items=self.opts.n_items, exclude_history=self.opts.exclude_history, banned=self.opts.banned,
                  allowed=self.opts.allowed,
                  timeout_s=self.loop.verify_timeout_s)
        # Triton traces what carries a trace context; three spans a round cost ~2% on the small profile (tracing
        # bench), so by default only the START (and a rebuild) does
        headers = self.trace_headers if start or self.loop.trace_every_round else None
        context = list(self.committed)
        try:
            return await target.verify(self.seq_id, tokens, parents, start=start, context=context if start else None,
                                       headers=headers, **kw)
        except TargetSequenceUnknown:
            # evicted, expired or a restarted Triton: rebuild the sequence from everything committed
            log.info("sequence %d lost by the target; rebuilding from %d tokens", self.seq_id, len(context))
            return await target.verify(self.seq_id, tokens, parents, start=True, context=context,
                                       headers=self.trace_headers, **kw)

    async def _end_on(self, pod: str, timeout_s: float | None = None) -> None:
        """END the sequence on `pod` if its client is still open; the sequence also expires on its own."""
        target = self.loop.backends.targets.find(pod)
        if target is None:
            return
        try:
            await target.end(self.seq_id, timeout_s=timeout_s)
        except Exception as e:  # never mask the real outcome
            log.debug("ending sequence %d on %s failed: %s", self.seq_id, pod, e)

    async def close(self) -> None:
        if self.started:
            self.started = False
            self.loop.sequences_open -= 1
            if self.pod is not None:  # off the critical path: the answer does not wait for END
                self.loop.in_background(self._end_on(self.pod))
