"""Does the target stop cleanly after a long mixed load? SIGTERM to specrec-target, N times, timed.

Each try starts the local stack (real Triton through the launcher, drafter, orchestrator) on the tiny profile, runs a
mixed load (speculative and plain requests, streams, and requests the client cancels mid-way, which leave their
sequences to the server's clean-up), then sends SIGTERM to the launcher as the kubelet would and times its exit. A
clean stop exits 0 within the chart's drain (`--exit-timeout`) without Triton's "Exit timeout expired".

    .venv/bin/python bench/target_shutdown.py --tries 10 --load-s 60
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.loadgen import recommend_request, run_requests_sync  # noqa: E402
from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402

DIRTY = ("Exit timeout expired", "Non-graceful termination")


def mixed_load(addr: str, histories: list[list[str]], seconds: float, concurrency: int, seed: int) -> int:
    """Batches of requests until `seconds` pass; a quarter cancelled by the client mid-way. Returns requests sent."""
    rng, sent, end = random.Random(seed), 0, time.monotonic() + seconds
    while time.monotonic() < end:
        batch = [(i, recommend_request(rng.choice(histories), 10, rng.choice(["off", "adaptive", "adaptive"])))
                 for i in range(concurrency * 2)]
        cancels = {i: rng.uniform(0.01, 0.2) for i in range(len(batch)) if rng.random() < 0.25}
        run_requests_sync(addr, batch, concurrency, timeout_s=30, stream=rng.random() < 0.5, cancel_after_s=cancels)
        sent += len(batch)
    return sent


def one_try(arts, histories: list[list[str]], load_s: float, concurrency: int, drain_s: int, seed: int) -> dict:
    with LocalStack(StackConfig(artifacts=arts.directory)) as stack:
        sent = mixed_load(stack.orchestrator_addr, histories, load_s, concurrency, seed)
        target = stack.procs["target"]
        t0 = time.monotonic()
        target.proc.send_signal(signal.SIGTERM)
        try:
            code = target.proc.wait(drain_s + 15)
        except subprocess.TimeoutExpired:  # did not stop within drain + 15 s: counted as not clean
            code = None
        took = time.monotonic() - t0
        log = target.log_path.read_text(errors="replace")
    return {"sent": sent, "exit_code": code, "stop_s": round(took, 2),
            "dirty": [d for d in DIRTY if d in log], "clean": code == 0 and not any(d in log for d in DIRTY)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--load-s", type=float, default=60.0, help="seconds of mixed load before each SIGTERM")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--drain-s", type=int, default=30, help="the launcher's --exit-timeout (the chart's drainSeconds)")
    args = p.parse_args(argv)
    arts = prepare("ml-100k", "tiny", progress=False)
    histories = [[arts.data.item_ids[i] for i in arts.split.train[u][-20:]] for u in range(200)]
    results = []
    for n in range(args.tries):
        r = one_try(arts, histories, args.load_s, args.concurrency, args.drain_s, seed=n)
        results.append(r)
        print(f"try {n + 1}: sent {r['sent']}, exit {r['exit_code']} after {r['stop_s']} s"
              f"{', ' + '; '.join(r['dirty']) if r['dirty'] else ''}", flush=True)
    clean = sum(r["clean"] for r in results)
    print(f"clean stops: {clean} of {len(results)}; slowest {max(r['stop_s'] for r in results)} s "
          f"(drain {args.drain_s} s)")
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
