"""The draft service's resident memory across loaded phases: one local stack, phases of `--concurrency` requests
with wide-tree and chain policies, the drafter's RSS (from /proc) after each phase. Trees drafted ahead once grew
every row of a cache page to thousands of slots for good; this shows whether memory follows the load.

    python -m bench.draft_memory --profile bench --phases fixed:16:64,fixed:8:32,fixed:16:64,chain:16
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from bench.speedup import histories
from harness.loadgen import recommend_request, run_requests_sync
from harness.stack import LocalStack, StackConfig
from specrec.pipeline import prepare


def rss_mb(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()  # noqa: SIM115 (read at once)
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="bench")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--phases", default="fixed:16:64,fixed:8:32,fixed:16:64,chain:16,fixed:16:64,fixed:8:32",
                   help="one policy per phase, each running --concurrency users at once")
    a = p.parse_args()
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    users = histories(arts, a.concurrency)
    with LocalStack(StackConfig(artifacts=arts.directory, policy="adaptive", drafter="model")) as stack:
        pid = stack.procs["draft"].proc.pid
        print(f"draft service RSS at start: {rss_mb(pid)} MB", flush=True)
        for i, policy in enumerate(a.phases.split(",")):
            requests = [(k, recommend_request(h, 10, policy)) for k, (_u, h) in enumerate(users)]
            t0 = time.perf_counter()
            codes = Counter(o.code for o in run_requests_sync(stack.orchestrator_addr, requests, a.concurrency, 60.0))
            print(f"phase {i} {policy} x {a.concurrency}: {time.perf_counter() - t0:.0f} s, {dict(codes)}, "
                  f"draft service RSS {rss_mb(pid)} MB", flush=True)


if __name__ == "__main__":
    main()
