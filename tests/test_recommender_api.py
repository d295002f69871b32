"""The Recommender API a production caller needs (issue #19), end to end on the real stack: Triton via our
launcher, the draft service and the orchestrator as processes on loopback.

Catalog churn (unknown ids skipped and counted, long histories cut to the most recent items, empty histories
answered as a flagged cold start), request ids (echoed, in the orchestrator's log), and the error model
(google.rpc details read with grpc_status.rpc_status.from_call; the documented service config retrying
RESOURCE_EXHAUSTED after the server's pushback).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.stack import LocalStack, StackConfig
from orchestrator.catalog import Catalog
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import PUSHBACK_KEY, RETRY_AFTER_MS, RequestInvalid
from orchestrator.server import build_server
from specrec.decoding.plain import decode
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.semantic_ids.constraint import ListConstraint
from specrec.semantic_ids.vocab import BOS, REC
from specrec.training.examples import encode_prompt
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

SERVICE_CONFIG = Path(__file__).resolve().parents[1] / "protos" / "specrec" / "v1" / "service_config.json"
MAX_HISTORY = 50  # the orchestrator's default limit


@pytest.fixture(scope="module")
def stack(tiny_artifacts, tiny_drafter):
    config = StackConfig(artifacts=tiny_artifacts.directory, policy="fixed:3:16",
                         extra_env={"SPECREC_DRAFT_TIMEOUT_MS": "5000"})
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.orchestrator_addr) as ch:
        yield pb_grpc.RecommenderServiceStub(ch)


def plain_items(arts, target, history: list[int], n: int = 10) -> list[str]:
    """Plain constrained greedy decoding in process, from a history of item indices."""
    decoded = decode(target, arts.constraint(n), [encode_prompt(arts.sids, history)])[0]
    return [arts.data.item_ids[i] for i in decoded.items]


def stream_of(request: pb.RecommendRequest) -> pb.StreamRecommendRequest:
    return pb.StreamRecommendRequest(request=request)


def ids(arts, items) -> list[str]:
    return [arts.data.item_ids[i] for i in items]


def test_unknown_history_items_are_skipped_counted_and_the_list_is_the_known_items_list(stub, tiny_artifacts,
                                                                                       tiny_target):
    known = list(tiny_artifacts.split.train[1][-8:])
    history = ids(tiny_artifacts, known)
    mixed = ["new-item-a", *history[:4], "new-item-b", *history[4:], ""]
    resp = stub.Recommend(pb.RecommendRequest(history=mixed, num_items=10), timeout=60)
    assert [i.item_id for i in resp.items] == plain_items(tiny_artifacts, tiny_target, known)
    assert resp.history.used_items == 8 and resp.history.unknown_items == 3
    assert list(resp.history.unknown_item_ids) == ["new-item-a", "new-item-b", ""]
    assert not resp.history.cold_start and resp.history.truncated_items == 0


def test_a_history_over_the_limit_keeps_its_most_recent_items(stub, tiny_artifacts, tiny_target):
    user = next(u for u, seq in enumerate(tiny_artifacts.split.train) if len(seq) >= MAX_HISTORY + 30)
    known = list(tiny_artifacts.split.train[user][-(MAX_HISTORY + 30):])
    resp = stub.Recommend(pb.RecommendRequest(history=ids(tiny_artifacts, known), num_items=10), timeout=60)
    assert [i.item_id for i in resp.items] == plain_items(tiny_artifacts, tiny_target, known[-MAX_HISTORY:])
    assert (resp.history.used_items, resp.history.truncated_items) == (MAX_HISTORY, 30)


@pytest.mark.parametrize("history", [[], ["never-seen-1", "never-seen-2"]])
def test_no_usable_history_is_a_flagged_cold_start_equal_to_plain_decoding_from_nothing(stub, tiny_artifacts,
                                                                                        tiny_target, history):
    reference = decode(tiny_target, tiny_artifacts.constraint(10), [[BOS, REC]])[0]
    resp = stub.Recommend(pb.RecommendRequest(history=history, num_items=10), timeout=60)
    assert [i.item_id for i in resp.items] == ids(tiny_artifacts, reference.items)
    assert resp.history.cold_start and resp.history.used_items == 0
    assert resp.history.unknown_items == len(history)
    assert resp.stats.fallback_rounds == 0  # the drafter drafts from an empty history too


def test_streamed_cold_start_reports_its_history_in_the_last_message(stub):
    chunks = list(stub.StreamRecommend(stream_of(pb.RecommendRequest(history=[], num_items=3)), timeout=60))
    done = chunks[-1].done
    assert [c.item.item_id for c in chunks[:-1]] == [i.item_id for i in done.items] and len(done.items) == 3
    assert done.history.cold_start


def test_strict_history_refuses_what_the_lenient_reading_would_skip(stub, tiny_artifacts):
    history = ids(tiny_artifacts, tiny_artifacts.split.train[2][-3:]) + ["not-in-catalog"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Recommend(pb.RecommendRequest(history=history, strict_history=True, request_id="strict-1"), timeout=30)
    status = rpc_status.from_call(err.value)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not-in-catalog" in status.message
    details = {d.type_url.rsplit("/", 1)[-1]: d for d in status.details}
    bad, info = error_details_pb2.BadRequest(), error_details_pb2.RequestInfo()
    details["google.rpc.BadRequest"].Unpack(bad)
    details["google.rpc.RequestInfo"].Unpack(info)
    assert [v.field for v in bad.field_violations] == ["history[3]"]
    assert info.request_id == "strict-1"  # the client can match the refusal to its own logs


def test_request_ids_are_echoed_or_made_and_appear_in_the_orchestrator_log(stack, stub, tiny_artifacts):
    history = ids(tiny_artifacts, tiny_artifacts.split.train[3][-5:])
    given = stub.Recommend(pb.RecommendRequest(history=history, num_items=2, request_id="caller-42:a/b"),
                           timeout=60)
    made = stub.Recommend(pb.RecommendRequest(history=history, num_items=2), timeout=60)
    assert given.request_id == "caller-42:a/b"
    assert len(made.request_id) == 32 and int(made.request_id, 16) >= 0
    streamed = list(stub.StreamRecommend(stream_of(pb.RecommendRequest(history=history, num_items=2, request_id="s-1")),
                                         timeout=60))
    assert streamed[-1].done.request_id == "s-1"
    prompt = encode_prompt(tiny_artifacts.sids, list(tiny_artifacts.split.train[3][-5:]))
    chunks = list(stub.Generate(pb.GenerateRequest(prompt=prompt, num_items=2, request_id="g-1"), timeout=60))
    assert chunks[-1].done and chunks[-1].request_id == "g-1"
    log_text = stack.procs["orchestrator"].log_path.read_text()
    for rid in ("caller-42:a/b", made.request_id, "s-1", "g-1"):
        assert f"request={rid}]: done:" in log_text, f"no log line for request {rid}"


async def test_the_in_flight_cap_sends_retry_info_and_a_pushback_the_service_config_obeys(stack, tiny_artifacts):
    # A second orchestrator in process on the stack's Triton, with a cap of 0: it refuses every request, so the
    # retries the client makes are the only thing timed.
    config = OrchestratorConfig(artifacts=str(tiny_artifacts.directory), port=0, metrics_port=0, max_in_flight=0,
                                target_addr=stack.target_addr, draft_addr=stack.draft_addr)
    server, port, loop = await build_server(config)
    await server.start()
    request = pb.RecommendRequest(history=["1"], num_items=2, request_id="capped-1")
    service_config = json.loads(SERVICE_CONFIG.read_text())
    attempts = service_config["methodConfig"][0]["retryPolicy"]["maxAttempts"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            call = pb_grpc.RecommenderServiceStub(plain).Recommend(request, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            status = await rpc_status.aio.from_call(call)
            trailers = dict(await call.trailing_metadata())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = error_details_pb2.RetryInfo()
        assert next(d for d in status.details if d.Is(retry.DESCRIPTOR)).Unpack(retry)
        assert retry.retry_delay.ToMilliseconds() == RETRY_AFTER_MS == int(trailers[PUSHBACK_KEY])
        options = [("grpc.service_config", json.dumps(service_config)), ("grpc.enable_retries", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as retrying:
            t0 = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.RecommenderServiceStub(retrying).Recommend(request, timeout=30)
            waited = time.perf_counter() - t0
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # every retry waited the server's pushback, not the policy's shorter backoff
        assert waited >= (attempts - 1) * RETRY_AFTER_MS / 1e3 * 0.95, waited
    finally:
        await server.stop(0)
        await loop.backends.close()


def plain_item_scores(arts, target, prompts: list[list[int]], n: int) -> list[list[float]]:
    """Per item, the sum of its tokens' log-probabilities as plain greedy decoding computes them in process."""
    per_item = arts.sids.tokens_per_item  # codes, then SEP
    scores = []
    for d in decode(target, arts.constraint(n), prompts):
        scores.append([sum(d.logprobs[i:i + per_item]) for i in range(0, n * per_item, per_item)])
    return scores


@pytest.mark.parametrize("policy", ["fixed:3:16", "off"])
def test_item_scores_equal_plain_decodings_log_probabilities(stub, tiny_artifacts, tiny_target, policy):
    users = [0, 5, 9, 14]
    expected = plain_item_scores(tiny_artifacts, tiny_target, [tiny_artifacts.prompt(u) for u in users], 10)
    for user, want in zip(users, expected, strict=True):
        history = ids(tiny_artifacts, tiny_artifacts.split.train[user][-tiny_artifacts.profile.max_history:])
        resp = stub.Recommend(pb.RecommendRequest(history=history, num_items=10,
                                                  options=pb.DecodingOptions(policy=policy)), timeout=60)
        got = [item.log_prob for item in resp.items]
        assert got == pytest.approx(want, abs=1e-4), (user, got, want)
        assert all(s < 0 for s in got)  # every item had a real choice: no free score
        assert resp.total_log_prob == pytest.approx(sum(want), abs=1e-4)


def test_streamed_and_generated_tokens_carry_the_same_scores(stub, tiny_artifacts, tiny_target):
    prompt = tiny_artifacts.prompt(3)
    want = plain_item_scores(tiny_artifacts, tiny_target, [prompt], 4)[0]
    history = ids(tiny_artifacts, tiny_artifacts.split.train[3][-tiny_artifacts.profile.max_history:])
    chunks = list(stub.StreamRecommend(stream_of(pb.RecommendRequest(history=history, num_items=4)), timeout=60))
    assert [c.item.log_prob for c in chunks[:-1]] == pytest.approx(want, abs=1e-4)
    generated = list(stub.Generate(pb.GenerateRequest(prompt=prompt, num_items=4), timeout=60))
    assert all(len(c.log_probs) == len(c.tokens) for c in generated)
    assert sum(lp for c in generated for lp in c.log_probs) == pytest.approx(sum(want), abs=1e-4)


# -- filters -------------------------------------------------------------------------------------------


def filtered_plain(arts, target, user: int, n: int, banned: list[int]) -> list[str]:
    """Plain greedy decoding in process under the same grammar with `banned` items ruled out."""
    constraint = ListConstraint(arts.constraint(n).trie, n, True, banned)
    return ids(arts, decode(target, constraint, [arts.prompt(user)])[0].items)


def test_denied_items_are_never_drafted_and_the_list_is_plain_decodings_under_the_same_filter(stub, stack,
                                                                                             tiny_artifacts,
                                                                                             tiny_target):
    history = ids(tiny_artifacts, tiny_artifacts.split.train[6][-tiny_artifacts.profile.max_history:])
    unfiltered = [i.item_id for i in stub.Recommend(pb.RecommendRequest(history=history, num_items=10),
                                                    timeout=60).items]
    deny = unfiltered[:5] + ["not-an-item"]
    resp = stub.Recommend(pb.RecommendRequest(history=history, num_items=10,
                                              filters=pb.ItemFilters(deny_item_ids=deny)), timeout=60)
    got = [i.item_id for i in resp.items]
    index = {item_id: i for i, item_id in enumerate(tiny_artifacts.data.item_ids)}
    assert not set(got) & set(deny)
    assert got == filtered_plain(tiny_artifacts, tiny_target, 6, 10, [index[i] for i in deny[:5]])
    assert (resp.filters.unknown_ids, resp.filters.eligible_items) == (1, len(index) - 5)
    assert resp.stats.fallback_rounds == 0 and resp.stats.accepted_tokens > 0  # the drafter drafted under it


def test_the_draft_service_never_drafts_a_banned_item(stack, tiny_artifacts, tiny_target):
    # The drafter's own choices for this user are the items plain decoding picks; banning them must prune
    # every tree: each node, followed from the committed context, obeys the filtered grammar.
    prompt = tiny_artifacts.prompt(8)
    banned = decode(tiny_target, tiny_artifacts.constraint(10), [prompt])[0].items
    constraint = ListConstraint(tiny_artifacts.constraint(10).trie, 10, True, banned)
    budget = draft_pb2.DraftBudget(depth=8, max_nodes=48, top_k=4)
    with grpc.insecure_channel(stack.draft_addr) as ch:
        responses = draft_pb2_grpc.DraftServiceStub(ch).Speculate(iter([draft_pb2.SpeculateRequest(
            open=draft_pb2.OpenSession(context=prompt, n_items=10, budget=budget, banned_items=banned))]),
            timeout=60)
        tree = next(responses).tree
    assert len(tree.tokens) > 8
    states = [constraint.start(prompt)]
    for token, parent in zip(tree.tokens, tree.parents, strict=True):
        state = constraint.advance(states[parent + 1], token)
        assert state is not None, f"the drafter drafted token {token} past the filter"
        states.append(state)


@st.composite
def item_filters(draw: st.DrawFn, item_ids: list[str]) -> tuple[list[str], list[str]]:
    pick = st.sampled_from(item_ids)
    allow = draw(st.one_of(st.just([]), st.lists(pick, min_size=1, max_size=12), st.lists(pick, max_size=400)))
    deny = draw(st.lists(st.one_of(pick, st.just("unknown-id")), max_size=200))
    return allow, deny


def test_no_filtered_item_is_ever_returned_and_lists_equal_plain_under_random_filters(stub, tiny_artifacts,
                                                                                     tiny_target):
    item_ids = list(tiny_artifacts.data.item_ids)
    index = {item_id: i for i, item_id in enumerate(item_ids)}
    outcomes: list[str] = []

    @settings(deadline=None, database=None, max_examples=16, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(0, 20), st.integers(1, 10), item_filters(item_ids), st.sampled_from(["fixed:3:16", "off"]))
    def run(user: int, n: int, filters: tuple[list[str], list[str]], policy: str) -> None:
        allow, deny = filters
        known = list(tiny_artifacts.split.train[user][-tiny_artifacts.profile.max_history:])
        allowed = {index[i] for i in allow} if allow else set(range(len(item_ids)))
        banned = sorted(set(range(len(item_ids))) - allowed | {index[i] for i in deny if i in index})
        eligible = len(set(range(len(item_ids))) - set(banned) - set(known))
        request = pb.RecommendRequest(history=ids(tiny_artifacts, known), num_items=n,
                                      filters=pb.ItemFilters(allow_item_ids=allow, deny_item_ids=deny),
                                      options=pb.DecodingOptions(policy=policy))
        if eligible < n:  # a clear refusal at once, not a hang
            with pytest.raises(grpc.RpcError) as err:
                stub.Recommend(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "eligible" in err.value.details()
            outcomes.append("refused")
            return
        got = [i.item_id for i in stub.Recommend(request, timeout=60).items]
        assert len(got) == n
        assert all(index[i] not in banned for i in got)
        assert got == filtered_plain(tiny_artifacts, tiny_target, user, n, banned)
        outcomes.append("listed")

    run()
    assert "listed" in outcomes, outcomes


# -- many users per call ---------------------------------------------------------------------------------


def test_a_batch_with_a_bad_user_answers_every_other_user_with_their_plain_list(stub, tiny_artifacts, tiny_target):
    users = list(range(20, 32))
    requests = [pb.RecommendRequest(history=ids(tiny_artifacts, tiny_artifacts.split.train[u][-20:]), num_items=5,
                                    request_id=f"batch-{u}") for u in users]
    bad = 4
    requests[bad] = pb.RecommendRequest(history=["nope"], strict_history=True, request_id="batch-bad")
    reference = decode(tiny_target, tiny_artifacts.constraint(5), [tiny_artifacts.prompt(u) for u in users])
    results = list(stub.RecommendBatch(pb.RecommendBatchRequest(requests=requests, concurrency=6), timeout=120))
    assert sorted(r.index for r in results) == list(range(len(users)))  # every user answered exactly once
    by_index = {r.index: r for r in results}
    error = by_index[bad].error
    assert by_index[bad].WhichOneof("outcome") == "error"
    assert (error.code, error.field, error.request_id) == ("INVALID_ARGUMENT", "history[0]", "batch-bad")
    for i, u in enumerate(users):
        if i != bad:
            resp = by_index[i].response
            assert [it.item_id for it in resp.items] == ids(tiny_artifacts, reference[i].items), u
            assert resp.request_id == f"batch-{u}"


@pytest.mark.parametrize("batch, field", [
    (pb.RecommendBatchRequest(), "requests"),
    (pb.RecommendBatchRequest(requests=[pb.RecommendRequest()] * 1001), "requests"),
    (pb.RecommendBatchRequest(requests=[pb.RecommendRequest()], concurrency=-1), "concurrency"),
])
def test_a_malformed_batch_fails_the_call_naming_the_field(stub, batch, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.RecommendBatch(batch, timeout=30))
    status = rpc_status.from_call(err.value)
    bad = error_details_pb2.BadRequest()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]


def test_category_filters_select_by_the_catalogs_genres(stub, tiny_artifacts, tiny_target):
    data = tiny_artifacts.data
    genre = {name: set(np.flatnonzero(data.genres[:, j])) for j, name in enumerate(data.genre_names)}
    history = ids(tiny_artifacts, tiny_artifacts.split.train[11][-tiny_artifacts.profile.max_history:])
    filters = pb.ItemFilters(allow_categories=["Horror", "Sci-Fi", "no-such-genre"], deny_categories=["Comedy"])
    resp = stub.Recommend(pb.RecommendRequest(history=history, num_items=6, filters=filters), timeout=60)
    index = data.item_index()
    got = [index[i.item_id] for i in resp.items]
    assert all(i in genre["Horror"] | genre["Sci-Fi"] and i not in genre["Comedy"] for i in got)
    banned = sorted(set(range(data.n_items)) - ((genre["Horror"] | genre["Sci-Fi"]) - genre["Comedy"]))
    assert [i.item_id for i in resp.items] == filtered_plain(tiny_artifacts, tiny_target, 11, 6, banned)
    assert resp.filters.unknown_ids == 1 and resp.filters.eligible_items == data.n_items - len(banned)


def test_a_catalog_without_categories_refuses_category_filters_by_name(tiny_artifacts, tmp_path):
    # in process on real artifacts, less their categories file (what artifacts made before categories look like)
    shutil.copytree(tiny_artifacts.directory / "semantic_ids", tmp_path / "semantic_ids",
                    ignore=shutil.ignore_patterns("categories.json"))
    catalog = Catalog(tmp_path)
    one = catalog.item_filter(["1"], [])  # sent the short way: the one item allowed, not every other banned
    assert one.eligible == 1 and one.allowed == (catalog.index["1"],) and one.banned == ()
    most = catalog.item_filter([], ["1", "2"])
    assert most.eligible == catalog.sids.n_items - 2 and most.banned == tuple(sorted(catalog.index[i] for i in "12"))
    none = catalog.item_filter(["1"], ["1"])  # nothing eligible: everything banned (no allowed item = no allow rule)
    assert none.eligible == 0 and none.allowed == () and len(none.banned) == catalog.sids.n_items
    with pytest.raises(RequestInvalid) as err:
        catalog.item_filter([], [], allow_categories=["Horror"])
    assert err.value.field == "filters" and "no item categories" in str(err.value)


def test_retrieve_by_default_chooses_its_tree_and_always_answers_plain_beam_searchs_items(stub, tiny_artifacts):
    """The server's default (SPECREC_BEAM_DRAFT=auto) picks plain or a tree per request: the items never change."""
    history = ids(tiny_artifacts, tiny_artifacts.split.train[5][-10:])
    plain = stub.Retrieve(pb.RetrieveRequest(history=history, k=10, plain=True), timeout=60)
    budgets = set()
    for _ in range(5):
        auto = stub.Retrieve(pb.RetrieveRequest(history=history, k=10), timeout=60)
        budgets.add(auto.stats.tree_budget)
        assert [i.item_id for i in auto.items] == [i.item_id for i in plain.items]
        assert all(abs(a.log_prob - b.log_prob) <= 1e-4 for a, b in zip(auto.items, plain.items, strict=True))
    # every arm is measured before any is preferred: the trees by auto requests, plain by them or by the plain=True
    # request (a plain run is a plain arm's sample too, when it is booked under the same load bucket: timing decides)
    assert {26, 46} <= budgets <= {0, 26, 46}
