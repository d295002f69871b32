"""Latency and goodput of specrec against plain decoding, per policy and drafter, side by side in one run.

One local stack (Triton + draft service + orchestrator on loopback). The baseline is policy "off": plain
constrained greedy decoding through the same Triton, one model step per round, grammar-forced tokens
jumped forward. Every configuration runs the same users at each concurrency; repeats are interleaved across
configurations (the order rotates every repeat) so slow drift of a shared machine hits all of them alike.
Ratios are computed pair by pair: the same user, repeat and concurrency against the baseline.
All modes here are greedy (lossless): every list must equal the baseline's for the same user.

    python bench/speedup.py --profile tiny --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specrec.pipeline import prepare  # noqa: E402
from specrec.stack import LocalStack, StackConfig  # noqa: E402
from specrec.v1 import recommend_pb2, recommend_pb2_grpc  # noqa: E402

BASELINE = "off"
POLICIES = ["off", "adaptive", "heuristic", "fixed:1:1", "fixed:2:8", "fixed:3:16", "fixed:4:16"]
RESULTS = ROOT / "bench" / "results"


# -- machine ---------------------------------------------------------------------------------------

def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {"nproc": os.cpu_count(), "nproc_cmd": nproc,
            "cpu_model": model, "loadavg_start": list(os.getloadavg()), "platform": platform.platform(),
            "python": platform.python_version()}


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


# -- requests --------------------------------------------------------------------------------------

def histories(arts, n_users: int) -> list[tuple[int, list[str]]]:
    users = sorted(u for u in range(len(arts.split.train)) if len(arts.split.train[u]) > 0)
    rng = np.random.default_rng(0)
    picked = sorted(rng.choice(users, size=min(n_users, len(users)), replace=False).tolist())
    ids = arts.data.item_ids
    return [(u, [str(ids[i]) for i in arts.split.train[u][-20:]]) for u in picked]


def one(stub, history: list[str], policy: str, drafter: str, n_items: int, timeout: float) -> dict:
    req = recommend_pb2.RecommendRequest(history=history, num_items=n_items,
                                         options=recommend_pb2.DecodingOptions(policy=policy, drafter=drafter))
    t0 = time.perf_counter()
    resp = stub.Recommend(req, timeout=timeout)
    wall = (time.perf_counter() - t0) * 1000
    s = resp.stats
    return {"latency_ms": wall, "items": [it.item_id for it in resp.items],
            "tokens": sum(len(it.semantic_id) + 1 for it in resp.items) + 1,  # codes + SEP per item, EOS
            "rounds": s.rounds, "tau": s.tau, "draft_ms": s.draft_ms, "verify_ms": s.verify_ms,
            "network_ms": s.network_ms, "total_ms": s.total_ms, "fallback_rounds": s.fallback_rounds,
            "drafted": s.drafted_tokens, "accepted": s.accepted_tokens}


def run_batch(stub, users, policy, drafter, conc, n_items, timeout) -> tuple[list[dict], float]:
    """All users through one configuration with `conc` requests in flight; returns records and wall seconds.

    A batch holds max(len(users), conc) requests (users cycled) so that `conc` requests really are in flight;
    request `idx` is the same user in every configuration, which is what pairs them."""
    reqs = [users[i % len(users)] for i in range(max(len(users), conc))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        futs = [(i, u, pool.submit(one, stub, h, policy, drafter, n_items, timeout)) for i, (u, h) in enumerate(reqs)]
        out = []
        for i, u, f in futs:
            try:
                r = f.result()
                r["user"] = u
            except grpc.RpcError as err:
                r = {"user": u, "error": f"{err.code().name}: {err.details()}"}
            r["idx"] = i
            out.append(r)
    return out, time.perf_counter() - t0


# -- statistics ------------------------------------------------------------------------------------

def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def summarize(records: dict, batches: dict, configs, concs, repeats) -> dict:
    base_key = lambda conc: (BASELINE, "-", conc)  # noqa: E731
    rows = []
    for conc in concs:
        base = {(r["rep"], r["idx"]): r for r in records[base_key(conc)] if "error" not in r}
        base_tps = {rep: tok / wall for rep, (tok, wall) in batches[base_key(conc)].items()}
        for cfg in configs:
            key = (cfg[0], cfg[1], conc)
            recs = [r for r in records[key] if "error" not in r]
            errors = [r for r in records[key] if "error" in r]
            lat = [r["latency_ms"] for r in recs]
            pairs = [base[(r["rep"], r["idx"])]["latency_ms"] / r["latency_ms"] for r in recs
                     if (r["rep"], r["idx"]) in base]
            mism = sorted({r["user"] for r in recs if (r["rep"], r["idx"]) in base
                           and r["items"] != base[(r["rep"], r["idx"])]["items"]})
            tps = {rep: tok / wall for rep, (tok, wall) in batches[key].items()}
            tps_ratio = [tps[rep] / base_tps[rep] for rep in tps if rep in base_tps]
            base_lat_mean = statistics.fmean(b["latency_ms"] for b in base.values()) if base else float("nan")
            mean_lat = statistics.fmean(lat) if lat else float("nan")

            def m(field, recs=recs):
                return statistics.fmean(r[field] for r in recs) if recs else float("nan")

            rows.append({
                "policy": cfg[0], "drafter": cfg[1], "concurrency": conc, "n": len(recs), "errors": len(errors),
                "error_samples": [e["error"] for e in errors[:3]],
                "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "mean_ms": mean_lat,
                "tokens_per_s": statistics.median(tps.values()) if tps else float("nan"),
                "tokens_per_s_by_repeat": [tps[k] for k in sorted(tps)],
                "speedup_median_pairwise": statistics.median(pairs) if pairs else float("nan"),
                "speedup_mean_latency": base_lat_mean / mean_lat if lat else float("nan"),
                "goodput_ratio_median": statistics.median(tps_ratio) if tps_ratio else float("nan"),
                "goodput_ratio_by_repeat": tps_ratio,
                "tau": m("tau"), "rounds": m("rounds"), "draft_ms": m("draft_ms"), "verify_ms": m("verify_ms"),
                "network_ms": m("network_ms"), "server_total_ms": m("total_ms"),
                "fallback_rounds": m("fallback_rounds"), "drafted": m("drafted"), "accepted": m("accepted"),
                "mismatched_users": mism,
            })
    return {"rows": rows}


def adaptive_vs_fixed(rows, concs, drafters) -> list[dict]:
    out = []
    for conc in concs:
        base = next(r for r in rows if r["policy"] == BASELINE and r["concurrency"] == conc)
        for d in drafters:
            sub = [r for r in rows if r["drafter"] == d and r["concurrency"] == conc]
            fixed = [r for r in sub if r["policy"].startswith("fixed:")]
            ad = next((r for r in sub if r["policy"] == "adaptive"), None)
            if not fixed or ad is None:
                continue
            best = min(fixed, key=lambda r: r["mean_ms"])
            ratio = ad["mean_ms"] / best["mean_ms"]
            out.append({"drafter": d, "concurrency": conc, "adaptive_mean_ms": ad["mean_ms"],
                        "best_fixed": best["policy"], "best_fixed_mean_ms": best["mean_ms"],
                        "plain_mean_ms": base["mean_ms"], "adaptive_over_best_fixed": ratio,
                        "within_5pct": ratio <= 1.05, "below_plain": ad["mean_ms"] < base["mean_ms"],
                        "met": ratio <= 1.05 and ad["mean_ms"] < base["mean_ms"]})
    return out


# -- report ----------------------------------------------------------------------------------------

def table(rows) -> str:
    head = ("| policy | drafter | conc | n | p50 ms | p90 ms | p99 ms | mean ms | tokens/s | speedup (pairwise median) "
            "| speedup (mean lat) | goodput vs plain | tau | rounds | draft ms | verify ms | network ms | fallback "
            "| mismatches |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        err = f"+{r['errors']} err" if r["errors"] else ""
        lines.append(
            f"| {r['policy']} | {r['drafter']} | {r['concurrency']} | {r['n']}{err} "
            f"| {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['speedup_median_pairwise']:.2f}x | {r['speedup_mean_latency']:.2f}x "
            f"| {r['goodput_ratio_median']:.2f}x | {r['tau']:.2f} | {r['rounds']:.1f} | {r['draft_ms']:.1f} "
            f"| {r['verify_ms']:.1f} | {r['network_ms']:.1f} "
            f"| {r['fallback_rounds']:.2f} | {len(r['mismatched_users']) or '-'} |")
    return "\n".join(lines)


def report(res: dict) -> str:
    m, a, rows = res["machine"], res["args"], res["summary"]["rows"]
    mism = [(r["policy"], r["drafter"], r["concurrency"], r["mismatched_users"]) for r in rows if r["mismatched_users"]]
    errs = [(r["policy"], r["drafter"], r["concurrency"], r["errors"], r["error_samples"]) for r in rows if r["errors"]]
    out = [f"# specrec speedup vs plain decoding — {res['date']}", ""]
    out += ["## Machine and run", "",
            f"- CPU: {m['cpu_model']}; `nproc` = {m['nproc_cmd']}; load average at start "
            f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])} (1/5/15 min); load average at end "
            f"{', '.join(f'{x:.2f}' for x in res['loadavg_end'])}",
            f"- {m['platform']}, Python {m['python']}; code at `{res.get('git_start', res['git'])}` at start, "
            f"`{res['git']}` at the end",
            f"- command: `{res['command']}`",
            f"- profile **{a['profile']}** (target {res['target_params']} parameters), {a['users']} users "
            f"(last 20 training items as history), {a['items']} items per list, {a['repeats']} repeats interleaved "
            f"across configurations, concurrency {a['concurrency']}, drafters {', '.join(res['drafters'])}, "
            f"per-round draft budget {a['draft_timeout_ms']} ms",
            f"- warm-up ({a['warmup']} requests per configuration) excluded; measurement wall time "
            f"{res['measure_s']:.0f} s, total run {res['total_s']:.0f} s",
            "- baseline = policy `off`: plain constrained greedy decoding through the same Triton, one model step per "
            "round, grammar-forced tokens jumped forward for free. Ratios > 1 mean faster than the baseline; "
            "pairwise = the same user, repeat and concurrency. Goodput = generated tokens / batch wall time, "
            "median over repeats, "
            "ratio to the baseline's batch in the same repeat.",
            ""]
    if res.get("notes"):
        out += ["## Caveats", ""] + [f"- {n}" for n in res["notes"]] + [""]
    out += ["## Lossless check", ""]
    if mism:
        out += ["**MISMATCHES: these lossless configurations returned a list different from the baseline's:**", ""]
        out += [f"- **{p} / {d} @ {c}: users {u}**" for p, d, c, u in mism]
    else:
        n = sum(r["n"] for r in rows if r["policy"] != BASELINE)
        out += [f"All {n} speculative responses equal the baseline's list for the same user (greedy mode)."]
    if errs:
        out += ["", "**Errors:**", ""] + [f"- {p} / {d} @ {c}: {n} errors, e.g. {s}" for p, d, c, n, s in errs]
    out += ["", "## Results", "", table(rows), ""]
    out += ["## Adaptive vs the best fixed depth in hindsight (issue 5's criterion)", "",
            "| drafter | conc | adaptive mean ms | best fixed | its mean ms | plain mean ms "
            "| adaptive / best fixed | met |",
            "|---|---|---|---|---|---|---|---|"]
    for x in res["adaptive_vs_fixed"]:
        out.append(f"| {x['drafter']} | {x['concurrency']} | {x['adaptive_mean_ms']:.1f} | {x['best_fixed']} | "
                   f"{x['best_fixed_mean_ms']:.1f} | {x['plain_mean_ms']:.1f} | {x['adaptive_over_best_fixed']:.3f} | "
                   f"{'yes' if x['met'] else 'NO'} |")
    out += ["", "## Goals of issue 7", ""] + [f"- {g}" for g in res["goals"]]
    out += ["", "## Where the time goes", "", res["where"], ""]
    out += ["## Not in this report", "",
            "- Hugging Face assisted generation, perf_analyzer, tau per item slot and plots: `bench/run.py` "
            "(`make bench`) runs them with this script and writes the combined report.", ""]
    return "\n".join(out)


def goal_line(what: str, ratio: float, target: float, detail: str, shortfall: str = "") -> str:
    """One goal of issue 7: met or missed, the ratio, and by how much it fell short."""
    met = ratio >= target
    return (f"{what}: {'MET' if met else 'MISSED'} — {ratio:.2f}x {detail}"
            + ("" if met else f", {target - ratio:.2f}x short{shortfall}"))


def goals(rows, concs) -> list[str]:
    g = []
    ad1 = [r for r in rows if r["policy"] == "adaptive" and r["concurrency"] == 1]
    for r in ad1:
        s = r["speedup_median_pairwise"]
        g.append(goal_line(f"adaptive >= 2.0x faster than plain at concurrency 1 ({r['drafter']})", s, 2.0,
                           f"pairwise median ({r['speedup_mean_latency']:.2f}x on mean latency)",
                           f" ({s / 2.0:.0%} of the goal)"))
    for conc in concs:
        spec = [r for r in rows if r["concurrency"] == conc and r["policy"] != BASELINE]
        worst = min(spec, key=lambda r: r["goodput_ratio_median"])
        bad = [r for r in spec if r["goodput_ratio_median"] < 0.95]
        ad = [r for r in spec if r["policy"] == "adaptive"]
        ad_txt = ", ".join(f"adaptive/{r['drafter']} {r['goodput_ratio_median']:.2f}x" for r in ad)
        g.append(f"goodput >= 0.95x plain at concurrency {conc}: {ad_txt}; "
                 + (f"{len(bad)} of {len(spec)} configurations below 0.95x, worst {worst['policy']}/{worst['drafter']} "
                    f"{worst['goodput_ratio_median']:.2f}x" if bad else f"all {len(spec)} configurations MET "
                    f"(worst {worst['policy']}/{worst['drafter']} {worst['goodput_ratio_median']:.2f}x)"))
    return g


def where(rows) -> str:
    parts = []
    for r in rows:
        if r["concurrency"] != min(x["concurrency"] for x in rows):
            continue
        if r["policy"] not in (BASELINE, "adaptive"):
            continue
        srv = r["server_total_ms"]
        other = r["mean_ms"] - srv
        parts.append(f"{r['policy']}/{r['drafter']}: client {r['mean_ms']:.1f} ms = server {srv:.1f} ms "
                     f"(draft {r['draft_ms']:.1f}, verify {r['verify_ms']:.1f}, network/other {r['network_ms']:.1f}) "
                     f"+ {other:.1f} ms outside the orchestrator's loop; {r['rounds']:.1f} rounds, tau {r['tau']:.2f}, "
                     f"{srv / max(r['rounds'], 1e-9):.1f} ms per round")
    return ("Mean per request at the lowest concurrency, from the orchestrator's own stats: " + "; ".join(parts) + ".")


def count_params(path: Path) -> int | str:
    try:
        import math

        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except Exception:  # noqa: BLE001 - only for the report
        return "?"


# -- main ------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--users", type=int, default=None, help="users per configuration (default 40, quick 12)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--drafters", default=None, help="default: model (quick: model,retrieval)")
    p.add_argument("--configs", default="", help="explicit policy/drafter pairs, e.g. adaptive/model,fixed:4:16/"
                   "retrieval; overrides --policies x --drafters (the baseline is always added)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--draft-timeout-ms", type=int, default=200, help="SPECREC_DRAFT_TIMEOUT_MS")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, s")
    p.add_argument("--quick", action="store_true", help="a smoke run: 12 users, both cheap drafters")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", action="append", default=[], help="a caveat to print in the report (repeatable)")
    return p


def config_list(a: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    """(policy, drafter) pairs, baseline first, and the drafters they use."""
    if a.configs:
        pairs = [tuple(c.split("/", 1)) for c in a.configs.split(",") if c]
        configs = [(BASELINE, "-")] + [(pol, d) for pol, d in pairs if pol != BASELINE]
    else:
        drafters = a.drafters.split(",")
        configs = [(BASELINE, "-")] + [(pol, d) for pol in a.policies.split(",") if pol != BASELINE for d in drafters]
    drafters = list(dict.fromkeys(d for _, d in configs if d != "-"))
    return configs, drafters


def run(a: argparse.Namespace, command: str) -> dict:
    """Start the stack, measure every configuration, return the results (nothing written)."""
    a.users = a.users or (12 if a.quick else 40)
    a.drafters = a.drafters or ("model,retrieval" if a.quick else "model")
    t_start = time.perf_counter()
    mach = machine()
    rev_start = git_rev()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    concs = [int(c) for c in a.concurrency.split(",")]
    configs, drafters = config_list(a)

    arts = prepare(a.dataset, a.profile, train=False, progress=False)
    if not (arts.target_dir / "config.json").is_file():
        raise SystemExit(f"no trained {a.profile} target in {arts.target_dir}; "
                         f"run `specrec train-target --profile {a.profile}`")
    from specrec.training.drafter import trained
    if {"model", "hybrid"} & set(drafters) and not trained(arts):
        raise SystemExit(f"no trained drafter in {arts.directory}; run `specrec train-drafter --profile {a.profile}`")
    if {"retrieval", "hybrid"} & set(drafters) and not (arts.directory / "retrieval").is_dir():
        from specrec.drafting.commands import build_retrieval
        build_retrieval(arts, progress=False)
    target_params = count_params(arts.target_dir / "model.safetensors")
    users = histories(arts, a.users)

    records: dict = defaultdict(list)
    batches: dict = defaultdict(dict)
    cfg = StackConfig(artifacts=arts.directory, policy="adaptive", drafter=drafters[0] if drafters else "model",
                      extra_env={"SPECREC_DRAFT_TIMEOUT_MS": str(a.draft_timeout_ms)})
    print(f"[speedup] {len(configs)} configurations x {len(concs)} concurrencies x {a.repeats} repeats x "
          f"{len(users)} users; load {mach['loadavg_start']}", flush=True)
    with LocalStack(cfg) as stack, grpc.insecure_channel(stack.orchestrator_addr) as ch:
        stub = recommend_pb2_grpc.RecommenderStub(ch)
        for pol, d in configs:  # warm-up: load drafters, JIT paths, Triton instances; excluded
            for _u, h in users[:a.warmup]:
                one(stub, h, pol, "" if d == "-" else d, a.items, a.timeout)
        t_measure = time.perf_counter()
        for rep in range(a.repeats):
            for conc in concs:
                order = configs[rep % len(configs):] + configs[:rep % len(configs)]  # rotate every repeat
                for pol, d in order:
                    recs, wall = run_batch(stub, users, pol, "" if d == "-" else d, conc, a.items, a.timeout)
                    for r in recs:
                        r["rep"] = rep
                    records[(pol, d, conc)].extend(recs)
                    batches[(pol, d, conc)][rep] = (sum(r.get("tokens", 0) for r in recs if "error" not in r), wall)
                    ok = [r["latency_ms"] for r in recs if "error" not in r]
                    print(f"[speedup] rep {rep} conc {conc} {pol:>11}/{d:<9} {wall:6.2f} s  "
                          f"p50 {pct(ok, 50):7.1f} ms  errors {len(recs) - len(ok)}  "
                          f"elapsed {time.perf_counter() - t_start:5.0f} s", flush=True)
        measure_s = time.perf_counter() - t_measure

    summary = summarize(records, batches, configs, concs, a.repeats)
    rows = summary["rows"]
    res = {"date": date, "machine": mach, "loadavg_end": list(os.getloadavg()), "git": git_rev(),
           "git_start": rev_start, "command": command,
           "args": {**vars(a), "out": str(a.out)}, "drafters": drafters, "target_params": target_params,
           "measure_s": measure_s, "summary": summary,
           "adaptive_vs_fixed": adaptive_vs_fixed(rows, concs, drafters), "goals": goals(rows, concs),
           "where": where(rows), "notes": a.note,
           "records": {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in records.items()}}
    res["total_s"] = time.perf_counter() - t_start
    return res


def mismatches(rows: list[dict]) -> list[str]:
    return [f"{r['policy']}/{r['drafter']}@{r['concurrency']} users {r['mismatched_users']}"
            for r in rows if r["mismatched_users"]]


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    command = " ".join(shlex.quote(x) for x in [sys.executable.replace(str(ROOT) + "/", ""), "bench/speedup.py",
                                                 *(argv or sys.argv[1:])])
    res = run(a, command)
    rows = res["summary"]["rows"]
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / f"speedup-{res['date']}"
    (stem.with_suffix(".json")).write_text(json.dumps(res, indent=1, default=str) + "\n")
    (stem.with_suffix(".md")).write_text(report(res))
    print(table(rows))
    print("\n".join(res["goals"]))
    if mism := mismatches(rows):
        print("!!! LOSSLESS MISMATCH vs baseline: " + "; ".join(mism), flush=True)
    print(f"[speedup] wrote {stem}.json and {stem}.md in {res['total_s']:.0f} s")
    return 1 if mism else 0


if __name__ == "__main__":
    raise SystemExit(main())
