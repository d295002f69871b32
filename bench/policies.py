"""Speculation policies side by side: adaptive vs every fixed depth vs heuristic vs plain decoding (issue 5).

The real Triton and draft service run as processes on loopback (harness.stack); each policy drives the
orchestrator's own SpeculationLoop in this process, with its own learnt state, so the adaptive policy learns
only from its own rounds (in the orchestrator every policy would teach it). Policies take turns every
`concurrency` users (the order rotates) and every request's list is checked against plain decoding's.
The first pass over the users is a warm-up for every policy (for adaptive, part of its learning) and is
not reported. The criterion: adaptive's mean latency at most 5% above the best fixed policy chosen in
hindsight, and below plain decoding.

    python -m bench.policies --profile small --users 30 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.speedup import RESULTS, git_rev, histories, machine
from harness.stack import LocalStack, StackConfig
from orchestrator.catalog import Catalog
from orchestrator.config import OrchestratorConfig
from orchestrator.loop import LoopOptions, SpeculationLoop
from orchestrator.server import build_backends
from specrec.pipeline import prepare
from specrec.speculation.policy import Budget, Policy, RequestState, RoundStats, SharedStats, make_policy
from specrec.telemetry import OrchestratorMetrics

POLICIES = "off,adaptive,heuristic,fixed:1:1,fixed:2:8,fixed:3:16,fixed:4:16,fixed:6:32,fixed:8:32"
TOLERANCE = 0.05  # issue 5: adaptive at most 5% above the best fixed depth


class RecordingPolicy:
    """A policy that also keeps every round's budget, acceptance and timings, for the report."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.name = policy.name
        self.rounds: list[RoundStats] = []
        self.recording = False

    def new_request(self, next_slot: int = 0) -> RequestState:
        return self.policy.new_request(next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int):
        return self.policy.choose(req, next_slot, in_flight)

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        if self.recording:
            self.rounds.append(stats)
        self.policy.observe(req, stats)


async def run_pass(loop: SpeculationLoop, catalog: Catalog, policy: RecordingPolicy, users, n_items: int,
                   concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)

    async def one(user: int, history: list[str]) -> dict:
        items: list[int] = []

        async def emit(tokens: list[int], logprobs: list[float]) -> None:
            items.extend(tokens)

        async with gate:
            t0 = time.perf_counter()
            stats = await loop.run(catalog.prompt(history, 50).prompt, LoopOptions(n_items=n_items), policy, emit)
            return {"user": user, "ms": (time.perf_counter() - t0) * 1000, "tokens": items, "rounds": stats.rounds,
                    "tau": stats.tau, "draft_ms": stats.draft_s * 1000, "verify_ms": stats.verify_s * 1000}

    return list(await asyncio.gather(*(one(u, h) for u, h in users)))


async def measure(stack: LocalStack, args, users) -> dict[str, list[dict]]:
    catalog = Catalog(stack.config.artifacts)
    config = OrchestratorConfig(artifacts=str(stack.config.artifacts), target_addr=stack.target_addr,
                                draft_addr=stack.draft_addr, routing="static", draft_timeout_ms=args.draft_timeout_ms,
                                verify_timeout_s=30.0)
    backends = build_backends(config, OrchestratorMetrics())
    await backends.start()
    loop = SpeculationLoop(catalog, backends, config.verify_timeout_s)
    specs = args.policies.split(",")
    policies = {s: RecordingPolicy(make_policy(s, shared=SharedStats())) for s in specs}
    records: dict[str, list[dict]] = {s: [] for s in specs}
    try:
        for rep in range(args.repeats + 1):  # pass 0: warm-up
            for p in policies.values():
                p.recording = rep > 0
            # Policies take turns every `concurrency` users (the order rotating), so a burst of load on a
            # shared machine lands on all of them, not on whichever policy's pass it happened to hit.
            for i, start in enumerate(range(0, len(users), args.concurrency)):
                chunk = users[start:start + args.concurrency]
                turn = (rep + i) % len(specs)
                for spec in specs[turn:] + specs[:turn]:
                    out = await run_pass(loop, catalog, policies[spec], chunk, args.items, args.concurrency)
                    if rep > 0:
                        records[spec] += [dict(r, rep=rep) for r in out]
            print(f"repeat {rep}/{args.repeats} done", file=sys.stderr)
    finally:
        await backends.close()
    return {"records": records, "arms": {s: arm_counts(p.rounds) for s, p in policies.items()}}


def arm_counts(rounds: list[RoundStats]) -> list[tuple[str, int]]:
    def shape(b: Budget) -> str:
        return f"{b.depth}:{b.max_nodes}" + (f":{b.min_path_prob:.2g}" if b.min_path_prob else "")

    counts = Counter(shape(r.budget) for r in rounds)
    return counts.most_common(6)


def summarize(records: dict[str, list[dict]]) -> dict:
    base = {(r["rep"], r["user"]): r for r in records["off"]} if "off" in records else {}
    rows = {}
    for spec, recs in records.items():
        ms = [r["ms"] for r in recs]
        pairs = [base[r["rep"], r["user"]]["ms"] / r["ms"] for r in recs if (r["rep"], r["user"]) in base]
        rows[spec] = {"n": len(recs), "mean_ms": statistics.fmean(ms), "p50_ms": float(np.percentile(ms, 50)),
                      "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
                      "speedup_vs_off": statistics.median(pairs) if pairs else float("nan"),
                      "rounds": statistics.fmean(r["rounds"] for r in recs),
                      "tau": statistics.fmean(r["tau"] for r in recs),
                      "draft_ms": statistics.fmean(r["draft_ms"] for r in recs),
                      "verify_ms": statistics.fmean(r["verify_ms"] for r in recs),
                      "mismatches": sum(r["tokens"] != base[r["rep"], r["user"]]["tokens"] for r in recs
                                        if (r["rep"], r["user"]) in base)}
    return rows


def criterion(rows: dict, records: dict[str, list[dict]]) -> dict:
    fixed = {s: r["mean_ms"] for s, r in rows.items() if s.startswith("fixed:")}
    best = min(fixed, key=fixed.__getitem__)
    ratio = rows["adaptive"]["mean_ms"] / fixed[best]
    below_plain = rows["adaptive"]["mean_ms"] < rows["off"]["mean_ms"]
    best_ms = {(r["rep"], r["user"]): r["ms"] for r in records[best]}
    pairwise = statistics.median(r["ms"] / best_ms[r["rep"], r["user"]] for r in records["adaptive"])
    return {"best_fixed": best, "best_fixed_mean_ms": fixed[best], "adaptive_mean_ms": rows["adaptive"]["mean_ms"],
            "off_mean_ms": rows["off"]["mean_ms"], "adaptive_over_best_fixed": ratio,
            "adaptive_over_best_fixed_pairwise_median": pairwise, "below_plain": below_plain,
            "met": ratio <= 1 + TOLERANCE and below_plain}


def report(res: dict) -> str:
    m, c = res["machine"], res["criterion"]
    lines = [f"# Speculation policies — {res['date']}", "",
             f"- command: `{res['command']}`; code `{res['git']}`",
             f"- machine: {m['cpu_model']}, {m['nproc']} cores, load average at start {m['loadavg_start']}",
             f"- profile **{res['profile']}**, drafter {res['drafter']}, {res['users']} users x {res['repeats']} "
             f"repeats (after one warm-up pass), {res['items']} items per list, concurrency {res['concurrency']}; "
             f"wall time {res['wall_s']:.0f} s",
             "- each policy runs the orchestrator's SpeculationLoop in the bench process with its own learnt state, "
             "against the real Triton and draft service on loopback", "",
             "| policy | mean ms | p50 | p90 | p99 | speedup vs off (pairwise median) | tau | rounds | draft ms "
             "| verify ms | lists != plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for spec, r in res["rows"].items():
        lines.append(f"| {spec} | {r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} "
                     f"| {r['speedup_vs_off']:.2f}x | {r['tau']:.2f} | {r['rounds']:.1f} | {r['draft_ms']:.1f} "
                     f"| {r['verify_ms']:.1f} | {r['mismatches']} |")
    lines += ["", f"**Criterion** (adaptive mean <= {1 + TOLERANCE:.2f} x best fixed in hindsight, and below plain): "
              f"adaptive {c['adaptive_mean_ms']:.1f} ms, best fixed {c['best_fixed']} {c['best_fixed_mean_ms']:.1f} ms "
              f"(ratio {c['adaptive_over_best_fixed']:.3f}; median of per-request ratios "
              f"{c['adaptive_over_best_fixed_pairwise_median']:.3f}), plain {c['off_mean_ms']:.1f} ms: "
              f"**{'met' if c['met'] else 'MISSED'}**.", "",
              "Adaptive's most chosen budgets (depth:nodes[:min path prob], rounds): "
              + ", ".join(f"{a} x{n}" for a, n in res["arms"]["adaptive"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="small")
    p.add_argument("--drafter", default="model", help="model | retrieval | hybrid")
    p.add_argument("--users", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--policies", default=POLICIES, help="comma-separated; must include off and adaptive")
    p.add_argument("--draft-timeout-ms", type=float, default=200.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if not {"off", "adaptive"} <= set(a.policies.split(",")) or "fixed:" not in a.policies:
        p.error("--policies must include off, adaptive and at least one fixed:DEPTH:NODES")
    arts = prepare("ml-100k", a.profile, progress=True)
    users = histories(arts, a.users)
    mach, t0 = machine(), time.perf_counter()
    with LocalStack(StackConfig(artifacts=arts.directory, drafter=a.drafter, policy="off")) as stack:
        res = asyncio.run(measure(stack, a, users))
    rows = summarize(res["records"])
    date = dt.date.today().isoformat()
    args = " ".join(sys.argv[1:] if argv is None else argv)
    out = {"date": date, "command": f"python -m bench.policies {args}".strip(), "git": git_rev(), "machine": mach,
           "profile": a.profile, "drafter": a.drafter, "users": len(users), "repeats": a.repeats, "items": a.items,
           "concurrency": a.concurrency, "wall_s": time.perf_counter() - t0, "rows": rows,
           "criterion": criterion(rows, res["records"]), "arms": res["arms"]}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"policies-{a.profile}-{date}"
    # Per-request records without their token lists (checked above; they would make the file megabytes).
    records = {k: [{f: v for f, v in r.items() if f != "tokens"} for r in rs] for k, rs in res["records"].items()}
    stem.with_suffix(".json").write_text(json.dumps(out | {"records": records}))
    text = report(out)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
