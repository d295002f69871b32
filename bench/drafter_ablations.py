"""Issue 21's ablations of the drafter's training: offline tau of each variant x seed against the default.

Each variant (a TrainSpec: the divergence, PAD-Rec's slot / step embeddings, HASS's objective and alignment) is
trained once per seed into <artifacts>/ablations/<variant>-s<seed>/ (never the stack's <artifacts>/drafter), all
seeds on the same cached distillation data (--data-seed), then replayed offline against the target's greedy lists of
the users held out of drafter training (specrec.drafting.offline): tau = committed tokens / verification rounds,
summed over users, per shape (chains of 8 and 12 tokens, trees of 16 and 32 nodes, depth 8, top-k 8). A variant
directory that is already complete with the same steps is reused, so an interrupted sweep resumes.

    .venv/bin/python -m bench.drafter_ablations --profile small --seeds 0,1 --steps 600 --threads 1

Writes <out>.json (one record per variant x seed x shape, and the training seconds) after every run, and <out>.md:
mean tau over seeds, its min-max, and the difference of the means against the default variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch

from specrec.drafting.base import load_drafter
from specrec.drafting.offline import EvalConfig, eval_users, evaluate, target_truths
from specrec.models.llama import Transformer
from specrec.pipeline import prepare
from specrec.training.drafter import PLAIN, TrainSpec, drafter_profile, train_drafter

VARIANTS: dict[str, TrainSpec] = {
    "default": TrainSpec(),
    "rkl": TrainSpec("rkl"),
    "js": TrainSpec("js"),
    "tvd": TrainSpec("tvd"),
    "sinkhorn": TrainSpec("sinkhorn"),
    "bdkd": TrainSpec("bdkd"),
    "pld": TrainSpec("pld"),
    "no-slot": TrainSpec(use_slot=False),
    "no-step": TrainSpec(use_step=False),
    "no-hass-objective": TrainSpec(hass_objective=False),
    "no-hass-alignment": TrainSpec(hass_alignment=False),
    "plain": PLAIN,
}
EVAL = EvalConfig(chain_depths=(8, 12), tree_sizes=(16, 32), tree_depth=8, top_k=8)
SUBDIR = "ablations"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--profile", default="small", choices=("tiny", "small", "bench"))
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--users", type=int, default=0, help="held-out users to replay (0 = all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every variant (default: the profile's)")
    p.add_argument("--data-seed", type=int, default=0, help="the cached distillation data every run trains on")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default bench/results/tau-ablations-<profile>-<date>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="no training: one table (to --out) from the records of these runs' JSON files, each variant "
                        "x seed x shape once (separate runs can train separate variants or seeds side by side)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "default" not in args.variants:
        args.variants.insert(0, "default")  # the reference of every delta
    if len(args.seeds) < 1:
        p.error("give at least one seed")
    args.out = args.out or Path(f"bench/results/tau-ablations-{args.profile}-{datetime.now(UTC).date().isoformat()}")
    return args


def run_dir(spec: TrainSpec, seed: int) -> str:
    """<artifacts>/ablations/<variant>-s<seed>: e.g. ablations/drafter-s0 (default), ablations/drafter-tvd-s1."""
    return f"{SUBDIR}/{spec.variant}-s{seed}"


def complete(directory: Path, steps: int, data_seed: int) -> bool:
    meta = directory / "training.json"
    if not ((directory / "config.json").is_file() and meta.is_file()):
        return False
    m = json.loads(meta.read_text())
    return m["profile"]["steps"] == steps and m.get("data_seed") == data_seed


def summarise(records: list[dict], variants: list[str], trainings: list[dict]) -> str:
    shapes = list(EVAL.columns)
    secs: dict[str, list[float]] = {}
    for t in trainings:
        if t["trained"]:
            secs.setdefault(t["variant"], []).append(t["seconds"])
    by: dict[tuple[str, str], list[float]] = {}
    for r in records:
        by.setdefault((r["variant"], r["shape"]), []).append(r["tau"])
    ref = {s: statistics.mean(by[("default", s)]) for s in shapes if ("default", s) in by}
    head = ("| variant | seeds | " + " | ".join(f"{s}: tau (min-max) | {s}: delta" for s in shapes)
            + " | train s / run |\n" + "|---|---|" + "---|---|" * len(shapes) + "---|\n")
    lines = [head]
    for v in variants:
        if not any((v, s) in by for s in shapes):
            continue
        cells = []
        for s in shapes:
            taus = by.get((v, s), [])
            if not taus:
                cells += ["-", "-"]
                continue
            m = statistics.mean(taus)
            cells.append(f"{m:.3f} ({min(taus):.3f}-{max(taus):.3f})")
            cells.append("" if v == "default" or s not in ref else f"{m - ref[s]:+.3f}")
        n = len(by.get((v, shapes[0]), []))
        train = f"{statistics.mean(secs[v]):.0f}" if v in secs else "-"
        lines.append(f"| {v} | {n} | " + " | ".join(cells) + f" | {train} |\n")
    return "".join(lines)


def write(args: argparse.Namespace, meta: dict, records: list[dict], trainings: list[dict]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({**meta, "trainings": trainings, "records": records}, indent=1)
                                        + "\n")
    secs = [t["seconds"] for t in trainings if t["trained"]]
    md = [f"# Drafter training ablations: offline tau ({meta['dataset']}, profile {meta['profile']})\n\n",
          f"{meta['users']} held-out users (never in the distillation data), target greedy lists replayed; "
          "tau = committed tokens / verification rounds summed over users (bonus token included). "
          f"Chains of 8 / 12 tokens; trees of 16 / 32 nodes (depth {EVAL.tree_depth}, top-k {EVAL.top_k}). "
          f"Each variant trained {meta['steps']} steps per seed (seeds {meta['seeds']}, all on distillation data "
          f"seed {meta['data_seed']}), {meta['threads']} torch thread(s); mean over seeds, (min-max), "
          "delta = mean minus the default's mean.\n\n",
          "default = forward KL + HASS objective (top-1 loss) + HASS alignment (3 unrolled steps) + slot + step "
          "embeddings; each other row changes one thing (plain = slot, step and both HASS parts off).\n\n",
          summarise(records, meta["variants"], trainings),
          f"\nTraining time per run: {statistics.mean(secs):.0f} s mean ({min(secs):.0f}-{max(secs):.0f} s) over "
          f"{len(secs)} runs.\n" if secs else "",
          f"\nCommand: `{meta['command']}`; started {meta['started']}, finished {meta.get('finished', '-')}.\n"]
    Path(f"{args.out}.md").write_text("".join(md))


def merge(args: argparse.Namespace, files: list[Path]) -> None:
    """Records and trainings of several runs, first one wins (a variant x seed x shape is evaluated the same way
    in any run), written as one run over the variants they hold."""
    records, trainings, seen, trained = [], [], set(), set()
    runs = [json.loads(f.read_text()) for f in files]
    for run in runs:
        for r in run["records"]:
            if (key := (r["variant"], r["seed"], r["shape"])) not in seen:
                seen.add(key)
                records.append(r)
        for t in run["trainings"]:
            if t["trained"] and (key := (t["variant"], t["seed"])) not in trained:
                trained.add(key)
                trainings.append(t)
    present = {r["variant"] for r in records}
    meta = {k: v for k, v in runs[0].items() if k not in ("records", "trainings")}
    meta.update(variants=[v for v in VARIANTS if v in present], seeds=sorted({r["seed"] for r in records}),
                command=f"{meta['command']} and {len(files) - 1} other runs, merged: .venv/bin/python -m "
                        f"bench.drafter_ablations --merge {' '.join(str(f) for f in files)} --out {args.out}",
                started=min(r["started"] for r in runs), finished=max(r.get("finished", "-") for r in runs))
    write(args, meta, records, trainings)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        merge(args, args.merge)
        print(Path(f"{args.out}.md").read_text())
        return 0
    torch.set_num_threads(args.threads)
    arts = prepare(args.dataset, args.profile, progress=not args.quiet)
    steps = args.steps or drafter_profile(arts.profile.name).steps
    target = Transformer.from_pretrained(arts.target_dir)
    users = eval_users(arts, args.users or None)
    truths = target_truths(arts, target, users)
    constraint = arts.constraint()
    meta = {"dataset": args.dataset, "profile": args.profile, "seeds": args.seeds, "variants": args.variants,
            "steps": steps, "data_seed": args.data_seed, "threads": args.threads, "users": len(truths),
            "eval": asdict(EVAL),
            "command": ".venv/bin/python -m bench.drafter_ablations " + " ".join(argv or sys.argv[1:]),
            "started": datetime.now(UTC).isoformat(timespec="seconds")}
    records: list[dict] = []
    trainings: list[dict] = []
    for variant in args.variants:
        spec = VARIANTS[variant]
        for seed in args.seeds:
            name = run_dir(spec, seed)
            directory = arts.directory / name
            t0 = time.perf_counter()
            trained = not complete(directory, steps, args.data_seed)
            if trained:
                train_drafter(arts, spec, seed=seed, progress=not args.quiet, steps=steps, name=name,
                              data_seed=args.data_seed)
            secs = time.perf_counter() - t0
            final_loss = json.loads((directory / "training.json").read_text()).get("final_loss")
            trainings.append({"variant": variant, "seed": seed, "dir": name, "spec": asdict(spec),
                              "trained": trained, "seconds": round(secs, 1), "final_loss": final_loss})
            t0 = time.perf_counter()
            drafter = load_drafter(f"model:{name}", arts.directory)
            report = evaluate(drafter, truths, constraint, EVAL, name=variant, progress=not args.quiet)
            eval_secs = time.perf_counter() - t0
            for shape in EVAL.columns:
                kind, size = shape.split()
                records.append({"profile": args.profile, "variant": variant, "drafter": name, "seed": seed,
                                "shape": shape, "kind": kind, "nodes": int(size), "tau": report.tau(shape),
                                "tau_open": report.tau_open(shape), "committed": report.committed[shape],
                                "rounds": report.rounds[shape], "users": len(truths)})
            taus = " ".join(f"{s}={report.tau(s):.3f}" for s in EVAL.columns)
            print(f"{name}: train {secs:.0f} s{'' if trained else ' (reused)'}, eval {eval_secs:.0f} s, {taus}",
                  flush=True)
            write(args, meta, records, trainings)
    meta["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    write(args, meta, records, trainings)
    print(Path(f"{args.out}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
