"""Artifacts: what one training of a dataset and profile leaves behind (data, split, semantic IDs, trie, target),
as every later stage reads it. specrec.pipeline builds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specrec.data.dataset import InteractionData, Split
from specrec.models.profiles import TargetProfile
from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.trie import ItemTrie
from specrec.training.examples import encode_prompt
from specrec.training.target import TARGET_DIR


@dataclass
class Artifacts:
    directory: Path
    data: InteractionData
    split: Split
    sids: SemanticIds
    trie: ItemTrie
    profile: TargetProfile

    @property
    def target_dir(self) -> Path:
        return self.directory / TARGET_DIR

    def constraint(self, n_items: int | None = None, exclude_history: bool = True) -> ListConstraint:
        return ListConstraint(self.trie, n_items or self.profile.list_len, exclude_history)

    def prompt(self, user: int) -> list[int]:
        """The target's prompt for a user: the last max_history items of their training history."""
        return encode_prompt(self.sids, self.split.train[user][-self.profile.max_history:])
