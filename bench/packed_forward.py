"""Token-packed vs padded target forward on mixed batches (a randomly initialised target of the bench profile's size:
the cost of a forward does not depend on the weights), one torch thread, both on the same batch side by side.

    .venv/bin/python bench/packed_forward.py [--repeats 5]

A batch's rows are padded to its largest block; packed, the projections and the MLP run on the real tokens only
(attention stays per row). Batches: 8 plain steps + 8 chains of 17; a 100-token prefill + 15 chains; 16 chains.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specrec.models.llama import KVCache, ModelArgs, Transformer  # noqa: E402
from specrec.models.profiles import target_profile  # noqa: E402
from specrec.models.steps import Block, build_step  # noqa: E402

CHAIN = list(range(5, 22))
BATCHES = {
    "8 plain steps + 8 chains of 17": [Block.chain(r, [5]) for r in range(8)]
    + [Block.chain(8 + r, CHAIN) for r in range(8)],
    "a 100-token prefill + 15 chains of 17": [Block.chain(0, list(range(5, 105)))]
    + [Block.chain(1 + r, CHAIN) for r in range(15)],
    "16 chains of 17 (no padding)": [Block.chain(r, CHAIN) for r in range(16)],
}


def time_forward(model: Transformer, blocks: list[Block], packed: bool, repeats: int) -> float:
    """Mean ms of one forward over the batch, each row holding a 120-token prefix."""
    cache = KVCache(model.args, len(blocks), 400)
    cache.lengths = [120] * len(blocks)
    step = build_step(cache, blocks)
    n_real = step.n_real if packed else None
    with torch.inference_mode():
        model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask, n_real)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(step.tokens, step.positions, cache, step.rows, step.slots, step.mask, n_real)
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", default="bench")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    prof = target_profile(a.profile)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=1100, dim=prof.hidden, n_layers=prof.layers, n_heads=prof.heads,
                                  n_kv_heads=prof.heads, intermediate=prof.intermediate, max_len=512)).eval()
    for name, blocks in BATCHES.items():
        padded = time_forward(model, blocks, False, a.repeats)
        packed = time_forward(model, blocks, True, a.repeats)
        print(f"{name}: padded {padded:.1f} ms, packed {packed:.1f} ms, {padded / packed:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
