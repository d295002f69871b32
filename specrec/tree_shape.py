"""The shape of a draft tree every hop agrees on: its limits (draft.proto's DraftBudget) and the one validity rule.

The draft service builds trees within these limits, the orchestrator checks every drafted tree with
`tree_problem` before sending it (a broken drafter then costs speed, not the request), and the target
refuses any tree it flags.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_TREE_DEPTH = 16  # levels below the root (DraftBudget.depth)
MAX_TREE_TOP_K = 16  # children per node and frontier nodes per level (DraftBudget.top_k)
MAX_TREE_NODES = 128  # nodes per tree (DraftBudget.max_nodes), and the most the target verifies at once


def tree_problem(tokens: Sequence[int], parents: Sequence[int], vocab_size: int) -> str | None:
    """What makes this tree unverifiable, or None: node i's parent must be -1 (the root) or an earlier node."""
    n = len(tokens)
    if n != len(parents):
        return f"{n} tree tokens but {len(parents)} parents; they must match"
    if n > MAX_TREE_NODES:
        return f"tree of {n} nodes exceeds the limit of {MAX_TREE_NODES}"
    bad_parent = next((i for i, p in enumerate(parents) if not -1 <= p < i), None)
    if bad_parent is not None:
        return (f"node {bad_parent} has parent {parents[bad_parent]}: a parent must be -1 (the root) or an earlier "
                f"node index 0..{bad_parent - 1}")
    bad_token = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad_token is not None:
        return f"tree token {bad_token} is outside the vocabulary 0..{vocab_size - 1}"
    return None


def node_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node, 0 = a child of the root."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def path_scores(parents: Sequence[int], logprobs: Sequence[float]) -> list[float]:
    """Cumulative log q of every node's path from the root."""
    out: list[float] = []
    for p, lp in zip(parents, logprobs, strict=True):
        out.append(lp + (out[p] if p >= 0 else 0.0))
    return out
