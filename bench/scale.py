"""Catalog scale: synthetic catalogs of 10k, 100k and 1M items (users and interactions to match), each offline
stage's seconds and peak RSS, then serving on each catalog — side by side in one report.

    .venv/bin/python bench/scale.py [--catalogs 10000:2000,100000:20000,1000000:200000] [--mean-length 50]
                                    [--requests 24] [--no-serve]

Each catalog runs in a fresh process (so its peak RSS is its own). Offline stages: the synthetic data itself (not
ours to optimise, reported for scale), the sparse user x item matrix, item vectors (randomized SVD past 4M matrix
entries), RQ-KMeans semantic IDs, the item trie. Peak RSS is the process's peak up to the end of that stage.

Serving (another fresh process per catalog): the tiny profile's target and drafter are trained on the catalog (as
`make run` would, cached; `train` reports that time and peak RSS), the local stack starts, and held-out users
(never in drafter training) each get a plain request (policy off: one target step per round, so latency / rounds is
the cost of a round whatever the model learnt) and an adaptive one, in alternating order. round_p50_ms = the median
over plain requests of latency / rounds; request p50 for both; each service's resident memory after the requests.
The tiny profile's width and depth are the same for every catalog; its vocabulary (codes per level) grows with the
catalog, reported as the target's parameters.

Writes bench/results/scale-<date>.md and .json (a row per catalog: items, users, interactions, per stage seconds
and peak_rss_mb, round_p50_ms, serving{...}).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
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


def serve(n_items: int, n_users: int, mean_length: int, n_requests: int) -> dict:
    """Train the tiny models on this catalog (cached), start the stack, time plain and adaptive requests."""
    import grpc

    from bench.load import service_rss
    from bench.speedup import one as recommend_once
    from harness.stack import LocalStack, StackConfig
    from specrec.drafting.offline import eval_users
    from specrec.models.llama import Transformer
    from specrec.pipeline import prepare
    from specrec.training.drafter import train_drafter, trained
    from specrec.v1 import recommend_pb2_grpc

    spec = f"synthetic:users={n_users},items={n_items},mean_length={mean_length}"
    arts = prepare(spec, "tiny", train=False, progress=False)
    train = {"cached": (arts.target_dir / "config.json").is_file() and trained(arts)}
    if not train["cached"]:  # timed from loading the data, as a first `make run` on this catalog would be
        t0 = time.perf_counter()
        arts = prepare(spec, "tiny", progress=False)
        if not trained(arts):
            train_drafter(arts, progress=False)
        train |= {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    n_params = sum(p.numel() for p in Transformer.from_pretrained(arts.target_dir).parameters())
    ids = arts.data.item_ids
    users = [[str(ids[i]) for i in arts.split.train[u][-arts.profile.max_history:]]
             for u in eval_users(arts, n_requests)]
    records: list[dict] = []
    with LocalStack(StackConfig(artifacts=arts.directory, policy="adaptive", drafter="model")) as stack, \
            grpc.insecure_channel(stack.orchestrator_addr) as ch:
        stub = recommend_pb2_grpc.RecommenderServiceStub(ch)
        for history in users[:2]:  # warm-up, excluded
            recommend_once(stub, history, "off", "model", 10, 120.0)
        for k, history in enumerate(users):
            for policy in (("off", "adaptive") if k % 2 == 0 else ("adaptive", "off")):
                records.append({"policy": policy, "user": k,
                                **recommend_once(stub, history, policy, "model", 10, 120.0)})
        rss = service_rss(stack)
    plain = [r for r in records if r["policy"] == "off"]
    adaptive = [r for r in records if r["policy"] == "adaptive"]
    med = statistics.median
    return {"train": train, "target_params": n_params, "vocab": arts.sids.vocab.size,
            "round_p50_ms": round(med(r["latency_ms"] / r["rounds"] for r in plain), 3),
            "serving": {"requests": len(users), "plain_p50_ms": round(med(r["latency_ms"] for r in plain), 2),
                        "adaptive_p50_ms": round(med(r["latency_ms"] for r in adaptive), 2),
                        "adaptive_tau": round(sum(r["committed"] for r in adaptive)
                                              / sum(r["rounds"] for r in adaptive), 2),
                        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
                        "records": [{k: r[k] for k in ("policy", "user", "latency_ms", "rounds", "committed")}
                                    for r in records]}}


def report(rows: list[dict], command: str) -> str:
    lines = [f"# Catalog scale: offline pipeline and serving — {date.today()}", "", f"- command: `{command}`",
             f"- {platform.machine()}, {platform.python_version()}; each catalog in its own process; peak RSS = the "
             "process's peak up to the end of the stage", "",
             "| items | users | interactions | " + " | ".join(f"{s} s (peak MB)" for s in STAGES) + " |",
             "|---|---|---|" + "---|" * len(STAGES)]
    for r in rows:
        cells = [f"{r['stages'][s]['seconds']} ({r['stages'][s]['peak_rss_mb']:.0f})" for s in STAGES]
        lines.append(f"| {r['items']:,} | {r['users']:,} | {r['interactions']:,} | " + " | ".join(cells) + " |")
    served = [r for r in rows if "round_p50_ms" in r]
    if served:
        lines += ["", "Serving, tiny profile (plain = policy off, one target step per round; round p50 = median of "
                  "latency / rounds over plain requests; vs smallest = round p50 / the smallest catalog's; RSS "
                  "after the requests):", "",
                  "| items | train target + drafter s (peak MB) | target params | vocab | round p50 ms | vs smallest | "
                  "plain p50 ms | adaptive p50 ms | adaptive tau | RSS MB: Triton / draft / orchestrator |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        base = min(served, key=lambda r: r["items"])["round_p50_ms"]
        for r in served:
            sv, m = r["serving"], r["serving"]["rss_mb"]
            trained = "cached" if r["train"]["cached"] else \
                f"{r['train']['seconds']} ({r['train']['peak_rss_mb']:.0f})"
            lines.append(f"| {r['items']:,} | {trained} | "
                         f"{r['target_params']:,} | {r['vocab']} | {r['round_p50_ms']:.2f} | "
                         f"{r['round_p50_ms'] / base:.2f}x | {sv['plain_p50_ms']:.1f} | {sv['adaptive_p50_ms']:.1f} | "
                         f"{sv['adaptive_tau']:.2f} | {m['triton']:.0f} / {m['draft']:.0f} / {m['orchestrator']:.0f} |")
    return "\n".join(lines) + "\n"


def _child(args: list[str]) -> dict:
    """Run one catalog's part in a fresh process (its peak RSS its own); its last stdout line is the JSON."""
    proc = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=True)
    print(proc.stdout.rsplit("\n", 2)[0], flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalogs", default="10000:2000,100000:20000,1000000:200000", help="items:users,...")
    p.add_argument("--mean-length", type=int, default=50, help="interactions per user on average")
    p.add_argument("--requests", type=int, default=24, help="held-out users served per catalog (plain + adaptive)")
    p.add_argument("--no-serve", action="store_true", help="offline stages only")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # items:users, run in this process
    p.add_argument("--serve-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.one or a.serve_one:
        items, users = (int(v) for v in (a.one or a.serve_one).split(":"))
        out = one(items, users, a.mean_length) if a.one else serve(items, users, a.mean_length, a.requests)
        print(json.dumps(out))
        return 0
    rows = []
    for spec in a.catalogs.split(","):
        print(f"catalog {spec}", flush=True)
        row = _child(["--one", spec, "--mean-length", str(a.mean_length)])
        if not a.no_serve:
            row.update(_child(["--serve-one", spec, "--mean-length", str(a.mean_length),
                               "--requests", str(a.requests)]))
        rows.append(row)
    command = " ".join(["bench/scale.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(a.out or Path(__file__).parent / "results" / f"scale-{date.today()}")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(report(rows, command))
    print(report(rows, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
