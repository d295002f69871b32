"""Speculative vs plain beam search (the Retrieve RPC), side by side on one local stack, K = 10 and 50,
concurrency 1 and 16.

Every configuration (k, beam width, concurrency) runs the same held-out users (never in drafter training) plain
and speculative; which of the two goes first flips every repeat, and the concurrency phases run ascending in even
repeats and descending in odd ones. Ratios are pair by pair (same user, repeat, configuration): the pairwise median
of plain / speculative latency beside the mean-latency ratio, overall and per repeat. Every speculative answer must
equal the plain one (items in order, scores within 1e-4): mismatches are counted. Where the time goes: target
forwards (rounds) per request, nodes scored, drafting and verification milliseconds.

    python -m bench.beam --profile bench --users 24 --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.speedup import RESULTS, git_rev, machine
from harness.stack import LocalStack, StackConfig
from orchestrator.config import BEAM_DRAFT_MODES
from specrec.drafting.offline import eval_users
from specrec.pipeline import prepare
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc

MODES = ("plain", "speculative")


def one(stub, history: list[str], k: int, width: int, plain: bool, tree_nodes: int) -> dict:
    req = pb.RetrieveRequest(history=history, k=k, beam_width=width, plain=plain, max_tree_nodes=tree_nodes)
    t0 = time.perf_counter()
    resp = stub.Retrieve(req, timeout=120)
    s = resp.stats
    return {"latency_ms": (time.perf_counter() - t0) * 1e3, "items": [i.item_id for i in resp.items],
            "scores": [i.log_prob for i in resp.items], "rounds": s.rounds, "tree_nodes": s.tree_nodes,
            "drafted": s.drafted_nodes, "draft_ms": s.draft_ms, "verify_ms": s.verify_ms, "total_ms": s.total_ms}


def phase(stub, users, k: int, width: int, conc: int, mode: str, tree_nodes: int) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        futs = [(u, pool.submit(one, stub, h, k, width, mode == "plain", tree_nodes)) for u, h in users]
        out = [f.result() | {"user": u} for u, f in futs]
    return out, time.perf_counter() - t0


def measure(stub, users, shapes, concs, repeats: int, tree_nodes: int) -> tuple[list[dict], list[dict]]:
    records, walls = [], []
    for rep in range(repeats):
        for conc in (concs if rep % 2 == 0 else concs[::-1]):
            for k, width in shapes:
                for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                    recs, wall = phase(stub, users, k, width, conc, mode, tree_nodes)
                    key = {"k": k, "width": width, "conc": conc, "mode": mode, "repeat": rep}
                    records += [r | key for r in recs]
                    walls.append(key | {"wall_s": wall, "requests": len(recs)})
        print(f"[beam] repeat {rep} done", flush=True)
    return records, walls


def _ratios(plain: dict, spec: dict) -> tuple[float, float]:
    keys = sorted(plain.keys() & spec.keys())
    pairwise = statistics.median(plain[x]["latency_ms"] / spec[x]["latency_ms"] for x in keys)
    mean = statistics.fmean(plain[x]["latency_ms"] for x in keys) / statistics.fmean(spec[x]["latency_ms"]
                                                                                     for x in keys)
    return pairwise, mean


def _same(a: dict, b: dict) -> bool:
    return a["items"] == b["items"] and all(abs(x - y) <= 1e-4 for x, y in zip(a["scores"], b["scores"], strict=True))


def summarize(records: list[dict], walls: list[dict], repeats: int) -> list[dict]:
    by: dict[tuple, dict] = {}
    for r in records:
        by.setdefault((r["k"], r["width"], r["conc"], r["mode"]), {})[(r["user"], r["repeat"])] = r
    rows = []
    for (k, width, conc, mode), spec in by.items():
        if mode != "speculative":
            continue
        plain = by[(k, width, conc, "plain")]
        keys = sorted(plain.keys() & spec.keys())
        per_repeat = [_ratios({x: plain[x] for x in keys if x[1] == rep}, {x: spec[x] for x in keys if x[1] == rep})
                      for rep in range(repeats)]
        pairwise, mean = _ratios(plain, spec)
        wall = {m: sum(w["wall_s"] for w in walls if (w["k"], w["width"], w["conc"], w["mode"]) == (k, width, conc, m))
                for m in MODES}

        def avg(d: dict, f: str, keys: list = keys) -> float:
            return statistics.fmean(d[x][f] for x in keys)

        rows.append({"k": k, "width": width, "conc": conc, "requests": len(keys),
                     "plain_ms": avg(plain, "latency_ms"), "spec_ms": avg(spec, "latency_ms"),
                     "pairwise": pairwise, "mean_ratio": mean, "per_repeat": per_repeat,
                     "throughput_ratio": wall["plain"] / wall["speculative"],
                     "plain_rounds": avg(plain, "rounds"), "spec_rounds": avg(spec, "rounds"),
                     "plain_nodes": avg(plain, "tree_nodes"), "spec_nodes": avg(spec, "tree_nodes"),
                     "drafted": avg(spec, "drafted"), "draft_ms": avg(spec, "draft_ms"),
                     "plain_verify_ms": avg(plain, "verify_ms"), "spec_verify_ms": avg(spec, "verify_ms"),
                     "mismatches": sum(not _same(plain[x], spec[x]) for x in keys)})
    return rows


def report(res: dict) -> str:
    lines = [f"# Speculative vs plain beam search (Retrieve), {res['date']}", "",
             f"`{res['command']}` at {res['git']}; {res['machine']['cpu_model']}, {res['machine']['nproc']} cores; "
             f"profile {res['args']['profile']}, {res['users']} held-out users, {res['args']['repeats']} repeats, "
             f"target dtype {res['args']['target_dtype']}, drafted tree with the {res['args']['beam_draft']} "
             f"(SPECREC_BEAM_DRAFT).", "",
             "Ratios are plain / speculative: **pairwise** = median over (user, repeat) pairs, **mean** = ratio of "
             "mean latencies, **per repeat** = (pairwise, mean) of each repeat, **throughput** = plain / speculative "
             "wall time of the whole phase. Rounds = target forwards per request (the prefill counts as one).", "",
             "| k | beam width | concurrency | plain ms | speculative ms | pairwise | mean | per repeat | throughput "
             "| rounds plain / spec | nodes plain / spec (drafted) | draft ms | verify ms plain / spec | mismatches |",
             "|" + "---|" * 14]
    for r in res["rows"]:
        reps = ", ".join(f"{p:.2f}/{m:.2f}" for p, m in r["per_repeat"])
        lines.append(f"| {r['k']} | {r['width']} | {r['conc']} | {r['plain_ms']:.1f} | {r['spec_ms']:.1f} | "
                     f"{r['pairwise']:.2f}x | {r['mean_ratio']:.2f}x | {reps} | {r['throughput_ratio']:.2f}x | "
                     f"{r['plain_rounds']:.2f} / {r['spec_rounds']:.2f} | {r['plain_nodes']:.0f} / "
                     f"{r['spec_nodes']:.0f} ({r['drafted']:.0f}) | {r['draft_ms']:.1f} | "
                     f"{r['plain_verify_ms']:.1f} / {r['spec_verify_ms']:.1f} | {r['mismatches']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="bench")
    p.add_argument("--users", type=int, default=24, help="held-out users (never in drafter training)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--shapes", default="10:10,50:50", help="k:beam_width pairs")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--tree-nodes", type=int, default=0, help="nodes of the drafted tree (0 = the server's choice)")
    p.add_argument("--target-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--beam-draft", default="prefill", choices=BEAM_DRAFT_MODES,
                   help="the orchestrator's SPECREC_BEAM_DRAFT: the tree rides with the prefill, or overlaps it")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    shapes = [tuple(int(x) for x in s.split(":")) for s in a.shapes.split(",")]
    concs = [int(c) for c in a.concurrency.split(",")]
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    ids = arts.data.item_ids
    users = [(u, [str(ids[i]) for i in arts.split.train[u][-arts.profile.max_history:]])
             for u in eval_users(arts, a.users)]
    mach = machine()
    stack = LocalStack(StackConfig(artifacts=arts.directory, drafter="model",
                                   extra_env={"SPECREC_TARGET_DTYPE": a.target_dtype,
                                              "SPECREC_BEAM_DRAFT": a.beam_draft}))
    try:
        stack.start()
        with grpc.insecure_channel(stack.orchestrator_addr) as ch:
            stub = recommend_pb2_grpc.RecommenderServiceStub(ch)
            measure(stub, users[:2], shapes, [1], 1, a.tree_nodes)  # warm-up, excluded
            t0 = time.perf_counter()
            records, walls = measure(stub, users, shapes, concs, a.repeats, a.tree_nodes)
            measure_s = time.perf_counter() - t0
    finally:
        stack.stop()
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    res = {"date": date, "machine": mach, "git": git_rev(), "users": len(users),
           "command": " ".join(["python -m bench.beam", *sys.argv[1:]]), "args": {**vars(a), "out": str(a.out)},
           "measure_s": measure_s, "rows": summarize(records, walls, a.repeats), "walls": walls, "records": records}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / (f"beam-{date}" + ("" if a.beam_draft == "prefill" else f"-{a.beam_draft}"))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(report(res))
    print(report(res))
    print(f"[beam] wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
