"""Where beam search's time goes, in process (the library's verifier and model drafter, no servers): per target
forward, plain vs speculative, for held-out users; the first forward is the prompt's prefill (with the drafted
tree when speculative).

    python -m bench.beam_rounds --profile bench --users 24
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specrec.decoding.beam import BeamStats
from specrec.drafting.base import load_drafter
from specrec.drafting.offline import eval_users
from specrec.pipeline import prepare
from specrec.semantic_ids.constraint import ListConstraint
from specrec.speculation.local import retrieve
from specrec.verify import TargetVerifier


def line(name: str, runs: list[BeamStats]) -> str:
    n = max(len(s.round_s) for s in runs)
    per = [statistics.fmean(s.round_s[i] * 1e3 for s in runs if len(s.round_s) > i) for i in range(n)]
    reached = [sum(len(s.round_s) > i for s in runs) for i in range(n)]
    rounds = ", ".join(f"#{i + 1} {ms:.1f} ms ({c} req)" for i, (ms, c) in enumerate(zip(per, reached, strict=True)))
    return (f"  {name:>11}: {statistics.fmean(s.total_s * 1e3 for s in runs):6.1f} ms, drafting "
            f"{statistics.fmean(s.draft_s * 1e3 for s in runs):4.1f} ms, "
            f"{statistics.fmean(s.rounds for s in runs):.2f} forwards, "
            f"{statistics.fmean(s.tree_nodes for s in runs):.0f} nodes; forwards: {rounds}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="bench")
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--widths", default="10,50")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the stack's target uses 1)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    drafter = load_drafter("model", arts.directory)
    target = TargetVerifier(arts.directory, max_sequences=4)
    users = eval_users(arts, a.users)
    print(f"{len(users)} held-out users, prompts of {statistics.fmean(len(arts.prompt(u)) for u in users):.0f} "
          f"tokens on average ({a.profile} profile)")
    for width in (int(w) for w in a.widths.split(",")):
        constraint = ListConstraint(target.trie, width)
        plain = [retrieve(arts.prompt(u), constraint, width, target).stats for u in users]
        spec = [retrieve(arts.prompt(u), constraint, width, target, drafter=drafter).stats for u in users]
        print(f"width = k = {width}\n{line('plain', plain)}\n{line('speculative', spec)}")


if __name__ == "__main__":
    main()
