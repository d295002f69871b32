"""In-process adapters: the speculation loop over the library's own drafters and verifier, no servers.

Tests, offline evaluation and benchmarks run the very loop the orchestrator runs (specrec.speculation.engine)
with these in place of the draft stream and the Triton sequence.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from specrec.decoding.beam import BeamRun, Expansion, beam_retrieve, draft_shape
from specrec.drafting.base import Budget, Drafter, DraftSession
from specrec.semantic_ids.constraint import ListConstraint
from specrec.speculation.engine import Proposal, Proposer, RequestStats, Speculation, Verdict
from specrec.speculation.policy import Policy
from specrec.verify.engine import TargetVerifier, VerifyError, VerifyRequest
from specrec.verify.rules import AcceptParams

_SEQUENCE_IDS = itertools.count(1)


class LocalProposer:
    """Proposer over a drafter session in this process. ahead_guesses > 0: after each tree it drafts ahead for
    that many likely commits, as the draft service does while the target verifies (here in turn, not at the
    same time: what it exercises is that ready trees never change the output)."""

    def __init__(self, drafter: Drafter, constraint: ListConstraint, ahead_guesses: int = 0):
        self.drafter, self.constraint, self.ahead_guesses = drafter, constraint, ahead_guesses
        self.session: DraftSession | None = None

    @property
    def available(self) -> bool:
        return True

    async def propose(self, committed: Sequence[int], news: list[list[int]], budget: Budget) -> Proposal | None:
        if self.session is None:
            self.session = self.drafter.open(list(committed), self.constraint)
            self.session.acceptance = self.drafter.acceptance  # its guesses ranked by what verification accepts
        else:
            first, *plain = news or [[]]
            self.session.commit(first, [t for r in plain for t in r])
        tree = self.session.draft(budget)
        ready = self.session.ahead_hit
        if self.ahead_guesses and not self.session.finished:
            self.session.prepare_ahead(self.ahead_guesses)
        return Proposal(list(tree.tokens), list(tree.parents), list(tree.logprobs), ready)


class LocalVerifier:
    """Verifier over a TargetVerifier in this process: one sequence per instance."""

    def __init__(self, target: TargetVerifier, n_items: int = 10, exclude_history: bool = True,
                 params: AcceptParams | None = None, banned: Sequence[int] = (), allowed: Sequence[int] = ()):
        self.target, self.n_items, self.exclude_history = target, n_items, exclude_history
        self.banned, self.allowed = banned, allowed
        self.params = params or AcceptParams()
        self.sequence_id = next(_SEQUENCE_IDS)

    async def verify(self, tokens: list[int], parents: list[int], committed: Sequence[int],
                     start: bool) -> Verdict:
        req = VerifyRequest(self.sequence_id, list(tokens), list(parents), context=list(committed) if start else None,
                            start=start, params=self.params, n_items=self.n_items,
                            exclude_history=self.exclude_history,  # filters are read with the context only
                            banned=list(self.banned) if start else [], allowed=list(self.allowed) if start else [])
        result = self.target.verify_batch([req])[0]
        if isinstance(result, VerifyError):
            raise result
        return Verdict(result.accepted_tokens, result.accepted_nodes, result.logprobs)

    def close(self) -> None:
        self.target.end(self.sequence_id)


def speculate(prompt: list[int], constraint: ListConstraint, policy: Policy, target: TargetVerifier,
              drafter: Drafter | None, ahead_guesses: int = 0, proposer: Proposer | None = None,
              params: AcceptParams | None = None) -> tuple[list[int], RequestStats]:
    """Generate after `prompt` in this process; the committed tokens and the request's statistics.
    `proposer` replaces the drafter's (e.g. a test's broken one); `params`: the acceptance rule (greedy default)."""
    out: list[int] = []

    async def emit(tokens: list[int], logprobs: list[float]) -> None:
        out.extend(tokens)

    if proposer is None and drafter is not None:
        proposer = LocalProposer(drafter, constraint, ahead_guesses)
    verifier = LocalVerifier(target, constraint.n_items, constraint.exclude_history, params,
                             banned=constraint.banned.tolist(), allowed=constraint.allowed_items.tolist())
    try:
        stats = asyncio.run(Speculation(prompt, constraint, policy, proposer, verifier, emit,
                                        max_len=target.cache.max_len).run())
    finally:
        verifier.close()
    return out, stats


def retrieve(prompt: list[int], constraint: ListConstraint, width: int, target: TargetVerifier,
             drafter: Drafter | None = None, tree_nodes: int = 0, overlap: bool = False) -> BeamRun:
    """Top-`constraint.n_items` items after `prompt` by beam search of `width` in this process: plain without a
    drafter, speculative with one (a tree of `tree_nodes`, 0 = draft_shape's default)."""
    sequence_id = next(_SEQUENCE_IDS)
    params = AcceptParams(mode="beam", beam_width=width)

    async def score(tokens: list[int], parents: list[int], start: bool) -> list[Expansion | None]:
        req = VerifyRequest(sequence_id, tokens, parents, context=list(prompt) if start else None, start=start,
                            params=params, n_items=constraint.n_items, exclude_history=constraint.exclude_history,
                            banned=constraint.banned.tolist(), allowed=constraint.allowed_items.tolist())
        result = target.verify_batch([req])[0]
        if isinstance(result, VerifyError):
            raise result
        return result.expansions

    async def draft() -> tuple[list[int], list[int]] | None:
        assert drafter is not None
        session = drafter.open(list(prompt), constraint)
        try:
            tree = session.draft(Budget(*draft_shape(width, constraint.trie.branching_depth, tree_nodes)))
        finally:
            session.close()
        return list(tree.tokens), list(tree.parents)

    try:
        return asyncio.run(beam_retrieve(constraint, prompt, width, constraint.n_items, score,
                                         draft if drafter is not None else None, overlap))
    finally:
        target.end(sequence_id)
