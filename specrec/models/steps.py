"""Turn blocks of new tokens (chains or trees, one per cache row) into one batched forward's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specrec.models.llama import KVCache
from specrec.semantic_ids.vocab import PAD
from specrec.tree_shape import node_depths


@dataclass
class Block:
    """New tokens for one cache row, parents first. parents[i] = -1: child of the last committed token."""

    row: int
    tokens: list[int]
    parents: list[int]

    @classmethod
    def chain(cls, row: int, tokens: list[int]) -> Block:
        return cls(row, list(tokens), list(range(-1, len(tokens) - 1)))


@dataclass
class StepInputs:
    tokens: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [B]
    slots: torch.Tensor  # [B, T] cache slot each new token is written to
    mask: torch.Tensor  # [B, T, S] bool: which cache slots each new token attends to
    depths: list[list[int]]  # per block, 0-based depth of each node below the root
    n_real: torch.Tensor  # [B] tokens of each block (the rest of its row is padding)


def build_step(cache: KVCache, blocks: list[Block], device: torch.device | str = "cpu") -> StepInputs:
    """Each node sees its row's committed prefix, its ancestors and itself; padding sees only itself.

    A row's padding writes to the one slot after its own block, so a long row batched with a large block of another
    row needs only its own slots (plus that one): rows x the largest block would overflow a row near the limit."""
    t = max(len(b.tokens) for b in blocks)
    bsz = len(blocks)
    ends = [cache.lengths[b.row] + len(b.tokens) + (len(b.tokens) < t) for b in blocks]
    span = max(ends)
    if span > cache.max_len:
        b = ends.index(span)
        raise ValueError(f"sequence in cache row {blocks[b].row} would reach {span} slots, over the cache's "
                         f"{cache.max_len}")
    tokens = torch.full((bsz, t), PAD, dtype=torch.long)
    positions = torch.zeros((bsz, t), dtype=torch.long)
    slots = torch.zeros((bsz, t), dtype=torch.long)
    mask = torch.zeros((bsz, t, span), dtype=torch.bool)
    all_depths = []
    for b, block in enumerate(blocks):
        length, n = cache.lengths[block.row], len(block.tokens)
        depths = node_depths(block.parents)
        all_depths.append(depths)
        tokens[b, :n] = torch.as_tensor(block.tokens, dtype=torch.long)
        positions[b, :n] = length + torch.as_tensor(depths, dtype=torch.long)
        slots[b, :n] = length + torch.arange(n)
        if n < t:
            slots[b, n:] = length + n
        mask[b, :, :length] = True
        for i, p in enumerate(block.parents):
            if p >= 0:
                mask[b, i, length:length + n] = mask[b, p, length:length + n]
            mask[b, i, length + i] = True
        if n < t:
            mask[b, n:, length + n] = True
    rows = torch.as_tensor([b.row for b in blocks], dtype=torch.long)
    n_real = torch.as_tensor([len(b.tokens) for b in blocks], dtype=torch.long)
    return StepInputs(tokens.to(device), positions.to(device), rows.to(device), slots.to(device),
                      mask.to(device), all_depths, n_real.to(device))
