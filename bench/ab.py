"""An A/B of code (a git ref, run from a worktree) or of settings (environment): two stacks side by side, request by
request.

Separate runs cannot tell apart effects of a few percent here: the machine's pace moves between runs (plain decoding
took 352 ms in one run and 300 ms in the next, same code). Every user runs on both stacks one after the other (which
arm goes first flips every repeat), so drift hits both arms alike, and each comparison is paired: same user, repeat
and policy. Reported per policy: each arm's mean latency, B against A (pairwise median of the latency ratio, and the
ratio of means, also per repeat), each arm's speedup against its own plain decoding, tau (committed tokens /
verification rounds), ready rate, drafting waited for, and whether every list equals its own arm's plain decoding.

    .venv/bin/python -m bench.ab --b-ref HEAD~1 --label lean    # this checkout (A) against the commit before (B)
    .venv/bin/python -m bench.ab --b-env SPECREC_DRAFT_AHEAD_GUESSES=4 --label guesses
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.speedup import RESULTS, git_rev, histories, machine, one
from harness.stack import LocalStack, StackConfig
from specrec.pipeline import prepare
from specrec.v1 import recommend_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
PLAIN = "off"
ARMS = ("A", "B")


def interleaved(stubs: dict[str, Any], users: Sequence[tuple[int, list[str]]], configs: list[tuple[str, str]],
                repeats: int, items: int, field: str = "arm", timeout: float = 60.0) -> list[dict]:
    """Every (policy, drafter) x user on every stub one after the other; the stubs' order flips every repeat and
    the configurations rotate. Each record says which stub served it under `field`."""
    names = list(stubs)
    records = []
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for pol, drafter in configs[rep % len(configs):] + configs[:rep % len(configs)]:
            for u, h in users:
                for name in order:
                    r = one(stubs[name], h, pol, drafter, items, timeout)
                    records.append(r | {"user": u, "repeat": rep, "policy": pol, "drafter": drafter or "-",
                                        field: name})
        print(f"[ab] repeat {rep} done", flush=True)
    return records


def _ratio_figures(a: dict, b: dict, keys: list) -> dict:
    lat_a, lat_b = [a[k]["latency_ms"] for k in keys], [b[k]["latency_ms"] for k in keys]
    return {"b_faster_pairwise": statistics.median(x / y for x, y in zip(lat_a, lat_b, strict=True)),
            "b_faster_mean": statistics.fmean(lat_a) / statistics.fmean(lat_b), "n": len(keys)}


def _arm_figures(recs: dict, plain: dict | None, keys: list) -> dict:
    rs = [recs[k] for k in keys]
    after = sum(r["tree_rounds"] - r["start_trees"] for r in rs)
    out = {"mean_ms": statistics.fmean(r["latency_ms"] for r in rs),
           "tau": sum(r["committed"] for r in rs) / max(sum(r["rounds"] for r in rs), 1),
           # a START tree is never ready (nothing ran before it to hide behind): ready_trees counts none of them
           "ready": sum(r["ready_trees"] for r in rs) / after if after else float("nan"),
           "draft_ms": statistics.fmean(r["draft_ms"] for r in rs)}
    if plain is not None:
        out["speedup_pairwise"] = statistics.median(plain[k]["latency_ms"] / recs[k]["latency_ms"] for k in keys)
        out["speedup_mean"] = statistics.fmean(plain[k]["latency_ms"] for k in keys) / out["mean_ms"]
        out["unlike_plain"] = sum(recs[k]["items"] != plain[k]["items"] for k in keys)
    return out


def summarize(records: list[dict], configs: list[tuple[str, str]], repeats: int) -> list[dict]:
    by: dict[tuple[str, str, str], dict] = {}
    for r in records:
        by.setdefault((r["policy"], r["drafter"], r["arm"]), {})[(r["user"], r["repeat"])] = r
    rows = []
    for pol, drafter in configs:
        d = drafter or "-"
        a, b = by[(pol, d, "A")], by[(pol, d, "B")]

        def figures(keys: list, a: dict = a, b: dict = b, pol: str = pol) -> dict:
            fig = _ratio_figures(a, b, keys)
            for arm, recs in (("A", a), ("B", b)):
                plain = by.get((PLAIN, "-", arm)) if pol != PLAIN else None
                fig[arm] = _arm_figures(recs, plain, keys)
            return fig | {"lists_differing_between_arms": sum(a[k]["items"] != b[k]["items"] for k in keys)}

        rows.append({"policy": pol, "drafter": d, **by_repeat([k for k in a if k in b], repeats, figures)})
    return rows


def by_repeat(keys: list[tuple], repeats: int, figures: Callable[[list[tuple]], dict]) -> dict:
    """figures() of all (user, repeat) keys, and of each repeat's under "per_repeat"."""
    per = [figures([k for k in keys if k[1] == rep]) | {"repeat": rep} for rep in range(repeats)]
    return figures(keys) | {"per_repeat": per}


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.0%}"


def report(res: dict) -> str:
    m, arms = res["machine"], res["arms"]
    out = [f"# A/B, two stacks side by side: {res['label']} — {res['date']}", "",
           f"- A: {arms['A']['what']}", f"- B: {arms['B']['what']}",
           f"- CPU: {m['cpu_model']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}",
           f"- command: `{res['command']}`; this checkout at `{res['git']}`",
           f"- profile **{res['args']['profile']}**, {res['args']['users']} held-out users x {res['args']['repeats']} "
           "repeats, concurrency 1; each request on both stacks one after the other (order flips every repeat); "
           f"measurement wall time {res['measure_s']:.0f} s", "",
           "| policy | drafter | mean ms A | mean ms B | B faster (pairwise median) | B faster (mean) "
           "| speedup vs own plain, pairwise: A / B | ... on mean latency: A / B | tau A / B | ready A / B "
           "| drafting waited ms A / B | lists unlike own plain A / B | lists A != B |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        a, b = r["A"], r["B"]
        sp = (f"{a['speedup_pairwise']:.2f}x / {b['speedup_pairwise']:.2f}x",
              f"{a['speedup_mean']:.2f}x / {b['speedup_mean']:.2f}x",
              f"{a['unlike_plain']} / {b['unlike_plain']} of {r['n']}") if "speedup_mean" in a else ("-", "-", "-")
        out.append(f"| {r['policy']} | {r['drafter']} | {a['mean_ms']:.1f} | {b['mean_ms']:.1f} | "
                   f"{r['b_faster_pairwise']:.3f}x | {r['b_faster_mean']:.3f}x | {sp[0]} | {sp[1]} | "
                   f"{a['tau']:.2f} / {b['tau']:.2f} | {_pct(a['ready'])} / {_pct(b['ready'])} | "
                   f"{a['draft_ms']:.1f} / {b['draft_ms']:.1f} | {sp[2]} | {r['lists_differing_between_arms']} |")
    out += ["", "Per repeat, B faster (pairwise median / on mean latency):", ""]
    for r in res["rows"]:
        reps = "; ".join(f"repeat {p['repeat']}: {p['b_faster_pairwise']:.3f}x / {p['b_faster_mean']:.3f}x"
                         for p in r["per_repeat"])
        out.append(f"- {r['policy']}/{r['drafter']}: {reps}")
    return "\n".join(out) + "\n"


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--a-env / --b-env take NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def add_run_args(p: argparse.ArgumentParser, *, users: int, repeats: int, configs: str) -> None:
    """The options every side-by-side run takes (bench/ab.py, bench/precision.py)."""
    p.add_argument("--profile", default="bench")
    p.add_argument("--users", type=int, default=users, help="users held out of drafter training")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--items", type=int, default=10)
    p.add_argument("--configs", default=configs, help="policy/drafter,...; plain decoding (off/-) is always in")
    p.add_argument("--out", type=Path, default=RESULTS)


def parse_configs(spec: str) -> list[tuple[str, str]]:
    """"off/-,adaptive/model" -> [("off", ""), ("adaptive", "model")], plain decoding first."""
    configs = [(c.split("/")[0], "" if c.split("/")[1] == "-" else c.split("/")[1]) for c in spec.split(",")]
    return configs if configs[0][0] == PLAIN else [(PLAIN, ""), *configs]


def worktree(ref: str, parent: Path) -> Path:
    """A detached checkout of `ref` (the services run from it); removed by the caller."""
    path = parent / f"ab-{ref.replace('/', '_').replace('~', '-')}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(path), ref], check=True,
                   capture_output=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b-ref", default="", help="git ref whose code arm B runs (a worktree); default this checkout")
    p.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="arm A's environment")
    p.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="arm B's environment")
    p.add_argument("--label", default="ab", help="names the report (bench/results/ab-<date>-<label>.md)")
    add_run_args(p, users=24, repeats=2, configs="off/-,adaptive/model,chain:16/model")
    a = p.parse_args(argv)
    envs = {"A": parse_env(a.a_env), "B": parse_env(a.b_env)}
    if not a.b_ref and envs["A"] == envs["B"]:
        p.error("the arms are the same: give --b-ref and/or different --a-env / --b-env")
    configs = parse_configs(a.configs)
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    users = histories(arts, a.users)
    mach = machine()
    scratch = Path(tempfile.mkdtemp(prefix="specrec-ab-"))
    code = {"A": None, "B": worktree(a.b_ref, scratch) if a.b_ref else None}
    what = {arm: f"{'commit ' + git_rev(code[arm]) if code[arm] else 'this checkout at ' + git_rev()}"
            f"{', ' + ' '.join(f'{k}={v}' for k, v in envs[arm].items()) if envs[arm] else ''}" for arm in ARMS}
    stacks = {arm: LocalStack(StackConfig(artifacts=arts.directory, policy="adaptive", drafter="model",
                                          extra_env=envs[arm], code_dir=code[arm], log_dir=scratch / f"logs-{arm}"))
              for arm in ARMS}
    try:
        records, measure_s = measure_on_stacks(stacks, users, configs, a.repeats, a.items)
    finally:
        if code["B"] is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(code["B"])],
                           capture_output=True)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    res = {"date": date, "label": a.label, "machine": mach, "git": git_rev(), "arms": {
        arm: {"what": what[arm], "env": envs[arm], "ref": a.b_ref if arm == "B" else ""} for arm in ARMS},
           "command": " ".join(["python -m bench.ab", *(argv if argv is not None else sys.argv[1:])]),
           "args": {**vars(a), "out": str(a.out)}, "measure_s": measure_s,
           "rows": summarize(records, configs, a.repeats), "records": records}
    stem = a.out / f"ab-{date}-{a.label}"
    write_results(res, stem, report)
    print(f"[ab] wrote {stem}.md and .json (stack logs in {scratch})")
    return 0


def measure_on_stacks(stacks: dict[str, LocalStack], users, configs, repeats: int, items: int,
                      field: str = "arm") -> tuple[list[dict], float]:
    """Start the stacks, warm them up (two users, excluded), run `interleaved` over them, stop them; returns the
    records and the measurement's seconds."""
    try:
        for s in stacks.values():
            s.start()
        channels = {name: grpc.insecure_channel(s.orchestrator_addr) for name, s in stacks.items()}
        stubs = {name: recommend_pb2_grpc.RecommenderServiceStub(c) for name, c in channels.items()}
        interleaved(stubs, users[:2], configs, 1, items, field)
        t0 = time.perf_counter()
        records = interleaved(stubs, users, configs, repeats, items, field)
        return records, time.perf_counter() - t0
    finally:
        for s in stacks.values():
            s.stop()


def write_results(res: dict, stem: Path, render: Callable[[dict], str]) -> None:
    """<stem>.json (records included) and <stem>.md, and the report printed."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1))  # not with_suffix: a label may hold a dot ("gil-0.2")
    Path(f"{stem}.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    sys.exit(main())
