"""Semantic IDs: item codes learnt by residual k-means, the token vocabulary, and the item trie."""

from specrec.semantic_ids.codebook import SemanticIds, build_semantic_ids
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.trie import ItemTrie
from specrec.semantic_ids.vocab import BOS, EOS, N_SPECIAL, PAD, REC, SEP, Vocabulary

__all__ = [
    "BOS", "EOS", "PAD", "REC", "SEP", "N_SPECIAL", "ItemTrie", "ListConstraint", "ListState",
    "SemanticIds", "Vocabulary", "build_semantic_ids",
]
