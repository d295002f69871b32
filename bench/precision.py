"""The target in float32 vs bfloat16 (batch-invariant forward), two stacks side by side, plain and speculative.

Both stacks run the same models and drafter; only SPECREC_TARGET_DTYPE differs. Every policy runs every user on
both stacks one after the other (which stack goes first flips every repeat), so drift of a shared machine hits both
alike. Reported per policy: mean latency on each stack, the bfloat16 / float32 ratio (pairwise median, same user
and repeat, and on mean latency), speedup against float32 plain decoding (the baseline a user has without this
option) and against bfloat16 plain decoding (what lossless means in bfloat16: every bfloat16 list must equal
bfloat16 plain decoding's), per repeat. bfloat16 is a different rounding of the same model: how many users get a
different list than in float32 is counted, not hidden.

    python -m bench.precision --profile bench --users 12 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.ab import add_run_args, by_repeat, measure_on_stacks, parse_configs, write_results
from bench.speedup import git_rev, histories, machine
from harness.stack import LocalStack, StackConfig
from specrec.pipeline import prepare

DTYPES = ("float32", "bfloat16")
PLAIN = "off"


def _key(r: dict) -> tuple:
    return r["user"], r["repeat"]


def summarize(records: list[dict], configs: list[tuple[str, str]], repeats: int) -> list[dict]:
    by = {(r["policy"], r["dtype"]): {} for r in records}
    for r in records:
        by[(r["policy"], r["dtype"])][_key(r)] = r
    base32, base16 = by[(PLAIN, "float32")], by[(PLAIN, "bfloat16")]
    rows = []
    for pol, drafter in configs:
        a, b = by[(pol, "float32")], by[(pol, "bfloat16")]

        def figures(keys: list, a: dict = a, b: dict = b) -> dict:
            lat = {d: [x[k]["latency_ms"] for k in keys] for d, x in (("float32", a), ("bfloat16", b))}
            return {"mean_ms_float32": statistics.fmean(lat["float32"]),
                    "mean_ms_bfloat16": statistics.fmean(lat["bfloat16"]),
                    "bf16_vs_fp32_pairwise": statistics.median(a[k]["latency_ms"] / b[k]["latency_ms"] for k in keys),
                    "bf16_vs_fp32_mean": statistics.fmean(lat["float32"]) / statistics.fmean(lat["bfloat16"]),
                    "speedup_fp32_vs_fp32_plain": statistics.fmean(base32[k]["latency_ms"] for k in keys)
                    / statistics.fmean(lat["float32"]),
                    "speedup_bf16_vs_fp32_plain": statistics.fmean(base32[k]["latency_ms"] for k in keys)
                    / statistics.fmean(lat["bfloat16"]),
                    "speedup_fp32_vs_fp32_plain_pairwise": statistics.median(
                        base32[k]["latency_ms"] / a[k]["latency_ms"] for k in keys),
                    "speedup_bf16_vs_fp32_plain_pairwise": statistics.median(
                        base32[k]["latency_ms"] / b[k]["latency_ms"] for k in keys),
                    "speedup_bf16_vs_bf16_plain": statistics.fmean(base16[k]["latency_ms"] for k in keys)
                    / statistics.fmean(lat["bfloat16"]),
                    "tau_float32": sum(a[k]["committed"] for k in keys) / sum(a[k]["rounds"] for k in keys),
                    "tau_bfloat16": sum(b[k]["committed"] for k in keys) / sum(b[k]["rounds"] for k in keys),
                    "verify_ms_per_round_float32": sum(a[k]["verify_ms"] for k in keys)
                    / sum(a[k]["rounds"] for k in keys),
                    "verify_ms_per_round_bfloat16": sum(b[k]["verify_ms"] for k in keys)
                    / sum(b[k]["rounds"] for k in keys),
                    "mismatches_bfloat16": sum(b[k]["items"] != base16[k]["items"] for k in keys),
                    "mismatches_float32": sum(a[k]["items"] != base32[k]["items"] for k in keys),
                    "lists_differing_between_dtypes": sum(a[k]["items"] != b[k]["items"] for k in keys),
                    "n": len(keys)}

        rows.append({"policy": pol, "drafter": drafter or "-", **by_repeat(list(a), repeats, figures)})
    return rows


def report(res: dict) -> str:
    m = res["machine"]
    out = [f"# Target precision: float32 vs bfloat16 (batch-invariant) — {res['date']}", "",
           f"- CPU: {m['cpu_model']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}",
           f"- command: `{res['command']}`; code at `{res['git']}`",
           f"- profile **{res['args']['profile']}**, {res['args']['users']} users x {res['args']['repeats']} "
           "repeats, concurrency 1; two stacks side by side, each request on both stacks one after the other "
           "(order flips every repeat); measurement wall time " f"{res['measure_s']:.0f} s", "",
           "| policy | drafter | mean ms fp32 | mean ms bf16 | bf16 faster (pairwise median) | bf16 faster (mean) "
           "| speedup vs fp32 plain, pairwise median: fp32 / bf16 | ... on mean latency: fp32 / bf16 "
           "| bf16 vs bf16 plain (mean) | tau fp32 / bf16 | verify ms per round fp32 / bf16 "
           "| bf16 lists != bf16 plain | lists fp32 != bf16 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['policy']} | {r['drafter']} | {r['mean_ms_float32']:.1f} | {r['mean_ms_bfloat16']:.1f} | "
                   f"{r['bf16_vs_fp32_pairwise']:.2f}x | {r['bf16_vs_fp32_mean']:.2f}x | "
                   f"{r['speedup_fp32_vs_fp32_plain_pairwise']:.2f}x / "
                   f"{r['speedup_bf16_vs_fp32_plain_pairwise']:.2f}x | "
                   f"{r['speedup_fp32_vs_fp32_plain']:.2f}x / {r['speedup_bf16_vs_fp32_plain']:.2f}x | "
                   f"{r['speedup_bf16_vs_bf16_plain']:.2f}x | {r['tau_float32']:.2f} / {r['tau_bfloat16']:.2f} | "
                   f"{r['verify_ms_per_round_float32']:.1f} / {r['verify_ms_per_round_bfloat16']:.1f} | "
                   f"{r['mismatches_bfloat16']} of {r['n']} | {r['lists_differing_between_dtypes']} of {r['n']} |")
    out += ["", "Per repeat (bf16 faster, pairwise / on mean; speedup vs fp32 plain of fp32 and of bf16, pairwise / "
            "on mean):", ""]
    for r in res["rows"]:
        reps = "; ".join(f"repeat {p['repeat']}: {p['bf16_vs_fp32_pairwise']:.2f}x / {p['bf16_vs_fp32_mean']:.2f}x, "
                         f"fp32 {p['speedup_fp32_vs_fp32_plain_pairwise']:.2f}x / "
                         f"{p['speedup_fp32_vs_fp32_plain']:.2f}x, bf16 {p['speedup_bf16_vs_fp32_plain_pairwise']:.2f}x"
                         f" / {p['speedup_bf16_vs_fp32_plain']:.2f}x"
                         for p in r["per_repeat"])
        out.append(f"- {r['policy']}/{r['drafter']}: {reps}")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, users=12, repeats=3, configs="off/-,adaptive/model,chain:16/model,chain:8/model")
    p.add_argument("--rerender", type=Path, default=None, help="recompute the summary and report of this results "
                   "JSON from its records (no runs)")
    a = p.parse_args()
    if a.rerender:
        res = json.loads(a.rerender.read_text())
        pairs = list(dict.fromkeys((r["policy"], "" if r["drafter"] == "-" else r["drafter"]) for r in res["records"]))
        res["rows"] = summarize(res["records"], pairs, res["args"]["repeats"])
        a.rerender.write_text(json.dumps(res, indent=1))
        a.rerender.with_suffix(".md").write_text(report(res))
        print(report(res))
        return
    configs = parse_configs(a.configs)
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    users = histories(arts, a.users)
    mach = machine()
    logs = Path(tempfile.mkdtemp(prefix="specrec-precision-"))  # one directory per stack: their logs share names
    stacks = {d: LocalStack(StackConfig(artifacts=arts.directory, policy="adaptive", drafter="model",
                                        extra_env={"SPECREC_TARGET_DTYPE": d}, log_dir=logs / d)) for d in DTYPES}
    records, measure_s = measure_on_stacks(stacks, users, configs, a.repeats, a.items, field="dtype")
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    res = {"date": date, "machine": mach, "git": git_rev(), "command": " ".join(["python -m bench.precision",
                                                                                 *sys.argv[1:]]),
           "args": {**vars(a), "out": str(a.out)}, "measure_s": measure_s,
           "rows": summarize(records, configs, a.repeats), "records": records}
    stem = a.out / f"precision-{date}"
    write_results(res, stem, report)
    print(f"[precision] wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
