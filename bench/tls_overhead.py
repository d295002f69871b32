"""What TLS costs end to end: the same stack plaintext and with mTLS on every hop plus a bearer token.

Both stacks run at once and requests alternate between them (A B A B ...), so load from other work on the
machine falls on both alike. Per mode: Recommend latency seen by the client (one kept channel), the
orchestrator's own total, and the cost of a new connection (channel + first health check: the handshake).
The lists must be equal in both modes (exit 1 otherwise).

    python bench/tls_overhead.py --profile tiny --users 20
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from harness.devcerts import make_ca, make_identity  # noqa: E402
from harness.stack import LocalStack, StackConfig  # noqa: E402
from specrec.pipeline import prepare  # noqa: E402
from specrec.security import TlsConfig, auth_metadata, channel  # noqa: E402
from specrec.v1 import recommend_pb2 as pb  # noqa: E402
from specrec.v1 import recommend_pb2_grpc as pb_grpc  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connect_ms(addr: str, tls: TlsConfig) -> float:
    t0 = time.perf_counter()
    with channel(addr, tls) as ch:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="tiny")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--policy", default="fixed:3:8")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--connects", type=int, default=20, help="new connections timed per mode")
    a = p.parse_args()
    os.environ.setdefault("SPECREC_HOME", str(Path.home() / ".cache" / "specrec"))
    arts = prepare("ml-100k", a.profile, train=False, progress=False)
    work = Path(tempfile.mkdtemp(prefix="specrec-tls-bench-"))
    ca = make_ca(work, "bench-ca")
    node = make_identity(work, "bench-node", ca)
    token = secrets.token_urlsafe(24)
    (work / "token").write_text(token)
    secure = node.tls(ca.path, client_auth=True)
    modes = {"plaintext": (TlsConfig(), None, ()), "mTLS + token": (secure, work / "token", auth_metadata(token))}
    stacks = {m: LocalStack(StackConfig(artifacts=arts.directory, policy=a.policy, tls=tls, token_file=tf,
                                        log_dir=work / m.replace(" ", "").replace("+", "-")))
              for m, (tls, tf, _) in modes.items()}
    latency: dict[str, list[float]] = {m: [] for m in modes}
    server: dict[str, list[float]] = {m: [] for m in modes}
    connects: dict[str, list[float]] = {m: [] for m in modes}
    lists: dict[str, dict[int, list[str]]] = {m: {} for m in modes}
    try:
        for s in stacks.values():
            s.start()
        channels = {m: channel(stacks[m].orchestrator_addr, modes[m][0]) for m in modes}
        users = list(range(a.warmup + a.users))
        for i, user in enumerate(users):
            history = [arts.data.item_ids[j] for j in arts.split.train[user][-arts.profile.max_history:]]
            req = pb.RecommendRequest(history=history, num_items=10)
            for m in (modes if i % 2 == 0 else reversed(list(modes))):
                t0 = time.perf_counter()
                resp = pb_grpc.RecommenderServiceStub(channels[m]).Recommend(req, timeout=60, metadata=modes[m][2])
                if i >= a.warmup:
                    latency[m].append((time.perf_counter() - t0) * 1e3)
                    server[m].append(resp.stats.total_ms)
                    lists[m][user] = [it.item_id for it in resp.items]
        for _ in range(a.connects):
            for m in modes:
                connects[m].append(connect_ms(stacks[m].orchestrator_addr, modes[m][0]))
        for ch in channels.values():
            ch.close()
    finally:
        for s in stacks.values():
            s.stop()
    print(f"\n{a.users} users, policy {a.policy}, profile {a.profile}, alternating; {a.connects} new connections\n")
    print("| mode | Recommend p50 ms | p90 ms | mean ms | orchestrator total p50 ms | new connection p50 ms |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {pct(latency[m], 0.5):.1f} | {pct(latency[m], 0.9):.1f} | {statistics.fmean(latency[m]):.1f} "
              f"| {pct(server[m], 0.5):.1f} | {pct(connects[m], 0.5):.2f} |")
    same = lists["plaintext"] == lists["mTLS + token"]
    print(f"\nlists equal in both modes: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
