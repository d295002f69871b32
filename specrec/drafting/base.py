"""The drafter contract: sessions that propose token trees and follow what the target commits.

Vocabulary (as in the verifier): after each tree the target *accepts* a root-down path of it and adds
one *bonus* token; both are *committed*. A session is told the committed tokens by `commit` and then
drafts the next tree from the new prefix. A drafter may *draft ahead*: guess the commit (the tree's
most probable path plus its most likely bonus token) and build the next tree before the commit
arrives; if the guess was right, the next `draft` returns that tree at once (`ahead_hit`).

Bad client input raises DraftError (the service maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from specrec.calibration import Calibration, DepthCalibration
from specrec.semantic_ids.constraint import ConstraintError, ListConstraint, ListState
from specrec.tree_shape import MAX_TREE_DEPTH as MAX_DEPTH
from specrec.tree_shape import MAX_TREE_NODES as MAX_NODES
from specrec.tree_shape import MAX_TREE_TOP_K as MAX_TOP_K
from specrec.tree_shape import node_depths, path_scores

if TYPE_CHECKING:
    from specrec.drafting.batching import BatchCounters

DEFAULT_TOP_K = 8
AHEAD_LOOSENING = 0.5  # a tree drafted ahead keeps nodes down to this fraction of the asked min_path_prob
# Guesses are drafted in waves of this many, likeliest wave first: a wave's trees grow together (one forward per
# level) and are complete before the next wave starts, so more guesses never leave the likeliest ones unfinished.
# 4 rather than 8 of the default 8 guesses: bench profile, adaptive/model, two runs each, unfinished trees 26 / 17
# vs 50 / 38, ready 76% / 90% vs 74% / 85% (the commit is among the top 4 guesses most of the time).
AHEAD_WAVE = 4
_ACCEPTANCE_LOCK = threading.Lock()


class DraftError(ValueError):
    """Input a session cannot act on; the message says what was wrong and what is allowed."""


@dataclass(frozen=True)
class Budget:
    """How big the next draft tree may be: what a speculation policy plans and a drafter drafts. depth 0 = no
    speculation (one plain target step). Built from a client's message it is checked by `validated()`."""

    depth: int  # levels below the root, 0..MAX_DEPTH
    max_nodes: int  # nodes kept, 0..MAX_NODES
    top_k: int = 0  # frontier nodes expanded per level and children per node; 0 = DEFAULT_TOP_K
    min_path_prob: float = 0.0  # confidence stop: candidates whose path probability q is below this are dropped

    def validated(self) -> Budget:
        """This budget with top_k resolved; DraftError if a field is out of range."""
        if not 0 <= self.depth <= MAX_DEPTH:
            raise DraftError(f"budget depth {self.depth} is out of range 0..{MAX_DEPTH}")
        if not 0 <= self.max_nodes <= MAX_NODES:
            raise DraftError(f"budget max_nodes {self.max_nodes} is out of range 0..{MAX_NODES}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise DraftError(f"budget top_k {self.top_k} is out of range 0..{MAX_TOP_K} (0 = default)")
        if not 0.0 <= self.min_path_prob <= 1.0:
            raise DraftError(f"budget min_path_prob {self.min_path_prob} is out of range 0..1 (0 = keep every node)")
        return Budget(self.depth, self.max_nodes, self.top_k or DEFAULT_TOP_K, self.min_path_prob)

    @property
    def min_logprob(self) -> float:
        """The confidence stop as a floor on a node's cumulative log q."""
        return math.log(self.min_path_prob) if self.min_path_prob > 0 else -math.inf

    def covers(self, other: Budget) -> bool:
        """A tree built within self, cut by `DraftTree.restricted(other)`, is the tree `other` would build:
        the same top_k, and other's depth, size and confidence limits only remove nodes (the builder ranks
        candidates by path score, so the stricter tree's nodes are the looser one's best)."""
        return (self.top_k == other.top_k and self.depth >= other.depth and self.max_nodes >= other.max_nodes
                and self.min_path_prob <= other.min_path_prob)

    @property
    def empty(self) -> bool:
        return self.depth == 0 or self.max_nodes == 0

    @classmethod
    def chain(cls, depth: int) -> Budget:
        return cls(depth, depth, 1)


@dataclass
class DraftTree:
    """Draft nodes in priority order (parents first); parents[i] = -1: child of the root.

    For stochastic verification `probs[j]` is the drafter's distribution at node `expanded[j]`
    (-1 = the root), over the whole vocabulary, zero outside the grammar's allowed tokens.

    A calibrated tree (the model drafter's, once it has a calibration per depth) is ranked by acceptance: its
    logprobs sum along a path to the log probability that verification accepts the path, and `q_logprobs` keeps
    the drafter's own log q of each node, what the calibration learns from. Not sent: the wire carries logprobs.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log q of each node at its parent (0 if forced)
    expanded: list[int] = field(default_factory=list)
    probs: np.ndarray | None = None  # float32 [len(expanded), vocab_size]
    vocab_size: int = 0
    q_logprobs: list[float] | None = None  # a calibrated tree's log q per node (else logprobs are log q)

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        return node_depths(self.parents)

    def scores(self) -> list[float]:
        """Cumulative log q of each node's path (of a calibrated tree: log P(path accepted))."""
        return path_scores(self.parents, self.logprobs)

    def q_scores(self) -> list[float]:
        """Cumulative log q of each node's path, as the drafter gave it."""
        return path_scores(self.parents, self.logprobs if self.q_logprobs is None else self.q_logprobs)

    def children(self) -> dict[int, dict[int, int]]:
        """node (-1 = root) -> {token: child node}."""
        kids: dict[int, dict[int, int]] = {}
        for i, (tok, p) in enumerate(zip(self.tokens, self.parents, strict=True)):
            kids.setdefault(p, {})[tok] = i
        return kids

    def path_tokens(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Nodes of the longest root-down path whose tokens are a prefix of `tokens`."""
        kids = self.children()
        node, path = -1, []
        for tok in tokens:
            nxt = kids.get(node, {}).get(int(tok))
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        return path

    def best_path(self) -> list[int]:
        """The most probable path: from the root, always the child with the highest draft log-prob."""
        kids = self.children()
        node, path = -1, []
        while kids.get(node):
            node = max(kids[node].values(), key=lambda i: (self.logprobs[i], -i))
            path.append(node)
        return path

    def prefix(self, n: int) -> DraftTree:
        """The first n nodes: the best n-node tree when nodes are in priority order."""
        if self.probs is not None:
            keep = [j for j, e in enumerate(self.expanded) if e < n and any(p == e for p in self.parents[:n])]
            expanded, probs = [self.expanded[j] for j in keep], self.probs[keep]
        else:
            expanded, probs = [], None
        return DraftTree(self.tokens[:n], self.parents[:n], self.logprobs[:n], expanded, probs, self.vocab_size,
                         None if self.q_logprobs is None else self.q_logprobs[:n])

    def restricted(self, budget: Budget) -> DraftTree:
        """The nodes within budget's depth, confidence stop and size, in priority order (see Budget.covers)."""
        depths, scores, floor = self.depths(), self.scores(), budget.min_logprob
        index: dict[int, int] = {-1: -1}
        for i, p in enumerate(self.parents):
            if len(index) > budget.max_nodes:
                break
            if depths[i] < budget.depth and scores[i] >= floor and p in index:
                index[i] = len(index) - 1
        keep = [i for i in index if i >= 0]
        out = DraftTree([self.tokens[i] for i in keep], [index[self.parents[i]] for i in keep],
                        [self.logprobs[i] for i in keep], vocab_size=self.vocab_size,
                        q_logprobs=None if self.q_logprobs is None else [self.q_logprobs[i] for i in keep])
        if self.probs is not None:
            has_kids = set(out.parents)
            rows = [j for j, e in enumerate(self.expanded) if e in index and index[e] in has_kids]
            out.expanded, out.probs = [index[self.expanded[j]] for j in rows], self.probs[rows]
        return out

    def to_proto(self) -> Any:
        from specrec.draft.v1 import tree_pb2

        msg = tree_pb2.TokenTree(tokens=self.tokens, parents=self.parents, draft_logprobs=self.logprobs)
        if self.probs is not None:
            msg.expanded_nodes.extend(self.expanded)
            msg.draft_probs.extend(self.probs.astype(np.float32).ravel().tolist())
            msg.vocab_size = self.vocab_size
        return msg

    @classmethod
    def from_proto(cls, msg: Any) -> DraftTree:
        probs = None
        if msg.vocab_size and len(msg.expanded_nodes):
            probs = np.asarray(msg.draft_probs, dtype=np.float32).reshape(len(msg.expanded_nodes), msg.vocab_size)
        return cls(list(msg.tokens), list(msg.parents), list(msg.draft_logprobs), list(msg.expanded_nodes), probs,
                   msg.vocab_size)


class DraftSession(ABC):
    """One generation: drafts trees from the committed prefix and follows the target's commits.

    Subclasses implement the four hooks; this class validates input and runs draft-ahead.
    """

    # What verification accepted of its drafter's trees, shared by the drafter's sessions (`Drafter.acceptance`;
    # set by whoever opens the session for serving): draft-ahead ranks its guesses by it. None: by q alone.
    acceptance: Calibration | DepthCalibration | None = None
    # False: trees ranked by the drafter's q even when `acceptance` is set (deterministic trees; acceptance then
    # only ranks draft-ahead guesses)
    calibrated_trees: bool = True

    def __init__(self, constraint: ListConstraint, context: Sequence[int]):
        self.constraint = constraint
        self.vocab_size = constraint.trie.vocab.size
        context = [int(t) for t in context]
        check_tokens(context, self.vocab_size, "context")
        try:
            self.state: ListState = constraint.start(context)
        except ConstraintError as err:
            raise DraftError(f"context rejected: {err}") from None
        self.context = context
        self.last_tree: DraftTree | None = None
        self.ahead_hit = False  # the last tree was drafted ahead, completely, before its commit arrived
        self.ahead_reused = False  # the last tree grew from work drafted ahead (complete or finished on demand)
        # why the last tree was not ready, when draft-ahead ran before it: one of AHEAD_MISSES ("" on a hit)
        self.ahead_miss = ""
        self._ahead: list[_Ahead] = []  # guesses drafted ahead since the last commit, likeliest first
        self._ready: tuple[Budget, bool, DraftTree, bool] | None = None
        self._last_request: tuple[Budget, bool] | None = None

    # -- hooks -------------------------------------------------------------------------------------
    @abstractmethod
    def _draft(self, budget: Budget, want_probs: bool) -> DraftTree:
        """A tree rooted at the last committed token (budget validated and non-empty)."""

    @abstractmethod
    def _advance(self, tokens: list[int]) -> None:
        """Follow committed tokens (validated); self.context/state are updated by the caller."""

    def _draft_ahead(self, path: list[int], state: ListState, budget: Budget,
                     want_probs: bool) -> tuple[list[int], Any] | None:
        """Guess the bonus token after context + path (`state` is the grammar there) and draft the tree
        that would follow path + bonus, leaving the current state intact. Returns (path + bonus, work),
        or None when the drafter does not draft ahead."""
        return None

    def _draft_ahead_batch(self, points: list[StopPoint], n: int, budget: Budget, want_probs: bool,
                           stop: Callable[[], bool], skip: int = 0) -> list[tuple[list[int], Any]]:
        """Draft ahead for up to n commits ending at these stop points (likeliest first, the `skip` likeliest
        left out: an earlier wave drafted them), until stop().
        This default drafts one guess per point with `_draft_ahead`; drafters that can batch override it."""
        out: list[tuple[list[int], Any]] = []
        for point in points[skip:skip + n]:
            if stop():
                break
            result = self._draft_ahead(point.path, point.state, budget, want_probs)
            if result is not None:
                out.append(result)
        return out

    def _adopt_ahead(self, work: Any) -> DraftTree:
        """The guess came true: commit `assumed` using the speculative work, return its tree."""
        raise NotImplementedError

    def _ahead_complete(self, work: Any) -> bool:
        """Whether the guess's tree was fully drafted when the commit came (else adopting finishes it)."""
        return True

    def _restricted(self, tree: DraftTree, budget: Budget, want_probs: bool) -> DraftTree:
        """The tree `budget` would have drafted, from one drafted within a budget that covers it."""
        return tree.restricted(budget)

    def _drop_ahead(self, work: Any) -> None:  # noqa: B027 (optional hook)
        """The guess was wrong: forget the speculative work."""

    # -- public ------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def ahead_guess(self) -> list[int] | None:
        """The commit that draft-ahead bet on first (path + bonus), if it drafted ahead."""
        return list(self._ahead[0].assumed) if self._ahead else None

    @property
    def ahead_guesses(self) -> list[list[int]]:
        return [list(a.assumed) for a in self._ahead]

    def draft(self, budget: Budget, want_probs: bool = False) -> DraftTree:
        budget = budget.validated()
        self._last_request = (budget, want_probs)
        ready, self._ready = self._ready, None
        if ready is not None and ready[1] == want_probs and ready[0].covers(budget):
            # a tree drafted ahead with a looser budget serves a stricter one: cut, not redrafted
            tree = ready[2] if ready[0] == budget else self._restricted(ready[2], budget, want_probs)
            self.ahead_hit, self.ahead_reused, self.last_tree = ready[3], True, tree
            self.ahead_miss = "" if ready[3] else "unfinished"
            return tree
        if ready is not None:
            self.ahead_miss = "budget"
        self.ahead_hit = self.ahead_reused = False
        tree = DraftTree(vocab_size=self.vocab_size) if budget.empty or self.finished \
            else self._draft(budget, want_probs)
        if budget.min_path_prob > 0:  # drafters that do not stop early themselves (retrieval, merged trees)
            tree = tree.restricted(budget)
        self.last_tree = tree
        return tree

    def commit(self, tokens: Sequence[int], then_plain: Sequence[int] = ()) -> None:
        """Follow the target: `tokens` = a root-down path of the last tree, then any tokens the grammar forces
        after it, then one bonus token (a path that ends the list with EOS needs no bonus: its EOS plays that part).
        `then_plain`: tokens committed after those by rounds run without a tree, checked against the grammar only."""
        tokens = [int(t) for t in tokens]
        later = [int(t) for t in then_plain]
        state = self.validate_commit(tokens)
        if later:
            check_tokens(later, self.vocab_size, "then_plain")
            state = self._follow_grammar(state, later)
        self._learn_acceptance(tokens)
        guesses, self._ahead = self._ahead, []
        hit = next((a for a in guesses if not later and a.assumed == tokens), None)
        self.ahead_miss = "" if hit is not None else \
            "not_drafted" if not guesses else "plain_round" if later else "wrong_guess"
        for a in guesses:
            if a is not hit:
                self._drop_ahead(a.work)
        if hit is not None:
            # An unfinished guess is finished within the looser budget it was drafted with, not the last request's:
            # cut to that one, it missed ("budget") whenever the next request was looser, and a miss drafts anew
            # (bench profile, adaptive/model, 3 runs each: 161-172 ms mean without the cut, 168-184 ms with it).
            complete = self._ahead_complete(hit.work)
            self._ready = (hit.budget, hit.want_probs, self._adopt_ahead(hit.work), complete)
        else:
            self._advance(tokens + later)
        self.context += tokens + later
        self.state = state
        self.last_tree = None

    def _learn_acceptance(self, tokens: list[int]) -> None:
        """Each node of the last tree, by its path's q: on the committed path or not."""
        if self.acceptance is not None and self.last_tree is not None:
            learn_acceptance(self.acceptance, self.last_tree, tokens)

    def prepare_ahead(self, guesses: int = 1, stop: Callable[[], bool] = lambda: False) -> bool:
        """Draft the next tree now for the likeliest commits of the last tree (where verification may stop,
        each with a likely bonus token), until `guesses` are drafted or `stop()` (the commit has arrived).
        Trees are drafted with a looser confidence stop than the last request's, so a slightly stricter next
        budget is still served (`Budget.covers`). Returns whether it drafted (or began drafting) any."""
        tree, request = self.last_tree, self._last_request
        if tree is None or request is None or self._ahead or not len(tree) or stop():
            return False
        budget, want_probs = request
        looser = Budget(budget.depth, budget.max_nodes, budget.top_k, budget.min_path_prob * AHEAD_LOOSENING)
        points = [p for p in stop_points(tree, self._states_below(), self.acceptance) if not p.state.finished]
        for skip in range(0, guesses, AHEAD_WAVE):
            wave = self._draft_ahead_batch(points, min(AHEAD_WAVE, guesses - skip), looser, want_probs, stop, skip)
            for assumed, work in wave:
                if all(a.assumed != assumed for a in self._ahead):
                    self._ahead.append(_Ahead(assumed, looser, want_probs, work))
                else:
                    self._drop_ahead(work)
            if not wave or stop():
                break
        return bool(self._ahead)

    def state_after(self, tokens: list[int]) -> ListState:
        """Grammar state after the committed prefix plus `tokens` (which must be allowed)."""
        state = self.state
        for tok in tokens:
            nxt = self.constraint.advance(state, tok)
            assert nxt is not None, f"token {tok} left the grammar"
            state = nxt
        return state

    def _states_below(self) -> Callable[[list[int]], ListState]:
        """state_after for the paths of one tree, each from its parent path's state (one grammar step a node, not
        one a token of every path: a chain of 16 asked for all its prefixes took 136 steps, ~3 ms of the time
        draft-ahead has before the commit comes)."""
        memo: dict[tuple[int, ...], ListState] = {(): self.state}

        def state_after(tokens: list[int]) -> ListState:
            key = tuple(tokens)
            if key not in memo:
                nxt = self.constraint.advance(state_after(tokens[:-1]), tokens[-1])
                assert nxt is not None, f"token {tokens[-1]} left the grammar"
                memo[key] = nxt
            return memo[key]

        return state_after

    def follow(self, tokens: list[int], state: ListState) -> None:
        """Commit without checking against a tree (composite drafters validate once, outside)."""
        self._advance(tokens)
        self.context += tokens
        self.state = state
        self.last_tree = None

    def validate_commit(self, tokens: list[int]) -> ListState:
        """The grammar state after `tokens`, or DraftError saying why they are not a valid commit."""
        if self.finished:
            raise DraftError("the list is already finished (EOS committed); close the session")
        if not tokens:
            raise DraftError("committed must hold the accepted path's tokens and the bonus token; got none")
        check_tokens(tokens, self.vocab_size, "committed")
        tree = self.last_tree or DraftTree()
        path = tree.match(tokens[:-1])
        state = self.state
        for i, tok in enumerate(tokens):
            # Past the tree's path only grammar-forced tokens may come before the bonus: a round the target
            # ran without a tree (depth 0, or a late tree) still commits the chain the grammar forces.
            if len(path) <= i < len(tokens) - 1 and self.constraint.forced(state) != tok:
                raise DraftError(f"committed tokens {tokens} are not a path of the last tree ({len(tree)} nodes), "
                                 f"then tokens the list grammar forces, then one bonus token: token {i} ({tok}) "
                                 "is none of these")
            state = self._grammar_step(state, tok, f"committed token {i}")
        return state

    def _follow_grammar(self, state: ListState, tokens: list[int]) -> ListState:
        for i, tok in enumerate(tokens):
            state = self._grammar_step(state, tok, f"then_plain token {i}")
        return state

    def _grammar_step(self, state: ListState, tok: int, what: str) -> ListState:
        nxt = self.constraint.advance(state, tok)
        if nxt is None:
            raise DraftError(f"{what} ({tok}) is not allowed by the list grammar here (or after the list's EOS)")
        return nxt

    def close(self) -> None:
        for a in self._ahead:
            self._drop_ahead(a.work)
        self._ahead, self._ready = [], None


# Why a tree drafted ahead could not serve the next request: no guess was drafted before the commit came, tokens
# committed without a tree came in between, the commit was none of the guesses, the right guess was still being
# drafted (finished on demand), or the next budget asked for more than the guess's looser budget drafted.
AHEAD_MISSES = ("not_drafted", "plain_round", "wrong_guess", "unfinished", "budget")


def learn_acceptance(acceptance: Calibration | DepthCalibration, tree: DraftTree, committed: Sequence[int],
                     besides: Container[tuple[int, ...]] = ()) -> None:
    """Teach `acceptance` the nodes of `tree` whose fate `committed` (an accepted path, then the target's own
    token(s)) decides: a path that is a prefix of it was accepted, one that leaves it within its length was not;
    deeper paths that follow it all the way are undecided (a tree another source's tree was merged into may hold
    nodes verification never saw). Paths in `besides` are left out: what a source adds to another source's tree is
    worth only its paths the other lacks."""
    if not len(tree):
        return
    known = len(committed)
    scores, accepted, depths = [], [], []
    for i, score in enumerate(tree.q_scores()):
        path = tree.path_tokens(i)
        if besides and tuple(path) in besides:
            continue
        agrees = list(committed[:len(path)]) == path[:known]
        if len(path) <= known or not agrees:
            scores.append(score)
            accepted.append(agrees and len(path) <= known)
            depths.append(len(path))
    if scores:
        acceptance.record(scores, accepted, depths)


@dataclass
class StopPoint:
    """Where verifying the last tree may stop: `path` accepted, then a bonus token that is none of `exclude` (the
    path's children in the tree: a child equal to the target's token would have been accepted)."""

    path: list[int]
    state: ListState  # grammar state after the path
    exclude: frozenset[int]
    logprob: float  # the drafter's log q of the path
    mass: float  # probability that verification stops here: P(path accepted) * P(no child accepted | path)


def stop_points(tree: DraftTree, state_after: Callable[[list[int]], ListState],
                acceptance: Calibration | DepthCalibration | None = None) -> list[StopPoint]:
    """Every place verification of the tree may end, likeliest first (ties: the deeper). Acceptance by
    `acceptance` (a path of q at depth d accepted with probability f_d(q)), else by the drafter's own q (f(q) = q);
    a calibrated tree's scores are already that probability."""
    q_logprobs = tree.logprobs if tree.q_logprobs is None else tree.q_logprobs
    scores, q_scores, kids, depths = tree.scores(), tree.q_scores(), tree.children(), tree.depths()
    if tree.q_logprobs is not None or acceptance is None:
        def accepted(node: int) -> float:
            return math.exp(scores[node])
    else:
        def accepted(node: int) -> float:
            return acceptance.accepted_at(q_scores[node], depths[node] + 1)
    points = []
    for node in [-1, *range(len(tree))]:
        children = kids.get(node, {})
        q_children = sum(math.exp(q_logprobs[c]) for c in children.values())
        if q_children > 1.0 - 1e-6:  # a grammar-forced child: verification never stops before it
            continue
        logprob = q_scores[node] if node >= 0 else 0.0
        reach = 1.0 if node < 0 else min(accepted(node), 1.0)
        # P(some child accepted | path accepted); a child cannot be likelier than its path
        taken = sum(min(accepted(c), reach) for c in children.values()) / max(reach, 1e-12)
        mass = reach * max(1.0 - taken, 0.0)
        if mass > 1e-9:
            path = tree.path_tokens(node)
            points.append(StopPoint(path, state_after(path), frozenset(children), logprob, mass))
    points.sort(key=lambda p: (-p.mass, -len(p.path)))
    return points


@dataclass
class _Ahead:
    assumed: list[int]  # the guessed commit: most probable path + most likely bonus
    budget: Budget
    want_probs: bool
    work: Any


def check_tokens(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise DraftError(f"{what} holds unknown token ids {bad[:5]}; valid ids are 0..{vocab_size - 1}")


class Drafter(ABC):
    """Opens sessions; holds what sessions share (model weights, retrieval pool)."""

    name: str = ""

    @property
    def acceptance(self) -> DepthCalibration:
        """What verification accepted of this drafter's trees, per depth, learnt from every session that was given
        it; the model drafter ranks its trees' nodes by it."""
        with _ACCEPTANCE_LOCK:
            if getattr(self, "_acceptance", None) is None:
                self._acceptance = DepthCalibration()
            return self._acceptance

    @abstractmethod
    def open(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> DraftSession:
        """A session for `context` (BOS history REC [generated...]); DraftError on bad input."""

    def forward_counts(self) -> BatchCounters | None:
        """Forwards its model ran so far, the session steps they held and their seconds, for drafters that batch
        sessions' steps; else None."""
        return None

    def trees_along(self, context: list[int], constraint: ListConstraint, continuation: list[int],
                    budget: Budget) -> list[DraftTree]:
        """Offline evaluation: the tree drafted after context + continuation[:t], for every t."""
        session = self.open(context, constraint)
        out = []
        for tok in continuation:
            out.append(session.draft(budget))
            session.commit([tok])
        return out


DrafterFactory = Callable[..., Drafter]
F = TypeVar("F", bound=DrafterFactory)
_REGISTRY: dict[str, DrafterFactory] = {}


def register(name: str) -> Callable[[F], F]:
    """Decorator: a factory building drafter `name` from an artifact directory."""

    def wrap(factory: F) -> F:
        _REGISTRY[name] = factory
        return factory

    return wrap


# What a client may ask for: "model", "hybrid" (each optionally ":drafter-<variant>"), "retrieval".
DRAFTER_NAME = re.compile(r"(model|hybrid)(:drafter[-a-z0-9]*)?|retrieval")


def drafter_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def load_drafter(name: str, artifacts: Path, **options: Any) -> Drafter:
    """Drafter `name` ("model", "model:<variant dir>", "retrieval", "hybrid") from an artifact directory."""
    _load_builtin()
    kind = name.split(":", 1)[0]
    if kind not in _REGISTRY:
        raise DraftError(f"unknown drafter {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind](Path(artifacts), name=name, **options)


def _load_builtin() -> None:
    import specrec.drafting.hybrid  # noqa: F401  (registers model, retrieval, hybrid)
