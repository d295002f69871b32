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
    """All (user, cut) pairs where a full list of list_len items follows the cut. [n, 2]."""
    pairs = [(u, t) for u, seq in enumerate(sequences) for t in range(0, len(seq) - list_len + 1)]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def make_example(sids: SemanticIds, sequences: list[np.ndarray], user: int, cut: int, max_history: int,
                 list_len: int) -> list[int]:
    seq = sequences[user]
    return encode_example(sids, seq[max(0, cut - max_history):cut], seq[cut:cut + list_len])
