"""Quality of top-K retrieval: Recall@K and NDCG@K of beam search (width K) against greedy list generation and
popularity, on each user's held-out last items (ML-100k). In process: the library's verifier in beam mode and
plain greedy decoding of the same target.

    python -m bench.beam_quality --profile bench --users 0
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from bench.speedup import RESULTS, git_rev
from specrec.evaluation import beam_lists, eval_users, popularity_lists, recall_ndcg, target_lists
from specrec.pipeline import prepare
from specrec.verify import TargetVerifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="bench")
    p.add_argument("--users", type=int, default=0, help="users with held-out items to evaluate (0 = all)")
    p.add_argument("--ks", default="10,50")
    p.add_argument("--out", type=str, default=str(RESULTS))
    a = p.parse_args()
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    verifier = TargetVerifier(arts.directory, max_sequences=4)
    users = eval_users(arts, a.users or None)
    truths = [arts.split.test[u] for u in users]
    rows = []
    for k in (int(x) for x in a.ks.split(",")):
        t0 = time.perf_counter()
        lists = {"popularity": popularity_lists(arts, users, k),
                 f"greedy list of {k}": target_lists(arts, verifier.model, users, k),
                 f"beam search, width {k}": beam_lists(arts, verifier, users, k)}
        for name, recs in lists.items():
            q = recall_ndcg(recs, truths, k)
            rows.append({"k": k, "method": name, "recall": q.recall, "ndcg": q.ndcg, "users": q.users})
        print(f"[beam_quality] k={k} done in {time.perf_counter() - t0:.0f} s", flush=True)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = [f"# Top-K retrieval quality, ML-100k, profile {a.profile}, {date}", "",
             f"`python -m bench.beam_quality --profile {a.profile} --users {a.users}` at {git_rev()}; "
             f"{rows[0]['users']} users, each user's last 10 items held out.", "",
             "| K | method | Recall@K | NDCG@K |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['method']} | {r['recall']:.4f} | {r['ndcg']:.4f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    stem = f"{a.out}/beam-quality-{a.profile}-{date}"
    with open(stem + ".json", "w") as f:
        json.dump({"date": date, "git": git_rev(), "args": vars(a), "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
