"""`specrec train-drafter` and `specrec eval-drafter`: argparse subcommands and their handlers.

    specrec train-drafter --profile small                 # PAD-Rec drafter with HASS (the default variant)
    specrec train-drafter --profile small --ablations     # + plain, no-slot, no-step, no-hass, retrieval pool
    specrec eval-drafter --profile small --users 100 --out tau.md

Until the main CLI wires them in: python -m specrec.drafting.commands <subcommand> ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from specrec.artifacts import Artifacts
from specrec.drafting.base import load_drafter
from specrec.drafting.model_drafter import DEFAULT_DIR
from specrec.drafting.offline import EvalConfig, eval_users, evaluate, is_eval_user, markdown, target_truths
from specrec.drafting.retrieval import POOL_DIR, pool_for
from specrec.models.llama import Transformer
from specrec.pipeline import prepare
from specrec.training.drafter import ABLATIONS, OBJECTIVES, TrainSpec, distill_data, drafter_profile, train_drafter

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train-drafter", help="distil a drafter from the target (or build the "
                                  "retrieval pool)", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    _common(train)
    train.add_argument("--drafter", choices=("model", "retrieval"), default="model",
                       help="model: a PAD-Rec transformer; retrieval: build the DARE-style pool")
    train.add_argument("--divergence", choices=OBJECTIVES, default="fkl",
                       help="distillation divergence (pld: the Plackett-Luce ranking loss)")
    train.add_argument("--no-slot", action="store_true", help="ablation: no item-slot embedding")
    train.add_argument("--no-step", action="store_true", help="ablation: no draft-step embedding and gate")
    train.add_argument("--no-hass", action="store_true", help="ablation: no HASS top-K loss and no unrolling")
    train.add_argument("--no-hass-objective", action="store_true",
                       help="ablation: no HASS top-K loss (the unrolled context alignment stays)")
    train.add_argument("--no-hass-alignment", action="store_true",
                       help="ablation: no HASS unrolled context alignment (the top-K loss stays)")
    train.add_argument("--ablations", action="store_true",
                       help="train the default and the plain/no-slot/no-step/no-hass variants, and the pool")
    train.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train_drafter)

    ev = subparsers.add_parser("eval-drafter", help="offline tau of drafters against the target's greedy output")
    _common(ev)
    ev.add_argument("--drafters", default="",
                    help="comma-separated: drafter dirs (drafter, drafter-no-hass, ...), retrieval, hybrid; "
                         "default: every one found in the artifact directory")
    ev.add_argument("--users", type=int, default=100, help="held-out users to replay (0 = all)")
    ev.add_argument("--tree-depth", type=int, default=EvalConfig.tree_depth)
    ev.add_argument("--top-k", type=int, default=EvalConfig.top_k)
    ev.add_argument("--chain-depths", type=_ints, default=EvalConfig.chain_depths,
                    help="comma-separated chain lengths to report (default 1..8)")
    ev.add_argument("--tree-sizes", type=_ints, default=EvalConfig.tree_sizes,
                    help="comma-separated tree sizes (nodes) to report (default 8,16,32,64)")
    ev.add_argument("--out", type=Path, default=None, help="also write the markdown tables here")
    ev.set_defaults(func=cmd_eval_drafter)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="ml-100k", help="ml-100k or a synthetic spec (see specrec.data)")
    p.add_argument("--profile", default="small", choices=("tiny", "small", "bench"), help="target/drafter size")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _setup(args: argparse.Namespace) -> Artifacts:
    if args.threads:
        torch.set_num_threads(args.threads)
    return prepare(args.dataset, args.profile, progress=not args.quiet)


def build_retrieval(arts: Artifacts, seed: int = 0, progress: bool = True) -> Path:
    """The pool warmed with the distillation data's target outputs; evaluation users are in neither."""
    data = distill_data(arts, drafter_profile(arts.profile.name), seed=seed, progress=progress)
    return pool_for(arts, list(zip(data.users, data.sequences, strict=True)), seed=seed,
                    held_out=is_eval_user).save(arts.directory / POOL_DIR)


def cmd_train_drafter(args: argparse.Namespace) -> int:
    arts = _setup(args)
    progress = not args.quiet
    if args.ablations:
        for spec in ABLATIONS:
            print(train_drafter(arts, spec, seed=args.seed, progress=progress, steps=args.steps))
        print(build_retrieval(arts, args.seed, progress))
        return 0
    if args.drafter == "retrieval":
        print(build_retrieval(arts, args.seed, progress))
        return 0
    spec = TrainSpec(args.divergence, use_slot=not args.no_slot, use_step=not args.no_step,
                     hass_objective=not (args.no_hass or args.no_hass_objective),
                     hass_alignment=not (args.no_hass or args.no_hass_alignment))
    print(train_drafter(arts, spec, seed=args.seed, progress=progress, steps=args.steps))
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def available(arts: Artifacts) -> list[str]:
    names = sorted(p.name for p in arts.directory.glob(f"{DEFAULT_DIR}*") if (p / "config.json").is_file())
    if (arts.directory / POOL_DIR / "meta.json").is_file():
        names.append("retrieval")
        if DEFAULT_DIR in names:
            names.append("hybrid")
    return names


def loader_name(name: str) -> str:
    return f"model:{name}" if name.startswith(DEFAULT_DIR) else name


def cmd_eval_drafter(args: argparse.Namespace) -> int:
    arts = _setup(args)
    names = [n for n in args.drafters.split(",") if n] or available(arts)
    if not names:
        print(f"no drafters in {arts.directory}; run `specrec train-drafter --profile {args.profile}` first",
              file=sys.stderr)
        return 1
    cfg = EvalConfig(args.chain_depths, args.tree_sizes, args.tree_depth, args.top_k)
    target = Transformer.from_pretrained(arts.target_dir)
    users = eval_users(arts, args.users or None)
    truths = target_truths(arts, target, users)
    constraint = arts.constraint()
    reports = []
    for name in names:
        drafter = load_drafter(loader_name(name), arts.directory)
        reports.append(evaluate(drafter, truths, constraint, cfg, name=name, progress=not args.quiet))
    table = (f"Offline tau on {arts.data.name}, profile {args.profile}, {len(truths)} held-out users; trees: depth "
             f"{cfg.tree_depth}, top_k {cfg.top_k}.\n\n" + markdown(reports, cfg))
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specrec.drafting.commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
