"""Hybrid drafter: the model's and the retrieval pool's trees merged into one.

Both draft with the same budget; the union of their paths is ranked by the better of the two calibrated
acceptances, and the best max_nodes are kept (see tree.merge_trees). Each source's calibration (how often a path it
scores q at depth d is accepted) is learnt from the commits: the model's from its own tree, the pool's from its
paths the model's tree lacks (`learn_sources`). The pool's log q is a log match frequency, and a run backed by a
single match scores log 1 = 0, which read as the model's q outranked every model node. Both inner sessions follow
every commit, so the model keeps its rolled-back cache as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from specrec.calibration import DepthCalibration
from specrec.drafting.base import Budget, Drafter, DraftSession, DraftTree, learn_acceptance, register
from specrec.drafting.batching import BatchCounters
from specrec.drafting.model_drafter import AheadWork, ModelDrafter, ModelSession, load_model_drafter
from specrec.drafting.retrieval import RetrievalDrafter, RetrievalSession, load_retrieval_drafter, retrieval_tree
from specrec.drafting.tree import merge_trees
from specrec.semantic_ids.constraint import ListConstraint, ListState

# The pool's acceptance per bin is read as its posterior mean less this many standard deviations. Its bins learn from
# few paths (only those the model's tree lacks), and a pool node kept in place of a model node on an optimistic
# estimate costs the model's node: on the bench profile (189 held-out users, depth 8, top_k 8) the hybrid's tau at
# 16 / 32 nodes was 7.258 / 7.799 at 0, 7.269 / 7.830 at 1, 7.264 / 7.843 at 2; the model alone 7.253 / 7.856.
POOL_PESSIMISM = 2.0


class HybridDrafter(Drafter):
    def __init__(self, model: ModelDrafter, retrieval: RetrievalDrafter, name: str = "hybrid"):
        self.model = model
        self.retrieval = retrieval
        self.name = name
        # acceptance of the model's paths (the model drafter's own: it ranks the model's nodes by it), of the pool's
        # (pessimistic: POOL_PESSIMISM)
        self.sources = (model.acceptance, DepthCalibration(pessimism=POOL_PESSIMISM))

    def forward_counts(self) -> BatchCounters | None:
        return self.model.forward_counts()

    def open(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> HybridSession:
        model = self.model.open(context, constraint)
        model.acceptance = self.sources[0]  # the model's nodes ranked by acceptance per depth, as alone
        return HybridSession(model, self.retrieval.open(context, constraint, user_group), self.sources)

    def trees_along(self, context: list[int], constraint: ListConstraint, continuation: list[int],
                    budget: Budget) -> list[DraftTree]:
        """Each position's merged tree, then the sources learn from its outcome, as serving learns from commits."""
        model = self.model.trees_along(context, constraint, continuation, budget, learn=False)  # learn_sources does
        pool = self.retrieval.trees_along(context, constraint, continuation, budget)
        out = []
        for t, pair in enumerate(zip(model, pool, strict=True)):
            out.append(merge_trees(list(pair), budget.validated().max_nodes, acceptance=self.sources))
            learn_sources(self.sources, pair, continuation[t:], out[-1])
        return out


def learn_sources(sources: tuple[DepthCalibration, DepthCalibration], trees: Sequence[DraftTree],
                  committed: Sequence[int], served: DraftTree | None = None) -> None:
    """The model's calibration learns from its whole tree; the pool's from the paths the model's tree lacks (and,
    given the `served` merged tree, that it kept). A pool path is worth a place in the merged tree for what it adds:
    where the model drafted the same path, the pool's run being right says nothing (and the two are right together
    far more often than apart, so the pool's own acceptance overrated what its nodes add). Learning from the pool
    paths served only corrects the ones the merge overrates; one it underrates is served again once the pool's
    calibration of its bin falls to the truth, since the bins it is kept in keep learning."""
    if not trees:
        return
    model, *others = trees
    learn_acceptance(sources[0], model, committed)
    if others:
        lacks = {tuple(model.path_tokens(i)) for i in range(len(model))}
        if served is not None:
            kept = {tuple(served.path_tokens(i)) for i in range(len(served))}
            pool = others[0]
            lacks |= {p for p in (tuple(pool.path_tokens(i)) for i in range(len(pool))) if p not in kept}
        learn_acceptance(sources[1], others[0], committed, besides=lacks)


@dataclass
class _HybridAhead:
    assumed: list[int]
    model_work: AheadWork
    pool_tree: DraftTree
    budget: Budget
    want_probs: bool


class HybridSession(DraftSession):
    def __init__(self, model: ModelSession, retrieval: RetrievalSession,
                 sources: tuple[DepthCalibration, DepthCalibration] | None = None):
        super().__init__(model.constraint, model.context)
        self.model = model
        self.retrieval = retrieval
        self.sources = sources or (DepthCalibration(), DepthCalibration(pessimism=POOL_PESSIMISM))
        self._source_trees: list[DraftTree] = []  # the last merged tree's sources, to learn from its commit

    def _merge(self, trees: list[DraftTree], budget: Budget, want_probs: bool) -> DraftTree:
        self._source_trees = trees
        return merge_trees(trees, budget.max_nodes, want_probs, acceptance=self.sources)

    def _draft(self, budget: Budget, want_probs: bool) -> DraftTree:
        # the confidence stop applies to the merged, calibrated scores (DraftSession.draft cuts them), not to
        # each source's own q
        whole = replace(budget, min_path_prob=0.0)
        return self._merge([self.model._draft(whole, want_probs), self.retrieval._draft(whole, want_probs)],
                           budget, want_probs)

    def _restricted(self, tree: DraftTree, budget: Budget, want_probs: bool) -> DraftTree:
        # Calibrated per depth, the merge may rank a source's nodes otherwise than its own q does, so the merged tree
        # cut to a stricter budget is not the stricter budget's merge: merge the sources cut to it instead.
        whole = replace(budget, min_path_prob=0.0)
        merged = self._merge([t.restricted(whole) for t in self._source_trees], budget, want_probs)
        return merged.restricted(budget) if budget.min_path_prob > 0 else merged

    def _learn_acceptance(self, tokens: list[int]) -> None:
        super()._learn_acceptance(tokens)
        learn_sources(self.sources, self._source_trees, tokens, self.last_tree)
        self._source_trees = []

    def _advance(self, tokens: list[int]) -> None:
        state = self.model.state_after(tokens)
        self.model.follow(tokens, state)
        self.retrieval.follow(tokens, state)

    def _draft_ahead(self, path: list[int], state: ListState, budget: Budget,
                     want_probs: bool) -> tuple[list[int], _HybridAhead] | None:
        mine = self.model._draft_ahead(path, state, budget, want_probs)
        if mine is None:
            return None
        assumed, model_work = mine
        after = self.model.state_after(assumed)
        pool_tree = retrieval_tree(self.retrieval.pool, self.retrieval.group, self.context + assumed, after,
                                   self.constraint, budget, want_probs)
        return assumed, _HybridAhead(assumed, model_work, pool_tree, budget, want_probs)

    def _adopt_ahead(self, work: _HybridAhead) -> DraftTree:
        after = self.model.state_after(work.assumed)
        model_tree = self.model._adopt_ahead(work.model_work)
        self.model.context += work.assumed
        self.model.state = after
        self.retrieval.follow(work.assumed, after)
        return self._merge([model_tree, work.pool_tree], work.budget, work.want_probs)


@register("hybrid")
def load_hybrid_drafter(artifacts: Path, name: str = "hybrid", device: str = "cpu", **_: object) -> HybridDrafter:
    """"hybrid" pairs <artifacts>/drafter with the pool; "hybrid:<dir>" pairs another model variant."""
    variant = name.split(":", 1)[1] if ":" in name else None
    model = load_model_drafter(artifacts, f"model:{variant}" if variant else "model", device)
    return HybridDrafter(model, load_retrieval_drafter(artifacts), name=name)
