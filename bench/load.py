"""Load and soak of the orchestrator on loopback: latency per concurrency, errors by status, memory over time.

Closed-loop async clients (grpc.aio) send Recommend requests for a fixed set of users at each concurrency,
bounded by a request count and a time budget per level; every list is checked against plain greedy decoding
in process. Below the orchestrator's in-flight cap no request may fail; above it, refusals must be
RESOURCE_EXHAUSTED with a retry hint (clients wait the hint). `--soak N` then sends N more requests and
samples the resident memory of all three services (Triton = tritonserver + its Python stubs) before and after.

    python bench/load.py --quick                      # start a tiny stack, levels 1,4,16 + above a cap of 16
    python bench/load.py --soak 2000                  # levels 1,4,16,64 + 128 (cap 64), then a 2000-request soak
    python bench/load.py --addr 127.0.0.1:50051       # against a running orchestrator (no soak: no pids)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.loadgen import Tally, closed_loop, recommend_request  # noqa: E402
from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.artifacts import Artifacts  # noqa: E402
from specrec.decoding.plain import decode  # noqa: E402
from specrec.models.llama import Transformer  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TIMEOUT_S = 120.0


def workload(arts: Artifacts, n_users: int) -> tuple[list, dict[int, list[str]]]:
    """Requests for the first n users and their reference lists (plain greedy, in process)."""
    users = list(range(n_users))
    model = Transformer.from_pretrained(arts.target_dir)
    decoded = decode(model, arts.constraint(), [arts.prompt(u) for u in users])
    reference = {u: [arts.data.item_ids[i] for i in d.items] for u, d in zip(users, decoded, strict=True)}
    ids = arts.data.item_ids
    requests = [(u, recommend_request([ids[i] for i in arts.split.train[u][-arts.profile.max_history:]]))
                for u in users]
    return requests, reference


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def level(addr: str, requests, reference, concurrency: int, count: int, max_seconds: float) -> dict:
    t0 = time.perf_counter()
    outcomes = asyncio.run(closed_loop(addr, requests, concurrency, count, max_seconds, TIMEOUT_S))
    wall = time.perf_counter() - t0
    tally = Tally.of(outcomes, reference)
    ok = [o.latency_s * 1e3 for o in outcomes if o.code == "OK"]
    refused = [o for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    return {"concurrency": concurrency, "sent": tally.sent, "completed": tally.completed, "wrong": tally.wrong,
            "hung": tally.hung, "unclear": tally.unclear, "lost": tally.lost, "codes": dict(tally.codes),
            "refused_with_hint": sum(1 for o in refused if o.retry_after_ms),
            "p50_ms": percentile(ok, 0.50), "p99_ms": percentile(ok, 0.99),
            "mean_ms": statistics.fmean(ok) if ok else float("nan"), "req_per_s": len(ok) / wall, "wall_s": wall}


def service_rss(stack: LocalStack) -> dict[str, float]:
    """Resident memory (MB) per service; Triton = tritonserver + its Python backend stubs (not the launcher)."""
    def rss(procs) -> float:
        return sum(p.memory_info().rss for p in procs) / 2**20

    out = {}
    for name in ("orchestrator", "draft"):
        if name in stack.procs:
            out[name] = rss([psutil.Process(stack.procs[name].proc.pid)])
    launcher = psutil.Process(stack.procs["target"].proc.pid)
    out["triton"] = rss([p for p in launcher.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE])
    return out


def soak(stack: LocalStack, requests, reference, n: int, concurrency: int, max_seconds: float) -> dict:
    level(stack.orchestrator_addr, requests, reference, concurrency, min(100, n), max_seconds)  # warm-up
    before = service_rss(stack)
    result = level(stack.orchestrator_addr, requests, reference, concurrency, n, max_seconds)
    after = service_rss(stack)
    result["rss_mb"] = {k: {"before": before[k], "after": after[k], "growth_pct": 100 * (after[k] / before[k] - 1)}
                        for k in before}
    return result


def markdown(report: dict) -> str:
    lines = [f"# Load and soak, {report['date']}", "", f"Command: `{report['command']}`", "",
             f"Stack: {report['stack']}", "",
             "| concurrency | sent | completed | errors by status | lost | p50 ms | p99 ms | req/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["levels"]:
        errors = ", ".join(f"{k} {v}" for k, v in r["codes"].items() if k != "OK") or "none"
        lines.append(f"| {r['concurrency']}{' (above cap)' if r.get('above_cap') else ''} | {r['sent']} | "
                     f"{r['completed']} | {errors} | {r['lost']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['req_per_s']:.1f} |")
    if report.get("soak"):
        s = report["soak"]
        lines += ["", f"Soak: {s['sent']} requests at concurrency {s['concurrency']} in {s['wall_s']:.0f} s, "
                      f"completed {s['completed']}, lost {s['lost']}, p99 {s['p99_ms']:.0f} ms.", "",
                  "| service | RSS before MB | RSS after MB | growth |", "|---|---|---|---|"]
        for name, m in s["rss_mb"].items():
            lines.append(f"| {name} | {m['before']:.0f} | {m['after']:.0f} | {m['growth_pct']:+.1f}% |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", help="a running orchestrator; default: start a local stack")
    p.add_argument("--profile", default="tiny")
    p.add_argument("--policy", default="adaptive")
    p.add_argument("--drafter", default="model")
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16,64", help="levels below or at the cap")
    p.add_argument("--max-in-flight", type=int, default=64, help="the started orchestrator's cap")
    p.add_argument("--requests", type=int, default=0, help="per level; default max(3 x concurrency, 24)")
    p.add_argument("--level-seconds", type=float, default=60.0, help="time budget per level")
    p.add_argument("--soak", type=int, default=0, help="requests in the soak (0 = no soak)")
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--soak-seconds", type=float, default=300.0)
    p.add_argument("--quick", action="store_true", help="levels 1,4,16, cap 16, 24 users; soak at most 300")
    p.add_argument("--out", type=Path, help="JSON report path; default bench/results/load-<date>[-quick].json")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_in_flight, args.users = "1,4,16", 16, 24
        args.soak = min(args.soak, 300)
    return args


def run(args: argparse.Namespace, command: str) -> dict:
    os.environ.setdefault("SPECREC_HOME", str(Path.home() / ".cache" / "specrec"))
    arts = prepare("ml-100k", args.profile, progress=False)
    requests, reference = workload(arts, args.users)
    levels = [int(c) for c in args.concurrency.split(",")]
    above = 2 * args.max_in_flight
    report = {"date": dt.date.today().isoformat(), "command": command, "levels": []}
    stack = None
    if args.addr is None:
        config = StackConfig(artifacts=arts.directory, policy=args.policy, drafter=args.drafter,
                             extra_env={"SPECREC_MAX_IN_FLIGHT": str(args.max_in_flight)})
        stack = LocalStack(config).start()
    addr = args.addr or stack.orchestrator_addr
    where = f"running at {args.addr}" if args.addr else "local"
    report["stack"] = (f"{where}, profile {args.profile}, policy {args.policy}, drafter {args.drafter}, "
                       f"in-flight cap {args.max_in_flight}, {len(requests)} users")
    try:
        for c in [*levels, above]:
            count = args.requests or max(3 * c, 24)
            r = level(addr, requests, reference, c, count, args.level_seconds)
            r["above_cap"] = c > args.max_in_flight
            print(f"concurrency {c}: {r['completed']}/{r['sent']} ok, codes {r['codes']}, p50 {r['p50_ms']:.0f} ms,"
                  f" p99 {r['p99_ms']:.0f} ms", flush=True)
            report["levels"].append(r)
        if args.soak and stack is not None:
            report["soak"] = soak(stack, requests, reference, args.soak, args.soak_concurrency, args.soak_seconds)
            report["soak"]["concurrency"] = args.soak_concurrency
            print(f"soak: {report['soak']['completed']}/{report['soak']['sent']} ok, RSS {report['soak']['rss_mb']}",
                  flush=True)
    finally:
        if stack is not None:
            stack.stop()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args, command)
    out = args.out or RESULTS / f"load-{report['date']}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    below = [r for r in report["levels"] if not r["above_cap"]]
    failed = any(r["completed"] != r["sent"] for r in below) or any(r["lost"] for r in report["levels"])
    return 1 if failed or (report.get("soak") or {}).get("lost") else 0


if __name__ == "__main__":
    sys.exit(main())
