"""The orchestrator's per-pod clients (orchestrator.backends) following a Router fed by EndpointSlices.

No Kubernetes API server can run here, so the slices come from the local list/watch stand-in of
tests/test_routing.py. The clients are the real TargetClient and DraftClient (their channels are lazy,
so pods that do not exist cost nothing); they only record when they are closed. Requests against real
Triton servers, with pods leaving and dying mid-request, are in tests/test_multi_target.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_service.server import DraftConfig, build_server
from orchestrator.backends import Backends, router_from_config
from orchestrator.config import OrchestratorConfig
from orchestrator.draft_client import DraftClient, DraftUnavailable
from orchestrator.routing import DRAFT, TARGET, Router, rendezvous_rank
from orchestrator.server import SERVICE
from orchestrator.server import build_server as build_orchestrator
from specrec.speculation.policy import Budget
from specrec.target_client import TargetClient, TargetUnavailable
from tests.test_routing import NS, api, async_wait_until, endpoint_slice  # noqa: F401 - `api` is a fixture

CLOSED: list[str] = []


class RecordingTarget(TargetClient):
    async def close(self) -> None:
        CLOSED.append(self.url)
        await super().close()


class RecordingDraft(DraftClient):
    async def close(self) -> None:
        CLOSED.append(self.addr)
        await super().close()


TRITONS = [f"10.0.0.{i}" for i in range(1, 4)]
DRAFTERS = ["10.0.1.1", "10.0.1.2"]
KEYS = [f"{i:016x}" for i in range(300)]


def target_addr(ip: str) -> str:
    return f"{ip}:8001"


@pytest.fixture
async def backends(api):  # noqa: F811 - the fixture imported above
    fake, api_client = api
    fake.put(endpoint_slice("triton-a", "triton", dict.fromkeys(TRITONS, True)))
    fake.put(endpoint_slice("draft-a", "draft", dict.fromkeys(DRAFTERS, True), port=50052))
    router = Router(asyncio.get_running_loop())
    CLOSED.clear()
    wired = Backends(router, RecordingTarget, lambda addr: RecordingDraft(addr, 0.2), close_grace_s=0.05)
    router.watch(TARGET, api_client=api_client, namespace=NS, k8s_service="triton")
    router.watch(DRAFT, api_client=api_client, namespace=NS, k8s_service="draft")
    await router.wait_for_endpoints(TARGET, timeout=5)
    await router.wait_for_endpoints(DRAFT, timeout=5)
    await wired.start()
    yield fake, wired
    await wired.close()


async def test_triton_pod_leaving_closes_its_client_and_moves_only_its_requests(backends) -> None:
    fake, wired = backends
    await async_wait_until(lambda: wired.targets.addresses == {target_addr(ip) for ip in TRITONS})
    placed = {k: wired.target(k)[0] for k in KEYS}
    assert set(placed.values()) == {target_addr(ip) for ip in TRITONS}  # requests spread over every pod
    victim = target_addr(TRITONS[0])

    # The pod turns not ready (terminating): after the grace its client is closed ...
    fake.put(endpoint_slice("triton-a", "triton", {ip: ip != TRITONS[0] for ip in TRITONS}))
    await async_wait_until(lambda: victim in CLOSED)
    assert victim not in wired.targets
    # ... its requests move to their next pod by rendezvous rank, everybody else's stay put, and no
    # request gets the departed pod's (closed) client.
    for key, pod in placed.items():
        address, client = wired.target(key, current=pod)
        expected = rendezvous_rank(key, {target_addr(ip) for ip in TRITONS})[1] if pod == victim else pod
        assert address == expected and client is wired.targets.find(address) and not client.url == victim

    # A new pod arrives: requests in flight stay on the pod holding their sequence (its KV cache),
    # while new requests that rank it first go there.
    fake.put(endpoint_slice("triton-b", "triton", {"10.0.0.9": True}))
    await async_wait_until(lambda: target_addr("10.0.0.9") in wired.targets)
    survivors = {k: p for k, p in placed.items() if p != victim}
    assert all(wired.target(k, current=p)[0] == p for k, p in survivors.items())
    assert any(wired.target(k)[0] == target_addr("10.0.0.9") for k in KEYS)

    # Every pod gone: the request path gets UNAVAILABLE with a message naming what to check.
    fake.delete("triton-a")
    fake.delete("triton-b")
    await async_wait_until(lambda: len(wired.targets) == 0)
    with pytest.raises(TargetUnavailable, match="no ready Triton pod") as err:
        wired.target(KEYS[0], current=placed[KEYS[0]])
    assert err.value.code.name == "UNAVAILABLE"


async def test_draft_backoff_is_per_pod_and_a_departed_draft_pod_gets_no_new_requests(backends) -> None:
    fake, wired = backends
    await async_wait_until(lambda: len(wired.drafts) == len(DRAFTERS))
    chosen = {k: wired.draft(k) for k in KEYS}
    by_pod = {c.addr: [k for k, d in chosen.items() if d is c] for c in chosen.values()}
    assert set(by_pod) == {f"{ip}:50052" for ip in DRAFTERS}

    # One draft pod fails: its backoff sends its keys to the other pod; the other's keys do not move.
    failing, healthy = f"{DRAFTERS[0]}:50052", f"{DRAFTERS[1]}:50052"
    wired.drafts.get(failing).failed("test: stream broke")
    assert all(wired.draft(k).addr == healthy for k in KEYS)
    assert wired.drafts.get(healthy).available

    # The healthy pod leaves the slice: its client is closed; with the other pod still backing off,
    # new requests get no drafter (plain decoding) rather than a closed client.
    fake.put(endpoint_slice("draft-a", "draft", {DRAFTERS[0]: True, DRAFTERS[1]: False}, port=50052))
    await async_wait_until(lambda: healthy in CLOSED)
    assert all(wired.draft(k) is None for k in by_pod[healthy])


async def test_static_addresses_come_from_comma_separated_flags() -> None:
    config = OrchestratorConfig.from_args(["--artifacts", "x", "--target-addr", "127.0.0.1:8001, 127.0.0.1:8101",
                                           "--draft-addr", "", "--routing", "static"])
    # --routing static wins over the in-cluster default that KUBERNETES_SERVICE_HOST would select.
    router = router_from_config(asyncio.get_running_loop(), target_addr=config.target_addr,
                                draft_addr=config.draft_addr, routing=config.routing,
                                env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    wired = Backends(router, TargetClient, lambda addr: DraftClient(addr, 0.2))
    await wired.start()
    try:
        assert wired.targets.addresses == {"127.0.0.1:8001", "127.0.0.1:8101"}
        assert wired.draft("any") is None  # no drafter configured: plain decoding
    finally:
        await wired.close()


async def test_draft_stream_on_a_departed_pods_closed_channel_is_draft_unavailable(tiny_artifacts, tiny_drafter):
    """A draft pod leaves while a request's tree is in flight: the pool closes its channel, and the request
    sees DraftUnavailable (it goes on by plain decoding), not an error of its own."""
    server, port = await build_server(DraftConfig(artifacts=str(tiny_artifacts.directory), port=0,
                                                  drafter="retrieval"))
    await server.start()
    try:
        client = DraftClient(f"127.0.0.1:{port}", 5.0)
        session = client.session()
        prompt = tiny_artifacts.prompt(0)
        await session.open(prompt, 10, True, Budget(0, 0), "retrieval", 5.0)
        in_flight = asyncio.ensure_future(session.advance([], Budget(3, 8)))
        await asyncio.sleep(0)  # the tree request is on the wire
        await client.close()
        with pytest.raises(DraftUnavailable, match="closed"):
            await in_flight
        assert session.closed
    finally:
        await server.stop(0)


async def test_orchestrator_is_ready_only_while_a_triton_pod_is_known(tiny_artifacts) -> None:
    # Readiness (service specrec.v1.RecommenderService) follows the Triton pods; liveness ("") stays SERVING throughout.
    router = Router(asyncio.get_running_loop())
    config = OrchestratorConfig(artifacts=str(tiny_artifacts.directory), port=0, metrics_port=0, draft_addr="")
    server, port, loop = await build_orchestrator(config, router)
    await server.start()
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status(service: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

            async def becomes(want: int) -> None:
                deadline = asyncio.get_running_loop().time() + 5
                while (got := await status(SERVICE)) != want:
                    assert asyncio.get_running_loop().time() < deadline, f"readiness stayed {got}"
                    await asyncio.sleep(0.01)

            assert await status(SERVICE) == not_serving
            assert await status("") == serving
            router.set_static(TARGET, [target_addr(TRITONS[0])])
            await becomes(serving)
            router.set_static(TARGET, [])  # every Triton pod left
            await becomes(not_serving)
            assert await status("") == serving
    finally:
        await server.stop(0)
        await loop.backends.close()
