"""Offline generation throughput: users/s of `specrec batch`'s client (RecommendBatch) against one local stack,
speculative (a policy) vs plain decoding (policy "off", the same Triton), at several concurrencies; each is
reported at the concurrency that maximises it. Every speculative list must equal the plain one (greedy).

    python bench/offline_batch.py --profile tiny --users 200 --concurrency 4 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.batch_client import BatchOptions, Journal, User, generate  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402


def users_of(arts, n: int) -> list[User]:
    recent = arts.profile.max_history
    return [User(arts.data.user_ids[u], [arts.data.item_ids[i] for i in arts.split.train[u][-recent:]])
            for u in range(min(n, arts.data.n_users))]


def one_run(addr: str, users: list[User], policy: str, concurrency: int, n_items: int) -> tuple[float, dict]:
    """Users/s of one whole pass, and the lists it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "out.jsonl")
        opts = BatchOptions(num_items=n_items, policy=policy, concurrency=concurrency,
                            batch_size=max(concurrency, 32))
        t0 = time.perf_counter()
        asyncio.run(generate(addr, users, journal, opts))
        seconds = time.perf_counter() - t0
        journal.close()
        lists = {r["user_id"]: r["items"] for r in map(json.loads, journal.path.read_text().splitlines())}
    return len(users) / seconds, lists


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    p.add_argument("--policy", default="adaptive", help="the speculative policy to compare with off")
    args = p.parse_args()
    arts = prepare("ml-100k", args.profile, progress=False)
    users = users_of(arts, args.users)
    best: dict[str, tuple[float, int]] = {}
    with LocalStack(StackConfig(artifacts=arts.directory, policy=args.policy)) as stack:
        one_run(stack.orchestrator_addr, users[:16], "off", 4, args.n)  # warm-up: both models loaded, caches hot
        for conc in args.concurrency:
            plain_rate, plain = one_run(stack.orchestrator_addr, users, "off", conc, args.n)
            spec_rate, spec = one_run(stack.orchestrator_addr, users, args.policy, conc, args.n)
            assert spec == plain, "a speculative list differs from plain decoding's"
            print(f"concurrency {conc:3d}: plain {plain_rate:6.1f} users/s, {args.policy} {spec_rate:6.1f} users/s")
            for name, rate in (("off", plain_rate), (args.policy, spec_rate)):
                if rate > best.get(name, (0.0, 0))[0]:
                    best[name] = (rate, conc)
    (off, c_off), (spec, c_spec) = best["off"], best[args.policy]
    print(f"best: plain {off:.1f} users/s (concurrency {c_off}), {args.policy} {spec:.1f} users/s "
          f"(concurrency {c_spec}): {spec / off:.2f}x; profile {args.profile}, {len(users)} users, {args.n} items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
