"""Triton's perf_analyzer against `specrec_target`: verifier throughput and latency vs concurrency and tree size.

The model is stateful (sequence batcher, state per correlation id), so perf_analyzer runs it as sequences: an
input-data JSON holds one stream per user, each `--sequence-length` requests long; the first request carries
CONTEXT (the user's prompt; perf_analyzer sets START on it), every request carries a fixed tree of 0 / 8 / 32 nodes
(TREE_TOKENS / TREE_PARENTS; 0 = a plain decoding step). Tree tokens are codes of real items, arranged as
chains of one item each from the root, so every node runs through the target's forward (rejected nodes cost the
same as accepted ones). Each request commits at least the bonus token, so a sequence of L requests stays well
short of the list's end.

    python bench/perf_target.py --profile tiny --concurrency 1,4,16 --trees 0,8,32
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.artifacts import Artifacts  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

FETCH = ROOT / "bench" / "fetch_perf_analyzer.sh"


def tree(arts: Artifacts, n_nodes: int, seed: int) -> tuple[list[int], list[int]]:
    """n_nodes as chains from the root, each chain the first tokens of one item's semantic ID."""
    per = arts.trie.depth
    tokens: list[int] = []
    parents: list[int] = []
    item = seed
    while len(tokens) < n_nodes:
        codes = arts.sids.item_tokens(item % arts.sids.n_items)[:per]  # one item's code tokens
        prev = -1
        for tok in codes[: n_nodes - len(tokens)]:
            tokens.append(int(tok))
            parents.append(prev)
            prev = len(tokens) - 1
        item += 97
    return tokens, parents


def input_data(arts: Artifacts, n_nodes: int, seq_len: int, n_streams: int) -> dict:
    users = [u for u in range(len(arts.split.train)) if len(arts.split.train[u]) > 0][:n_streams]
    streams = []
    for s, u in enumerate(users):
        tokens, parents = tree(arts, n_nodes, seed=s)
        tree_in = {"TREE_TOKENS": {"content": tokens, "shape": [len(tokens)]},
                   "TREE_PARENTS": {"content": parents, "shape": [len(parents)]}}
        ctx = arts.prompt(u)
        steps = [{"CONTEXT": {"content": ctx, "shape": [len(ctx)]}, **tree_in}] + [dict(tree_in)] * (seq_len - 1)
        streams.append(steps)
    return {"data": streams}


def perf_analyzer(binary: str, url: str, data: Path, conc: int, seq_len: int, out_csv: Path,
                  interval_ms: int, stability: int = 30) -> subprocess.CompletedProcess:
    """One perf_analyzer measurement; `stability` = the % spread allowed between its last 3 windows."""
    env = dict(os.environ)
    lib = str(Path(binary).parents[1] / "lib")
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    args = [binary, "-m", "specrec_target", "-i", "grpc", "-u", url, "--input-data", str(data),
            "--concurrency-range", f"{conc}:{conc}", "--sequence-length", str(seq_len),
            "--sequence-id-range", f"1:{10_000_000}", "--measurement-interval", str(interval_ms),
            "--max-trials", "5", "--stability-percentage", str(stability), "-f", str(out_csv)]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)


def parse(out_csv: Path) -> dict:
    with out_csv.open() as f:
        row = next(csv.DictReader(f))
    us = lambda k: float(row[k]) / 1000  # noqa: E731 - microseconds to ms
    return {"infer_per_s": float(row["Inferences/Second"]), "p50_ms": us("p50 latency"),
            "p90_ms": us("p90 latency"), "p99_ms": us("p99 latency"),
            "server_queue_ms": us("Server Queue"), "server_compute_ms": us("Server Compute Infer"),
            "client_send_recv_ms": (float(row["Client Send"]) + float(row["Client Recv"])) / 1000}


def run(arts: Artifacts, concs: list[int], trees: list[int], seq_len: int = 8, interval_ms: int = 2000,
        binary: str | None = None) -> dict:
    binary = binary or subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, check=True,
                                      env={**os.environ, "PY": sys.executable}).stdout.strip()
    rows, failures = [], []
    stack = LocalStack(StackConfig(artifacts=arts.directory, with_drafter=False))
    try:
        stack.start_target()
        with tempfile.TemporaryDirectory() as tmp:
            for n in trees:
                data = Path(tmp) / f"tree{n}.json"
                data.write_text(json.dumps(input_data(arts, n, seq_len, n_streams=max(concs) * 2)))
                for conc in concs:
                    out_csv = Path(tmp) / f"pa-{n}-{conc}.csv"
                    res = perf_analyzer(binary, stack.target_addr, data, conc, seq_len, out_csv, interval_ms)
                    unstable = False
                    if res.returncode != 0 and "stable measurement" in res.stdout + res.stderr:
                        # a shared machine may never settle within 30 %: measure again, accept any spread, say so
                        unstable = True
                        res = perf_analyzer(binary, stack.target_addr, data, conc, seq_len, out_csv, interval_ms * 2,
                                            stability=1000)
                    if res.returncode != 0 or not out_csv.is_file():
                        err = " ".join((res.stderr or res.stdout).split())
                        failures.append({"tree_nodes": n, "concurrency": conc, "error": err[-300:]})
                        print(f"[perf] tree {n} conc {conc}: FAILED {failures[-1]['error'][-200:]}", flush=True)
                        continue
                    r = {"tree_nodes": n, "concurrency": conc, "unstable": unstable, **parse(out_csv)}
                    r["tree_nodes_per_s"] = r["infer_per_s"] * max(n, 1)
                    rows.append(r)
                    print(f"[perf] tree {n:2d} conc {conc:2d}: {r['infer_per_s']:7.1f} infer/s  p50 {r['p50_ms']:6.2f} "
                          f"ms  p99 {r['p99_ms']:6.2f} ms  compute {r['server_compute_ms']:5.2f} ms", flush=True)
    finally:
        stack.stop()
    return {"rows": rows, "failures": failures, "sequence_length": seq_len, "interval_ms": interval_ms,
            "binary": "perf_analyzer from the tritonclient 2.48.0 wheel (bench/fetch_perf_analyzer.sh)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny")
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--trees", default="0,8,32")
    p.add_argument("--sequence-length", type=int, default=8)
    p.add_argument("--interval-ms", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    arts = prepare(a.dataset, a.profile, train=False, progress=False)
    res = run(arts, [int(c) for c in a.concurrency.split(",")], [int(t) for t in a.trees.split(",")],
              a.sequence_length, a.interval_ms)
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
