"""The target's precision: float32, or bfloat16 with a batch-invariant forward so that speculation stays exact.

Speculation is lossless only if the target scores a token the same whether it is verified alone (plain decoding),
in a chain, in a tree or beside other requests. In float32 the kernels differ by ~1e-6 with the batch shape, far
below any logit gap that matters; in bfloat16 by ~1e-2, enough to flip near ties. So bfloat16 runs the
batch-invariant forward (`Transformer.invariant_rows`), and only after this machine's kernels passed a check that a
token's logits come out bit for bit the same in a batch as alone.
"""

from __future__ import annotations

import torch
from torch import nn

from specrec.models.llama import KVCache, Transformer
from specrec.models.steps import Block, build_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHUNK_ROWS = (32, 16, 8)  # projection chunk sizes tried, largest (fastest) first


class PrecisionError(ValueError):
    """The requested precision cannot keep speculation exact on this machine."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name or "float32"]
    except KeyError:
        raise PrecisionError(f"unknown target dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def set_precision(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast the model for serving in `dtype` (lm_head stays float32); below float32, switch on the batch-invariant
    forward with the largest projection chunk this machine computes row by row alike, or raise PrecisionError."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    model.lm_head.float()
    rows = next((n for n in CHUNK_ROWS if _projections_rowwise(model, n)), 0)
    if not rows:
        raise PrecisionError(f"this machine's {dtype} matrix kernels compute a token differently when other tokens "
                             "share the batch, so speculation could not stay exact; serve the target in float32 "
                             "(SPECREC_TARGET_DTYPE=float32)")
    model.invariant_rows = rows
    if not _chain_matches_steps(model, rows):
        model.invariant_rows = 0
        raise PrecisionError(f"the {dtype} forward of a chain differs from token-by-token decoding on this machine; "
                             "serve the target in float32 (SPECREC_TARGET_DTYPE=float32)")
    return model


@torch.inference_mode()
def _projections_rowwise(model: Transformer, rows: int) -> bool:
    """Every projection shape gives each row the same bits for any batch of 1..rows rows, computed as the
    batch-invariant forward computes them (`Transformer._proj`: its kernels, its padding to MIN_ROWS rows)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {tuple(m.weight.shape): m for m in model.model.modules() if isinstance(m, nn.Linear)}
    before, model.invariant_rows = model.invariant_rows, rows
    try:
        for linear in shapes.values():
            x = torch.randn(rows, linear.in_features, generator=gen).to(linear.weight.dtype)
            alone = torch.cat([model._proj(linear, x[i: i + 1]) for i in range(rows)])
            if any(not torch.equal(model._proj(linear, x[:m]), alone[:m]) for m in range(2, rows + 1)):
                return False
    finally:
        model.invariant_rows = before
    return True


@torch.inference_mode()
def _chain_matches_steps(model: Transformer, rows: int) -> bool:
    """One forward over a chain longer than a chunk gives the same logits as feeding its tokens one at a time."""
    gen = torch.Generator().manual_seed(1)
    prefix, n = 7, rows + 3
    tokens = torch.randint(0, model.args.vocab_size, (prefix + n,), generator=gen).tolist()
    caches = [model.new_cache(1, prefix + n + 1) for _ in range(2)]
    for cache in caches:
        _feed(model, cache, tokens[:prefix])
    together = _feed(model, caches[0], tokens[prefix:])
    alone = torch.cat([_feed(model, caches[1], [tok]) for tok in tokens[prefix:]], dim=1)
    return torch.equal(together, alone)


def _feed(model: Transformer, cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """Logits of a chain appended to row 0 (then committed)."""
    step = build_step(cache, [Block.chain(0, tokens)], cache.k.device)
    logits = model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask)
    cache.lengths[0] += len(tokens)
    return logits
