"""Latency and goodput of specrec against plain decoding, per policy and drafter, side by side in one run.

One local stack (Triton + draft service + orchestrator on loopback). The baseline is policy "off": plain
constrained greedy decoding through the same Triton, one model step per round, grammar-forced tokens
jumped forward. Every configuration runs the same users at each concurrency; repeats are interleaved across
configurations (the order rotates every repeat) so slow drift of a shared machine hits all of them alike.
Concurrency phases run ascending in even repeats and descending in odd ones (high load last, then first), so
state a policy carries from a loaded phase into a quiet one shows up in the per-repeat figures.
Ratios are computed pair by pair: the same user, repeat and concurrency against the baseline; the mean-latency
ratio is reported beside the pairwise median, overall and per repeat. tau = sum(tokens) / sum(rounds) over a row's
requests (not a mean of per-request ratios).
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
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc  # noqa: E402
from specrec.drafting.offline import eval_users  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402
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


def git_rev(checkout: Path | None = None) -> str:
    """The commit of this checkout (or another one), +dirty with uncommitted changes to tracked files."""
    where = str(checkout or ROOT)
    r = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


# -- requests --------------------------------------------------------------------------------------

def histories(arts, n_users: int) -> list[tuple[int, list[str]]]:
    """n_users users held out of drafter training (`eval_users`), picked at random, with their last 20 items."""
    users = eval_users(arts)
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
            "tree_rounds": s.tree_rounds, "ready_trees": s.ready_trees, "start_trees": s.start_trees,
            "committed": round(s.tau * s.rounds),  # the orchestrator's count (tau = committed / rounds)
            "drafted": s.drafted_tokens, "accepted": s.accepted_tokens}


def ahead_outcomes(draft_stub) -> Counter:
    """The draft service's draft-ahead counts so far: hits, and misses by why (not_drafted, wrong_guess, ...)."""
    s = draft_stub.Stats(draft_pb2.StatsRequest(), timeout=10)
    return Counter({"hit": s.draft_ahead_hits, **dict(s.draft_ahead_misses_by_reason),
                    FORWARDS: s.drafter_forwards, FORWARD_US: round(s.drafter_forward_seconds * 1e6)})


FORWARDS, FORWARD_US = "drafter_forwards", "drafter_forward_us"  # beside the outcomes: the drafter's own pace


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

GOAL_DRAFTER = "model"  # issue 15's goals are judged with this drafter; the others are reported the same way
GOAL_PLAIN_MEDIAN = 2.2  # adaptive vs plain at concurrency 1, pairwise median
GOAL_PLAIN_MEAN = 2.0  # ... on mean latency
GOAL_REPEAT_MIN = 1.8  # ... no repeat's pairwise median below this
GOAL_VS_BEST = 1.03  # adaptive mean latency / best other policy's (heuristic, fixed, chain), at most
GOAL_READY = 0.80  # ready trees / tree rounds, at least
GOAL_HF = 1.3  # HF assisted latency / adaptive latency, same drafter (bench/run.py)

DEFINITIONS = [
    "**pairwise median** = median over requests of plain latency / this latency, each request against the "
    "baseline's request for the same user, repeat and concurrency.",
    "**mean-latency ratio** = mean plain latency / mean latency of this configuration, over the same paired requests.",
    "**per repeat**: the same two ratios (and tau, ready rate) on one repeat's requests only; `order` = the "
    "concurrency phases of that repeat ran ascending (`asc`, load last) or descending (`desc`, load first); "
    "`after` = the concurrency of the phase that ran just before (`-` = first phase of the run).",
    "**tau** = sum of tokens committed / sum of verification rounds over the row's requests (tokens = codes + SEP "
    "per item + EOS of the returned list; rounds = the orchestrator's rounds, START included); not a mean of "
    "per-request ratios (that one is `tau_request_mean` in the JSON).",
    "**ready rate** = sum(ready_trees) / sum(tree_rounds - start_trees): of the rounds that verified a drafted tree "
    "after an earlier verification (the first tree rides on START, drafted before anything could hide it), the "
    "share whose tree was already drafted (ahead) when the loop asked for it; `-` when no tree rounds were reported. "
    "`ready of all tree rounds` in the JSON keeps the START trees in the denominator.",
    "**draft ms / tree round** = sum(draft_ms) / sum(tree_rounds): drafting time left on the critical path "
    "(the loop waiting for a tree) per tree round.",
    "**goodput** = generated tokens / batch wall time, median over repeats, ratio to the baseline's batch in the "
    "same repeat.",
]


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def _div(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def _fmean(xs) -> float:
    xs = list(xs)
    return statistics.fmean(xs) if xs else float("nan")


def figures(recs: list[dict], base: dict) -> dict:
    """Speedups, tau and ready rate of some error-free requests against the baseline's, keyed by (rep, idx)."""
    paired = [(base[(r["rep"], r["idx"])], r) for r in recs if (r["rep"], r["idx"]) in base]
    tree = sum(r.get("tree_rounds", 0) for r in recs)
    after_verify = tree - sum(r.get("start_trees", 0) for r in recs)
    return {"n": len(recs), "mean_ms": _fmean(r["latency_ms"] for r in recs),
            "speedup_median_pairwise": _median(b["latency_ms"] / r["latency_ms"] for b, r in paired),
            "speedup_mean_latency": _div(_fmean(b["latency_ms"] for b, _ in paired),
                                         _fmean(r["latency_ms"] for _, r in paired)),
            "tau": _div(sum(r["tokens"] for r in recs), sum(r["rounds"] for r in recs)),
            "tree_rounds_total": tree, "ready_trees_total": sum(r.get("ready_trees", 0) for r in recs),
            "ready_rate": _div(sum(r.get("ready_trees", 0) for r in recs), after_verify),
            "ready_of_all_tree_rounds": _div(sum(r.get("ready_trees", 0) for r in recs), tree),
            "tree_rounds_after_verify": after_verify,
            "draft_ms_per_tree_round": _div(sum(r["draft_ms"] for r in recs), tree)}


def summarize(records: dict, batches: dict, configs, concs, repeats) -> dict:
    """One row per (policy, drafter, concurrency); `by_repeat` holds each repeat's figures and the order it ran in."""
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
            mism = sorted({r["user"] for r in recs if (r["rep"], r["idx"]) in base
                           and r["items"] != base[(r["rep"], r["idx"])]["items"]})
            tps = {rep: tok / wall for rep, (tok, wall) in batches[key].items()}
            tps_ratio = [tps[rep] / base_tps[rep] for rep in sorted(tps) if rep in base_tps]
            fig = figures(recs, base)
            by_repeat = []
            for rep in sorted({r["rep"] for r in records[key]}):
                first = next(r for r in records[key] if r["rep"] == rep)
                f = figures([r for r in recs if r["rep"] == rep], base)
                by_repeat.append({"repeat": rep, "order": first.get("order", "asc"), "phase": first.get("phase"),
                                  "after": first.get("after"), **f,
                                  "goodput_ratio": tps[rep] / base_tps[rep] if rep in tps and rep in base_tps
                                  else float("nan")})

            def m(field, recs=recs):
                return _fmean(r.get(field, 0) for r in recs)

            rows.append({
                "policy": cfg[0], "drafter": cfg[1], "concurrency": conc, "n": len(recs), "errors": len(errors),
                "error_samples": [e["error"] for e in errors[:3]],
                "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "mean_ms": fig["mean_ms"],
                "tokens_per_s": statistics.median(tps.values()) if tps else float("nan"),
                "tokens_per_s_by_repeat": [tps[k] for k in sorted(tps)],
                "speedup_median_pairwise": fig["speedup_median_pairwise"],
                "speedup_mean_latency": fig["speedup_mean_latency"],
                "speedup_median_pairwise_by_repeat": [x["speedup_median_pairwise"] for x in by_repeat],
                "speedup_mean_latency_by_repeat": [x["speedup_mean_latency"] for x in by_repeat],
                "goodput_ratio_median": _median(tps_ratio), "goodput_ratio_by_repeat": tps_ratio,
                "tau": fig["tau"], "tau_request_mean": _fmean(_div(r["tokens"], r["rounds"]) for r in recs),
                "rounds": m("rounds"), "draft_ms": m("draft_ms"), "verify_ms": m("verify_ms"),
                "network_ms": m("network_ms"), "server_total_ms": m("total_ms"),
                "fallback_rounds": m("fallback_rounds"), "drafted": m("drafted"), "accepted": m("accepted"),
                "tree_rounds": m("tree_rounds"), "ready_trees": m("ready_trees"),
                "tree_rounds_total": fig["tree_rounds_total"], "ready_trees_total": fig["ready_trees_total"],
                "ready_rate": fig["ready_rate"], "ready_of_all_tree_rounds": fig["ready_of_all_tree_rounds"],
                "tree_rounds_after_verify": fig["tree_rounds_after_verify"],
                "draft_ms_per_tree_round": fig["draft_ms_per_tree_round"],
                "by_repeat": by_repeat, "mismatched_users": mism,
                # requests whose list token count differs from the orchestrator's committed count (expected 0)
                "tokens_neq_committed": sum(r["tokens"] != r["committed"] for r in recs if "committed" in r),
            })
    return {"rows": rows}


def resummarize(stack: dict) -> dict:
    """The summary of a results JSON recomputed from its per-request records and batches (for --rerender)."""
    records: dict = defaultdict(list)
    for k, v in stack["records"].items():
        pol, d, conc = k.split("|")
        records[(pol, d, int(conc))] = v
    batches: dict = defaultdict(dict)
    for k, v in stack["batches"].items():
        pol, d, conc = k.split("|")
        batches[(pol, d, int(conc))] = {int(rep): tuple(tw) for rep, tw in v.items()}
    configs = list(dict.fromkeys((p, d) for p, d, _ in records))
    configs.sort(key=lambda c: c[0] != BASELINE)
    concs = sorted({c for _, _, c in records})
    return summarize(records, batches, configs, concs, stack["args"]["repeats"])


def best_other(rows, drafter: str, conc: int) -> dict | None:
    """The fastest row on mean latency with this drafter and concurrency, other than adaptive and plain."""
    others = [r for r in rows if r["drafter"] == drafter and r["concurrency"] == conc
              and r["policy"] not in (BASELINE, "adaptive")]
    return min(others, key=lambda r: r["mean_ms"]) if others else None


def adaptive_vs_best(rows, concs, drafters) -> list[dict]:
    """Adaptive's mean latency against the best other policy (heuristic, fixed, chain) with the same drafter."""
    out = []
    for conc in concs:
        base = next(r for r in rows if r["policy"] == BASELINE and r["concurrency"] == conc)
        for d in drafters:
            ad = next((r for r in rows if (r["policy"], r["drafter"], r["concurrency"]) == ("adaptive", d, conc)),
                      None)
            best = best_other(rows, d, conc)
            if best is None or ad is None:
                continue
            ratio = ad["mean_ms"] / best["mean_ms"]
            out.append({"drafter": d, "concurrency": conc, "adaptive_mean_ms": ad["mean_ms"],
                        "best_other": best["policy"], "best_other_mean_ms": best["mean_ms"],
                        "plain_mean_ms": base["mean_ms"], "adaptive_over_best": ratio,
                        "within_3pct": ratio <= GOAL_VS_BEST, "below_plain": ad["mean_ms"] < base["mean_ms"]})
    return out


# -- report ----------------------------------------------------------------------------------------

def rate(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"


def num(x: float, spec: str = ".1f") -> str:
    return "-" if x != x else format(x, spec)


def table(rows) -> str:
    head = ("| policy | drafter | conc | n | p50 ms | p90 ms | p99 ms | mean ms | tokens/s | speedup (pairwise median) "
            "| speedup (mean lat) | goodput vs plain | tau | rounds | ready rate | draft ms / tree round | draft ms "
            "| verify ms | network ms | fallback | mismatches |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        err = f"+{r['errors']} err" if r["errors"] else ""
        lines.append(
            f"| {r['policy']} | {r['drafter']} | {r['concurrency']} | {r['n']}{err} "
            f"| {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_ms']:.1f} "
            f"| {r['tokens_per_s']:.0f} | {r['speedup_median_pairwise']:.2f}x | {r['speedup_mean_latency']:.2f}x "
            f"| {r['goodput_ratio_median']:.2f}x | {r['tau']:.2f} | {r['rounds']:.1f} | {rate(r['ready_rate'])} "
            f"| {num(r['draft_ms_per_tree_round'], '.2f')} | {r['draft_ms']:.1f} "
            f"| {r['verify_ms']:.1f} | {r['network_ms']:.1f} "
            f"| {r['fallback_rounds']:.2f} | {len(r['mismatched_users']) or '-'} |")
    return "\n".join(lines)


def per_repeat_table(rows, conc: int = 1) -> str:
    """Every repeat of every configuration at `conc`, with the order its phases ran in."""
    lines = ["| policy | drafter | repeat | order | after | n | mean ms | speedup (pairwise median) "
             "| speedup (mean lat) | tau | ready rate | goodput vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["concurrency"] != conc or r["policy"] == BASELINE:
            continue
        for x in r["by_repeat"]:
            lines.append(f"| {r['policy']} | {r['drafter']} | {x['repeat']} | {x['order']} "
                         f"| {'-' if x['after'] is None else x['after']} | {x['n']} | {num(x['mean_ms'])} "
                         f"| {num(x['speedup_median_pairwise'], '.2f')}x | {num(x['speedup_mean_latency'], '.2f')}x "
                         f"| {num(x['tau'], '.2f')} | {rate(x['ready_rate'])} | {num(x['goodput_ratio'], '.2f')}x |")
    return "\n".join(lines)


def phase_order(phases: list[dict]) -> str:
    """`rep 0 asc: 1, 4, 16, 64; rep 1 desc: 64, 16, 4, 1; ...`"""
    reps: dict = {}
    for p in phases:
        reps.setdefault((p["repeat"], p["order"]), []).append(str(p["concurrency"]))
    return "; ".join(f"repeat {rep} {order}: {', '.join(cs)}" for (rep, order), cs in reps.items())


def adaptive_vs_best_table(items: list[dict]) -> list[str]:
    out = ["| drafter | conc | adaptive mean ms | best other | its mean ms | plain mean ms | adaptive / best other "
           f"| within {GOAL_VS_BEST - 1:.0%} |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {x['drafter']} | {x['concurrency']} | {x['adaptive_mean_ms']:.1f} | {x['best_other']} | "
            f"{x['best_other_mean_ms']:.1f} | {x['plain_mean_ms']:.1f} | {x['adaptive_over_best']:.3f} | "
            f"{'yes' if x['within_3pct'] else 'NO'} |" for x in items]
    return out


def ahead_table(ahead: dict[str, dict[str, int]]) -> str:
    kinds = ["hit", "not_drafted", "plain_round", "wrong_guess", "unfinished", "budget"]
    lines = ["| policy | drafter | conc | " + " | ".join(kinds) + " | hit share | drafter forwards | ms a forward |",
             "|---" * (len(kinds) + 6) + "|"]
    for key, counts in ahead.items():
        total = sum(counts.get(k, 0) for k in kinds)
        forwards = counts.get(FORWARDS, 0)
        pace = f"{counts.get(FORWARD_US, 0) / forwards / 1e3:.2f}" if forwards else "-"
        lines.append("| " + " | ".join(key.split("|")) + " | " + " | ".join(str(counts.get(k, 0)) for k in kinds)
                     + f" | {counts.get('hit', 0) / max(total, 1):.0%} | {forwards} | {pace} |")
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
            f"(held out of drafter training, last 20 training items as history), {a['items']} items per list, "
            f"{a['repeats']} repeats interleaved across configurations, concurrency {a['concurrency']}, "
            f"drafters {', '.join(res['drafters'])}, "
            f"per-round draft budget {a['draft_timeout_ms']} ms, target in {a.get('target_dtype', 'float32')} "
            "(plain decoding included)",
            f"- phase order (even repeats ascending, odd descending): {phase_order(res.get('phases', []))}",
            f"- warm-up ({a['warmup']} requests per configuration) excluded; measurement wall time "
            f"{res['measure_s']:.0f} s, total run {res['total_s']:.0f} s",
            "- baseline = policy `off`: plain constrained greedy decoding through the same Triton, one model step per "
            "round, grammar-forced tokens jumped forward for free. Ratios > 1 mean faster than the baseline.",
            ""]
    out += ["Definitions:", ""] + [f"- {d}" for d in DEFINITIONS] + [""]
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
    out += ["", "## Goals of issue 15", ""] + [f"- {g}" for g in res["goals"]]
    out += ["", "## Results", "", table(rows), ""]
    out += ["## Per repeat (concurrency 1)", "", per_repeat_table(rows), ""]
    out += ["## Adaptive vs the best other policy (heuristic, fixed or chain) with the same drafter", ""]
    out += adaptive_vs_best_table(res["adaptive_vs_best"])
    out += ["", "## Where the time goes", "", res["where"], ""]
    if res.get("draft_ahead"):
        out += ["## Draft-ahead outcomes", "", "The draft service's count per configuration: trees served ready (hit), "
                "and misses by why — not_drafted (no guess drafted before the commit came), plain_round (a round "
                "without a tree in between), wrong_guess (the commit was none of the guesses), unfinished (the "
                "right guess was still being drafted), budget (the next budget asked for more than the guess "
                "drafted); beside them the drafter forwards the service ran meanwhile and their mean time (prefills, "
                "tree levels and draft-ahead waves alike; the same count in process, one thread, bench drafter: "
                "~1.0 ms).", "",
                ahead_table(res["draft_ahead"]), ""]
    out += ["## Not in this report", "",
            "- Hugging Face assisted generation, perf_analyzer, tau per item slot and plots: `bench/run.py` "
            "(`make bench`) runs them with this script and writes the combined report.", ""]
    return "\n".join(out)


def goal_line(what: str, value: float, target: float, detail: str, shortfall: str = "", at_most: bool = False) -> str:
    """One goal: MET or MISSED, the number, and by how much it fell short (value >= target, or <= if at_most)."""
    if value != value:
        return f"{what}: MISSED — not measured {detail}"
    met = value <= target if at_most else value >= target
    short = value - target if at_most else target - value
    return (f"{what}: {'MET' if met else 'MISSED'} — {value:.{3 if at_most else 2}f}{'' if at_most else 'x'} {detail}"
            + ("" if met else f", {short:.{3 if at_most else 2}f} {'over' if at_most else 'short'}{shortfall}"))


def _repeats_txt(r: dict) -> str:
    return ", ".join(f"repeat {x['repeat']} ({x['order']}) {x['speedup_median_pairwise']:.2f}x "
                     f"/ mean {x['speedup_mean_latency']:.2f}x" for x in r["by_repeat"])


def _ready_txt(r: dict) -> str:
    return (f"{r['ready_trees_total']} ready of {r['tree_rounds_after_verify']} tree rounds after a verification, "
            f"{r['tree_rounds_total']} with the START trees"
            + ("" if r["tree_rounds_total"] else " (tree_rounds = 0: not reported by the orchestrator)")
            + f"; draft {num(r['draft_ms_per_tree_round'], '.2f')} ms per tree round on the critical path")


def goals(rows, concs) -> list[str]:
    """Issue 15's goals at concurrency 1 with the model drafter (MET / MISSED), the other drafters' adaptive rows
    as information lines, and the goodput line per concurrency (information)."""
    g, info = [], []
    ad1 = {r["drafter"]: r for r in rows if r["policy"] == "adaptive" and r["concurrency"] == 1}
    r = ad1.get(GOAL_DRAFTER)
    if r is None:
        g.append(f"adaptive/{GOAL_DRAFTER} at concurrency 1: MISSED — not measured (no such row in this run)")
    else:
        s, ml = r["speedup_median_pairwise"], r["speedup_mean_latency"]
        g.append(goal_line(f"adaptive/{GOAL_DRAFTER} >= {GOAL_PLAIN_MEDIAN}x plain at concurrency 1 (pairwise "
                           "median)", s, GOAL_PLAIN_MEDIAN, f"({ml:.2f}x on mean latency)",
                           f" ({s / GOAL_PLAIN_MEDIAN:.0%} of the goal)"))
        g.append(goal_line(f"adaptive/{GOAL_DRAFTER} >= {GOAL_PLAIN_MEAN}x plain on mean latency at concurrency 1",
                           ml, GOAL_PLAIN_MEAN, f"(mean {r['mean_ms']:.1f} ms; pairwise median {s:.2f}x)"))
        worst = min(r["by_repeat"], key=lambda x: x["speedup_median_pairwise"], default=None)
        g.append(goal_line(f"adaptive/{GOAL_DRAFTER}: no repeat below {GOAL_REPEAT_MIN}x at concurrency 1 "
                           "(per-repeat pairwise median)",
                           worst["speedup_median_pairwise"] if worst else float("nan"), GOAL_REPEAT_MIN,
                           (f"worst, repeat {worst['repeat']} ({worst['order']}); " if worst else "")
                           + f"all: {_repeats_txt(r)}"))
        best = best_other(rows, GOAL_DRAFTER, 1)
        if best is None:
            g.append(f"adaptive/{GOAL_DRAFTER} mean latency within {GOAL_VS_BEST - 1:.0%} of the best other policy "
                     "at concurrency 1: MISSED — not measured (no heuristic, fixed or chain row)")
        else:
            g.append(goal_line(f"adaptive/{GOAL_DRAFTER} mean latency within {GOAL_VS_BEST - 1:.0%} of the best "
                               "other policy at concurrency 1 (adaptive / best, at most "
                               f"{GOAL_VS_BEST:.2f})", r["mean_ms"] / best["mean_ms"], GOAL_VS_BEST,
                               f"(best other: {best['policy']}/{GOAL_DRAFTER} {best['mean_ms']:.1f} ms, "
                               f"adaptive {r['mean_ms']:.1f} ms)", at_most=True))
        rr = r["ready_rate"]
        met = rr == rr and rr >= GOAL_READY
        g.append(f"adaptive/{GOAL_DRAFTER}: ready trees >= {GOAL_READY:.0%} of tree rounds at concurrency 1: "
                 f"{'MET' if met else 'MISSED'} — {rate(rr)} ({_ready_txt(r)})"
                 + ("" if met or rr != rr else f", {(GOAL_READY - rr) * 100:.0f} points short"))
    for d, r in ad1.items():
        if d == GOAL_DRAFTER:
            continue
        best = best_other(rows, d, 1)
        info.append(f"adaptive/{d} at concurrency 1 (reported, not a goal): {r['speedup_median_pairwise']:.2f}x plain "
                    f"pairwise median, {r['speedup_mean_latency']:.2f}x on mean latency; per repeat: "
                    f"{_repeats_txt(r)}; "
                    + (f"mean latency / best other ({best['policy']}/{d} {best['mean_ms']:.1f} ms) "
                       f"{r['mean_ms'] / best['mean_ms']:.3f}; " if best else "no other policy with this drafter; ")
                    + f"ready rate {rate(r['ready_rate'])} ({_ready_txt(r)}); tau {r['tau']:.2f}")
    for conc in concs:
        spec = [r for r in rows if r["concurrency"] == conc and r["policy"] != BASELINE]
        if not spec:
            continue
        worst = min(spec, key=lambda r: r["goodput_ratio_median"])
        bad = [r for r in spec if r["goodput_ratio_median"] < 0.95]
        ad = [r for r in spec if r["policy"] == "adaptive"]
        ad_txt = ", ".join(f"adaptive/{r['drafter']} {r['goodput_ratio_median']:.2f}x" for r in ad)
        info.append(f"goodput vs plain at concurrency {conc} (information; 0.95x was issue 7's bar): {ad_txt}; "
                    + (f"{len(bad)} of {len(spec)} configurations below 0.95x, worst "
                       f"{worst['policy']}/{worst['drafter']} {worst['goodput_ratio_median']:.2f}x" if bad
                       else f"all {len(spec)} configurations at or above 0.95x "
                       f"(worst {worst['policy']}/{worst['drafter']} {worst['goodput_ratio_median']:.2f}x)"))
    return g + info


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
                     f"{srv / max(r['rounds'], 1e-9):.1f} ms per round"
                     + (f"; {r['tree_rounds']:.1f} tree rounds, {rate(r['ready_rate'])} ready, "
                        f"{num(r['draft_ms_per_tree_round'], '.2f')} ms drafting per tree round"
                        if r["policy"] != BASELINE else ""))
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
    p.add_argument("--target-dtype", default=os.environ.get("SPECREC_TARGET_DTYPE", "float32"),
                   choices=["float32", "bfloat16"], help="the target's precision, plain decoding included "
                   "(SPECREC_TARGET_DTYPE; bfloat16 runs the batch-invariant forward)")
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


def phase_plan(concs: list[int], repeats: int) -> list[tuple[int, str, int, int | None]]:
    """(repeat, order, concurrency, concurrency of the phase before) in run order: even repeats ascending, odd
    descending, so the lowest concurrency runs both before any load and after the loaded phases."""
    plan, prev = [], None
    for rep in range(repeats):
        order = "asc" if rep % 2 == 0 else "desc"
        for conc in sorted(concs, reverse=order == "desc"):
            plan.append((rep, order, conc, prev))
            prev = conc
    return plan


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
    phases: list[dict] = []
    cfg = StackConfig(artifacts=arts.directory, policy="adaptive", drafter=drafters[0] if drafters else "model",
                      extra_env={"SPECREC_DRAFT_TIMEOUT_MS": str(a.draft_timeout_ms),
                                 "SPECREC_TARGET_DTYPE": a.target_dtype})
    print(f"[speedup] {len(configs)} configurations x {len(concs)} concurrencies x {a.repeats} repeats x "
          f"{len(users)} users; load {mach['loadavg_start']}", flush=True)
    ahead: dict = defaultdict(Counter)  # draft-ahead outcomes per configuration, from the draft service
    with LocalStack(cfg) as stack, grpc.insecure_channel(stack.orchestrator_addr) as ch, \
            grpc.insecure_channel(stack.draft_addr) as draft_ch:
        stub = recommend_pb2_grpc.RecommenderServiceStub(ch)
        draft_stub = draft_pb2_grpc.DraftServiceStub(draft_ch)
        for pol, d in configs:  # warm-up: load drafters, JIT paths, Triton instances; excluded
            for _u, h in users[:a.warmup]:
                one(stub, h, pol, "" if d == "-" else d, a.items, a.timeout)
        t_measure = time.perf_counter()
        for rep, order, conc, after in phase_plan(concs, a.repeats):
            phases.append({"phase": len(phases), "repeat": rep, "order": order, "concurrency": conc, "after": after})
            rotated = configs[rep % len(configs):] + configs[:rep % len(configs)]  # rotate every repeat
            for pol, d in rotated:
                before = ahead_outcomes(draft_stub)
                recs, wall = run_batch(stub, users, pol, "" if d == "-" else d, conc, a.items, a.timeout)
                ahead[(pol, d, conc)].update(ahead_outcomes(draft_stub) - before)
                for r in recs:
                    r.update(policy=pol, drafter=d, concurrency=conc, repeat=rep, rep=rep, order=order,
                             phase=len(phases) - 1, after=after)
                records[(pol, d, conc)].extend(recs)
                batches[(pol, d, conc)][rep] = (sum(r.get("tokens", 0) for r in recs if "error" not in r), wall)
                ok = [r["latency_ms"] for r in recs if "error" not in r]
                print(f"[speedup] rep {rep} ({order}) conc {conc} {pol:>11}/{d:<9} {wall:6.2f} s  "
                      f"p50 {pct(ok, 50):7.1f} ms  errors {len(recs) - len(ok)}  "
                      f"elapsed {time.perf_counter() - t_start:5.0f} s", flush=True)
        measure_s = time.perf_counter() - t_measure

    summary = summarize(records, batches, configs, concs, a.repeats)
    rows = summary["rows"]
    res = {"date": date, "machine": mach, "loadavg_end": list(os.getloadavg()), "git": git_rev(),
           "git_start": rev_start, "command": command,
           "args": {**vars(a), "out": str(a.out)}, "drafters": drafters, "target_params": target_params,
           "measure_s": measure_s, "summary": summary,
           "adaptive_vs_best": adaptive_vs_best(rows, concs, drafters), "goals": goals(rows, concs),
           "where": where(rows), "notes": a.note, "phases": phases,
           "draft_ahead": {f"{k[0]}|{k[1]}|{k[2]}": dict(v) for k, v in ahead.items() if v},
           "batches": {f"{k[0]}|{k[1]}|{k[2]}": {rep: list(tw) for rep, tw in v.items()} for k, v in batches.items()},
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
