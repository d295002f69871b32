"""The item catalog as clients see it: external item ids <-> semantic-ID tokens, request validation."""

from __future__ import annotations

import json
from pathlib import Path

from specrec.model_identity import artifact_version
from specrec.models.profiles import TargetProfile
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
        self.max_len = target_max_len(Path(artifacts))
        self.version = artifact_version(Path(artifacts).resolve())  # the training this catalog belongs to

    def list_len(self, prompt: list[int], n_items: int) -> int:
        """Positions a finished list takes on the target: the prompt, n items of codes + SEP, then EOS."""
        return len(prompt) + n_items * self.sids.tokens_per_item + 1

    def check_fits(self, prompt: list[int], n_items: int) -> None:
        """RequestInvalid unless the whole list fits the target's positions (else it would fail mid-stream)."""
        need = self.list_len(prompt, n_items)
        if need > self.max_len:
            raise RequestInvalid(f"a prompt of {len(prompt)} tokens and {n_items} items of {self.sids.tokens_per_item} "
                                 f"tokens need {need} positions, over the target's {self.max_len}: send a shorter "
                                 "history or ask for fewer items")

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


def target_max_len(artifacts: Path) -> int:
    """Positions the target model supports, from its HF config beside the semantic IDs (else the profiles' default)."""
    try:
        return int(json.loads((artifacts / "target" / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError):
        return TargetProfile.max_len
