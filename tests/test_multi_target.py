"""Two real Triton servers behind one orchestrator: requests spread over both, and survive one leaving or dying.

Both Tritons are real `target_service.launch` processes serving the tiny target, beside a real draft
service. The lists must equal plain constrained greedy decoding whatever happens to the pods. Which pod
served what is read from Triton's own model statistics. EndpointSlices come from the local list/watch
stand-in of tests/test_routing.py (no Kubernetes API server can run here)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.stack import Process, free_port, grpc_healthy, triton_ready
from orchestrator.config import OrchestratorConfig
from orchestrator.routing import TARGET, Router
from orchestrator.server import SERVICE, build_server
from specrec.decoding.plain import decode
from specrec.target_client import MODEL_NAME
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc
from tests.test_routing import NS, api, async_wait_until, endpoint_slice  # noqa: F401 - `api` is a fixture

pytestmark = pytest.mark.slow
N_USERS = 32


def history_ids(arts, user: int) -> list[str]:
    return [arts.data.item_ids[i] for i in arts.split.train[user][-arts.profile.max_history:]]


def request(arts, user: int, policy: str = "off") -> pb.RecommendRequest:
    return pb.RecommendRequest(history=history_ids(arts, user), num_items=10,
                               options=pb.DecodingOptions(policy=policy))


@pytest.fixture(scope="module")
def reference(tiny_artifacts, tiny_target) -> dict[int, list[str]]:
    """Plain greedy lists (item ids) for the first N users, computed in process."""
    users = list(range(N_USERS))
    decoded = decode(tiny_target, tiny_artifacts.constraint(), [tiny_artifacts.prompt(u) for u in users])
    return {u: [tiny_artifacts.data.item_ids[i] for i in d.items] for u, d in zip(users, decoded, strict=True)}


def service_env(artifacts: Path) -> dict[str, str]:
    return {**os.environ, "SPECREC_ARTIFACTS": str(artifacts), "SPECREC_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Services:
    tritons: list[tuple[str, Process]]  # (gRPC address, process)
    draft_addr: str


@pytest.fixture(scope="module")
def services(tiny_artifacts, tiny_drafter, tmp_path_factory) -> Iterator[Services]:
    """Two Tritons and a draft service, started side by side (each takes 10-30 s to load here)."""
    log_dir, env = tmp_path_factory.mktemp("services"), service_env(tiny_artifacts.directory)
    tritons = []
    for i in range(2):
        port = free_port()
        args = [sys.executable, "-m", "target_service.launch", "--artifacts", str(tiny_artifacts.directory),
                "--grpc-port", str(port), "--http-port", str(free_port()), "--metrics-port", str(free_port())]
        tritons.append((f"127.0.0.1:{port}", Process(f"triton{i}", args, env, log_dir)))
    draft_port = free_port()
    drafter = Process("draft", [sys.executable, "-m", "draft_service.server", "--port", str(draft_port),
                                "--artifacts", str(tiny_artifacts.directory), "--drafter", "model"], env, log_dir)
    try:
        for addr, proc in tritons:
            wait_for(lambda a=addr: triton_ready(a), proc, 180)
        wait_for(lambda: grpc_healthy(f"127.0.0.1:{draft_port}"), drafter, 120)
        yield Services(tritons, f"127.0.0.1:{draft_port}")
    finally:
        for _, proc in [*tritons, ("", drafter)]:
            proc.stop()


def wait_for(ready, proc: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.alive(), f"{proc.name} exited; its log ends with:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"{proc.name} not ready; its log ends with:\n{proc.tail()}"
        time.sleep(0.2)


def inferences(addr: str) -> int:
    """Verify requests the Triton at `addr` has executed for specrec_target (its own statistics)."""
    stats = grpcclient.InferenceServerClient(addr).get_inference_statistics(MODEL_NAME)
    return sum(s.inference_count for s in stats.model_stats)


def kill_triton(proc: Process, addr: str) -> None:
    """kill -9 tritonserver (a crash, not a drain), then its launcher; remove the shared memory they held.

    tritonserver runs in a session of its own and gets SIGTERM when the launcher dies (it would drain
    gracefully), so it is killed first, by pid.
    """
    launcher = proc.proc.pid
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for child in children:
        os.kill(int(child), signal.SIGKILL)
    proc.kill()
    port = addr.rsplit(":", 1)[1]
    for region in Path("/dev/shm").glob(f"specrec{proc.proc.pid}p{port}_*"):
        region.unlink(missing_ok=True)


async def recommend_all(addr: str, arts, users: list[int]) -> dict[int, list[str]]:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub, gate = pb_grpc.RecommenderServiceStub(ch), asyncio.Semaphore(4)

        async def one(u: int) -> list[str]:
            async with gate:  # concurrent requests, as a client fleet would send them
                return [i.item_id for i in (await stub.Recommend(request(arts, u), timeout=60)).items]

        return dict(zip(users, await asyncio.gather(*(one(u) for u in users)), strict=True))


# Runs first: it needs both Tritons alive (the test below kills one).
async def test_endpointslice_routing_spreads_requests_and_drops_a_departed_pod(
    api, services, tiny_artifacts, reference  # noqa: F811 - `api` is the fixture imported above
) -> None:
    fake, api_client = api
    (a, _), (b, _) = services.tritons
    # One slice per Triton: both listen on 127.0.0.1, on ports of their own.
    for name, addr in (("triton-a", a), ("triton-b", b)):
        fake.put(endpoint_slice(name, "triton", {"127.0.0.1": True}, port=int(addr.rsplit(":", 1)[1])))
    router = Router(asyncio.get_running_loop())
    router.watch(TARGET, api_client=api_client, namespace=NS, k8s_service="triton")
    await router.wait_for_endpoints(TARGET, timeout=5)
    config = OrchestratorConfig(artifacts=str(tiny_artifacts.directory), port=0, metrics_port=0, draft_addr="",
                                policy="off")
    server, port, loop = await build_server(config, router)
    await server.start()
    try:
        users = list(reference)
        before = {a: inferences(a), b: inferences(b)}
        got = await recommend_all(f"127.0.0.1:{port}", tiny_artifacts, users[:16])
        assert got == {u: reference[u] for u in users[:16]}
        await loop.settled()  # the ENDs, sent off the critical path, have reached their Tritons
        spread = {a: inferences(a), b: inferences(b)}
        assert all(spread[t] > before[t] for t in (a, b)), f"requests did not reach both Tritons: {spread}"

        # Triton a leaves the Service: its client is dropped and no further request reaches it.
        fake.delete("triton-a")
        await async_wait_until(lambda: a not in loop.backends.targets)
        got = await recommend_all(f"127.0.0.1:{port}", tiny_artifacts, users[16:])
        assert got == {u: reference[u] for u in users[16:]}
        assert inferences(a) == spread[a] and inferences(b) > spread[b]
        assert loop.sequences_open == 0
    finally:
        await server.stop(1)
        await loop.backends.close()


def moves(metrics_port: int, reason: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("specrec_target_moves_total") and f'reason="{reason}' in line)


def tritonserver_pid(proc: Process) -> int:
    """The tritonserver under a launcher (its only child)."""
    launcher = proc.proc.pid
    return int(Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()[0])


def orchestrator_args(services: Services, arts, port: str, metrics_port: int, *extra: str) -> list[str]:
    (a, _), (b, _) = services.tritons
    return [sys.executable, "-m", "orchestrator.server", "--port", port, "--artifacts", str(arts.directory),
            "--target-addr", f"{a},{b}", "--draft-addr", services.draft_addr, "--policy", "fixed:3:16",
            "--metrics-port", str(metrics_port), *extra]


def test_requests_on_a_hung_triton_move_to_the_other_after_the_verify_timeout(services, tiny_artifacts, reference,
                                                                               tmp_path) -> None:
    # A hung pod (SIGSTOP: process alive, port open, no answers) fails no call; only the verify timeout sees it.
    (_, _), (b, proc_b) = services.tritons
    orch_addr, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    args = orchestrator_args(services, tiny_artifacts, orch_addr.rsplit(":", 1)[1], metrics_port,
                             "--verify-timeout-s", "2")
    orchestrator = Process("orchestrator", args, service_env(tiny_artifacts.directory), tmp_path)
    triton_b = tritonserver_pid(proc_b)
    try:
        wait_for(lambda: grpc_healthy(orch_addr), orchestrator, 60)
        os.kill(triton_b, signal.SIGSTOP)
        users = list(reference)[:12]
        with grpc.insecure_channel(orch_addr) as ch, cf.ThreadPoolExecutor(4) as pool:
            stub = pb_grpc.RecommenderServiceStub(ch)

            def one(u: int) -> list[str]:
                return [i.item_id for i in stub.Recommend(request(tiny_artifacts, u, "fixed:3:16"), timeout=60).items]

            got = dict(zip(users, pool.map(one, users), strict=True))
        assert got == {u: reference[u] for u in users}
        assert moves(metrics_port, "timeout") > 0
    finally:
        os.kill(triton_b, signal.SIGCONT)
        orchestrator.stop()


def test_static_routing_survives_a_triton_killed_mid_run(services, tiny_artifacts, reference, tmp_path) -> None:
    (a, proc_a), (b, _) = services.tritons
    orch_addr, metrics_port = f"127.0.0.1:{free_port()}", free_port()
    # Speculation on: the sequences that move carry draft trees, rebuilt on the other Triton.
    args = orchestrator_args(services, tiny_artifacts, orch_addr.rsplit(":", 1)[1], metrics_port)
    orchestrator = Process("orchestrator", args, service_env(tiny_artifacts.directory), tmp_path)
    try:
        wait_for(lambda: grpc_healthy(orch_addr), orchestrator, 60)
        start_a = inferences(a)
        with grpc.insecure_channel(orch_addr) as ch, cf.ThreadPoolExecutor(4) as pool:
            stub = pb_grpc.RecommenderServiceStub(ch)
            futures = {u: pool.submit(lambda u=u: stub.Recommend(request(tiny_artifacts, u, "fixed:3:16"), timeout=60))
                       for u in reference}
            # Kill Triton a as soon as this run's sequences are on it, with most requests still to come.
            wait_for(lambda: inferences(a) > start_a + 3, orchestrator, 30)
            kill_triton(proc_a, a)
            done_at_kill = sum(f.done() for f in futures.values())
            got = {u: [i.item_id for i in f.result().items] for u, f in futures.items()}
        assert done_at_kill < len(reference) // 2, "the kill came too late to test anything"
        assert got == reference
        # Requests on the dead Triton moved to the other one (the orchestrator counts each move).
        assert moves(metrics_port) > 0
    finally:
        orchestrator.stop()


async def test_orchestrator_is_ready_only_while_a_triton_pod_of_its_version_is_known(services, tiny_artifacts):
    # Readiness (service specrec.v1.RecommenderService) follows the Triton pods that answered the version probe with the
    # catalog's version; liveness ("") stays SERVING throughout.
    (triton,) = [addr for addr, proc in services.tritons if proc.alive()]  # a test above kills one
    router = Router(asyncio.get_running_loop())
    config = OrchestratorConfig(artifacts=str(tiny_artifacts.directory), port=0, metrics_port=0, draft_addr="")
    server, port, loop = await build_server(config, router)
    await server.start()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status(service: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

            async def becomes(want: int) -> None:
                deadline = asyncio.get_running_loop().time() + 10
                while (got := await status(SERVICE)) != want:
                    assert asyncio.get_running_loop().time() < deadline, f"readiness stayed {got}"
                    await asyncio.sleep(0.01)

            assert await status(SERVICE) == not_serving
            assert await status("") == serving
            router.set_static(TARGET, ["127.0.0.1:1"])  # a pod that never answers the probe: not ready
            await asyncio.sleep(0.5)
            assert await status(SERVICE) == not_serving
            router.set_static(TARGET, [triton])  # a real Triton of the catalog's version
            await becomes(serving)
            router.set_static(TARGET, [])  # every Triton pod left
            await becomes(not_serving)
            assert await status("") == serving
    finally:
        await server.stop(0)
        await loop.backends.close()
