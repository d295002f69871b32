"""Tau per item slot for each drafter, by offline replay on the bench's users (no servers).

The stack's responses carry one tau per request; which item slot a round started in is only known inside the
loop. So this replays the speculation loop offline (`specrec.drafting.offline`): the target's greedy list per
user, the drafter's tree at every position, rounds grouped by the slot of their first unforced token
(L0..L2 = code levels, L3 = the collision code, end = only forced tokens left).

    python bench/slot_tau.py --profile tiny --users 12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specrec.artifacts import Artifacts  # noqa: E402
from specrec.drafting.base import load_drafter  # noqa: E402
from specrec.drafting.offline import EvalConfig, evaluate, target_truths  # noqa: E402
from specrec.models.llama import Transformer  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

COLUMNS = EvalConfig(chain_depths=(4,), tree_sizes=(16,), tree_depth=8, top_k=8)


def run(arts: Artifacts, users: list[int], drafters: list[str], cfg: EvalConfig = COLUMNS) -> dict:
    """{drafter: {column: {"tau": x, "slots": {slot: tau}}}} over these users."""
    import torch

    torch.set_num_threads(1)
    truths = target_truths(arts, Transformer.from_pretrained(arts.target_dir), users)
    constraint = arts.constraint()
    out: dict = {"columns": cfg.columns, "users": len(users), "drafters": {}}
    for name in drafters:
        rep = evaluate(load_drafter(name, arts.directory), truths, constraint, cfg, name=name)
        slots = sorted({s for s, _ in rep.slot_rounds})
        out["drafters"][name] = {
            col: {"tau": rep.tau(col), "tau_open": rep.tau_open(col),
                  "slots": {s: rep.tau_slot(s, col) for s in slots if rep.tau_slot(s, col) is not None},
                  "rounds": {s: rep.slot_rounds[(s, col)] for s in slots}}
            for col in cfg.columns}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--users", type=int, default=12)
    p.add_argument("--drafters", default="model,retrieval,hybrid")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    from bench.speedup import histories  # the same users as the stack bench
    arts = prepare(a.dataset, a.profile, train=False, progress=False)
    res = run(arts, [u for u, _ in histories(arts, a.users)], a.drafters.split(","))
    for name, cols in res["drafters"].items():
        for col, v in cols.items():
            slots = "  ".join(f"{s} {t:.2f}" for s, t in v["slots"].items())
            print(f"{name:10s} {col:8s} tau {v['tau']:.2f}  {slots}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
