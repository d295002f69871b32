"""The offline pipeline at catalog scale: synthetic catalogs of 10k, 100k and 1M items (users and interactions to
match), each stage's seconds and peak RSS, side by side in one report.

    .venv/bin/python bench/scale.py [--catalogs 10000:2000,100000:20000,1000000:200000] [--mean-length 50]

Each catalog runs in a fresh process (so its peak RSS is its own). Stages: the synthetic data itself (not ours to
optimise, reported for scale), the sparse user x item matrix, item vectors (randomized SVD past 4M matrix entries),
RQ-KMeans semantic IDs, the item trie. Peak RSS is the process's peak up to the end of that stage. Writes
bench/results/scale-<date>.md and .json (a row per catalog: items, users, interactions, per stage seconds and
peak_rss_mb). Serving at these sizes (round p50) needs a target trained on each catalog: not measured here yet.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ["synthetic_data", "sparse_matrix", "item_vectors", "semantic_ids", "trie"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n_items: int, n_users: int, mean_length: int) -> dict:
    import numpy as np

    from specrec.data.dataset import sparse_interactions
    from specrec.data.synthetic import synthetic
    from specrec.semantic_ids.codebook import build_semantic_ids, item_vectors
    from specrec.semantic_ids.trie import ItemTrie

    stages: dict[str, dict] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = fn()
        stages[name] = {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)}
        print(f"  {name}: {stages[name]['seconds']} s, peak {stages[name]['peak_rss_mb']} MB", flush=True)
        return out

    data = timed("synthetic_data", lambda: synthetic(n_users=n_users, n_items=n_items, mean_length=mean_length))
    x = timed("sparse_matrix", lambda: sparse_interactions(data.sequences, data.n_items))
    vectors = timed("item_vectors", lambda: item_vectors(data.genres, data.years, x))
    popularity = np.asarray(x.sum(axis=0)).ravel()
    sids = timed("semantic_ids", lambda: build_semantic_ids(vectors, popularity, data.item_ids, data.titles))
    timed("trie", lambda: ItemTrie(sids))
    return {"items": n_items, "users": n_users, "interactions": int(x.nnz), "stages": stages}


def report(rows: list[dict], command: str) -> str:
    lines = [f"# Offline pipeline at scale — {date.today()}", "", f"- command: `{command}`",
             f"- {platform.machine()}, {platform.python_version()}; each catalog in its own process; peak RSS = the "
             "process's peak up to the end of the stage", "",
             "| items | users | interactions | " + " | ".join(f"{s} s (peak MB)" for s in STAGES) + " |",
             "|---|---|---|" + "---|" * len(STAGES)]
    for r in rows:
        cells = [f"{r['stages'][s]['seconds']} ({r['stages'][s]['peak_rss_mb']:.0f})" for s in STAGES]
        lines.append(f"| {r['items']:,} | {r['users']:,} | {r['interactions']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalogs", default="10000:2000,100000:20000,1000000:200000", help="items:users,...")
    p.add_argument("--mean-length", type=int, default=50, help="interactions per user on average")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # items:users, run in this process
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.one:
        items, users = (int(v) for v in a.one.split(":"))
        print(json.dumps(one(items, users, a.mean_length)))
        return 0
    rows = []
    for spec in a.catalogs.split(","):
        print(f"catalog {spec}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", spec, "--mean-length", str(a.mean_length)],
                              capture_output=True, text=True, check=True)
        print(proc.stdout.rsplit("\n", 2)[0], flush=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    command = " ".join(["bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(a.out or Path(__file__).parent / "results" / f"scale-{date.today()}")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(report(rows, command))
    print(report(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
