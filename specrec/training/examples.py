"""Training examples: a window of a user's history, REC, then the next N items as one list."""

from __future__ import annotations

import numpy as np

from specrec.semantic_ids.codebook import SemanticIds
from specrec.semantic_ids.vocab import BOS, EOS, REC, SEP


def item_block(sids: SemanticIds, items: np.ndarray | list[int]) -> list[int]:
    """Tokens of several items: each item's codes followed by SEP."""
    out: list[int] = []
    for item in items:
        out += sids.item_tokens(int(item))
        out.append(SEP)
    return out


def encode_prompt(sids: SemanticIds, history: np.ndarray | list[int]) -> list[int]:
    """BOS history-items REC: what a request hands the target."""
    return [BOS, *item_block(sids, history), REC]


def encode_example(sids: SemanticIds, history: np.ndarray, target: np.ndarray) -> list[int]:
    return encode_prompt(sids, history) + item_block(sids, target) + [EOS]


def window_index(sequences: list[np.ndarray], list_len: int) -> np.ndarray:
    """All (user, cut) pairs where a full list of list_len items follows the cut. [n, 2]. Built with array ops: 16
    bytes a window (10M interactions: ~150 MB, where a list of tuples took over 1 GB on the way)."""
    counts = np.maximum(np.array([len(seq) for seq in sequences], dtype=np.int64) - list_len + 1, 0)
    users = np.repeat(np.arange(len(sequences), dtype=np.int64), counts)
    cuts = np.arange(len(users), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([users, cuts], axis=1)


def make_example(sids: SemanticIds, sequences: list[np.ndarray], user: int, cut: int, max_history: int,
                 list_len: int) -> list[int]:
    seq = sequences[user]
    return encode_example(sids, seq[max(0, cut - max_history):cut], seq[cut:cut + list_len])
