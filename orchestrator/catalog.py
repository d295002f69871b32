"""The item catalog as clients see it: external item ids <-> semantic-ID tokens, request validation."""

from __future__ import annotations

from pathlib import Path

from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.trie import ItemTrie
from specrec.semantic_ids.vocab import BOS, REC, SEP


class RequestInvalid(ValueError):
    """A client request that cannot be served; the message names the field."""


class Catalog:
    def __init__(self, artifacts: str | Path):
        self.sids = SemanticIds.load(Path(artifacts))
        self.trie = ItemTrie(self.sids)
        self.index = {item_id: i for i, item_id in enumerate(self.sids.item_ids)}

    def prompt(self, history: list[str], max_history: int) -> list[int]:
        if not history:
            raise RequestInvalid("history is empty: give at least one item id the catalog knows")
        if len(history) > max_history:
            raise RequestInvalid(f"history has {len(history)} items, over the limit of {max_history}; "
                                 "send the most recent ones")
        tokens = [BOS]
        for pos, item_id in enumerate(history):
            item = self.index.get(item_id)
            if item is None:
                raise RequestInvalid(f"history[{pos}] = {item_id!r} is not an item id of this catalog")
            tokens += self.sids.item_tokens(item) + [SEP]
        return tokens + [REC]

    def constraint(self, n_items: int, exclude_history: bool) -> ListConstraint:
        return ListConstraint(self.trie, n_items, exclude_history)

    def item_of(self, tokens: list[int]) -> int | None:
        return self.sids.item_of_tokens(tokens)
