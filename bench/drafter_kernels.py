"""The drafter's projection kernels: each timed faster on this machine per shape and row count (the default),
against oneDNN's packed kernel everywhere and F.linear everywhere, side by side in one process, on the draft service's
code below gRPC (a pooled cache, merged forwards, a drafting thread pool).

Every user drafts `rounds` trees in a row (committing a path of `accept` nodes + a bonus, as verification would),
once per arm; arms alternate per user and their order rotates, so drift on the machine falls on all of them.

    .venv/bin/python bench/drafter_kernels.py --profile bench --users 8 --repeats 2

With no trained drafter for the profile, a randomly initialised drafter of the profile's size is timed (the cost of
a forward does not depend on the weights; the budget fixes the tree's shape, no confidence stop): the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.draft_batching import UNTRAINED, load_model, measure  # noqa: E402
from specrec.drafting.base import Budget  # noqa: E402
from specrec.drafting.offline import eval_users  # noqa: E402
from specrec.models import packed  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

BUDGETS = {"chain:16": Budget(16, 16, 1), "tree:6:12": Budget(6, 12, 4), "tree:8:32": Budget(8, 32, 8)}
ARMS = ("timed", "packed", "dense")


def cpu_name() -> str:
    """The CPU's model name (which kernel wins depends on it), or the architecture where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def tables(model) -> dict[str, dict[int, bool]]:
    """Each arm's kernel per row count: the timed choice, and every row count forced to one kernel."""
    model.choose_kernels()
    timed = dict(packed._packed_rows)
    return {"timed": timed, "packed": dict.fromkeys(timed, True), "dense": dict.fromkeys(timed, False)}


def summary(rows: list[dict]) -> list[dict]:
    """Per budget and arm: mean ms per tree, and the paired (user, repeat) ratio of packed's mean to this arm's."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        by = {(r["arm"], r["user"], r["repeat"]): r["mean_ms"] for r in rows if r["budget"] == budget}
        for arm in ARMS:
            pairs = [(by[("packed", u, rep)], ms) for (a, u, rep), ms in by.items() if a == arm]
            out.append({"budget": budget, "arm": arm, "mean_ms": statistics.fmean(ms for _, ms in pairs),
                        "vs_packed_median": statistics.median(p / ms for p, ms in pairs),
                        "vs_packed_mean": statistics.fmean(p for p, _ in pairs) / statistics.fmean(m for _, m in pairs),
                        "per_repeat": [statistics.fmean(p for (a, _, r), p in by.items() if a == "packed" and r == rep)
                                       / statistics.fmean(m for (a, _, r), m in by.items() if a == arm and r == rep)
                                       for rep in sorted({k[2] for k in by})]})
    return out


def report(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Drafter projection kernels — {m['date']}", "", f"- command: `{m['command']}`",
             f"- profile {m['profile']}, drafter {'trained' if m['trained'] else UNTRAINED}, torch threads 1, "
             f"{m['cpu']}; {m['users']} users x {m['repeats']} repeats, {m['rounds']} trees each in a row, "
             f"concurrency 1",
             "- timed: the kernel whose drafter forward was faster here at the step's row count (the default); packed: "
             "oneDNN's packed kernel everywhere (the default before); dense: F.linear everywhere",
             "- speedup vs packed: packed's ms per tree / this arm's, pairwise median over (user, repeat), the ratio "
             "of means, and per repeat", "",
             "Kernels chosen here: " + ", ".join(f"{k} {v}" for k, v in m["choices"].items()), "",
             "| budget | kernels | ms per tree | vs packed (pairwise median) | vs packed (mean) | per repeat |",
             "|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['budget']} | {s['arm']} | {s['mean_ms']:.2f} | {s['vs_packed_median']:.3f}x | "
                     f"{s['vs_packed_mean']:.3f}x | {' / '.join(f'{x:.3f}x' for x in s['per_repeat'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="bench")
    p.add_argument("--budgets", default=",".join(BUDGETS), help=f"of {', '.join(BUDGETS)}")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="trees each user drafts in a row")
    p.add_argument("--accept", type=int, default=4, help="tree nodes each commit accepts (then a bonus)")
    p.add_argument("--out", default=None, help="report path prefix (default bench/results/drafter-kernels-<date>)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    arts = prepare(profile=a.profile, train=False)
    model, trained = load_model(arts)
    arms = tables(model)
    users = eval_users(arts, a.users)
    rows = []
    for rep in range(a.repeats):
        for name in a.budgets.split(","):
            for i, user in enumerate(users):
                k = (i + rep) % len(ARMS)
                for arm in ARMS[k:] + ARMS[:k]:
                    packed._packed_rows = arms[arm]
                    r = measure(model, arts, [arts.prompt(user)], True, 1, BUDGETS[name], a.rounds, a.accept)
                    rows.append({"budget": name, "arm": arm, "user": int(user), "repeat": rep,
                                 "mean_ms": r["mean_ms"], "trees": r["trees"]})
            print(f"repeat {rep} {name}: " + ", ".join(
                f"{arm} {statistics.fmean(r['mean_ms'] for r in rows if r['budget'] == name and r['arm'] == arm):.2f}"
                f" ms" for arm in ARMS), flush=True)
    packed._packed_rows = arms["timed"]
    meta = {"date": str(date.today()), "command": " ".join(["bench/drafter_kernels.py", *(argv or sys.argv[1:])]),
            "profile": a.profile, "trained": trained, "cpu": f"{cpu_name()}, nproc {os.cpu_count()}",
            "users": a.users, "repeats": a.repeats, "rounds": a.rounds,
            "choices": packed.kernel_choices()}
    res = {"meta": meta, "rows": rows, "summary": summary(rows)}
    out = Path(a.out or Path(__file__).parent / "results" / f"drafter-kernels-{date.today()}")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
