"""The list grammar every decoder obeys: N distinct items, each a valid semantic ID then SEP, then EOS.
Banned items (a request's filters) and, unless included, the history's items are never generated.

    BOS  c1 c2 c3 c4 SEP ...  REC  c1 c2 c3 c4 SEP ... EOS
         └─ history ─┘             └─ generated list ─┘

A ListState is what the grammar needs to know about a token prefix; it is immutable, so tree search
can branch from any state cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specrec.semantic_ids.trie import ItemTrie, Node
from specrec.semantic_ids.vocab import BOS, EOS, REC, SEP

EMPTY = np.zeros(0, dtype=np.int64)


class ConstraintError(ValueError):
    """A token sequence that the list grammar does not accept."""


class TooFewItems(ConstraintError):
    """The items the history and the filters leave cannot fill the list."""


@dataclass(frozen=True)
class ListState:
    node: Node  # trie node of the item being written (root at an item boundary)
    n_done: int  # items completed in the list
    # Sorted trie positions of items that may not be generated: those the request rules out (history, filters)
    # and those the list already holds. Kept apart because an allow-list can rule out nearly the whole catalog,
    # and merging a million positions at every item written cost ~7 ms an item at 10^6 items.
    excluded: np.ndarray
    generated: np.ndarray
    finished: bool = False

    @property
    def n_taken(self) -> int:
        return len(self.excluded) + len(self.generated)  # disjoint: an excluded item is never generated

    def item_written(self, root: Node) -> ListState:
        """The state after the SEP that closes the item at this (leaf) node."""
        return ListState(root, self.n_done + 1, self.excluded, np.union1d(self.generated, [self.node[1]]))

    def ended(self) -> ListState:
        return ListState(self.node, self.n_done, self.excluded, self.generated, True)


class ListConstraint:
    """A request's filters, as item indices: `banned` items no list may hold, and, when `allowed` is not empty, only
    those items may be. The trie prunes them from every decoder's choices: plain decoding, the drafters' trees and
    verification. Both forms exist so that a filter travels the short way: an allow-list of 100 items at 10^6
    items is 100 indices, not 999,900 banned ones."""

    def __init__(self, trie: ItemTrie, n_items: int, exclude_history: bool = True, banned: Sequence[int] = (),
                 allowed: Sequence[int] = ()):
        if n_items < 1:
            raise ConstraintError(f"n_items must be >= 1, got {n_items}")
        self.trie = trie
        self.n_items = n_items
        self.exclude_history = exclude_history
        self.banned = _item_indices(trie, banned, "banned")
        self.allowed_items = _item_indices(trie, allowed, "allowed")
        self.banned_positions = np.sort(trie.position[self.banned])
        # sorted trie positions of the only items that may be generated (None: every item)
        self.only_positions = np.sort(trie.position[self.allowed_items]) if len(self.allowed_items) else None

    def parse_history(self, prompt: list[int]) -> list[int]:
        """Items of a prompt `BOS item... REC` (each item: codes then SEP)."""
        per_item = self.trie.depth + 1
        if len(prompt) < 2 or prompt[0] != BOS or prompt[-1] != REC:
            raise ConstraintError("a prompt must start with BOS and end with REC")
        body = prompt[1:-1]
        if len(body) % per_item:
            raise ConstraintError(f"history length {len(body)} is not a multiple of {per_item} tokens per item")
        items = []
        for i in range(0, len(body), per_item):
            chunk = body[i:i + per_item]
            item = self.trie.sids.item_of_tokens(chunk[:-1])
            if item is None or chunk[-1] != SEP:
                raise ConstraintError(f"history tokens {i + 1}..{i + per_item} are not a valid item followed by SEP")
            items.append(item)
        return items

    def start(self, context: list[int]) -> ListState:
        """State after a full context: the prompt (up to REC) and any tokens generated since."""
        try:
            rec = context.index(REC)
        except ValueError:
            raise ConstraintError("context has no REC token marking where the list starts") from None
        history = self.parse_history(list(context[: rec + 1]))
        used = self.trie.position[history] if self.exclude_history else EMPTY
        excluded = np.union1d(used, self.banned_positions)
        if self.only_positions is not None:  # counted against the allowed items only, so those outside do not count
            excluded = excluded[np.isin(excluded, self.only_positions, assume_unique=True)]
        state = ListState(self.trie.root, 0, excluded, EMPTY)
        for i, token in enumerate(context[rec + 1:]):
            nxt = self.advance(state, int(token))
            if nxt is None:
                raise ConstraintError(f"context token {rec + 1 + i} ({token}) is not allowed by the list grammar")
            state = nxt
        self._check_enough(state)
        return state

    def _check_enough(self, state: ListState) -> None:
        """Refuse up front a list the eligible items cannot fill: decoding would reach a dead end."""
        wanted = self.n_items - state.n_done  # an item being written is among those left
        eligible = self.trie.sids.n_items if self.only_positions is None else len(self.only_positions)
        left = eligible - state.n_taken
        if not state.finished and left < wanted:
            raise TooFewItems(f"only {left} items are eligible (the catalog less the history and the "
                                  f"filters), fewer than the {wanted} the list still needs")

    def allowed(self, state: ListState) -> np.ndarray:
        if state.finished:
            return EMPTY
        if state.node == self.trie.root and state.n_done >= self.n_items:
            return np.array([EOS], dtype=np.int64)
        return self.trie.allowed(state.node, state.excluded, state.generated, only=self.only_positions)

    def forced(self, state: ListState) -> int | None:
        """The only legal next token, if there is exactly one."""
        allowed = self.allowed(state)
        return int(allowed[0]) if len(allowed) == 1 else None

    def advance(self, state: ListState, token: int) -> ListState | None:
        """The state after `token`, or None if the grammar forbids it."""
        if state.finished:
            return None
        if token == EOS:
            ok = state.node == self.trie.root and state.n_done >= self.n_items
            return state.ended() if ok else None
        if token == SEP:
            if state.node[0] != self.trie.depth:
                return None
            return state.item_written(self.trie.root)
        if state.node == self.trie.root and state.n_done >= self.n_items:
            return None
        if state.node[0] >= self.trie.depth:
            return None
        child = self.trie.child(state.node, token)
        if child is None or not self.trie.is_open(child, state.excluded, state.generated, only=self.only_positions):
            return None
        return ListState(child, state.n_done, state.excluded, state.generated)

    def list_items(self, generated: list[int]) -> list[int]:
        """Items of a generated token list (what follows REC), in order."""
        per_item = self.trie.depth + 1
        items = []
        for i in range(0, len(generated) - per_item + 1, per_item):
            item = self.trie.sids.item_of_tokens(generated[i:i + self.trie.depth])
            if item is not None:
                items.append(item)
        return items


def _item_indices(trie: ItemTrie, items: Sequence[int], name: str) -> np.ndarray:
    """Sorted unique item indices, checked against the catalog."""
    found = np.asarray(items, dtype=np.int64).reshape(-1)
    if len(found) and not (0 <= found.min() and found.max() < trie.sids.n_items):
        raise ConstraintError(f"{name} items must be item indices in 0..{trie.sids.n_items - 1}")
    return np.unique(found)
