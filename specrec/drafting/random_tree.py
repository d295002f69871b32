"""A random test drafter: grammar-valid trees that sometimes follow a known continuation."""

from __future__ import annotations

import numpy as np

from specrec.semantic_ids.constraint import ListConstraint, ListState


def random_tree(constraint: ListConstraint, state: ListState, rng: np.random.Generator, n_nodes: int,
                truth: list[int] | None = None, p_truth: float = 0.6) -> tuple[list[int], list[int]]:
    """A random tree of at most n_nodes grammar-valid nodes; with probability p_truth a node follows
    `truth` (the expected continuation), so paths of several accepted tokens occur."""
    tokens: list[int] = []
    parents: list[int] = []
    frontier: list[tuple[int, ListState, int]] = [(-1, state, 0)]  # (node, state, depth)
    while frontier and len(tokens) < n_nodes:
        node, st, depth = frontier.pop(int(rng.integers(len(frontier))))
        allowed = constraint.allowed(st)
        if len(allowed) == 0:
            continue
        picks = set(int(t) for t in rng.choice(allowed, size=min(2, len(allowed)), replace=False))
        on_truth = truth is not None and depth < len(truth) and _on_path(tokens, parents, node, truth)
        if on_truth and rng.random() < p_truth:
            picks.add(truth[depth])
        for tok in sorted(picks):
            if len(tokens) >= n_nodes or tok not in allowed:
                continue
            nxt = constraint.advance(st, tok)
            tokens.append(tok)
            parents.append(node)
            if nxt is not None:
                frontier.append((len(tokens) - 1, nxt, depth + 1))
    return tokens, parents


def _on_path(tokens: list[int], parents: list[int], node: int, truth: list[int]) -> bool:
    path = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1] == truth[: len(path)]
