"""Beam search over one item's semantic ID (top-K retrieval), and the bookkeeping that lets one drafted tree
answer several beam steps in a single target forward while committing exactly what plain beam search commits.

Beam search needs, at each level, the target's top children of every beam (an *expansion*: the `width` best
tokens the grammar allows there, with their log-probabilities). Plain beam search gets them one level per target
forward. A drafted tree lets the target expand nodes *before* they become beams: when the next level's beams are
all among the tree's nodes, their expansions are already known and the search moves on without a forward.
Expansions are a function of the node's path only, so the committed beams and scores are plain beam search's
whatever the tree held; a good tree only saves forwards.

KV design: the target caches the prompt once (the sequence's START prefill); every later forward sends a tree
that hangs off the prompt and holds the needed beams' whole paths (items are a few tokens deep, so recomputing
their ancestors costs a few rows) and keeps none of it. Beams are never rows of their own: B beams cost B tree
nodes, not B cache rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.tree_shape import MAX_TREE_NODES, MAX_TREE_TOP_K

MAX_BEAM_WIDTH = 64
Path = tuple[int, ...]  # tokens of a node below the retrieval root (the prompt's last token)


@dataclass(frozen=True)
class Expansion:
    """The target's best children of one node, best first (ties: lower token first)."""

    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True)
class Retrieved:
    item: int
    tokens: tuple[int, ...]  # the item's semantic-ID tokens
    score: float  # sum of the target's log-probabilities of its tokens (grammar-constrained, T = 1)


@dataclass
class BeamStats:
    rounds: int = 0  # target forwards (the first one is the prompt's prefill)
    tree_nodes: int = 0  # nodes the target scored, over all rounds
    drafted: int = 0  # nodes of the drafted tree
    round_s: list[float] = field(default_factory=list)  # each forward's time, as the caller saw it
    draft_s: float = 0.0
    score_s: float = 0.0
    total_s: float = 0.0


class BeamSearch:
    """One retrieval's beams. `learn` what a forward computed, `advance` as far as the known expansions allow,
    `next_tree` for what is still missing; `done` once the beams are whole items."""

    def __init__(self, constraint: ListConstraint, prompt: Sequence[int], width: int, k: int):
        if not 1 <= width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam width must be in 1..{MAX_BEAM_WIDTH}, got {width}")
        if not 1 <= k <= width:
            raise ValueError(f"k must be in 1..beam width ({width}), got {k}")
        self.constraint, self.width, self.k = constraint, width, k
        self.root = constraint.start(list(prompt))
        self.beams: list[tuple[Path, float, ListState]] = [((), 0.0, self.root)]
        self.known: dict[Path, Expansion] = {}
        self.level = 0

    @property
    def done(self) -> bool:
        return self.level == self.constraint.trie.depth

    def learn(self, tokens: Sequence[int], parents: Sequence[int], rows: Sequence[Expansion | None]) -> None:
        """Expansions of one forward: rows[0] at the root, rows[i + 1] at tree node i (None: nothing allowed)."""
        for path, row in zip([()] + tree_paths(tokens, parents), rows, strict=True):
            if row is not None:
                self.known.setdefault(path, row)

    def advance(self) -> None:
        """Take every beam step the known expansions allow."""
        while not self.done and not self.missing():
            candidates = [(score + lp, path + (tok,), state)
                          for path, score, state in self.beams
                          for tok, lp in zip(self.known[path].tokens, self.known[path].logprobs, strict=True)]
            candidates.sort(key=lambda c: (-c[0], c[1]))
            self.beams = [(path, score, self._step(state, path[-1])) for score, path, state in candidates[:self.width]]
            self.level += 1

    def _step(self, state: ListState, token: int) -> ListState:
        nxt = self.constraint.advance(state, token)
        assert nxt is not None, "expansions hold only tokens the grammar allows"
        return nxt

    def missing(self) -> list[Path]:
        """Beams whose expansion no forward has given yet; a node the grammar forces expands without one."""
        out = []
        for path, _score, state in self.beams:
            if path in self.known:
                continue
            forced = self.constraint.forced(state)
            if forced is not None:
                self.known[path] = Expansion((forced,), (0.0,))
            else:
                out.append(path)
        return out

    def next_tree(self, drafted: Sequence[Path] = (), max_nodes: int = MAX_TREE_NODES) -> tuple[list[int], list[int]]:
        """A tree holding the paths of as many missing beams as fit in max_nodes (at least one), then the drafted
        nodes (paths, parents first) that descend from one of those beams, as many as fit."""
        index: dict[Path, int] = {}
        tokens: list[int] = []
        parents: list[int] = []

        def add(p: Path) -> None:
            index[p] = len(tokens)
            tokens.append(p[-1])
            parents.append(index[p[:-1]] if len(p) > 1 else -1)

        sent = []
        for path in self.missing():
            new = [p for p in (path[:d] for d in range(1, len(path) + 1)) if p not in index]
            if tokens and len(tokens) + len(new) > max_nodes:
                break
            for p in new:
                add(p)
            sent.append(path)
        level, under = self.level, set(sent)
        for p in drafted:
            if len(tokens) >= max_nodes:
                break
            if len(p) > level and p[:level] in under and p not in index and p[:-1] in index:
                add(p)
        return tokens, parents

    def results(self) -> list[Retrieved]:
        assert self.done
        trie = self.constraint.trie
        return [Retrieved(trie.item_at(state.node), path, score) for path, score, state in self.beams[:self.k]]


def pack_expansions(rows: Sequence[Expansion | None], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Expansions as two flat arrays of len(rows) x width (token -1: no child there), for the wire."""
    tokens = np.full((len(rows), width), -1, dtype=np.int64)
    logprobs = np.zeros((len(rows), width), dtype=np.float64)
    for r, row in enumerate(rows):
        if row is not None:
            tokens[r, :len(row.tokens)] = row.tokens
            logprobs[r, :len(row.tokens)] = row.logprobs
    return tokens.reshape(-1), logprobs.reshape(-1)


def unpack_expansions(tokens: np.ndarray, logprobs: np.ndarray, n_rows: int) -> list[Expansion | None]:
    """pack_expansions undone: n_rows = tree nodes + 1."""
    if n_rows < 1 or len(tokens) % n_rows or len(tokens) != len(logprobs):
        raise ValueError(f"{len(tokens)} beam tokens and {len(logprobs)} log-probabilities do not make {n_rows} rows")
    out: list[Expansion | None] = []
    for toks, lps in zip(tokens.reshape(n_rows, -1), logprobs.reshape(n_rows, -1), strict=True):
        keep = toks >= 0
        out.append(Expansion(tuple(int(t) for t in toks[keep]), tuple(float(v) for v in lps[keep]))
                   if keep.any() else None)
    return out


def default_tree_nodes(width: int) -> int:
    """About three beams' worth of nodes per level past the first, whole first level included."""
    return min(MAX_TREE_NODES, 3 * width + 16)


def draft_shape(width: int, branching_depth: int, nodes: int = 0) -> tuple[int, int, int]:
    """(depth, max_nodes, top_k) of the tree drafted for a beam search of `width`. Only nodes down to the trie's
    branching depth ever need a forward (below it every token is forced), so the tree stops there; every child
    of a node may be drafted (top_k at its cap: a level of a few dozen codes is covered whole), and by default the
    tree holds about three beams' worth of nodes per level past the first (nodes > 0 overrides)."""
    depth = max(1, branching_depth)
    max_nodes = nodes or default_tree_nodes(width)
    return depth, max(depth, min(max_nodes, MAX_TREE_NODES)), MAX_TREE_TOP_K


# A forward of the target: (tree tokens, parents, start) -> rows as in BeamSearch.learn.
Score = Callable[[list[int], list[int], bool], Awaitable[list[Expansion | None]]]
# The drafter's tree after the prompt, or None (no drafter, or it failed): (tokens, parents).
Draft = Callable[[], Awaitable[tuple[list[int], list[int]] | None]]


@dataclass
class BeamRun:
    results: list[Retrieved]
    stats: BeamStats = field(default_factory=BeamStats)


def tree_paths(tokens: Sequence[int], parents: Sequence[int]) -> list[Path]:
    paths: list[Path] = []
    for tok, par in zip(tokens, parents, strict=True):
        paths.append((paths[par] if par >= 0 else ()) + (int(tok),))
    return paths


async def beam_retrieve(constraint: ListConstraint, prompt: Sequence[int], width: int, k: int, score: Score,
                        draft: Draft | None = None, overlap: bool = False) -> BeamRun:
    """Top-k items after `prompt` by beam search of width `width`: plain when `draft` is None. With a drafter the
    drafted tree rides along with the prefill (one forward if it covers every beam), or, with `overlap`, is drafted
    while the target prefills and then only its nodes under the first level's real beams go out with them (two
    forwards at best, the drafting hidden). Every expansion a tree holds saves a forward; same results either way."""
    t0 = time.perf_counter()
    search, stats = BeamSearch(constraint, prompt, width, k), BeamStats()
    tokens: list[int] = []
    parents: list[int] = []
    drafted: list[Path] = []
    pending: asyncio.Future | None = None
    if draft is not None and overlap:
        pending = asyncio.ensure_future(draft())
    elif draft is not None:
        t = time.perf_counter()
        tree = await draft()
        stats.draft_s += time.perf_counter() - t
        if tree is not None:
            tokens, parents = tree
            stats.drafted = len(tokens)
    start = True
    try:
        while True:
            t = time.perf_counter()
            rows = await score(tokens, parents, start)
            stats.round_s.append(time.perf_counter() - t)
            stats.score_s += stats.round_s[-1]
            stats.rounds += 1
            stats.tree_nodes += len(tokens)
            search.learn(tokens, parents, rows)
            search.advance()
            if search.done:
                break
            if pending is not None:  # the prefill is back: the tree the drafter made meanwhile
                t = time.perf_counter()
                tree = await pending
                stats.draft_s += time.perf_counter() - t
                pending = None
                if tree is not None:
                    drafted = tree_paths(*tree)
                    stats.drafted = len(drafted)
            tokens, parents = search.next_tree(drafted)
            start = False
    finally:
        if pending is not None:
            pending.cancel()
    stats.total_s = time.perf_counter() - t0
    return BeamRun(search.results(), stats)
