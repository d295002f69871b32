"""The benchmark suite behind `make bench` / `make bench-quick`: one command, one report.

Phases, in this order, on the same users (the last 20 training items of each as history):
1. the stack (`bench/speedup.py`): plain decoding through Triton (policy off, jump-forward) against every
   policy x drafter at each concurrency, interleaved repeats (concurrency ascending in even repeats, descending in
   odd ones), pair-by-pair ratios and mean-latency ratios, overall and per repeat, lossless check;
2. in process (`bench/hf_assisted.py`): HF plain `generate`, HF assisted generation with our drafter, and our
   own plain decoding with and without jump-forward (the gain from grammar-forced tokens alone);
3. tau per item slot (`bench/slot_tau.py`, offline replay);
4. perf_analyzer against `specrec_target` (`bench/perf_target.py`);
then plots (`bench/plots.py`), `results/bench-<date>[-quick].json` and `.md`.

    python bench/run.py --quick            # tiny profile, < 5 minutes
    python bench/run.py                    # bench profile (27M target; ~80 min to train on first use), the full sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import hf_assisted, perf_target, plots, slot_tau, speedup  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

FULL_CONFIGS = ("adaptive/model,adaptive/retrieval,adaptive/hybrid,heuristic/model,heuristic/retrieval,"
                "chain:8/model,chain:16/model,fixed:4:16/model,fixed:8:32/model,fixed:4:16/retrieval")
QUICK_CONFIGS = "adaptive/model,adaptive/retrieval,heuristic/model,fixed:4:16/model"
PRESETS = {
    "full": {"profile": "bench", "configs": FULL_CONFIGS, "concurrency": "1,4,16,64", "users": 24, "repeats": 3,
             "warmup": 2, "hf_users": 12, "slot_users": 12, "perf_conc": "1,4,16,64", "perf_interval_ms": 2000},
    "quick": {"profile": "tiny", "configs": QUICK_CONFIGS, "concurrency": "1,16", "users": 8, "repeats": 3,
              "warmup": 1, "hf_users": 4, "slot_users": 4, "perf_conc": "1,4", "perf_interval_ms": 1000},
}


def ensure_models(profile: str, dataset: str = "ml-100k") -> None:
    """Train what is missing, as `make run` does (the target, then the default drafter); cached afterwards.

    Progress bars on: the bench profile's first training takes over an hour on 2 CPU cores."""
    from specrec.training.drafter import train_drafter, trained

    arts = prepare(dataset, profile, train=True, progress=True)
    if not trained(arts):
        print(f"[bench] training the {profile} drafter (once; cached in {arts.directory})", flush=True)
        train_drafter(arts, progress=True)


def phase(name: str, t0: float) -> None:
    print(f"[bench] {name} (load {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{time.perf_counter() - t0:.0f} s since start)", flush=True)


# -- comparisons -------------------------------------------------------------------------------------

def by_user_median(recs: list[dict], key: str = "latency_ms") -> dict[int, float]:
    per: dict[int, list[float]] = {}
    for r in recs:
        if "error" not in r:
            per.setdefault(r["user"], []).append(r[key])
    return {u: statistics.median(v) for u, v in per.items()}


HF_SAME_DRAFTER = {"model": "hf assisted (pad)"}  # our drafter -> the HF run that drafts with it


def adaptive_vs_hf(stack: dict, hf: dict) -> list[dict]:
    """Per drafter and HF assisted run at concurrency 1, on the users both measured: HF latency / adaptive latency
    per user (medians over repeats; the median of those ratios) and the ratio of mean latencies (all requests)."""
    out = []
    hf_names = [n for n in hf["configs"] if n.startswith("hf assisted")]
    for key, recs in stack["records"].items():
        pol, d, conc = key.split("|")
        if pol != "adaptive" or int(conc) != 1:
            continue
        ok = [r for r in recs if "error" not in r]
        ours = by_user_median(ok)
        for name in hf_names:
            their_recs = [r for r in hf["records"] if r["config"] == name and "error" not in r]
            theirs = by_user_median(their_recs)
            common = sorted(set(ours) & set(theirs))
            if not common:
                continue
            ratios = [theirs[u] / ours[u] for u in common]
            ad_mean = statistics.fmean(r["latency_ms"] for r in ok if r["user"] in common)
            hf_mean = statistics.fmean(r["latency_ms"] for r in their_recs if r["user"] in common)
            out.append({"drafter": d, "hf": name, "users": len(common), "ratio_median": statistics.median(ratios),
                        "ratio_mean_latency": hf_mean / ad_mean, "adaptive_mean_ms": ad_mean, "hf_mean_ms": hf_mean,
                        "same_drafter": HF_SAME_DRAFTER.get(d) == name})
    return out


def goals(stack: dict, hf_cmp: list[dict]) -> list[str]:
    """speedup.goals, with issue 15's goal against HF assisted (same drafter) among the goal lines and the other
    drafter / assistant pairs as information lines."""
    g = list(speedup.goals(stack["summary"]["rows"],
                           sorted({r["concurrency"] for r in stack["summary"]["rows"]})))
    goal_d, target = speedup.GOAL_DRAFTER, speedup.GOAL_HF
    what = (f"adaptive/{goal_d} >= {target}x faster than {HF_SAME_DRAFTER[goal_d]} (same drafter) at "
            "concurrency 1 (per-user median)")
    same = [x for x in hf_cmp if x["same_drafter"] and x["drafter"] == goal_d]
    lines = [f"{what}: MISSED — not measured ("
             + ("no HF phase" if not hf_cmp else f"no {HF_SAME_DRAFTER[goal_d]} run or no common users") + ")"]
    for x in same:
        lines = [speedup.goal_line(
            what, x["ratio_median"], target,
            f"per-user median over {x['users']} users; mean-latency ratio {x['ratio_mean_latency']:.2f}x "
            f"({'also >=' if x['ratio_mean_latency'] >= target else 'below'} {target}x: HF {x['hf_mean_ms']:.0f} ms, "
            f"adaptive {x['adaptive_mean_ms']:.0f} ms)")]
    info = [f"adaptive/{x['drafter']} vs {x['hf']} at concurrency 1 (reported, not a goal): "
            f"{x['ratio_median']:.2f}x per-user median over {x['users']} users, {x['ratio_mean_latency']:.2f}x on "
            f"mean latency (HF {x['hf_mean_ms']:.0f} ms, adaptive {x['adaptive_mean_ms']:.0f} ms)"
            for x in hf_cmp if x not in same]
    first_info = next((i for i, line in enumerate(g) if "(reported, not a goal)" in line
                       or line.startswith("goodput")), len(g))
    goodput = next((i for i, line in enumerate(g) if line.startswith("goodput")), len(g))
    return g[:first_info] + lines + g[first_info:goodput] + info + g[goodput:]


# -- report ------------------------------------------------------------------------------------------

def headline(stack: dict, hf: dict | None) -> str:
    rows = stack["summary"]["rows"]
    conc1 = [r for r in rows if r["concurrency"] == 1]
    base = next(r for r in conc1 if r["policy"] == speedup.BASELINE)
    lines = ["| system | drafter | p50 ms | p90 ms | p99 ms | mean ms | tokens/s | speedup vs plain (pairwise median) "
             "| speedup vs plain (mean latency) | tau | ready rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fixed = [r for r in conc1 if r["policy"].startswith(("fixed:", "chain:"))]
    best_fixed = min(fixed, key=lambda r: r["mean_ms"]) if fixed else None
    for r in conc1:
        if r["policy"] in (speedup.BASELINE, "adaptive", "heuristic") or r is best_fixed:
            name = "specrec plain (off)" if r["policy"] == speedup.BASELINE else f"specrec {r['policy']}"
            if r is best_fixed:
                name += " (best fixed/chain)"
            lines.append(f"| {name} | {r['drafter']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p99_ms']:.0f} | "
                         f"{r['mean_ms']:.0f} | {r['tokens_per_s']:.0f} | {r['speedup_median_pairwise']:.2f}x | "
                         f"{r['speedup_mean_latency']:.2f}x | {r['tau']:.2f} | {speedup.rate(r['ready_rate'])} |")
    for name, c in (hf or {}).get("configs", {}).items():
        if name.startswith("hf"):
            lines.append(f"| {name} (in process) | {'-' if 'generate' in name else name.split('(')[1][:-1]} | "
                         f"{c['p50_ms']:.0f} | {c['p90_ms']:.0f} | {c['p99_ms']:.0f} | {c['mean_ms']:.0f} | "
                         f"{c['tokens_per_s']:.0f} | {base['p50_ms'] / c['p50_ms']:.2f}x (p50 ratio) | "
                         f"{base['mean_ms'] / c['mean_ms']:.2f}x | {c['tau']:.2f} | - |")
    return "\n".join(lines)


def goodput_table(stack: dict) -> str:
    rows = stack["summary"]["rows"]
    concs = sorted({r["concurrency"] for r in rows})
    configs = list(dict.fromkeys((r["policy"], r["drafter"]) for r in rows))
    lines = ["| policy | drafter | " + " | ".join(f"conc {c}" for c in concs) + " |",
             "|---|---|" + "---|" * len(concs)]
    for pol, d in configs:
        cells = []
        for c in concs:
            r = next((x for x in rows if (x["policy"], x["drafter"], x["concurrency"]) == (pol, d, c)), None)
            cells.append("-" if r is None else (f"{r['tokens_per_s']:.0f} tok/s" if pol == speedup.BASELINE
                                                  else f"{r['goodput_ratio_median']:.2f}x"))
        lines.append(f"| {pol} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hf_table(hf: dict) -> str:
    lines = ["| configuration | n | p50 ms | p90 ms | p99 ms | mean ms | tokens/s | target forwards | tau "
             "| mismatches |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in hf["configs"].items():
        lines.append(f"| {name} | {c['n']} | {c['p50_ms']:.1f} | {c['p90_ms']:.1f} | {c['p99_ms']:.1f} | "
                     f"{c['mean_ms']:.1f} | {c['tokens_per_s']:.0f} | {c['target_forwards']:.1f} | {c['tau']:.2f} | "
                     f"{len(c['mismatched_users']) or '-'} |")
    return "\n".join(lines)


def slot_table(sl: dict) -> str:
    cols = sl["columns"]
    slots = sorted({s for d in sl["drafters"].values() for c in d.values() for s in c["slots"]},
                   key=lambda s: (s == "end", s))
    lines = ["| drafter | column | all | " + " | ".join(slots) + " |", "|---|---|---|" + "---|" * len(slots)]
    for name, d in sl["drafters"].items():
        for col in cols:
            v = d[col]
            lines.append(f"| {name} | {col} | {v['tau']:.2f} | "
                         + " | ".join(f"{v['slots'][s]:.2f}" if s in v["slots"] else "-" for s in slots) + " |")
    return "\n".join(lines)


def perf_table(perf: dict) -> str:
    lines = ["| tree nodes | concurrency | verifications/s | p50 ms | p90 ms | p99 ms | server queue ms | "
             "server compute ms |", "|---|---|---|---|---|---|---|---|"]
    for r in perf["rows"]:
        flag = " (unstable: 2nd try, any spread accepted)" if r.get("unstable") else ""
        lines.append(f"| {r['tree_nodes']} | {r['concurrency']} | {r['infer_per_s']:.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_queue_ms']:.2f} | "
                     f"{r['server_compute_ms']:.2f}{flag} |")
    lines += [f"| {f['tree_nodes']} | {f['concurrency']} | FAILED: {f['error'][-160:]} | | | | | |"
              for f in perf.get("failures", [])]
    return "\n".join(lines)


def where_time_goes(stack: dict, hf: dict | None, perf: dict | None) -> list[str]:
    out = [stack["where"]]
    if perf and perf["rows"]:
        p0 = next((r for r in perf["rows"] if r["tree_nodes"] == 0 and r["concurrency"] == 1), None)
        p32 = next((r for r in perf["rows"] if r["tree_nodes"] == 32 and r["concurrency"] == 1), None)
        if p0:
            out.append(f"perf_analyzer, one sequence: a plain step costs {p0['p50_ms']:.2f} ms p50 at the client; "
                       f"the model's execute() (Python backend + forward) takes {p0['server_compute_ms']:.2f} ms "
                       "on mean"
                       + (f"; a 32-node tree {p32['p50_ms']:.2f} ms ({p32['server_compute_ms']:.2f} ms compute), "
                          f"{p32['server_compute_ms'] / max(p0['server_compute_ms'], 1e-9):.1f}x a plain step"
                          if p32 else "") + ".")
    if hf:
        for name, c in hf["configs"].items():
            out.append(f"{name}: {c['mean_ms']:.1f} ms per request, {c['target_forwards']:.1f} target forwards, "
                       f"{c['mean_ms'] / max(c['target_forwards'], 1e-9):.1f} ms per target forward "
                       "(drafting included, if any).")
    return out


PROFILE_ROLES = {"tiny": "; the test profile, for smoke runs only", "small": "; the `make run` default",
                 "bench": "; the benchmark profile"}


def report(res: dict) -> str:
    st, hf, sl, perf = res["stack"], res.get("hf"), res.get("slot_tau"), res.get("perf")
    m = st["machine"]
    out = [f"# specrec benchmark — {res['date']}{' (quick)' if res['quick'] else ''}", "",
           "## Machine and run", "",
           f"- CPU: {m['cpu_model']}; `nproc` = {m['nproc_cmd']}; {m['platform']}, Python {m['python']}",
           "- load average (1/5/15 min) per phase: " + "; ".join(
               f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in res["load"].items()),
           "- the services, the load generator and the HF phase share these 2 cores (load average above; other jobs, "
           "if any, are named under Caveats): absolute milliseconds are noisy, the pairwise ratios within one phase "
           "are the fair comparison",
           f"- command: `{res['command']}`; code `{st['git_start']}` at start, `{res['git_end']}` at the end",
           f"- profile **{res['profile']}** (target {st['target_params']} parameters"
           + PROFILE_ROLES.get(res["profile"], "") + ")",
           f"- stack phase: {st['args']['users']} users, {st['args']['repeats']} repeats interleaved, warm-up "
           f"{st['args']['warmup']} per configuration excluded, concurrency {st['args']['concurrency']} (a batch holds "
           f"max(users, concurrency) requests), {len(st['summary']['rows'])} rows",
           f"- stack phase order (even repeats ascending, odd descending): {speedup.phase_order(st.get('phases', []))}",
           "- time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["phase_s"].items())
           + f"; **total {res['total_s']:.0f} s**", ""]
    notes = st.get("notes") or []
    if notes:
        out += ["Caveats:", ""] + [f"- {n}" for n in notes] + [""]
    out += ["## Headline (concurrency 1)", "", headline(st, hf), "",
            "Speedup = plain latency / this latency, pairwise median (same user and repeat) and ratio of mean "
            "latencies for the stack rows; HF rows run in one process without gRPC or Triton, their ratios are stack "
            "plain p50 / HF p50 and stack plain mean / HF mean.", "",
            "## Goals (issue 15)", ""] + [f"- {g}" for g in res["goals"]] + [""]
    out += ["Against HF assisted generation: HF latency / adaptive latency on the users both phases measured, per "
            "user (median over repeats), median over users; and HF mean latency / adaptive mean latency over all "
            "their requests. The HF phase runs after the stack phase, in one process.", "",
            "Definitions:", ""] + [f"- {d}" for d in speedup.DEFINITIONS] + [""]
    out += ["## Goodput vs plain at each concurrency", "", goodput_table(st), "",
            "Plain row: generated tokens/s; others: ratio to plain's batch in the same repeat (median of repeats).", ""]
    mism = speedup.mismatches(st["summary"]["rows"])
    hf_mism = [f"{n}: users {c['mismatched_users']}" for n, c in (hf or {}).get("configs", {}).items()
               if c["mismatched_users"]]
    n_spec = sum(r["n"] for r in st["summary"]["rows"] if r["policy"] != speedup.BASELINE)
    out += ["## Lossless check", "",
            ("**MISMATCHES:** " + "; ".join(mism + hf_mism)) if mism or hf_mism else
            f"All {n_spec} speculative stack responses equal plain decoding's list for the same user, and every "
            "in-process output (HF generate, HF assisted, ours with and without jump-forward) equals the reference "
            "greedy decode (`specrec.decoding.decode`) token for token.", ""]
    out += ["## All stack configurations", "", speedup.table(st["summary"]["rows"]), ""]
    out += ["## Per repeat (concurrency 1)", "", speedup.per_repeat_table(st["summary"]["rows"]), ""]
    out += ["## Adaptive vs the best other policy (heuristic, fixed or chain) with the same drafter", ""]
    out += speedup.adaptive_vs_best_table(st["adaptive_vs_best"]) + [""]
    if res.get("adaptive_vs_hf"):
        out += ["## Adaptive vs HF assisted generation (concurrency 1)", "",
                "| drafter | HF run | same drafter | users | HF / adaptive (per-user median) | HF / adaptive (mean "
                "latency) | HF mean ms | adaptive mean ms |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {x['drafter']} | {x['hf']} | {'yes' if x['same_drafter'] else 'no'} | {x['users']} | "
                f"{x['ratio_median']:.2f}x | {x['ratio_mean_latency']:.2f}x | {x['hf_mean_ms']:.1f} | "
                f"{x['adaptive_mean_ms']:.1f} |" for x in res["adaptive_vs_hf"]] + [""]
    if hf:
        hs = hf["assistant_settings"]
        out += ["## In process: Hugging Face assisted generation and jump-forward", "", hf_table(hf), "",
                f"- HF assisted: `target.generate(assistant_model=...)`, greedy, batch 1, "
                f"`num_assistant_tokens_schedule='heuristic'` (start {hs['num_assistant_tokens_start']}"
                f" tokens), confidence threshold {hs['assistant_confidence_threshold']} "
                f"({hs['note']}); the list grammar as a LogitsProcessor. `pad` = our PAD-Rec "
                "drafter wrapped as an HF model (exact: slot embedding folded into the token embedding, draft-step "
                "head counted per assisted round); `plain` = the plain distilled drafter as a bare LlamaForCausalLM.",
                f"- Jump-forward: the grammar forces {hf['forced_share']:.0%} of the {hf['tokens_per_list']:.0f} "
                "tokens of a list (SEP, usually the collision code, EOS); our plain decoding appends them without a "
                "model step (`ours plain (jump-forward)`) or steps the model for each "
                "(`ours plain (no jump-forward)`). "
                "The orchestrator's loop always jumps forward (no switch without editing orchestrator/), so the "
                "stack's plain baseline already includes this gain; the in-process pair shows its size.", ""]
    if sl:
        out += [f"## Tau per item slot (offline replay, {sl['users']} of the same users)", "", slot_table(sl), "",
                "Rounds grouped by the slot of their first unforced token (L0..L2 code levels, L3 the collision code, "
                "end = only forced tokens left); `chain 4` = a chain of 4, `tree 16` = a depth-8 top-8 tree of 16 "
                "nodes.", ""]
    if perf:
        out += ["## perf_analyzer: the verifier alone", "", perf_table(perf), "",
                f"Stateful sequences of {perf['sequence_length']} requests (START + CONTEXT first, then one fixed tree "
                f"per request), `--concurrency-range C:C`, measurement interval {perf['interval_ms']} ms; "
                f"{perf['binary']}. Latency percentiles include the START request (prefill) of each sequence.", ""]
    if res.get("perf_first_attempt"):
        out += ["First attempt, in the same run right after the stack phase (lower machine load; the points that did "
                "not settle within 30 % were measured again above, together with the whole grid):", "",
                perf_table(res["perf_first_attempt"]), ""]
    out += ["## Where the time goes", ""] + [f"- {w}" for w in where_time_goes(st, hf, perf)] + [""]
    out += ["## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]] + [""]
    return "\n".join(out)


def rerender(path: Path, redo: set[str]) -> int:
    """Re-run some phases of a finished run (e.g. perf) and rewrite its report and JSON in place."""
    res = json.loads(path.read_text())
    if "batches" not in res["stack"]:
        raise SystemExit(f"{path} predates per-repeat batches in the JSON; its summary cannot be recomputed")
    pre = PRESETS["quick" if res["quick"] else "full"]
    if "perf" in redo:
        arts = prepare("ml-100k", res["profile"], train=False, progress=False)
        t = time.perf_counter()
        res["perf"] = perf_target.run(arts, [int(c) for c in pre["perf_conc"].split(",")], [0, 8, 32],
                                      interval_ms=pre["perf_interval_ms"])
        res["phase_s"]["perf_analyzer (re-run)"] = time.perf_counter() - t
        res["load"]["after perf re-run"] = list(os.getloadavg())
        res["plots"] = [x for x in res["plots"] if "perf" not in x]
        if res["perf"]["rows"]:
            out = plots.perf_analyzer_plot(res["perf"], path.with_name(path.stem + "-perf-analyzer.png"))
            res["plots"].append(out.name)
    st = res["stack"]
    st["summary"] = speedup.resummarize(st)
    rows = st["summary"]["rows"]
    concs = sorted({r["concurrency"] for r in rows})
    st["adaptive_vs_best"] = speedup.adaptive_vs_best(rows, concs, st["drafters"])
    st["goals"], st["where"] = speedup.goals(rows, concs), speedup.where(rows)
    res["adaptive_vs_hf"] = adaptive_vs_hf(st, res["hf"]) if res.get("hf") else []
    res["goals"] = goals(st, res["adaptive_vs_hf"])
    path.write_text(json.dumps(res, indent=1, default=str) + "\n")
    path.with_suffix(".md").write_text(report(res))
    print(f"[bench] rewrote {path} and {path.with_suffix('.md')}")
    return 0


# -- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny profile, a smoke run under 5 minutes")
    p.add_argument("--profile", default=None, help="override the preset's profile (full: bench, quick: tiny)")
    p.add_argument("--skip", default="", help="phases to skip: any of hf,slots,perf")
    p.add_argument("--out", type=Path, default=speedup.RESULTS)
    p.add_argument("--note", action="append", default=[], help="a caveat for the report (repeatable)")
    p.add_argument("--rerender", type=Path, default=None, help="rewrite the report of this results JSON (no runs)")
    p.add_argument("--redo", default="", help="with --rerender: phases to run again into it (perf)")
    a = p.parse_args(argv)
    if a.rerender:
        return rerender(a.rerender, set(a.redo.split(",")) - {""})
    pre = dict(PRESETS["quick" if a.quick else "full"])
    profile = a.profile or pre["profile"]
    skip = set(a.skip.split(",")) - {""}
    t0 = time.perf_counter()
    command = " ".join(shlex.quote(x) for x in ["python", "bench/run.py", *(argv or sys.argv[1:])])
    load, phase_s = {"start": list(os.getloadavg())}, {}

    ensure_models(profile)
    phase("stack: plain vs policies x drafters", t0)
    sargs = speedup.parser().parse_args(
        ["--profile", profile, "--configs", pre["configs"], "--concurrency", pre["concurrency"],
         "--users", str(pre["users"]), "--repeats", str(pre["repeats"]), "--warmup", str(pre["warmup"]),
         *[x for n in a.note for x in ("--note", n)]])
    t = time.perf_counter()
    stack = speedup.run(sargs, command)
    phase_s["stack"], load["after stack"] = time.perf_counter() - t, list(os.getloadavg())

    arts = prepare(sargs.dataset, profile, train=False, progress=False)
    users = [u for u, _ in speedup.histories(arts, pre["users"])]
    hf = sl = perf = None
    if "hf" not in skip:
        phase("in process: HF generate, HF assisted, jump-forward", t0)
        t = time.perf_counter()
        hf = hf_assisted.run(arts, users[: pre["hf_users"]], pre["repeats"], assistants=("pad", "plain"))
        phase_s["hf"], load["after hf"] = time.perf_counter() - t, list(os.getloadavg())
    if "slots" not in skip:
        phase("tau per item slot (offline)", t0)
        t = time.perf_counter()
        sl = slot_tau.run(arts, users[: pre["slot_users"]], [d for d in ("model", "retrieval", "hybrid")])
        phase_s["slot tau"], load["after slot tau"] = time.perf_counter() - t, list(os.getloadavg())
    if "perf" not in skip:
        phase("perf_analyzer on specrec_target", t0)
        t = time.perf_counter()
        perf = perf_target.run(arts, [int(c) for c in pre["perf_conc"].split(",")], [0, 8, 32],
                               interval_ms=pre["perf_interval_ms"])
        phase_s["perf_analyzer"], load["after perf"] = time.perf_counter() - t, list(os.getloadavg())

    stem = a.out / f"bench-{stack['date']}{'-quick' if a.quick else ''}"
    a.out.mkdir(parents=True, exist_ok=True)
    concs = [int(c) for c in pre["concurrency"].split(",")]
    made = [plots.speedup_vs_concurrency(stack["summary"]["rows"], Path(f"{stem}-speedup.png")),
            plots.latency_cdfs(stack["records"], (hf or {}).get("records", []), concs, Path(f"{stem}-latency-cdf.png"))]
    if sl:
        made.append(plots.tau_per_slot(sl, Path(f"{stem}-tau-slot.png")))
    if perf and perf["rows"]:
        made.append(plots.perf_analyzer_plot(perf, Path(f"{stem}-perf-analyzer.png")))
    hf_cmp = adaptive_vs_hf(stack, hf) if hf else []
    res = {"date": stack["date"], "quick": a.quick, "profile": profile, "command": command,
           "git_end": speedup.git_rev(), "load": load, "phase_s": phase_s, "total_s": time.perf_counter() - t0,
           "goals": goals(stack, hf_cmp), "adaptive_vs_hf": hf_cmp, "plots": [x.name for x in made],
           "stack": stack, "hf": hf, "slot_tau": sl, "perf": perf}
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(report(res))
    print(headline(stack, hf))
    print("\n".join(res["goals"]))
    mism = speedup.mismatches(stack["summary"]["rows"]) + [n for n, c in (hf or {}).get("configs", {}).items()
                                                           if c["mismatched_users"]]
    if mism:
        print("!!! LOSSLESS MISMATCH: " + "; ".join(mism), flush=True)
    print(f"[bench] wrote {stem}.md, {stem}.json and {len(made)} plots; the whole run took {res['total_s']:.0f} s "
          f"({res['total_s'] / 60:.1f} min)")
    return 1 if mism else 0


if __name__ == "__main__":
    raise SystemExit(main())
