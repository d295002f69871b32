"""DARE-style retrieval drafter: continuations of the current suffix, looked up in a pool, no model.

The pool holds token streams per user group: every user's training sequence (items as codes + SEP)
and, when given, the target's own earlier outputs (a few history items, REC, the generated list, EOS;
DARE warms its pool the same way). Users are grouped by k-means over the mean of their items' vectors;
a request is routed to the group nearest its history (or to the group it names).

Drafting: find where the longest suffix of the context (n-gram lengths NGRAMS, longest first) occurs
in the group's stream (falling back to every group when the own group has too few matches), count the
continuations that follow, and keep the most frequent ones as a tree (log q = log of a child's share of
its parent's count), trie-masked, with forced tokens inserted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specrec.artifacts import Artifacts
from specrec.data.dataset import sparse_interactions
from specrec.drafting.base import Budget, Drafter, DraftError, DraftSession, DraftTree, register
from specrec.drafting.tree import CandidateTree, Node, TreeRoot, select
from specrec.semantic_ids.codebook import item_vectors
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import REC, SEP

POOL_DIR = "retrieval"
FORMAT_VERSION = 1
NGRAMS = (12, 10, 7, 5, 3, 2, 1)  # suffix lengths tried, longest first
MIN_SUPPORT = 4  # matches wanted before a shorter suffix is not tried
MAX_MATCHES = 256  # continuations counted per lookup (the latest ones)
SEPARATOR = -1  # between sequences in a stream
_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(stream: np.ndarray, m: int) -> np.ndarray:
    """Hash of stream[i - m + 1 .. i] at every i (uint64; 0 where the window crosses a separator or the start)."""
    n = len(stream)
    h = np.zeros(n, dtype=np.uint64)
    bad = np.zeros(n, dtype=bool)
    vals = (stream.astype(np.int64) + 2).astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(m):  # h = sum_j token[i - j] * MULT^(j + 1), token shifted so none is zero
            shifted = np.zeros(n, dtype=np.uint64)
            shifted[j:] = vals[: n - j]
            bad[:j] = True
            bad[j:] |= stream[: n - j] == SEPARATOR
            h = h * _MULT + shifted
        h = h * _MULT
    h[bad] = 0
    return h


def suffix_hash(tokens: Sequence[int]) -> int:
    return int(ngram_hashes(np.asarray(tokens, dtype=np.int64), len(tokens))[-1])


@dataclass
class _Index:
    keys: np.ndarray  # sorted n-gram hashes (uint64)
    ends: np.ndarray  # int64 position of each n-gram's last token


class RetrievalPool:
    """Token streams per user group, their n-gram indexes, and the router."""

    def __init__(self, streams: list[np.ndarray], centroids: np.ndarray, item_vectors: np.ndarray):
        self.streams = [np.asarray(s, dtype=np.int64) for s in streams]
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.index: list[dict[int, _Index]] = []
        for stream in self.streams:
            per_m = {}
            for m in NGRAMS:
                h = ngram_hashes(stream, m)
                ends = np.flatnonzero(h)
                order = np.argsort(h[ends], kind="stable")
                per_m[m] = _Index(h[ends][order], ends[order])
            self.index.append(per_m)

    @property
    def n_groups(self) -> int:
        return len(self.streams)

    def route(self, history: Sequence[int]) -> int:
        """The group whose centroid is nearest the mean vector of these items (group 0 if none)."""
        if not len(history):
            return 0
        v = self.item_vectors[np.asarray(history)].mean(axis=0)
        v /= np.linalg.norm(v) + 1e-8
        return int(np.argmin(((self.centroids - v) ** 2).sum(axis=1)))

    def _matches(self, group: int, suffix: Sequence[int]) -> np.ndarray:
        idx = self.index[group][len(suffix)]
        key = np.uint64(suffix_hash(suffix))
        lo, hi = np.searchsorted(idx.keys, key, "left"), np.searchsorted(idx.keys, key, "right")
        return np.sort(idx.ends[lo:hi])

    def continuations(self, group: int, context: Sequence[int], depth: int) -> list[np.ndarray]:
        """Up to MAX_MATCHES token runs (each <= depth long) that followed the longest well-supported
        suffix of `context` in the pool."""
        best: list[tuple[int, np.ndarray]] = []
        for m in NGRAMS:
            if m > len(context):
                continue
            suffix = list(context[-m:])
            found = [(group, self._matches(group, suffix))]
            if sum(len(e) for _, e in found) < MIN_SUPPORT:
                found += [(g, self._matches(g, suffix)) for g in range(self.n_groups) if g != group]
            found = [(g, e) for g, e in found if len(e)]
            if not found:
                continue
            best = [(g, e[-MAX_MATCHES:]) for g, e in found]
            if sum(len(e) for _, e in found) >= MIN_SUPPORT:
                break
        out: list[np.ndarray] = []
        for g, ends in best:
            stream = self.streams[g]
            for end in ends[::-1]:
                run = stream[end + 1: end + 1 + depth]
                stop = np.flatnonzero(run == SEPARATOR)
                run = run[: stop[0]] if len(stop) else run
                if len(run):
                    out.append(run)
                if len(out) >= MAX_MATCHES:
                    return out
        return out

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"stream_{g}": s for g, s in enumerate(self.streams)}
        np.savez_compressed(directory / "pool.npz", centroids=self.centroids, item_vectors=self.item_vectors,
                            **arrays)
        meta = {"format_version": FORMAT_VERSION, "n_groups": self.n_groups,
                "tokens": [int(len(s)) for s in self.streams]}
        (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> RetrievalPool:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: no retrieval pool here (run `specrec train-drafter --drafter "
                                    "retrieval`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')}, this specrec reads "
                             f"{FORMAT_VERSION}; rebuild the pool")
        data = np.load(directory / "pool.npz")
        return cls([data[f"stream_{g}"] for g in range(meta["n_groups"])], data["centroids"], data["item_vectors"])


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Plain Lloyd's k-means: (centroids [k, d], labels [n])."""
    rng = np.random.default_rng(seed)
    k = min(k, len(x))
    centroids = x[rng.choice(len(x), size=k, replace=False)].copy()
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        labels = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        for c in range(k):
            if (labels == c).any():
                centroids[c] = x[labels == c].mean(0)
    return centroids, labels


def build_pool(item_tokens: list[list[int]], sequences: list[np.ndarray], item_vectors: np.ndarray,
               outputs: Sequence[tuple[int, list[int]]] = (), n_groups: int = 3, seed: int = 0,
               held_out: Callable[[int], bool] = lambda user: False) -> RetrievalPool:
    """Pool from users' training sequences (item index lists) and earlier target outputs
    ((user, tokens) pairs), grouped by user cluster. item_tokens[i] = item i's code tokens.
    Users for whom `held_out(user)` is true are left out (sequences, outputs and clustering): the benchmarks
    measure them, and a pool that holds a user's own history would draft it back."""
    kept = [u for u in range(len(sequences)) if not held_out(u)]
    norm = item_vectors / (np.linalg.norm(item_vectors, axis=1, keepdims=True) + 1e-8)
    users = np.stack([norm[sequences[u]].mean(0) if len(sequences[u]) else np.zeros(norm.shape[1], dtype=np.float32)
                      for u in kept]).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True) + 1e-8
    centroids, labels = kmeans(users, n_groups, seed)
    group = dict(zip(kept, labels.tolist(), strict=True))
    parts: list[list[np.ndarray]] = [[] for _ in range(len(centroids))]
    sep = np.array([SEPARATOR], dtype=np.int64)
    for u in kept:
        if len(sequences[u]):
            toks = [t for i in sequences[u] for t in (*item_tokens[int(i)], SEP)]
            parts[group[u]] += [np.asarray(toks, dtype=np.int64), sep]
    for u, toks in outputs:
        if u in group:
            parts[group[u]] += [np.asarray(toks, dtype=np.int64), sep]
    streams = [np.concatenate(p) if p else sep.copy() for p in parts]
    return RetrievalPool(streams, centroids, norm.astype(np.float32))


def retrieval_tree(pool: RetrievalPool, group: int, context: Sequence[int], state: ListState,
                   constraint: ListConstraint, budget: Budget, want_probs: bool = False) -> DraftTree:
    budget = budget.validated()
    conts = pool.continuations(group, context, budget.depth)
    trie: dict = {}
    for run in conts:
        node = trie
        for tok in run.tolist():
            entry = node.setdefault(tok, [0, {}])
            entry[0] += 1
            node = entry[1]
    tree = CandidateTree(TreeRoot(0, 0, 0, state, None), constraint, [0])
    _grow(tree, tree.root, trie, budget, want_probs)
    return select(tree, budget, want_probs).tree


def _grow(tree: CandidateTree, node: Node, trie: dict, budget: Budget, want_probs: bool) -> None:
    if node.depth + 1 >= budget.depth or not trie:
        return
    ok = set(tree.allowed(node).tolist())
    kids = sorted(((cnt, tok) for tok, (cnt, _) in trie.items() if tok in ok), key=lambda x: (-x[0], x[1]))
    if not kids:
        return
    total = sum(cnt for cnt, _ in kids)
    kids = kids[: budget.top_k]
    node.expanded = True
    if want_probs:
        out = torch.full((tree.constraint.trie.vocab.size,), -math.inf)
        for cnt, tok in kids:
            out[tok] = math.log(cnt / total)
        node.out = torch.log_softmax(out, dim=-1)
    for cnt, tok in kids:
        child = tree.add(node, tok, math.log(cnt / total))
        _grow(tree, child, trie[tok][1], budget, want_probs)


class RetrievalDrafter(Drafter):
    def __init__(self, pool: RetrievalPool, name: str = "retrieval"):
        self.pool = pool
        self.name = name

    def group_for(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> int:
        if user_group:
            if not user_group.isdigit() or int(user_group) >= self.pool.n_groups:
                raise DraftError(f"user_group {user_group!r} is not a pool group; use 0..{self.pool.n_groups - 1} "
                                 "or leave it empty to route by history")
            return int(user_group)
        rec = list(context).index(REC) if REC in context else len(context)
        try:
            history = constraint.parse_history(list(context[: rec + 1]))
        except ValueError:
            history = []
        return self.pool.route(history)

    def open(self, context: Sequence[int], constraint: ListConstraint, user_group: str = "") -> RetrievalSession:
        session = RetrievalSession(self, constraint, context)
        session.group = self.group_for(session.context, constraint, user_group)
        return session


class RetrievalSession(DraftSession):
    def __init__(self, drafter: RetrievalDrafter, constraint: ListConstraint, context: Sequence[int]):
        super().__init__(constraint, context)
        self.pool = drafter.pool
        self.group = 0

    def _draft(self, budget: Budget, want_probs: bool) -> DraftTree:
        return retrieval_tree(self.pool, self.group, self.context, self.state, self.constraint, budget, want_probs)

    def _advance(self, tokens: list[int]) -> None:
        pass  # stateless: the context (kept by the base class) is all it needs

    def _draft_ahead(self, path: list[int], state: ListState, budget: Budget,
                     want_probs: bool) -> tuple[list[int], DraftTree] | None:
        bonus = self.constraint.forced(state)
        if bonus is None:
            counts: dict[int, int] = {}
            allowed = set(self.constraint.allowed(state).tolist())
            for run in self.pool.continuations(self.group, self.context + path, 1):
                tok = int(run[0])
                if tok in allowed:
                    counts[tok] = counts.get(tok, 0) + 1
            if not counts:
                return None
            bonus = max(counts, key=lambda t: (counts[t], -t))
        after = self.constraint.advance(state, bonus)
        if after is None or after.finished:
            return None
        assumed = path + [bonus]
        tree = retrieval_tree(self.pool, self.group, self.context + assumed, after, self.constraint, budget,
                              want_probs)
        return assumed, tree

    def _adopt_ahead(self, work: DraftTree) -> DraftTree:
        return work


@register("retrieval")
def load_retrieval_drafter(artifacts: Path, name: str = "retrieval", **_: object) -> RetrievalDrafter:
    return RetrievalDrafter(RetrievalPool.load(Path(artifacts) / POOL_DIR), name=name)


def pool_for(arts: Artifacts, outputs: Sequence[tuple[int, list[int]]] = (), n_groups: int = 3, seed: int = 0,
             context_items: int = 2, held_out: Callable[[int], bool] = lambda user: False) -> RetrievalPool:
    """The pool of a dataset's artifacts: training sequences of the users not `held_out` plus earlier target
    outputs ((user, prompt + list) pairs), each output kept from `context_items` history items before REC on."""
    vectors = item_vectors(arts.data.genres, arts.data.years, sparse_interactions(arts.split.train, arts.data.n_items))
    keep = context_items * arts.sids.tokens_per_item
    trimmed = [(u, toks[max(0, toks.index(REC) - keep):]) for u, toks in outputs]
    item_tokens = [arts.sids.item_tokens(i) for i in range(arts.sids.n_items)]
    return build_pool(item_tokens, arts.split.train, vectors, trimmed, n_groups, seed, held_out)
