"""Verification cost on this machine: latency vs tree size, and batched vs one-by-one verification.

Runs the verifier library in process (the same code Triton's model.py calls) so the numbers isolate
the forward pass from transport.
Usage (repo root): .venv/bin/python -m bench.verify_cost [--profile small] [--repeats 5] [--dtypes float32,bfloat16]
The default compares the serving forward (float32, projections on weights packed once for oneDNN) with F.linear.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from specrec.drafting.random_tree import random_tree
from specrec.models.packed import dense_projections
from specrec.pipeline import prepare
from specrec.verify import TargetVerifier, VerifyRequest

SIZES = (0, 1, 4, 8, 16, 32, 64)
BATCHES = (1, 4, 8)


def open_sequences(verifier: TargetVerifier, arts, ids: list[int]) -> None:
    verifier.verify_batch([VerifyRequest(s, [], [], context=arts.prompt(s % arts.data.n_users), start=True)
                           for s in ids])


def timed_round(verifier: TargetVerifier, arts, ids: list[int], n_nodes: int, rng, batched: bool) -> float:
    constraint = arts.constraint()
    reqs = []
    for s in ids:
        seq = verifier.sequences[s]
        tokens, parents = random_tree(constraint, seq.state, rng, n_nodes) if n_nodes else ([], [])
        reqs.append(VerifyRequest(s, tokens, parents))
    t0 = time.perf_counter()
    if batched:
        verifier.verify_batch(reqs)
    else:
        for r in reqs:
            verifier.verify_batch([r])
    return (time.perf_counter() - t0) * 1000


def measure(verifier, arts, ids, n_nodes, repeats, batched, rng) -> float:
    times = []
    for _ in range(repeats + 1):  # the first round is warm-up
        open_sequences(verifier, arts, ids)
        times.append(timed_round(verifier, arts, ids, n_nodes, rng, batched))
        for s in ids:
            verifier.end(s)
    return statistics.median(times[1:])


def projections(variant: str) -> contextlib.AbstractContextManager:
    """F.linear throughout for a "-dense" variant, else the serving default (weights packed once where possible)."""
    return dense_projections() if variant.endswith("-dense") else contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,float32-dense",
                        help="target precisions measured side by side, e.g. float32,bfloat16 (bfloat16 runs the "
                        "batch-invariant forward); -dense: projections by F.linear, not on weights packed once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arts = prepare("ml-100k", args.profile, progress=True)
    dtypes = args.dtypes.split(",")
    verifiers = {d: TargetVerifier(arts.directory, max_sequences=16, dtype=d.removesuffix("-dense")) for d in dtypes}
    rng = np.random.default_rng(0)
    report: dict = {"profile": args.profile, "threads": args.threads, "dtypes": dtypes, "tree_size_ms": {},
                    "batching": {}}
    print(f"## Verify latency vs tree size ({args.profile} target, 1 sequence, median of {args.repeats}; "
          "dtypes interleaved per size)")
    print("| nodes | " + " | ".join(f"{d} ms | x {d} step" for d in dtypes) + " |")
    print("|---|" + "---|---|" * len(dtypes))
    base: dict[str, float] = {}
    for n in SIZES:
        row = {}
        for d, v in verifiers.items():
            with projections(d):
                row[d] = measure(v, arts, [1], n, args.repeats, True, rng)
        for d, ms in row.items():
            base.setdefault(d, ms)
        report["tree_size_ms"][n] = row
        print(f"| {n} | " + " | ".join(f"{ms:.2f} | {ms / base[d]:.2f}" for d, ms in row.items()) + " |")
    print("\n## Batched vs one-by-one (16-node trees)")
    print("| dtype | sequences | batched ms | one-by-one ms | batched / one-by-one |\n|---|---|---|---|---|")
    for b in BATCHES:
        ids = list(range(1, b + 1))
        for d, verifier in verifiers.items():
            with projections(d):
                batched = measure(verifier, arts, ids, 16, args.repeats, True, rng)
                single = measure(verifier, arts, ids, 16, args.repeats, False, rng)
            report["batching"].setdefault(d, {})[b] = {"batched_ms": batched, "one_by_one_ms": single}
            print(f"| {d} | {b} | {batched:.2f} | {single:.2f} | {batched / single:.2f} |")
    out = Path(__file__).parent / "results" / f"verify_cost-{args.profile}-{date.today()}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
