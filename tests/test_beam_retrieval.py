"""Top-K retrieval by beam search (issue #22): speculative beam search returns exactly plain beam search's items,
in order, with its scores, in process and through the real stack (Triton via our launcher, the draft service and
the orchestrator on loopback); plain beam search itself is checked against independent references (width 1 is
greedy decoding's first item; every score is the item's log-probability computed token by token)."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from harness.stack import LocalStack, StackConfig
from specrec.decoding.beam import BeamRun, default_tree_nodes
from specrec.decoding.plain import decode
from specrec.decoding.select import constrained_logprob
from specrec.drafting.base import load_drafter
from specrec.models.steps import Block, build_step
from specrec.semantic_ids.constraint import ListConstraint
from specrec.speculation.beam_arms import PLAIN, BeamArms
from specrec.speculation.local import retrieve
from specrec.training.examples import encode_prompt
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc
from specrec.verify import TargetVerifier

SHAPES = [(1, 1), (4, 2), (10, 10), (16, 5), (32, 20), (64, 50), (64, 64)]  # (beam width, k)


@pytest.fixture(scope="module")
def verifier(tiny_artifacts) -> TargetVerifier:
    return TargetVerifier(tiny_artifacts.directory, max_sequences=8)


def same_results(a: BeamRun, b: BeamRun) -> bool:
    return ([r.item for r in a.results] == [r.item for r in b.results]
            and all(abs(x.score - y.score) <= 1e-4 for x, y in zip(a.results, b.results, strict=True)))


@pytest.mark.parametrize("overlap", [False, True], ids=["tree-with-prefill", "tree-overlaps-prefill"])
@pytest.mark.parametrize(("width", "k"), SHAPES)
def test_speculative_beam_search_returns_plain_beam_searchs_items_and_scores(tiny_artifacts, tiny_drafter, verifier,
                                                                            width, k, overlap):
    drafter = load_drafter("model", tiny_drafter)
    plain_rounds = spec_rounds = 0
    for user in range(300, 312):
        constraint = ListConstraint(verifier.trie, k)
        plain = retrieve(tiny_artifacts.prompt(user), constraint, width, verifier)
        spec = retrieve(tiny_artifacts.prompt(user), constraint, width, verifier, drafter=drafter, overlap=overlap)
        assert same_results(plain, spec), f"user {user}, width {width}, k {k}"
        assert len(plain.results) == k and len({r.item for r in plain.results}) == k
        assert [r.score for r in plain.results] == sorted((r.score for r in plain.results), reverse=True)
        plain_rounds += plain.stats.rounds
        spec_rounds += spec.stats.rounds
    assert spec_rounds <= plain_rounds
    assert verifier.live_sequences == 0


def test_width_one_is_greedy_decodings_first_item_with_its_score(tiny_artifacts, tiny_target, verifier):
    for user in range(320, 330):
        prompt = tiny_artifacts.prompt(user)
        greedy = decode(tiny_target, tiny_artifacts.constraint(1), [prompt])[0]
        beam = retrieve(prompt, ListConstraint(verifier.trie, 1), 1, verifier).results
        assert [r.item for r in beam] == greedy.items
        assert beam[0].score == pytest.approx(sum(greedy.logprobs), abs=1e-4)


@torch.inference_mode()
def item_logprob(target, constraint: ListConstraint, prompt: list[int], tokens: tuple[int, ...]) -> float:
    """An item's score recomputed from one forward over prompt + its tokens, token by token."""
    cache = target.new_cache(1, len(prompt) + len(tokens) + 1)
    step = build_step(cache, [Block.chain(0, prompt + list(tokens))])
    logits = target(step.tokens, step.positions, cache, step.rows, step.slots, step.mask)[0]
    state, total = constraint.start(prompt), 0.0
    for i, tok in enumerate(tokens):
        total += constrained_logprob(logits[len(prompt) - 1 + i].float(), constraint.allowed(state), tok)
        state = constraint.advance(state, tok)
    return total


def test_beam_scores_are_the_items_log_probabilities_and_skip_history_and_banned_items(tiny_artifacts, tiny_target,
                                                                                     verifier):
    user = 340
    prompt = tiny_artifacts.prompt(user)
    history = set(ListConstraint(verifier.trie, 1).parse_history(prompt))
    open_run = retrieve(prompt, ListConstraint(verifier.trie, 10), 16, verifier)
    banned = [r.item for r in open_run.results[:3]]
    constraint = ListConstraint(verifier.trie, 10, banned=banned)
    run = retrieve(prompt, constraint, 16, verifier)
    assert not {r.item for r in run.results} & (history | set(banned))
    for r in run.results:
        assert r.score == pytest.approx(item_logprob(tiny_target, constraint, prompt, r.tokens), abs=1e-4)


# -- through the real stack ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tiny_artifacts, tiny_drafter):
    config = StackConfig(artifacts=tiny_artifacts.directory, extra_env={"SPECREC_DRAFT_TIMEOUT_MS": "5000",
                                                                        "SPECREC_BEAM_DRAFT": "prefill"})
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="module")
def stub(stack):
    with grpc.insecure_channel(stack.orchestrator_addr) as ch:
        yield pb_grpc.RecommenderServiceStub(ch)


def history_of(arts, user: int) -> list[int]:
    return list(arts.split.train[user][-10:])


@pytest.mark.parametrize(("width", "k"), [(10, 10), (32, 20), (64, 50)])
def test_retrieve_through_the_stack_is_exactly_plain_beam_search(stub, tiny_artifacts, verifier, width, k):
    tree_rounds = 0
    for user in range(350, 356):
        history = history_of(tiny_artifacts, user)
        req = pb.RetrieveRequest(history=[tiny_artifacts.data.item_ids[i] for i in history], k=k, beam_width=width)
        spec = stub.Retrieve(req, timeout=60)
        req.plain = True
        plain = stub.Retrieve(req, timeout=60)
        assert [i.item_id for i in spec.items] == [i.item_id for i in plain.items]
        assert all(abs(a.log_prob - b.log_prob) <= 1e-4 for a, b in zip(spec.items, plain.items, strict=True))
        assert len(spec.items) == k and plain.stats.drafted_nodes == 0 and plain.stats.tree_budget == 0
        assert spec.stats.tree_budget == default_tree_nodes(width)
        tree_rounds += spec.stats.drafted_nodes > 0
        # and both are what the library's plain beam search computes in process
        local = retrieve(encode_prompt(tiny_artifacts.sids, history), ListConstraint(verifier.trie, k), width, verifier)
        assert [tiny_artifacts.data.item_ids[r.item] for r in local.results] == [i.item_id for i in plain.items]
    assert tree_rounds == 6  # every speculative request got its tree from the draft service


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"k": 65}, "k"), ({"k": -1}, "k"), ({"k": 10, "beam_width": 5}, "beam_width"),
    ({"k": 10, "beam_width": 65}, "beam_width"), ({"max_tree_nodes": 129}, "max_tree_nodes"),
    ({"drafter": "no such"}, "drafter"),
])
def test_bad_retrieve_requests_are_invalid_argument_naming_the_field(stub, tiny_artifacts, request_fields, field):
    history = [tiny_artifacts.data.item_ids[i] for i in history_of(tiny_artifacts, 360)]
    req = pb.RetrieveRequest(history=history, **request_fields)
    with pytest.raises(grpc.RpcError) as err:
        stub.Retrieve(req, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    violations = [v for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)
                  for v in _unpacked(d).field_violations]
    assert [v.field for v in violations] == [field]


def _unpacked(detail) -> error_details_pb2.BadRequest:
    out = error_details_pb2.BadRequest()
    detail.Unpack(out)
    return out


def test_retrieve_goes_on_by_plain_beam_search_when_the_draft_service_dies(stack, stub, tiny_artifacts):
    """Last in this module: it kills the module's draft service."""
    history = [tiny_artifacts.data.item_ids[i] for i in history_of(tiny_artifacts, 370)]
    before = stub.Retrieve(pb.RetrieveRequest(history=history, k=10), timeout=60)
    assert before.stats.drafted_nodes > 0
    stack.procs["draft"].kill()
    after = stub.Retrieve(pb.RetrieveRequest(history=history, k=10), timeout=60)
    assert after.stats.drafted_nodes == 0
    assert [i.item_id for i in after.items] == [i.item_id for i in before.items]
    assert all(abs(a.log_prob - b.log_prob) <= 1e-4 for a, b in zip(after.items, before.items, strict=True))


def test_auto_takes_the_arm_that_has_been_fastest_and_keeps_retrying_the_others():
    arms = BeamArms(explore=8)
    width, plain, small, big = 10, *BeamArms.arms(10)
    assert (plain, small, big) == (PLAIN, 26, 46)
    cost = {plain: 0.100, small: 0.090, big: 0.120}
    picks = []
    for _ in range(64):
        arm = arms.choose(width, in_flight=1)
        picks.append(arm)
        arms.observe(width, 1, arm, cost[arm])
    assert picks[:3] == [plain, small, big]  # each arm is measured once first
    assert picks[3:].count(small) >= 52 and {plain, big} <= set(picks[3:])  # the fastest, the others retried
    cost[plain] = 0.050  # e.g. the load went away and plain got cheaper: noticed at its next retry
    later = []
    for _ in range(64):
        arm = arms.choose(width, in_flight=1)
        later.append(arm)
        arms.observe(width, 1, arm, cost[arm])
    assert later[-32:].count(plain) >= 26
    assert arms.choose(width, in_flight=40) == plain  # another load bucket learns on its own, from scratch
