"""The draft service over a real grpc.aio server on loopback: sessions, rollback, draft-ahead, bad input,
limits, vanished clients, health/reflection and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_service.server import DraftConfig, build_server
from specrec.artifacts import Artifacts
from specrec.calibration import Calibration
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.drafting.base import Budget, DraftTree, load_drafter
from specrec.drafting.offline import eval_users
from specrec.semantic_ids.constraint import ListConstraint
from tests.drafter_artifacts import ensure_tiny_drafters

BUDGET = draft_pb2.DraftBudget(depth=6, max_nodes=16, top_k=4)


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts: Artifacts) -> Artifacts:
    ensure_tiny_drafters(tiny_artifacts)
    return tiny_artifacts


@dataclass
class Running:
    stub: draft_pb2_grpc.DraftServiceStub
    channel: grpc.aio.Channel
    port: int


async def start(arts: Artifacts, **overrides: object) -> tuple[grpc.aio.Server, Running]:
    config = DraftConfig(artifacts=str(arts.directory), port=0, **overrides)  # type: ignore[arg-type]
    server, port = await build_server(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, Running(draft_pb2_grpc.DraftServiceStub(channel), channel, port)


@pytest.fixture
async def svc(artifacts: Artifacts) -> AsyncIterator[Running]:
    server, running = await start(artifacts, idle_timeout_s=30.0)
    yield running
    await running.channel.close()
    await server.stop(0)


def open_req(context: list[int], budget: draft_pb2.DraftBudget = BUDGET, **kw: object) -> draft_pb2.SpeculateRequest:
    return draft_pb2.SpeculateRequest(open=draft_pb2.OpenSession(context=context, n_items=kw.pop("n_items", 10),
                                                                  exclude_history=True, budget=budget, **kw))


def advance_req(committed: list[int], budget: draft_pb2.DraftBudget = BUDGET,
                then_plain: list[int] = ()) -> draft_pb2.SpeculateRequest:
    return draft_pb2.SpeculateRequest(advance=draft_pb2.AdvanceSession(committed=committed, budget=budget,
                                                                       then_plain=then_plain))


async def ask(call: grpc.aio.StreamStreamCall, req: draft_pb2.SpeculateRequest) -> draft_pb2.SpeculateResponse:
    await call.write(req)
    resp = await call.read()
    assert resp is not grpc.aio.EOF
    return resp


async def live(stub: draft_pb2_grpc.DraftServiceStub) -> int:
    return (await stub.Stats(draft_pb2.StatsRequest())).live_sessions


async def wait_live(stub: draft_pb2_grpc.DraftServiceStub, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await live(stub) != n:
        assert time.monotonic() < deadline, f"live sessions stayed at {await live(stub)}, expected {n}"
        await asyncio.sleep(0.02)


def commit_for(tree: DraftTree, constraint: ListConstraint, context: list[int], node: int,
               bonus_rank: int = 0) -> list[int]:
    path = tree.path_tokens(node) if node >= 0 else []
    state = constraint.start(context + path)
    allowed = constraint.allowed(state)
    return path + [int(allowed[min(bonus_rank, len(allowed) - 1)])]


def prompts(arts: Artifacts, n: int) -> list[list[int]]:
    users = eval_users(arts)
    return [arts.prompt(users[i % len(users)]) for i in range(n)]


async def test_open_draft_advance_and_rollback(svc, artifacts):
    """Each Advance's tree equals the tree a fresh stream opens with the whole committed prefix."""
    constraint = artifacts.constraint()
    context = prompts(artifacts, 1)[0]
    call = svc.stub.Speculate()
    resp = await ask(call, open_req(context))
    tree = DraftTree.from_proto(resp.tree)
    assert 0 < len(tree) <= BUDGET.max_nodes and resp.draft_ms > 0
    rng = np.random.default_rng(1)
    for _ in range(5):
        commit = commit_for(tree, constraint, context, int(rng.integers(-1, len(tree))), int(rng.integers(3)))
        context = context + commit
        tree = DraftTree.from_proto((await ask(call, advance_req(commit))).tree)
        fresh_call = svc.stub.Speculate()
        fresh = DraftTree.from_proto((await ask(fresh_call, open_req(context))).tree)
        await fresh_call.done_writing()
        assert tree.tokens == fresh.tokens and tree.parents == fresh.parents
        assert np.allclose(tree.logprobs, fresh.logprobs, atol=1e-4)
    assert await live(svc.stub) >= 1
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await wait_live(svc.stub, 0)


async def test_rounds_without_a_tree_are_told_with_the_next_advance(svc, artifacts):
    """The orchestrator's plain rounds skip the drafter; their tokens come with the next Advance (then_plain).
    The tree after them equals a fresh stream's for the whole committed prefix."""
    constraint = artifacts.constraint()
    context = prompts(artifacts, 3)[2]
    call = svc.stub.Speculate()
    tree = DraftTree.from_proto((await ask(call, open_req(context))).tree)
    commit = commit_for(tree, constraint, context, len(tree) - 1)
    plain: list[int] = []
    state = constraint.start(context + commit)
    for _ in range(7):  # plain steps: the grammar's first choice each time
        plain.append(int(constraint.allowed(state)[0]))
        state = constraint.advance(state, plain[-1])
    tree = DraftTree.from_proto((await ask(call, advance_req(commit, then_plain=plain))).tree)
    fresh_call = svc.stub.Speculate()
    fresh = DraftTree.from_proto((await ask(fresh_call, open_req(context + commit + plain))).tree)
    await fresh_call.done_writing()
    assert tree.tokens == fresh.tokens and tree.parents == fresh.parents
    assert np.allclose(tree.logprobs, fresh.logprobs, atol=1e-4)
    await call.done_writing()
    # Tokens the grammar forbids are refused, as in `committed`.
    await _expect_invalid(svc.stub, [open_req(context), advance_req(commit, then_plain=[1])], "then_plain")
    await wait_live(svc.stub, 0)


async def test_draft_ahead_hit_and_miss(svc, artifacts):
    """Committing the drafter's own guess (best path + its bonus) is a hit; anything else a miss."""
    constraint = artifacts.constraint()
    context = prompts(artifacts, 2)[1]
    local = load_drafter("model", artifacts.directory).open(context, constraint)  # to know the guess
    local.acceptance = Calibration()  # learns from the same commits as the server's fresh drafter: same ranking
    budget = Budget(BUDGET.depth, BUDGET.max_nodes, BUDGET.top_k)
    call = svc.stub.Speculate()
    tree = DraftTree.from_proto((await ask(call, open_req(context))).tree)
    assert tree.tokens == local.draft(budget).tokens
    assert local.prepare_ahead(guesses=DraftConfig.ahead_guesses)  # the server's own guesses
    guess = local.ahead_guess
    await asyncio.sleep(0.5)  # a hit is a tree complete when the commit arrives: give draft-ahead its time
    resp = await ask(call, advance_req(guess))
    assert resp.draft_ahead_hit
    local.commit(guess)
    assert DraftTree.from_proto(resp.tree).tokens == local.draft(budget).tokens
    local.prepare_ahead(guesses=DraftConfig.ahead_guesses)
    live = DraftTree.from_proto(resp.tree)
    miss = next(c for node in range(-1, len(live)) for rank in range(1, 64)  # a commit none of the guesses is
                if (c := commit_for(live, constraint, context + guess, node, rank)) not in local.ahead_guesses
                and c[-1] not in live.children().get(node, {}))
    await asyncio.sleep(0.5)  # drafted ahead (else it is neither a hit nor a miss)
    resp = await ask(call, advance_req(miss))
    assert not resp.draft_ahead_hit
    stats = await svc.stub.Stats(draft_pb2.StatsRequest())
    assert stats.draft_ahead_hits == 1 and stats.draft_ahead_misses == 1
    assert dict(stats.draft_ahead_misses_by_reason) == {"wrong_guess": 1}  # the commit was none of the guesses
    assert stats.drafter_forwards > 0 and 0 < stats.drafter_forward_seconds / stats.drafter_forwards < 1.0
    call.cancel()


async def _expect_invalid(stub, requests: list[draft_pb2.SpeculateRequest], words: str) -> None:
    call = stub.Speculate()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        for req in requests:
            await ask(call, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert words in err.value.details(), err.value.details()


async def test_bad_input_is_invalid_argument_and_frees_the_session(svc, artifacts):
    context = prompts(artifacts, 1)[0]
    good = open_req(context)
    await _expect_invalid(svc.stub, [open_req(context[:-1] + [999, 4])], "unknown token")
    await _expect_invalid(svc.stub, [open_req([1, 4, 4])], "context rejected")
    await _expect_invalid(svc.stub, [advance_req([5])], "Advance before Open")
    await _expect_invalid(svc.stub, [good, good], "already has a session")
    await _expect_invalid(svc.stub, [open_req(context, draft_pb2.DraftBudget(depth=17, max_nodes=8))], "depth 17")
    await _expect_invalid(svc.stub, [open_req(context, draft_pb2.DraftBudget(depth=4, max_nodes=129))], "max_nodes")
    await _expect_invalid(svc.stub, [open_req(context, draft_pb2.DraftBudget(depth=4, max_nodes=8, top_k=99))],
                          "top_k")
    await _expect_invalid(svc.stub, [open_req(context, n_items=0)], "n_items")
    await _expect_invalid(svc.stub, [open_req(context, drafter="nope")], "unknown drafter")
    await _expect_invalid(svc.stub, [good, advance_req([])], "got none")
    await _expect_invalid(svc.stub, [good, advance_req([5, 10_000])], "unknown token")
    await _expect_invalid(svc.stub, [good, advance_req([1])], "not allowed")  # BOS as the bonus
    call = svc.stub.Speculate()
    tree = DraftTree.from_proto((await ask(call, good)).tree)
    off_tree = [t for t in artifacts.constraint().allowed(artifacts.constraint().start(context))
                if t not in tree.children().get(-1, {})]
    call.cancel()
    if off_tree:
        await _expect_invalid(svc.stub, [good, advance_req([int(off_tree[0]), 3])], "not a path")
    await _expect_invalid(svc.stub, [good, advance_req([5], draft_pb2.DraftBudget(depth=-1, max_nodes=4))],
                          "depth -1")
    await wait_live(svc.stub, 0)
    assert (await svc.stub.Stats(draft_pb2.StatsRequest())).invalid_requests >= 14


async def test_64_concurrent_sessions(svc, artifacts):
    constraint = artifacts.constraint()
    peak = 0

    async def session(context: list[int], seed: int) -> int:
        nonlocal peak
        rng = np.random.default_rng(seed)
        call = svc.stub.Speculate()
        tree = DraftTree.from_proto((await ask(call, open_req(context))).tree)
        peak = max(peak, await live(svc.stub))
        n = 0
        for _ in range(3):
            commit = commit_for(tree, constraint, context, int(rng.integers(-1, len(tree))))
            context = context + commit
            tree = DraftTree.from_proto((await ask(call, advance_req(commit))).tree)
            n += len(tree)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        return n

    t0 = time.monotonic()
    sizes = await asyncio.gather(*(session(p, i) for i, p in enumerate(prompts(artifacts, 64))))
    assert all(s > 0 for s in sizes)
    assert peak > 1
    await wait_live(svc.stub, 0)
    stats = await svc.stub.Stats(draft_pb2.StatsRequest())
    assert stats.sessions_opened == 64 and stats.trees_drafted == 64 * 4
    print(f"64 sessions x 4 trees in {time.monotonic() - t0:.2f} s")


async def test_session_cap_and_idle_timeout(artifacts):
    server, svc = await start(artifacts, max_sessions=2, idle_timeout_s=0.5)
    try:
        context = prompts(artifacts, 1)[0]
        calls = [svc.stub.Speculate() for _ in range(3)]
        for call in calls[:2]:
            await ask(call, open_req(context))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ask(calls[2], open_req(context))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap" in err.value.details()
        assert await live(svc.stub) == 2
        await asyncio.sleep(0.8)  # both sessions go idle
        for call in calls[:2]:
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "open a new stream" in await call.details()
        await wait_live(svc.stub, 0)
        stats = await svc.stub.Stats(draft_pb2.StatsRequest())
        assert stats.sessions_rejected == 1 and stats.sessions_expired == 2
    finally:
        await svc.channel.close()
        await server.stop(0)


_CLIENT = """
import sys, time, grpc
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
def requests():
    context = [int(t) for t in sys.argv[2].split(",")]
    budget = draft_pb2.DraftBudget(depth=4, max_nodes=8)
    yield draft_pb2.SpeculateRequest(open=draft_pb2.OpenSession(context=context, n_items=10, budget=budget))
    time.sleep(60)
responses = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel("127.0.0.1:" + sys.argv[1])).Speculate(requests())
next(responses)
print("opened", flush=True)
time.sleep(60)
"""


async def test_vanished_client_frees_its_session(svc, artifacts):
    """A client process that dies mid-session (no goodbye) frees its session; so does a cancelled stream."""
    context = prompts(artifacts, 1)[0]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CLIENT, str(svc.port),
                                                ",".join(map(str, context)), stdout=subprocess.PIPE)
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"opened\n"
        assert await live(svc.stub) == 1
    finally:
        proc.kill()
        await proc.wait()
    await wait_live(svc.stub, 0)
    call = svc.stub.Speculate()
    await ask(call, open_req(context))
    call.cancel()
    await wait_live(svc.stub, 0)


async def test_retrieval_and_hybrid_and_probs(svc, artifacts):
    context = prompts(artifacts, 1)[0]
    for name in ("retrieval", "hybrid"):
        call = svc.stub.Speculate()
        resp = await ask(call, open_req(context, drafter=name, want_probs=True, user_group="1"))
        tree = DraftTree.from_proto(resp.tree)
        assert len(tree) and tree.probs is not None and tree.probs.shape[1] == artifacts.sids.vocab.size
        call.cancel()
    await _expect_invalid(svc.stub, [open_req(context, drafter="retrieval", user_group="x")], "user_group")


async def test_health_and_reflection(svc):
    health = health_pb2_grpc.HealthStub(svc.channel)
    for service in ("", "specrec.draft.v1.DraftService"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(svc.channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    resp = await call.read()
    names = {s.name for s in resp.list_services_response.service}
    assert "specrec.draft.v1.DraftService" in names
    call.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_and_exits(artifacts):
    """The real entry point: serves, then on SIGTERM stops taking work and exits 0 within the grace."""
    port = _free_port()
    env = {**os.environ, "SPECREC_ARTIFACTS": str(artifacts.directory), "SPECREC_DRAFT_PORT": str(port),
           "SPECREC_SHUTDOWN_GRACE_SECONDS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "draft_service.server"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        import grpc as sync_grpc

        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with sync_grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except sync_grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        release = threading.Event()

        def requests() -> Iterator[draft_pb2.SpeculateRequest]:
            yield open_req(prompts(artifacts, 1)[0])
            release.wait(30)  # keep the stream open through the drain

        with sync_grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            responses = draft_pb2_grpc.DraftServiceStub(ch).Speculate(requests())
            assert len(next(responses).tree.tokens)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(sync_grpc.RpcError):  # the open stream is cut once the grace period is over
                next(responses)
            assert proc.wait(timeout=15) == 0
            assert 1.5 < time.monotonic() - t0 < 10
            release.set()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_metrics_endpoint_counts_sessions_and_trees(artifacts):
    import urllib.request

    port = _free_port()
    server, svc = await start(artifacts, metrics_port=port)
    try:
        call = svc.stub.Speculate()
        await ask(call, open_req(prompts(artifacts, 1)[0]))

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("specrec_draft_") and " " in line}

        values = await asyncio.to_thread(scrape)
        assert values["specrec_draft_sessions"] == 1 and values["specrec_draft_trees_total"] == 1
        forwards, steps = (values[f'specrec_draft_{m}_total{{drafter="model"}}'] for m in ("forwards", "forward_steps"))
        assert 0 < forwards <= steps  # the open's prefill and the tree's levels, batched
        seconds = values['specrec_draft_forward_seconds_total{drafter="model"}']
        assert 0 < seconds / forwards < 1.0  # a mean forward time an operator can read (~1 ms here)
        call.cancel()
        await wait_live(svc.stub, 0)
        assert (await asyncio.to_thread(scrape))["specrec_draft_sessions"] == 0
    finally:
        await svc.channel.close()
        await server.stop(0)
