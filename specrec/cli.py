"""The `specrec` command: data, training, evaluation, plain decoding and one-user requests to a running
orchestrator. The demo that starts the whole stack (`make run`) is `specrec-demo` (harness.demo)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from specrec.security import add_auth_args, add_tls_args

log = logging.getLogger("specrec")

DEFAULT_DATASET = os.environ.get("SPECREC_DATASET", "ml-100k")
DEFAULT_PROFILE = os.environ.get("SPECREC_PROFILE", "small")


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="ml-100k (default), synthetic:users=N,items=M,seed=S, or a GroupLens directory")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="model size: tiny, small (default) or bench")
    p.add_argument("--seed", type=int, default=0)


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from specrec.data.movielens import load_dataset

    data = load_dataset(args.dataset)
    print(f"{data.name}: {data.n_users} users, {data.n_items} items, {data.n_interactions} interactions")
    return 0


def cmd_train_target(args: argparse.Namespace) -> int:
    from specrec.pipeline import prepare
    from specrec.quality_guard import REPORT, QualityVerdict, check_quality

    t0 = time.perf_counter()
    arts = prepare(args.dataset, args.profile, seed=args.seed)
    print(f"target ready in {arts.target_dir} ({time.perf_counter() - t0:.0f} s)")
    report = arts.target_dir / REPORT
    if report.is_file():  # checked right after training
        saved = json.loads(report.read_text())
        verdict = QualityVerdict(**{k: v for k, v in saved.items() if k != "beats_popularity"})
    else:  # trained before the guard existed
        verdict = check_quality(arts, seed=args.seed)
    print(verdict.message(arts.profile.name))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from specrec.evaluation import evaluate
    from specrec.models.llama import Transformer
    from specrec.pipeline import prepare

    arts = prepare(args.dataset, args.profile, seed=args.seed)
    model = Transformer.from_pretrained(arts.target_dir)
    quality = evaluate(arts, model, k=args.k, limit=args.users)
    print(f"| model ({arts.data.name}, profile {arts.profile.name}) | Recall@{args.k} | NDCG@{args.k} | users |")
    print("|---|---|---|---|")
    for name, q in quality.items():
        print(f"| {name} | {q.recall:.4f} | {q.ndcg:.4f} | {q.users} |")
    return 0


def cmd_plain(args: argparse.Namespace) -> int:
    """Recommend for one user by plain constrained greedy decoding, in process (no services)."""
    from specrec.decoding.plain import decode
    from specrec.models.llama import Transformer
    from specrec.pipeline import prepare

    arts = prepare(args.dataset, args.profile, seed=args.seed)
    user = arts.data.user_ids.index(str(args.user)) if str(args.user) in arts.data.user_ids else args.user
    model = Transformer.from_pretrained(arts.target_dir)
    t0 = time.perf_counter()
    result = decode(model, arts.constraint(n_items=args.n), [arts.prompt(user)])[0]
    ms = (time.perf_counter() - t0) * 1000
    print(f"user {arts.data.user_ids[user]}: recently watched")
    for item in arts.split.train[user][-5:]:
        print(f"    {_item_name(arts, item)}")
    print(f"recommended ({len(result.items)} items, plain greedy decoding, {result.model_steps} steps, {ms:.0f} ms):")
    for rank, item in enumerate(result.items, 1):
        print(f"  {rank:2d}. {_item_name(arts, item)}")
    return 0


def _item_name(arts, item: int) -> str:
    """An item's title, or its id where the data has no titles (synthetic data, interactions-only tables)."""
    return arts.data.titles[item] or arts.data.item_ids[item]


def _user_index(arts, user: str) -> int:
    try:
        return arts.data.user_ids.index(str(user))
    except ValueError:
        raise SystemExit(f"user {user!r} is not in {arts.data.name} (ids run {arts.data.user_ids[0]}.."
                         f"{arts.data.user_ids[-1]})") from None


def recommend_for_user(arts, addr: str, user: str, n: int, policy: str = "", timeout: float = 60.0,
                       tls=None, token: str = "") -> None:
    """Call the orchestrator's Recommend for a dataset user and print the list with its stats.

    `tls` (a specrec.security.TlsConfig) dials over TLS; `token` is sent as `authorization: Bearer`."""
    from specrec.security import TlsConfig, auth_metadata, channel
    from specrec.v1 import recommend_pb2 as pb
    from specrec.v1 import recommend_pb2_grpc as pb_grpc

    u = _user_index(arts, user)
    history = [arts.data.item_ids[i] for i in arts.split.train[u][-arts.profile.max_history:]]
    with channel(addr, tls or TlsConfig()) as ch:
        resp = pb_grpc.RecommenderServiceStub(ch).Recommend(
            pb.RecommendRequest(history=history, num_items=n, options=pb.DecodingOptions(policy=policy)),
            timeout=timeout, metadata=auth_metadata(token))
    print(f"user {user}: recently watched " + "; ".join(_item_name(arts, i) for i in arts.split.train[u][-3:]))
    for rank, item in enumerate(resp.items, 1):
        print(f"  {rank:2d}. {item.title or item.item_id}")
    s = resp.stats
    print(f"  {s.rounds} rounds, tau {s.tau:.2f} tokens/verification, {s.accepted_tokens}/{s.drafted_tokens} "
          f"drafted tokens accepted, policy {s.policy}, {s.fallback_rounds} fallback rounds")
    print(f"  {s.total_ms:.0f} ms total: drafting {s.draft_ms:.0f} ms, verification {s.verify_ms:.0f} ms, "
          f"network and the rest {s.network_ms:.0f} ms; model version {resp.model_version or '-'}")


def retrieve_for_user(arts, addr: str, user: str, k: int, width: int = 0, plain: bool = False,
                      timeout: float = 60.0, tls=None, token: str = "") -> None:
    """Call the orchestrator's Retrieve (top-k by beam search) for a dataset user and print items and scores."""
    from specrec.security import TlsConfig, auth_metadata, channel
    from specrec.v1 import recommend_pb2 as pb
    from specrec.v1 import recommend_pb2_grpc as pb_grpc

    u = _user_index(arts, user)
    history = [arts.data.item_ids[i] for i in arts.split.train[u][-arts.profile.max_history:]]
    with channel(addr, tls or TlsConfig()) as ch:
        resp = pb_grpc.RecommenderServiceStub(ch).Retrieve(
            pb.RetrieveRequest(history=history, k=k, beam_width=width, plain=plain),
            timeout=timeout, metadata=auth_metadata(token))
    print(f"user {user}: top {k} by {'plain' if plain else 'speculative'} beam search (width {width or k})")
    for rank, item in enumerate(resp.items, 1):
        print(f"  {rank:2d}. {item.log_prob:7.3f}  {item.title or item.item_id}")
    s = resp.stats
    print(f"  {s.rounds} target forwards, {s.tree_nodes} nodes scored ({s.drafted_nodes} drafted), "
          f"{s.total_ms:.0f} ms total: drafting {s.draft_ms:.0f} ms, verification {s.verify_ms:.0f} ms")


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from specrec.pipeline import prepare
    from specrec.security import SecurityConfigError, auth_from_args, read_token, tls_from_args

    try:
        tls, token = tls_from_args(args), read_token(auth_from_args(args))
    except SecurityConfigError as err:
        raise SystemExit(f"specrec recommend: {err}") from None
    arts = prepare(args.dataset, args.profile, seed=args.seed, train=False)
    try:
        if args.command == "retrieve":
            retrieve_for_user(arts, args.addr, args.user, args.k, args.beam_width, args.plain, tls=tls, token=token)
        else:
            recommend_for_user(arts, args.addr, args.user, args.n, args.policy, tls=tls, token=token)
    except grpc.RpcError as err:  # refused (UNAUTHENTICATED), unreachable, bad input: say which, no traceback
        raise SystemExit(f"specrec {args.command}: {err.code().name}: {err.details()}") from None
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Lists for every user of a file through a running orchestrator; resumable (specrec.batch_client)."""
    import grpc

    from specrec.batch_client import MAX_BATCH, BatchOptions, run

    if args.concurrency < 1 or not 1 <= args.batch_size <= MAX_BATCH:
        raise SystemExit(f"specrec batch: --concurrency must be >= 1 and --batch-size in 1..{MAX_BATCH}")
    opts = BatchOptions(num_items=args.n, policy=args.policy, concurrency=args.concurrency,
                        batch_size=args.batch_size)
    t0 = time.perf_counter()
    try:
        counts = run(args.addr, Path(args.users), Path(args.out), opts, progress=not args.no_progress)
    except (OSError, ValueError) as err:
        raise SystemExit(f"specrec batch: {err}") from None
    except grpc.RpcError as err:
        raise SystemExit(f"specrec batch: {err.code().name}: {err.details()} (rerun to resume)") from None
    total = sum(counts.values())
    print(f"{total} users in {args.out} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
          f"this run {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch-data", help="download and check a dataset")
    add_common_args(p)
    p.set_defaults(func=cmd_fetch_data)
    p = sub.add_parser("train-target", help="build semantic IDs and train the target (cached; resumable)")
    add_common_args(p)
    p.set_defaults(func=cmd_train_target)
    p = sub.add_parser("eval", help="Recall@K / NDCG@K of the target and a popularity baseline")
    add_common_args(p)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--users", type=int, default=None, help="evaluate only the first N users")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("plain", help="recommend for one user by plain decoding, in process")
    add_common_args(p)
    p.add_argument("--user", default="42", help="user id as the dataset knows it")
    p.add_argument("--n", type=int, default=10, help="items to recommend")
    p.set_defaults(func=cmd_plain)
    p = sub.add_parser("recommend", help="ask a running orchestrator for one user's list")
    add_common_args(p)
    p.add_argument("--user", default="42", help="user id as the dataset knows it")
    p.add_argument("--n", type=int, default=10, help="items to recommend")
    p.add_argument("--policy", default="", help="adaptive | heuristic | off | fixed:DEPTH:NODES (default: server's)")
    p.add_argument("--addr", default=os.environ.get("SPECREC_ORCHESTRATOR_ADDR", "127.0.0.1:50051"),
                   help="orchestrator address (env SPECREC_ORCHESTRATOR_ADDR)")
    add_tls_args(p, client_only=True)
    add_auth_args(p)
    p.set_defaults(func=cmd_recommend)
    p = sub.add_parser("retrieve", help="ask a running orchestrator for one user's top-k items by beam search")
    add_common_args(p)
    p.add_argument("--user", default="42", help="user id as the dataset knows it")
    p.add_argument("--k", type=int, default=10, help="items to retrieve (1..64)")
    p.add_argument("--beam-width", type=int, default=0, help="beams kept per level, k..64 (0 = k)")
    p.add_argument("--plain", action="store_true", help="plain beam search (no drafted tree; same items)")
    p.add_argument("--addr", default=os.environ.get("SPECREC_ORCHESTRATOR_ADDR", "127.0.0.1:50051"),
                   help="orchestrator address (env SPECREC_ORCHESTRATOR_ADDR)")
    add_tls_args(p, client_only=True)
    add_auth_args(p)
    p.set_defaults(func=cmd_recommend)
    p = sub.add_parser("batch", help="lists for every user of a CSV/Parquet file via a running orchestrator "
                       "(resumable: rerun after a crash or Ctrl-C)")
    p.add_argument("users", help="CSV or Parquet with user_id and history (item ids, oldest first)")
    p.add_argument("--out", required=True, help="results: .jsonl, or .parquet (built from a .journal.jsonl beside)")
    p.add_argument("--n", type=int, default=10, help="items per list")
    p.add_argument("--policy", default="", help="adaptive | heuristic | off | fixed:DEPTH:NODES (default: server's)")
    p.add_argument("--concurrency", type=int, default=16, help="users decoding at once")
    p.add_argument("--batch-size", type=int, default=64, help="users per RecommendBatch call")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--addr", default=os.environ.get("SPECREC_ORCHESTRATOR_ADDR", "127.0.0.1:50051"),
                   help="orchestrator address (env SPECREC_ORCHESTRATOR_ADDR)")
    p.set_defaults(func=cmd_batch)
    try:
        from specrec.drafting.commands import register
    except ImportError:
        pass
    else:
        register(sub)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen command's handler, logging as every specrec command does."""
    logging.basicConfig(level=os.environ.get("SPECREC_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
