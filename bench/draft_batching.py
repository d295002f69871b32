"""Drafter throughput and latency with many sessions: batched (pooled cache, merged forwards, 64 drafting threads)
against one by one (a cache per session, a forward per session step, 2 drafting threads: the draft service before
batching), side by side in one run, in process (the draft service's code below gRPC).

Every session is a held-out user: it drafts a tree, commits a path of it (the first `accept` nodes of its best path
plus a bonus token, as verification would) and drafts again, `rounds` times; sessions run concurrently at 1, 16
and 64 at a time, both modes alternating per concurrency, in both orders across repeats. A draft's latency runs
from asking (the job queued for a drafting thread, as in the service) to its tree.

    .venv/bin/python bench/draft_batching.py --profile bench --concurrency 1,16,64 --repeats 2

With no trained drafter for the profile, a randomly initialised drafter of the profile's size is timed (the cost of
a forward does not depend on the weights; the budget fixes the tree's shape, no confidence stop): the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specrec.artifacts import Artifacts  # noqa: E402
from specrec.drafting.base import Budget, DraftSession  # noqa: E402
from specrec.drafting.model_drafter import DEFAULT_DIR, ModelDrafter, PadDrafter  # noqa: E402
from specrec.drafting.offline import eval_users  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402
from specrec.training.drafter import TrainSpec, drafter_config, drafter_profile  # noqa: E402

THREADS = {True: 64, False: 2}  # drafting threads per mode: the service's default now, and before batching
UNTRAINED = "RANDOMLY INITIALISED (no trained drafter here; a forward's cost does not depend on the weights)"
BUDGETS = {"chain:16": Budget(16, 16, 1), "tree:8:32": Budget(8, 32, 8)}


def load_model(arts: Artifacts) -> tuple[PadDrafter, bool]:
    directory = arts.directory / DEFAULT_DIR
    if (directory / "config.json").is_file():
        return PadDrafter.from_pretrained(directory), True
    torch.manual_seed(0)
    cfg = drafter_config(arts, drafter_profile(arts.profile.name), TrainSpec())
    return PadDrafter(cfg).eval(), False


def run_session(session: DraftSession, pool: ThreadPoolExecutor, budget: Budget, rounds: int,
                accept: int) -> list[float]:
    """Latencies (s) of one session's drafts; each draft is a job on the drafting pool, as in the service."""
    lat = []
    for _ in range(rounds):
        if session.finished:
            break
        t0 = time.perf_counter()
        tree = pool.submit(session.draft, budget).result()
        lat.append(time.perf_counter() - t0)
        path = tree.best_path()[:accept]
        tokens = tree.path_tokens(path[-1]) if path else []
        state = session.state_after(tokens)
        if state.finished:
            break
        bonus = int(session.constraint.allowed(state)[0])
        pool.submit(session.commit, tokens + [bonus]).result()
    return lat


def measure(model: PadDrafter, arts: Artifacts, prompts: list[list[int]], batched: bool, concurrency: int,
            budget: Budget, rounds: int, accept: int) -> dict:
    drafter = ModelDrafter(model, batched=batched)
    constraint = arts.constraint()
    with ThreadPoolExecutor(THREADS[batched]) as pool, ThreadPoolExecutor(concurrency) as clients:
        sessions = [drafter.open(prompts[i % len(prompts)], constraint) for i in range(concurrency)]
        t0 = time.perf_counter()
        futures = [clients.submit(run_session, s, pool, budget, rounds, accept) for s in sessions]
        lat = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - t0
        for s in sessions:
            s.close()
    c = drafter.batcher.counters
    return {"batched": batched, "concurrency": concurrency, "trees": len(lat), "wall_s": wall,
            "trees_per_s": len(lat) / wall, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "mean_ms": 1e3 * statistics.fmean(lat),
            "forwards": c.forwards, "mean_batch": c.mean_batch}


def report(rows: list[dict], meta: dict) -> str:
    lines = [f"# Drafter batching — {meta['date']}", "", f"- command: `{meta['command']}`",
             f"- profile {meta['profile']}, drafter {'trained' if meta['trained'] else UNTRAINED}"
             f" ({meta['params']} parameters), torch threads {meta['torch_threads']}, {meta['cpu']}",
             f"- {meta['rounds']} drafts per session, commits of {meta['accept']} nodes + bonus; batched = pooled "
             f"cache, merged forwards, {THREADS[True]} drafting threads; one by one = a cache per session, a forward "
             f"per "
             f"step, {THREADS[False]} drafting threads (the service before batching)",
             "- latency = from asking (job queued) to the tree; ratios are batched / one by one in the same repeat", "",
             "| budget | concurrency | repeat | mode | trees/s | p50 ms | p99 ms | mean rows per forward |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['concurrency']} | {r['repeat']} | "
                     f"{'batched' if r['batched'] else 'one by one'} | {r['trees_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['mean_batch']:.2f} |")
    lines += ["", "| budget | concurrency | trees/s batched / one by one (per repeat) | p99 one by one / batched |",
              "|---|---|---|---|"]
    keys = sorted({(r["budget"], r["concurrency"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for b, c in keys:
        pairs = [(x, y) for x in rows for y in rows if x["budget"] == y["budget"] == b
                 and x["concurrency"] == y["concurrency"] == c and x["repeat"] == y["repeat"]
                 and x["batched"] and not y["batched"]]
        tput = " / ".join(f"{x['trees_per_s'] / y['trees_per_s']:.2f}x" for x, y in pairs)
        p99 = " / ".join(f"{y['p99_ms'] / x['p99_ms']:.2f}x" for x, y in pairs)
        lines.append(f"| {b} | {c} | {tput} | {p99} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="bench")
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--budgets", default=",".join(BUDGETS), help=f"of {', '.join(BUDGETS)}")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--accept", type=int, default=4, help="tree nodes each commit accepts (then a bonus)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", default=None, help="report path prefix (default bench/results/draft-batching-<date>)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    arts = prepare(profile=a.profile, train=False)
    model, trained = load_model(arts)
    prompts = [arts.prompt(u) for u in eval_users(arts, a.users)]
    rows = []
    for rep in range(a.repeats):
        for name in a.budgets.split(","):
            for conc in [int(c) for c in a.concurrency.split(",")]:
                modes = [True, False] if (rep + conc) % 2 == 0 else [False, True]
                for batched in modes:
                    r = measure(model, arts, prompts, batched, conc, BUDGETS[name], a.rounds, a.accept)
                    r.update(budget=name, repeat=rep)
                    rows.append(r)
                    print(f"{name} conc {conc} rep {rep} {'batched' if batched else 'one-by-one'}: "
                          f"{r['trees_per_s']:.1f} trees/s, p99 {r['p99_ms']:.1f} ms, {r['mean_batch']:.2f} rows/fwd",
                          flush=True)
    meta = {"date": str(date.today()), "command": " ".join(["bench/draft_batching.py", *(argv or sys.argv[1:])]),
            "profile": a.profile, "trained": trained, "params": model.n_params(), "torch_threads": a.torch_threads,
            "cpu": f"{platform.machine()}, nproc {os.cpu_count()}",
            "rounds": a.rounds, "accept": a.accept}
    out = Path(a.out or Path(__file__).parent / "results" / f"draft-batching-{date.today()}")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(report(rows, meta))
    print(report(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
