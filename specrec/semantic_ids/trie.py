"""ItemTrie: which token may follow a partial semantic ID, skipping items that are already used.

Items are sorted by code tuple, so every trie node is a contiguous range [lo, hi) of sorted items at
some depth; a node is named by (depth, lo, hi). Where each depth's nodes start is computed once (an int64
per node, at most items x depth), so a node's children are two binary searches away whatever the catalog's
size; the most recently used nodes' children are kept (a bounded cache: caching every node a long-running
service visits held ~730 MB at 1M items).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.vocab import SEP

Node = tuple[int, int, int]  # (depth, lo, hi) over items sorted by code tuple
CHILDREN_CACHE = 16384  # nodes whose children stay cached (~0.7 KB each): every top-two-level node of 1M items


@dataclass(frozen=True)
class Children:
    tokens: np.ndarray  # int64 [c] the token of each child
    lo: np.ndarray  # int64 [c] child ranges in sorted order
    hi: np.ndarray


class ItemTrie:
    def __init__(self, sids: SemanticIds):
        self.sids = sids
        self.vocab = sids.vocab
        self.order = np.lexsort(tuple(sids.codes[:, lv] for lv in reversed(range(sids.n_levels))))
        self.sorted_tokens = self.vocab.tokens(sids.codes[self.order])  # [n_items, n_levels]
        self.position = np.empty(sids.n_items, dtype=np.int64)  # item index -> sorted position
        self.position[self.order] = np.arange(sids.n_items)
        self.root: Node = (0, 0, sids.n_items)
        # starts[d]: sorted positions where a depth-d prefix begins (depth 0: the root), then n_items
        changed = np.ones((sids.n_items, self.depth + 1), dtype=bool)
        changed[1:, 1:] = self.sorted_tokens[1:] != self.sorted_tokens[:-1]
        changed[1:, 0] = False
        changed = np.logical_or.accumulate(changed, axis=1)  # a prefix changes when any of its codes does
        self._starts = [np.r_[np.flatnonzero(changed[:, d]), sids.n_items] for d in range(self.depth + 1)]
        self.children = functools.lru_cache(maxsize=CHILDREN_CACHE)(self._children_of)

    @property
    def depth(self) -> int:
        return self.sids.n_levels

    @functools.cached_property
    def branching_depth(self) -> int:
        """The deepest depth at which some node has more than one child (0 = only the root branches): below it
        every token is forced. A code level that only resolves no collision never branches."""
        deepest = 0
        for d in range(1, self.depth):
            same_prefix = np.all(self.sorted_tokens[1:, :d] == self.sorted_tokens[:-1, :d], axis=1)
            if np.any(same_prefix & (self.sorted_tokens[1:, d] != self.sorted_tokens[:-1, d])):
                deepest = d
        return deepest

    def _children_of(self, node: Node) -> Children:
        """A node's children: the depth+1 nodes starting inside its range (`self.children` caches this)."""
        depth, lo, hi = node
        starts = self._starts[depth + 1]
        first, last = np.searchsorted(starts, [lo, hi])
        child_lo = starts[first:last]
        child_hi = starts[first + 1:last + 1]
        return Children(self.sorted_tokens[child_lo, depth].astype(np.int64), child_lo, child_hi)

    def allowed(self, node: Node, *taken: np.ndarray, only: np.ndarray | None = None) -> np.ndarray:
        """Tokens that may follow `node` when the positions in `taken` (disjoint sorted arrays) are taken and, if
        `only` (sorted) is given, no position outside it may be (then every taken position lies in `only`).

        A leaf (a whole semantic ID) is followed by SEP.
        """
        if node[0] == self.depth:
            return np.array([SEP], dtype=np.int64)
        ch = self.children(node)
        return ch.tokens[_free(ch.lo, ch.hi, taken, only) > 0]

    def is_open(self, node: Node, *taken: np.ndarray, only: np.ndarray | None = None) -> bool:
        """Whether some item under `node` is neither taken nor (given `only`) outside it: `allowed` for one child,
        without the parent's other children (advancing a state by a token asks only about that token)."""
        return bool(_free(node[1], node[2], taken, only) > 0)

    def child(self, node: Node, token: int) -> Node | None:
        """The node reached from `node` by `token`, or None if no item continues that way."""
        ch = self.children(node)
        i = int(np.searchsorted(ch.tokens, token))
        if i < len(ch.tokens) and ch.tokens[i] == token:
            return (node[0] + 1, int(ch.lo[i]), int(ch.hi[i]))
        return None

    def item_at(self, node: Node) -> int:
        """The item a leaf node stands for."""
        assert node[0] == self.depth and node[2] - node[1] == 1
        return int(self.order[node[1]])

    def masks(self, allowed_lists: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
        """Stack allowed-token lists into a boolean mask [B, vocab] for batched logits."""
        mask = torch.zeros(len(allowed_lists), self.vocab.size, dtype=torch.bool)
        for row, allowed in enumerate(allowed_lists):
            mask[row, torch.as_tensor(allowed, dtype=torch.long)] = True
        return mask.to(device)


def _free(lo: Any, hi: Any, taken: tuple[np.ndarray, ...], only: np.ndarray | None) -> Any:
    """Items in position ranges [lo, hi) (arrays or scalars) neither taken nor, given `only`, outside it."""
    free = hi - lo if only is None else np.searchsorted(only, hi) - np.searchsorted(only, lo)
    for positions in taken:
        if len(positions):
            free = free - (np.searchsorted(positions, hi) - np.searchsorted(positions, lo))
    return free
