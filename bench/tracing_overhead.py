"""End-to-end latency with tracing at 100% sampling vs tracing off, two identical stacks side by side.

Both stacks run the same models, policy and users. The traced one exports every span of all three services
(orchestrator and drafter by OTLP/gRPC, Triton by OTLP/HTTP) to a local OTLP receiver; the other has no
endpoint configured, i.e. the no-op tracer. The receiver runs in a process of its own (in production the
collector is another machine; in the measuring process its work held the client's GIL). Requests alternate
between the stacks user by user (the order flips every repeat), so drift of a shared machine hits both alike; the
overhead is the median of per-pair latency ratios (same user, same repeat), reported beside the mean-latency
ratio and per repeat. Goal: < 3% at 100% sampling, < 1% at 10% or less.

A pair of stacks carries a bias of its own (measured: -0.9% to +2.1% between runs of the same 10% setting, each
run's interval far narrower), so `--runs K` measures K fresh pairs, started traced-first and off-first in turn,
and pools them; the per-run figures show the spread.

    python -m bench.tracing_overhead --profile tiny --users 40 --repeats 3
    python -m bench.tracing_overhead --profile tiny --users 100 --repeats 2 --runs 6 --sampling-ratio 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import psutil

from bench.speedup import RESULTS, git_rev, histories, machine
from harness.otlp_receiver import OtlpReceiver
from harness.stack import LocalStack, StackConfig
from specrec.pipeline import prepare
from specrec.v1 import recommend_pb2, recommend_pb2_grpc

GOAL = 0.03  # tracing at 100% costs under 3% of end-to-end latency
GOAL_SAMPLED = 0.01  # and under 1% at 10% sampling (issue 18)
CONTROL_NOTE = "**CONTROL RUN: tracing off in both stacks** (the difference is the noise floor); "


def traced_env(endpoints: tuple[str, str], target: bool = True, ratio: float = 1.0) -> dict[str, str]:
    """Environment of the traced stack; `endpoints`: the receiver's (OTLP/gRPC, OTLP/HTTP traces URL)."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoints[0], "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    # Triton traces every request that carries a trace context (the orchestrator sends one only for sampled
    # requests) and 1 in SPECREC_TARGET_TRACE_RATE of the others: high, so it traces exactly the sampled ones.
    triton = {"SPECREC_TARGET_TRACE_URL": endpoints[1], "SPECREC_TARGET_TRACE_RATE": "1000000"}
    return env | (triton if target else {})


def _receive(conn) -> None:  # type: ignore[no-untyped-def]
    """The receiver's process: endpoints out, then on request the span count by service and name."""
    with OtlpReceiver() as receiver:
        conn.send((receiver.grpc_endpoint, receiver.http_endpoint))
        conn.recv()  # the measurement is over
        spans = receiver.spans()
        conn.send((len(spans), Counter(f"{s['service_name']}: {s['name']}" for s in spans)))


class ReceiverProcess:
    """An OtlpReceiver in a process of its own."""

    def __enter__(self) -> ReceiverProcess:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receive, args=(child,), daemon=True)
        self.proc.start()
        self.endpoints: tuple[str, str] = self.conn.recv()
        return self

    def cpu_seconds(self) -> float:
        """What receiving has cost so far: it shares the measured machine (a collector would not)."""
        return sum(psutil.Process(self.proc.pid).cpu_times()[:2])

    def span_counts(self, settle_s: float = 6.0) -> tuple[int, Counter]:
        time.sleep(settle_s)  # the services' batch exporters flush every 5 s
        self.conn.send("done")
        return self.conn.recv()

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(5)


def spans_per_request(counts: Counter, requests: int) -> dict[str, float]:
    """Spans per request by service and span name (events on spans not counted)."""
    return {k: n / requests for k, n in counts.most_common()}


def latency_ms(stub, history: list[str], n_items: int, timeout: float) -> tuple[float, list[str], bool]:
    """Latency, the list, and whether the request was sampled (the response names its trace)."""
    t0 = time.perf_counter()
    resp = stub.Recommend(recommend_pb2.RecommendRequest(history=history, num_items=n_items), timeout=timeout)
    return (time.perf_counter() - t0) * 1000, [it.item_id for it in resp.items], bool(resp.trace_id)


def measure(stubs: dict[str, object], users, repeats: int, warmup: int, n_items: int, timeout: float) -> dict:
    """Per-pair latencies {mode: [ms]} in matching order, after `warmup` unrecorded passes per stack."""
    for stub in stubs.values():
        for _, h in users[:warmup]:
            latency_ms(stub, h, n_items, timeout)
    out: dict[str, list[float]] = {name: [] for name in stubs}
    sampled: list[bool] = []  # per pair: the traced stack sampled this request
    mismatches = 0
    for rep in range(repeats):
        order = list(stubs) if rep % 2 == 0 else list(reversed(stubs))
        for i, (_, h) in enumerate(users):
            lists = {}
            for name in (order if i % 2 == 0 else list(reversed(order))):
                ms, lists[name], was_sampled = latency_ms(stubs[name], h, n_items, timeout)
                out[name].append(ms)
                if name == "traced":
                    sampled.append(was_sampled)
            mismatches += len({tuple(v) for v in lists.values()}) - 1
    return {"latency_ms": out, "mismatches": mismatches, "sampled": sampled}


def cpu_seconds(stack: LocalStack) -> dict[str, float]:
    """CPU seconds (user + system) each service has used: where traced requests spend what they cost."""
    def used(procs) -> float:  # type: ignore[no-untyped-def]
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    out = {name: used([psutil.Process(stack.procs[name].proc.pid)]) for name in ("orchestrator", "draft")}
    launcher = psutil.Process(stack.procs["target"].proc.pid)
    out["triton"] = used([p for p in launcher.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE])
    return out


def bootstrap_ci(traced: list[float], off: list[float], block: int = 20, draws: int = 2000,
                 seed: int = 0) -> dict[str, list[float]]:
    """95% intervals (in %) of the pairwise-median and mean-latency overheads, resampling blocks of `block`
    consecutive pairs: neighbouring pairs share the machine's drift, so single pairs would understate the spread."""
    rng = np.random.default_rng(seed)
    t, o = np.asarray(traced), np.asarray(off)
    starts = np.arange(0, len(t) - block + 1, block)
    med, mean = [], []
    for _ in range(draws):
        idx = (rng.choice(starts, len(starts))[:, None] + np.arange(block)).ravel()
        med.append(np.median(t[idx] / o[idx]))
        mean.append(t[idx].mean() / o[idx].mean())
    return {k: [round(100 * (float(np.percentile(v, q)) - 1), 2) for q in (2.5, 97.5)]
            for k, v in (("pairwise_median_pct", med), ("mean_pct", mean))}


def summarize(lat: dict[str, list[float]], goal: float, repeats: int) -> dict:
    ratios = [t / o for t, o in zip(lat["traced"], lat["off"], strict=True)]
    med_ratio = statistics.median(ratios)
    mean_ratio = statistics.fmean(lat["traced"]) / statistics.fmean(lat["off"])
    per = len(ratios) // repeats
    per_repeat = [{"pairwise_median_pct": 100 * (statistics.median(ratios[r * per:(r + 1) * per]) - 1),
                   "mean_pct": 100 * (statistics.fmean(lat["traced"][r * per:(r + 1) * per])
                                      / statistics.fmean(lat["off"][r * per:(r + 1) * per]) - 1)}
                  for r in range(repeats)]
    return {mode: {"mean_ms": statistics.fmean(v), "p50_ms": statistics.median(v)} for mode, v in lat.items()} | {
        "pairwise_median_ratio": med_ratio, "mean_ratio": mean_ratio, "pairs": len(ratios), "goal_pct": 100 * goal,
        "overhead_pct": 100 * (med_ratio - 1), "goal_met": med_ratio - 1 < goal and mean_ratio - 1 < goal,
        "per_repeat": per_repeat, "ci95": bootstrap_ci(lat["traced"], lat["off"])}


def report(res: dict) -> str:
    s, m = res["summary"], res["machine"]
    return "\n".join([
        f"# Tracing overhead — {res['date']}", "",
        f"- command: `{res['command']}`",
        f"- machine: {m['cpu_model']}, {m['nproc']} cores, load average at start {m['loadavg_start']}; "
        f"code `{res['git']}`",
        f"- profile {res['profile']}, policy {res['policy']}, drafter {res['drafter']}, {res['users']} users x "
        f"{res['repeats']} repeats, {res['items']} items per list; warm-up excluded",
        f"- traced stack: {100 * res['sampling_ratio']:g}% sampling (parent-based) in orchestrator and drafter, Triton "
        f"tracing the requests they sample, exported to a local OTLP receiver "
        f"in a process of its own ({res['spans']} spans received)"
        f"{'' if res['target_tracing'] else '; Triton tracing OFF in both'}; "
        f"{CONTROL_NOTE if res['control'] else ''}"
        f"off: no endpoint (no-op tracer)", "",
        "| mode | mean ms | p50 ms |", "|---|---|---|",
        f"| off | {s['off']['mean_ms']:.1f} | {s['off']['p50_ms']:.1f} |",
        f"| traced ({100 * res['sampling_ratio']:g}%) | {s['traced']['mean_ms']:.1f} "
        f"| {s['traced']['p50_ms']:.1f} |", "",
        f"Overhead: **{s['overhead_pct']:+.1f}%** (median of {s['pairs']} pairwise ratios; "
        f"{100 * (s['mean_ratio'] - 1):+.1f}% on mean latency). Goal < {s['goal_pct']:.0f}% on both: "
        f"{'met' if s['goal_met'] else 'MISSED'}. Lists differing between the stacks: {res['mismatches']}.", "",
        "95% intervals (block bootstrap, blocks of 20 consecutive pairs): pairwise median "
        f"{s['ci95']['pairwise_median_pct'][0]:+.1f}% .. {s['ci95']['pairwise_median_pct'][1]:+.1f}%, mean latency "
        f"{s['ci95']['mean_pct'][0]:+.1f}% .. {s['ci95']['mean_pct'][1]:+.1f}%", "",
        *([f"Per run ({res['runs']} fresh stack pairs, " + ", ".join(res["run_order"]) + "; pairwise median / "
           "mean latency): " + "; ".join(f"{r['pairwise_median_pct']:+.1f}% / {r['mean_pct']:+.1f}%"
                                         for r in s["per_run"]), ""] if res.get("runs", 1) > 1 else []),
        "By sampling (pairs; pairwise median / mean latency): " + "; ".join(
            f"{k} ({v['pairs']}) {v['pairwise_median_pct']:+.1f}% / {v['mean_pct']:+.1f}%"
            for k, v in res.get("by_sampling", {}).items()), "",
        "Per repeat (pairwise median / mean latency): " + "; ".join(
            f"{r['pairwise_median_pct']:+.1f}% / {r['mean_pct']:+.1f}%" for r in s["per_repeat"]), "",
        "CPU seconds over the measured requests, traced / off: " + ", ".join(
            f"{k} {res['cpu_seconds']['traced'][k]:.1f} / {res['cpu_seconds']['off'][k]:.1f}"
            for k in res["cpu_seconds"]["off"]) + f"; OTLP receiver {res['cpu_seconds'].get('receiver', 0):.1f}", "",
        "Spans per request: " + ", ".join(f"{k} {v:.1f}" for k, v in res["spans_per_request"].items()), ""])


def run_pair(receiver: ReceiverProcess, base: dict, env: dict[str, str], users, a: argparse.Namespace,
             traced_first: bool) -> dict:
    """One measurement on a fresh pair of stacks: latencies, mismatches and CPU seconds per service."""
    configs = {"traced": StackConfig(**base, extra_env=env), "off": StackConfig(**base)}
    order = ["traced", "off"] if traced_first else ["off", "traced"]
    with contextlib.ExitStack() as started:
        stacks = {name: started.enter_context(LocalStack(configs[name])) for name in order}
        chans = {name: grpc.insecure_channel(stacks[name].orchestrator_addr) for name in ("traced", "off")}
        stubs = {k: recommend_pb2_grpc.RecommenderServiceStub(c) for k, c in chans.items()}
        before = {name: cpu_seconds(stack) for name, stack in stacks.items()}
        receiver_before = receiver.cpu_seconds()
        res = measure(stubs, users, a.repeats, a.warmup, a.items, a.timeout)
        cpu = {name: {k: round(v - before[name][k], 2) for k, v in cpu_seconds(stack).items()}
               for name, stack in stacks.items()}
        cpu["receiver"] = round(receiver.cpu_seconds() - receiver_before, 2)
        for c in chans.values():
            c.close()
    return res | {"cpu": cpu}


def by_sampling(lat: dict[str, list[float]], sampled: list[bool]) -> dict[str, dict[str, float]]:
    """Overhead of the pairs whose traced request was sampled, and of the others: where the cost sits."""
    out = {}
    for name, want in (("sampled", True), ("unsampled", False)):
        idx = [i for i, s in enumerate(sampled) if s == want]
        if idx:
            out[name] = {"pairs": len(idx)} | per_run({m: [lat[m][i] for i in idx] for m in ("traced", "off")})
    return out


def per_run(lat: dict[str, list[float]]) -> dict[str, float]:
    ratios = [t / o for t, o in zip(lat["traced"], lat["off"], strict=True)]
    return {"pairwise_median_pct": 100 * (statistics.median(ratios) - 1),
            "mean_pct": 100 * (statistics.fmean(lat["traced"]) / statistics.fmean(lat["off"]) - 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--users", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--policy", default="fixed:3:16", help="a fixed policy keeps both stacks' rounds identical")
    p.add_argument("--drafter", default="model")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--no-target-tracing", action="store_true",
                   help="trace only orchestrator and drafter (Triton's own tracing off), to split the cost")
    p.add_argument("--sampling-ratio", type=float, default=1.0,
                   help="OTEL_TRACES_SAMPLER_ARG of the traced stack (Triton traces the sampled requests only)")
    p.add_argument("--control", action="store_true",
                   help="A/A run: the 'traced' stack gets no tracing either; shows the noise floor of the comparison")
    p.add_argument("--runs", type=int, default=1,
                   help="fresh stack pairs one after the other, started traced-first and off-first in turn: a pair "
                        "of stacks carries its own bias (which got which core, cache), which repeats cannot average")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    arts = prepare("ml-100k", a.profile, progress=True)
    users = histories(arts, a.users)
    mach = machine()
    with ReceiverProcess() as receiver:
        base = dict(artifacts=arts.directory, drafter=a.drafter, policy=a.policy)
        env = {} if a.control else traced_env(receiver.endpoints, not a.no_target_tracing, a.sampling_ratio)
        runs = [run_pair(receiver, base, env, users, a, traced_first=i % 2 == 0) for i in range(a.runs)]
        n_spans, counts = receiver.span_counts()
    res = {"latency_ms": {m: [x for r in runs for x in r["latency_ms"][m]] for m in ("traced", "off")},
           "mismatches": sum(r["mismatches"] for r in runs), "sampled": [x for r in runs for x in r["sampled"]]}
    cpu = {mode: {k: round(sum(r["cpu"][mode][k] for r in runs), 2) for k in runs[0]["cpu"][mode]}
           for mode in ("traced", "off")} | {"receiver": round(sum(r["cpu"]["receiver"] for r in runs), 2)}
    requests = (len(users) * a.repeats + min(a.warmup, len(users))) * a.runs
    date = dt.date.today().isoformat()
    args = " ".join(sys.argv[1:] if argv is None else argv)
    out = {"date": date, "command": f"python -m bench.tracing_overhead {args}", "git": git_rev(),
           "machine": mach, "profile": a.profile, "policy": a.policy, "drafter": a.drafter, "users": len(users),
           "repeats": a.repeats, "items": a.items, "spans": n_spans, "target_tracing": not a.no_target_tracing,
           "sampling_ratio": a.sampling_ratio, "control": a.control,
           "spans_per_request": spans_per_request(counts, requests), "mismatches": res["mismatches"],
           "runs": a.runs, "run_order": ["traced first" if i % 2 == 0 else "off first" for i in range(a.runs)],
           "summary": summarize(res["latency_ms"], GOAL if a.sampling_ratio > 0.1 else GOAL_SAMPLED,
                                a.repeats * a.runs) | {"per_run": [per_run(r["latency_ms"]) for r in runs]},
           "cpu_seconds": cpu, "by_sampling": by_sampling(res["latency_ms"], res["sampled"]),
           "sampled": res["sampled"],
           "latency_ms": res["latency_ms"]}
    a.out.mkdir(parents=True, exist_ok=True)
    ratio = "" if a.sampling_ratio == 1.0 else f"-ratio{a.sampling_ratio:g}"
    variant = "-control" if a.control else ("-no-target" if a.no_target_tracing else "") + ratio
    stem = f"tracing-overhead-{a.profile}{variant}-{date}"
    (a.out / f"{stem}.json").write_text(json.dumps(out, indent=1))
    text = report(out)
    (a.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
