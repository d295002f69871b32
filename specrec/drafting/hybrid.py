"""Hybrid drafter: the model's and the retrieval pool's trees merged into one.

Both draft with the same budget; the union of their paths is ranked by the better of the two cumulative
log q (the pool's log q is a log frequency), and the best max_nodes are kept (see tree.merge_trees).
Both inner sessions follow every commit, so the model keeps its rolled-back cache as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specrec.drafting.base import Budget, Drafter, DraftSession, DraftTree, register
from specrec.drafting.model_drafter import AheadWork, ModelDrafter, ModelSession, load_model_drafter
from specrec.drafting.retrieval import RetrievalDrafter, RetrievalSession, load_retrieval_drafter, retrieval_tree
from specrec.drafting.tree import merge_trees
from specrec.semantic_ids.constraint import ListConstraint, ListState


class HybridDrafter(Drafter):
    def __init__(self, model: ModelDrafter, retrieval: RetrievalDrafter, name: str = "hybrid"):
        self.model = model
        self.retrieval = retrieval
        self.name = name

    def forward_counts(self) -> tuple[int, int] | None:
        return self.model.forward_counts()

    def open(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> HybridSession:
        return HybridSession(self.model.open(context, constraint), self.retrieval.open(context, constraint, user_group))

    def trees_along(self, context: list[int], constraint: ListConstraint, continuation: list[int],
                    budget: Budget) -> list[DraftTree]:
        model = self.model.trees_along(context, constraint, continuation, budget)
        pool = self.retrieval.trees_along(context, constraint, continuation, budget)
        return [merge_trees([m, p], budget.validated().max_nodes) for m, p in zip(model, pool, strict=True)]


@dataclass
class _HybridAhead:
    assumed: list[int]
    model_work: AheadWork
    pool_tree: DraftTree
    budget: Budget
    want_probs: bool


class HybridSession(DraftSession):
    def __init__(self, model: ModelSession, retrieval: RetrievalSession):
        super().__init__(model.constraint, model.context)
        self.model = model
        self.retrieval = retrieval

    def _draft(self, budget: Budget, want_probs: bool) -> DraftTree:
        trees = [self.model._draft(budget, want_probs), self.retrieval._draft(budget, want_probs)]
        return merge_trees(trees, budget.max_nodes, want_probs)

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
        return merge_trees([model_tree, work.pool_tree], work.budget.max_nodes, work.want_probs)


@register("hybrid")
def load_hybrid_drafter(artifacts: Path, name: str = "hybrid", device: str = "cpu", **_: object) -> HybridDrafter:
    """"hybrid" pairs <artifacts>/drafter with the pool; "hybrid:<dir>" pairs another model variant."""
    variant = name.split(":", 1)[1] if ":" in name else None
    model = load_model_drafter(artifacts, f"model:{variant}" if variant else "model", device)
    return HybridDrafter(model, load_retrieval_drafter(artifacts), name=name)
