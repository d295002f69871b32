"""A model rollout under load: two trainings' pods live side by side, swapped one at a time, nothing lost or mixed.

Version 1 is the tiny artifacts; version 2 is a copy whose target weights were perturbed (a "new training":
its plain-decoding lists differ), with the same catalog and the v1 drafter. Both versions run real Tritons
(through the launcher) and real draft services; the two orchestrators are real gRPC servers in this process,
each watching EndpointSlices from the local list/watch stand-in of tests/test_routing.py (no Kubernetes API
server can run here). Clients call only orchestrators that are in service, as a Service would route them.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from harness.stack import Process, free_port, grpc_healthy, triton_ready
from orchestrator.config import OrchestratorConfig
from orchestrator.routing import DRAFT, TARGET, Router
from orchestrator.server import SERVICE, build_server
from specrec.decoding.plain import decode
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.model_identity import artifact_version
from specrec.models.llama import Transformer
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc
from tests.test_multi_target import inferences, service_env, wait_for
from tests.test_routing import NS, api, async_wait_until, endpoint_slice  # noqa: F401 - `api` is a fixture

pytestmark = pytest.mark.slow
N_USERS = 24
PHASE_S = 3.0  # load time per phase of the rollout
CLIENTS = 3  # concurrent client loops
COPIED = ("semantic_ids", "target", "drafter", "retrieval")


def second_training(v1: Path, out: Path) -> Path:
    """v1's catalog and drafter with the target's weights perturbed: another model version."""
    for name in COPIED:
        shutil.copytree(v1 / name, out / name)
    weights = load_file(v1 / "target" / "model.safetensors")
    noise = torch.Generator().manual_seed(7)
    perturbed = {k: w + 0.3 * w.std() * torch.randn(w.shape, generator=noise)
                 if w.is_floating_point() and w.numel() > 1 else w for k, w in weights.items()}
    save_file(perturbed, out / "target" / "model.safetensors", metadata={"format": "pt"})
    return out


@dataclass
class Pods:
    """The Triton and draft pods of each version: address and process."""

    tritons: dict[str, tuple[str, Process]]
    drafters: dict[str, tuple[str, Process]]
    artifacts: dict[str, Path]
    reference: dict[str, dict[int, list[str]]]  # version -> user -> plain greedy list of that version


def history_ids(arts, user: int) -> list[str]:
    return [arts.data.item_ids[i] for i in arts.split.train[user][-arts.profile.max_history:]]


@pytest.fixture(scope="module")
def pods(tiny_artifacts, tiny_drafter, tmp_path_factory) -> Iterator[Pods]:
    v1_dir = Path(tiny_artifacts.directory).resolve()
    v2_dir = second_training(v1_dir, tmp_path_factory.mktemp("v2"))
    artifacts = {artifact_version(v1_dir): v1_dir, artifact_version(v2_dir): v2_dir}
    assert len(artifacts) == 2
    prompts, constraint = [tiny_artifacts.prompt(u) for u in range(N_USERS)], tiny_artifacts.constraint()
    reference = {}
    for version, directory in artifacts.items():
        decoded = decode(Transformer.from_pretrained(directory / "target"), constraint, prompts)
        reference[version] = {u: [tiny_artifacts.data.item_ids[i] for i in d.items] for u, d in enumerate(decoded)}
    v1, v2 = artifacts
    differ = sum(reference[v1][u] != reference[v2][u] for u in range(N_USERS))
    assert differ >= N_USERS // 2, "the two versions must give different lists, or mixing them could not be seen"

    log_dir = tmp_path_factory.mktemp("rollout")
    tritons, drafters = {}, {}
    for version, directory in artifacts.items():
        env, tag = service_env(directory), version[:6]
        port = free_port()
        tritons[version] = (f"127.0.0.1:{port}", Process(
            f"triton-{tag}", [sys.executable, "-m", "target_service.launch", "--artifacts", str(directory),
                              "--grpc-port", str(port), "--http-port", str(free_port()),
                              "--metrics-port", str(free_port())], env, log_dir))
        port = free_port()
        drafters[version] = (f"127.0.0.1:{port}", Process(
            f"draft-{tag}", [sys.executable, "-m", "draft_service.server", "--port", str(port), "--artifacts",
                             str(directory), "--drafter", "model"], env, log_dir))
    try:
        for addr, proc in tritons.values():
            wait_for(lambda a=addr: triton_ready(a), proc, 180)
        for addr, proc in drafters.values():
            wait_for(lambda a=addr: grpc_healthy(a), proc, 120)
        yield Pods(tritons, drafters, artifacts, reference)
    finally:
        for _, proc in [*tritons.values(), *drafters.values()]:
            proc.stop()


@dataclass
class Load:
    """Client loops sending requests to the orchestrators in service; every answer and error recorded."""

    arts: object
    in_service: list[str] = field(default_factory=list)
    answers: list[tuple[str, int, str, list[str]]] = field(default_factory=list)  # (orchestrator, user, version, items)
    errors: list[str] = field(default_factory=list)
    running: bool = True

    async def client(self, index: int) -> None:
        users = itertools.cycle(range(index, N_USERS, 1))
        turn = itertools.count(index)
        while self.running:
            addr, user = self.in_service[next(turn) % len(self.in_service)], next(users)
            request = pb.RecommendRequest(history=history_ids(self.arts, user), num_items=10,
                                          options=pb.DecodingOptions(policy="fixed:3:8"))
            try:
                async with grpc.aio.insecure_channel(addr) as ch:
                    resp = await pb_grpc.RecommenderServiceStub(ch).Recommend(request, timeout=60)
                self.answers.append((addr, user, resp.model_version, [i.item_id for i in resp.items]))
            except grpc.aio.AioRpcError as e:
                self.errors.append(f"{addr} user {user}: {e.code().name} {e.details()}")


def put_pod(fake, service: str, name: str, addr: str) -> None:
    """One EndpointSlice per pod: every pod listens on 127.0.0.1, each on a port of its own."""
    fake.put(endpoint_slice(name, service, {"127.0.0.1": True}, port=int(addr.rsplit(":", 1)[1])))


async def start_orchestrator(api_client, artifacts: Path):
    router = Router(asyncio.get_running_loop())
    router.watch(TARGET, api_client=api_client, namespace=NS, k8s_service="triton")
    router.watch(DRAFT, api_client=api_client, namespace=NS, k8s_service="draft")
    await router.wait_for_endpoints(TARGET, timeout=5)
    config = OrchestratorConfig(artifacts=str(artifacts), port=0, metrics_port=0, draft_addr="", policy="fixed:3:8",
                                draft_timeout_ms=2000)
    server, port, loop = await build_server(config, router)
    await server.start()
    return server, f"127.0.0.1:{port}", loop


async def ready(addr: str) -> bool:
    async with grpc.aio.insecure_channel(addr) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


async def sessions_opened(addr: str) -> int:
    async with grpc.aio.insecure_channel(addr) as ch:
        return (await draft_pb2_grpc.DraftServiceStub(ch).Stats(draft_pb2.StatsRequest(), timeout=5)).sessions_opened


async def test_rolling_model_upgrade_loses_nothing_and_never_mixes_versions(api, pods, tiny_artifacts):  # noqa: F811
    fake, api_client = api
    v1, v2 = pods.artifacts
    (t1, _), (t2, _) = pods.tritons[v1], pods.tritons[v2]
    (d1, _), (d2, _) = pods.drafters[v1], pods.drafters[v2]
    put_pod(fake, "triton", "triton-v1", t1)
    put_pod(fake, "draft", "draft-v1", d1)
    o1_server, o1, o1_loop = await start_orchestrator(api_client, pods.artifacts[v1])
    load = Load(tiny_artifacts, in_service=[o1])
    clients = [asyncio.ensure_future(load.client(i)) for i in range(CLIENTS)]
    o2_server = o2_loop = None
    try:
        await asyncio.sleep(PHASE_S)

        # 1. The new version's Triton and draft pods come up beside the old ones. The v1 orchestrator probes them
        #    and never sends them a request: its load goes on for a phase without touching them.
        put_pod(fake, "triton", "triton-v2", t2)
        put_pod(fake, "draft", "draft-v2", d2)
        o1_versions = o1_loop.backends.versions
        await async_wait_until(lambda: o1_versions[TARGET].version(t2) == v2
                               and o1_versions[DRAFT].version(d2) == v2, timeout=30)
        t2_probed, d2_sessions = inferences(t2), await sessions_opened(d2)
        await asyncio.sleep(PHASE_S)
        assert inferences(t2) == t2_probed, "the v1 orchestrator verified on a v2 Triton"
        assert await sessions_opened(d2) == d2_sessions == 0, "the v1 orchestrator drafted on a v2 drafter"

        # 2. A v2 orchestrator starts; it is ready (a v2 Triton is there) and joins the Service beside v1.
        o2_server, o2, o2_loop = await start_orchestrator(api_client, pods.artifacts[v2])
        await async_wait_until(lambda: o2_loop.backends.serves_our_version(TARGET, t2), timeout=30)
        assert await ready(o2)
        load.in_service = [o1, o2]
        await asyncio.sleep(PHASE_S)

        # 3. The v1 orchestrator leaves the Service and drains; then the v1 Triton and draft pods go.
        load.in_service = [o2]
        await o1_server.stop(10)  # in-flight requests finish within the grace
        await o1_loop.settled()
        # One make-test run (of four this day) counted one more inference on the v1 Triton than a snapshot taken at
        # once after the drain (cause not established; a trailing END of v1's is a guess): the count is taken once it
        # has stopped moving for a second, and v2 must not move it afterwards.
        t1_done = inferences(t1)
        for _ in range(10):
            await asyncio.sleep(1.0)
            if (now := inferences(t1)) == t1_done:
                break
            t1_done = now
        d1_done = await sessions_opened(d1)
        fake.delete("triton-v1")
        fake.delete("draft-v1")
        await asyncio.sleep(PHASE_S)
        assert inferences(t1) == t1_done and await sessions_opened(d1) == d1_done, "v2 used a v1 pod"
    finally:
        load.running = False
        await asyncio.gather(*clients)
        for server, loop in ((o1_server, o1_loop), (o2_server, o2_loop)):
            if server is not None:
                await server.stop(0)
                await loop.backends.close()

    assert load.errors == [], load.errors[:5]  # 0 requests lost
    served = {(orch, version) for orch, _, version, _ in load.answers}
    assert served == {(o1, v1), (o2, v2)}  # each orchestrator served its own version only
    for orch, user, version, items in load.answers:
        assert items == pods.reference[version][user], (orch, user, version)  # plain decoding of that version
    per_phase = {orch: sum(a[0] == orch for a in load.answers) for orch in (o1, o2)}
    assert min(per_phase.values()) >= CLIENTS, per_phase  # both versions really served under load
    assert await sessions_opened(d2) > 0, "the v2 orchestrator drafted on its own drafter"
