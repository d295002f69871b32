"""How many guesses draft-ahead needs: the rank of each round's real commit among the outcomes a chain can have.

A chain's verification ends in one of its outcomes: the first k nodes accepted, then a bonus token b that is not
node k+1 (any b after the last node). Ranked by the drafter's own probability of that outcome (path log q + log
q(b)), this prints how often the real commit is among the top G, i.e. the ready rate G trees drafted ahead could
reach if they were all ready in time. In process (our drafter and verifier, no servers), held-out users.

    .venv/bin/python bench/ahead_coverage.py --profile bench --depth 15 --users 12
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specrec.drafting.base import Budget, load_drafter  # noqa: E402
from specrec.drafting.offline import eval_users  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402
from specrec.verify.engine import TargetVerifier, VerifyRequest  # noqa: E402
from specrec.verify.rules import AcceptParams  # noqa: E402

BONUS_CANDIDATES = 4  # bonus tokens considered per accepted-prefix length
UNRANKED = 99


def ranked_outcomes(session, full, tree, constraint) -> list[list[int]]:
    """The chain's possible commits (accepted prefix + bonus), likeliest first by the drafter's q."""
    cands: list[tuple[float, list[int]]] = []
    scores, chain = tree.scores(), list(tree.tokens)
    for k in range(len(chain) + 1):
        path, base = chain[:k], 0.0 if k == 0 else scores[k - 1]
        state = session.state_after(path)
        if state.finished:
            continue
        forced = constraint.forced(state)
        if forced is not None:
            if k == len(chain) or chain[k] != forced:
                cands.append((base, path + [forced]))
            continue
        out = session.root_logprobs if k == 0 else session.outputs.get(tuple(path))
        if out is None:  # the leaf: its output is the extra node drafted one level deeper
            if k == len(chain) and len(full) > len(tree):
                cands.append((base + full.logprobs[k], path + [full.tokens[k]]))
            continue
        allowed = constraint.allowed(state)
        logq = out[torch.as_tensor(allowed)]
        for j in torch.argsort(logq, descending=True)[:BONUS_CANDIDATES].tolist():
            if k == len(chain) or int(allowed[j]) != chain[k]:
                cands.append((base + float(logq[j]), path + [int(allowed[j])]))
    return [c for _, c in sorted(cands, key=lambda c: -c[0])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--depth", type=int, default=15, help="chain depth (at most 15: one more level is drafted)")
    p.add_argument("--users", type=int, default=12)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    arts = prepare(a.dataset, a.profile, train=False)
    drafter, target = load_drafter("model", arts.directory), TargetVerifier(arts.directory, max_sequences=4)
    constraint = arts.constraint()
    ranks: collections.Counter[int] = collections.Counter()
    for seq, user in enumerate(eval_users(arts, a.users), start=1):
        committed = arts.prompt(user)
        session, start = drafter.open(committed, constraint), True
        while not session.finished:
            full = session.draft(Budget.chain(a.depth + 1))
            tree = full.prefix(min(a.depth, len(full)))
            req = VerifyRequest(seq, list(tree.tokens), list(tree.parents), context=committed if start else None,
                                start=start, params=AcceptParams(), n_items=constraint.n_items,
                                exclude_history=constraint.exclude_history)
            commit = target.verify_batch([req])[0].accepted_tokens
            outcomes = ranked_outcomes(session, full, tree, constraint)
            ranks[outcomes.index(commit) if commit in outcomes else UNRANKED] += 1
            session.commit(commit)
            start = False
        target.end(seq)
    n = sum(ranks.values())
    print(f"{n} rounds of chain:{a.depth}, {a.users} held-out users ({a.profile} profile)")
    for g in (1, 2, 4, 8, 16):
        print(f"  commit among the top {g:2d} outcomes: {sum(v for r, v in ranks.items() if r < g) / n:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
