"""End to end on loopback: real Triton (via our launcher), the real draft service and orchestrator.

The sacred check: every lossless list equals plain constrained greedy decoding of the same target.
"""

from __future__ import annotations

import concurrent.futures as cf

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from harness.stack import LocalStack, StackConfig
from orchestrator.config import OrchestratorConfig
from orchestrator.loop import LoopOptions
from orchestrator.server import build_server
from specrec.decoding.plain import decode
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.speculation.policy import NO_SPECULATION, Budget, RequestState, RoundStats
from specrec.training.examples import encode_prompt
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

N_USERS = 50


@pytest.fixture(scope="module")
def reference(tiny_artifacts, tiny_target):
    """Plain greedy lists (item ids) for the first N users, computed in process."""
    users = list(range(N_USERS))
    decoded = decode(tiny_target, tiny_artifacts.constraint(), [tiny_artifacts.prompt(u) for u in users])
    return {u: [tiny_artifacts.data.item_ids[i] for i in d.items] for u, d in zip(users, decoded, strict=True)}


def history_ids(arts, user: int) -> list[str]:
    return [arts.data.item_ids[i] for i in arts.split.train[user][-arts.profile.max_history:]]


def recommend_all(stub, arts, users, policy: str, fallbacks: list[int] | None = None) -> dict[int, list[str]]:
    def one(u: int) -> list[str]:
        req = pb.RecommendRequest(history=history_ids(arts, u), num_items=10,
                                  options=pb.DecodingOptions(policy=policy))
        resp = stub.Recommend(req, timeout=60)
        if fallbacks is not None:
            fallbacks.append(resp.stats.fallback_rounds)
        return [i.item_id for i in resp.items]

    with cf.ThreadPoolExecutor(4) as pool:  # concurrent requests: trees of several sequences batch in Triton
        return dict(zip(users, pool.map(one, users), strict=True))


@pytest.fixture(scope="module")
def plain_stack(tiny_artifacts):
    with LocalStack(StackConfig(artifacts=tiny_artifacts.directory, with_drafter=False, policy="off")) as stack:
        yield stack


def test_target_only_stack_equals_plain_greedy(plain_stack, tiny_artifacts, reference):
    with grpc.insecure_channel(plain_stack.orchestrator_addr) as ch:
        got = recommend_all(pb_grpc.RecommenderServiceStub(ch), tiny_artifacts, list(reference), "off")
    assert got == reference


@pytest.mark.parametrize("request_, field", [
    (pb.RecommendRequest(history=[], num_items=10, strict_history=True), "history"),
    (pb.RecommendRequest(history=["1", "no-such-item"], num_items=10, strict_history=True), "history[1]"),
    (pb.RecommendRequest(history=["1"] * 51, num_items=10, strict_history=True), "history"),
    (pb.RecommendRequest(history=["1"], num_items=500), "num_items"),
    (pb.RecommendRequest(history=["1"], num_items=10, options=pb.DecodingOptions(policy="fixed:x")),
     "options.policy"),
    (pb.RecommendRequest(history=["1"], request_id="has spaces"), "request_id"),
])
def test_bad_requests_get_invalid_argument_with_the_field_in_bad_request_details(plain_stack, request_, field):
    with grpc.insecure_channel(plain_stack.orchestrator_addr) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecommenderServiceStub(ch).Recommend(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split("[")[0].split(".")[-1] in err.value.details()
    status = rpc_status.from_call(err.value)
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    assert len(bad) == 1
    violations = error_details_pb2.BadRequest()
    bad[0].Unpack(violations)
    assert [v.field for v in violations.field_violations] == [field]
    assert violations.field_violations[0].description == err.value.details()


def test_stream_recommend_streams_items_then_stats(plain_stack, tiny_artifacts, reference):
    with grpc.insecure_channel(plain_stack.orchestrator_addr) as ch:
        req = pb.RecommendRequest(history=history_ids(tiny_artifacts, 0), num_items=10)
        chunks = list(pb_grpc.RecommenderServiceStub(ch).StreamRecommend(pb.StreamRecommendRequest(request=req),
                                                                          timeout=30))
    items = [c.item.item_id for c in chunks if c.WhichOneof("kind") == "item"]
    assert items == reference[0]
    assert chunks[-1].WhichOneof("kind") == "done" and chunks[-1].done.stats.rounds > 0


@pytest.fixture(scope="module")
def full_stack(tiny_artifacts, tiny_drafter):
    # A generous per-round drafting budget: this test checks the drafter never fails, not its speed on a
    # 2-core machine shared with the test runner (fallback on slow trees is tested on its own).
    config = StackConfig(artifacts=tiny_artifacts.directory, policy="adaptive",
                         extra_env={"SPECREC_DRAFT_TIMEOUT_MS": "5000"})
    with LocalStack(config) as stack:
        yield stack


@pytest.mark.parametrize("policy", ["adaptive", "heuristic", "fixed:3:16", "off"])
def test_speculative_lists_equal_plain_greedy_under_every_policy(full_stack, tiny_artifacts, reference, policy):
    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        fallbacks: list[int] = []
        got = recommend_all(pb_grpc.RecommenderServiceStub(ch), tiny_artifacts, list(reference), policy, fallbacks)
    assert got == reference
    assert sum(fallbacks) == 0, "the drafter failed during some rounds (see the draft service's log)"


def test_speculation_accepts_draft_tokens(full_stack, tiny_artifacts):
    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        req = pb.RecommendRequest(history=history_ids(tiny_artifacts, 3), num_items=10,
                                  options=pb.DecodingOptions(policy="fixed:3:16"))
        stats = pb_grpc.RecommenderServiceStub(ch).Recommend(req, timeout=60).stats
    assert stats.fallback_rounds == 0 and stats.accepted_tokens > 0 and stats.tau > 1.0


def test_a_drafter_the_service_lacks_costs_only_that_request_its_speculation(full_stack, tiny_artifacts, reference):
    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)
        bad = pb.RecommendRequest(history=history_ids(tiny_artifacts, 4), num_items=10,
                                  options=pb.DecodingOptions(policy="fixed:3:16", drafter="model:drafter-nope"))
        resp = stub.Recommend(bad, timeout=60)
        assert [i.item_id for i in resp.items] == reference[4]  # plain decoding, same list
        good = pb.RecommendRequest(history=history_ids(tiny_artifacts, 5), num_items=10,
                                   options=pb.DecodingOptions(policy="fixed:3:16"))
        stats = stub.Recommend(good, timeout=60).stats
    assert stats.fallback_rounds == 0 and stats.tau > 2.5  # the next request still drafts (plain: tau ~1.7)


def test_a_list_that_fills_the_targets_positions_equals_plain_greedy(full_stack, tiny_artifacts, tiny_target):
    # 50 history items and 50 items to recommend: 503 of the target's 512 positions. Deep trees near the end
    # would run past the last position; the loop shrinks them instead of failing the request mid-stream.
    user = next(u for u, seq in enumerate(tiny_artifacts.split.train) if len(seq) >= 50)
    history = tiny_artifacts.split.train[user][-50:]
    prompt = encode_prompt(tiny_artifacts.sids, history)
    reference = decode(tiny_target, tiny_artifacts.constraint(50), [prompt])[0].items
    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        req = pb.RecommendRequest(history=[tiny_artifacts.data.item_ids[i] for i in history], num_items=50,
                                  options=pb.DecodingOptions(policy="fixed:8:32"))
        resp = pb_grpc.RecommenderServiceStub(ch).Recommend(req, timeout=120)
    assert [i.item_id for i in resp.items] == [tiny_artifacts.data.item_ids[i] for i in reference]
    assert resp.stats.fallback_rounds == 0


def test_a_prompt_too_long_for_the_target_is_refused_before_any_token(full_stack, tiny_artifacts):
    prompt = encode_prompt(tiny_artifacts.sids, list(tiny_artifacts.split.train[0][-10:]) * 12)  # 120 items
    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        chunks = pb_grpc.RecommenderServiceStub(ch).Generate(pb.GenerateRequest(prompt=prompt, num_items=10),
                                                             timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(chunks))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "positions, over the target's 512" in err.value.details()


class PlainThenTrees:
    """Plain rounds first (`plain` of them; None: always), then fixed 3:16 trees: what adaptive does when it
    stops speculating under load and starts again."""

    def __init__(self, plain: int | None):
        self.plain, self.name = plain, f"plain-then-trees-{plain}"

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        return NO_SPECULATION if self.plain is None or req.rounds < self.plain else Budget(3, 16)

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1


@pytest.mark.parametrize("plain", [None, 5])
async def test_rounds_without_a_tree_leave_the_drafter_alone_until_a_tree_is_wanted(full_stack, tiny_artifacts,
                                                                                     tiny_target, plain):
    config = OrchestratorConfig(artifacts=str(tiny_artifacts.directory), port=0, metrics_port=0,
                                target_addr=full_stack.target_addr, draft_addr=full_stack.draft_addr)
    server, _, loop = await build_server(config)  # its loop only, driven in process with the policy above
    try:
        async with grpc.aio.insecure_channel(full_stack.draft_addr) as ch:
            drafter = draft_pb2_grpc.DraftServiceStub(ch)
            before = await drafter.Stats(draft_pb2.StatsRequest())
            prompt, tokens = tiny_artifacts.prompt(7), []

            async def emit(committed: list[int], logprobs: list[float]) -> None:
                tokens.extend(committed)

            stats = await loop.run(prompt, LoopOptions(n_items=10), PlainThenTrees(plain), emit)
            after = await drafter.Stats(draft_pb2.StatsRequest())
        assert tokens == decode(tiny_target, tiny_artifacts.constraint(), [prompt])[0].tokens
        assert stats.fallback_rounds == 0
        if plain is None:  # never speculated: the drafter never heard of the request
            assert (after.sessions_opened, after.trees_drafted) == (before.sessions_opened, before.trees_drafted)
        else:  # one stream, opened with the first tree; the plain rounds' tokens arrived with it
            assert after.sessions_opened == before.sessions_opened + 1
            # the START round is the policy's first round (it may carry a tree): `plain` rounds, then trees
            assert after.trees_drafted - before.trees_drafted == stats.rounds - plain == stats.tree_rounds
            assert stats.accepted > 0
    finally:
        await server.stop(0)
        await loop.backends.close()


def test_cancelled_and_expired_requests_leave_no_session_behind(full_stack, tiny_artifacts):
    import time

    with grpc.insecure_channel(full_stack.orchestrator_addr) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)
        codes = []
        for u in range(8):
            req = pb.RecommendRequest(history=history_ids(tiny_artifacts, u), num_items=10)
            try:
                stub.Recommend(req, timeout=0.02 + 0.01 * u)  # deadlines that expire mid-request
            except grpc.RpcError as e:
                codes.append(e.code())
            stream = stub.StreamRecommend(pb.StreamRecommendRequest(request=req), timeout=30)
            next(stream)  # the first item arrived, then the client walks away
            stream.cancel()
    assert codes and all(c == grpc.StatusCode.DEADLINE_EXCEEDED for c in codes)
    deadline = time.monotonic() + 10
    while full_stack.live_counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert full_stack.live_counts() == (0, 0)


def test_drafter_killed_mid_request_lists_still_equal_plain_greedy(tiny_artifacts, tiny_drafter, reference):
    import threading

    config = StackConfig(artifacts=tiny_artifacts.directory, policy="fixed:3:16")
    with LocalStack(config) as stack, grpc.insecure_channel(stack.orchestrator_addr) as ch:
        killer = threading.Timer(0.5, stack.procs["draft"].kill)
        killer.start()
        fallbacks: list[int] = []
        got = recommend_all(pb_grpc.RecommenderServiceStub(ch), tiny_artifacts, list(reference)[:20], "fixed:3:16",
                            fallbacks)
        killer.join()
    assert got == {u: reference[u] for u in list(reference)[:20]}
    assert sum(fallbacks) > 0, "the drafter died mid-run, so some rounds went on without it"
