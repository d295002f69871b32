"""Drafters and token trees: tree invariants, forced tokens, the drafter's cached forward, rollback,
draft-ahead, retrieval/hybrid trees, offline tau bookkeeping and the distillation losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specrec.artifacts import Artifacts
from specrec.calibration import Calibration, DepthCalibration
from specrec.drafting.base import (
    AHEAD_WAVE,
    Budget,
    Drafter,
    DraftError,
    DraftTree,
    StopPoint,
    learn_acceptance,
    load_drafter,
    stop_points,
)
from specrec.drafting.hybrid import POOL_PESSIMISM, HybridDrafter, learn_sources
from specrec.drafting.model_drafter import DrafterConfig, ModelSession, PadDrafter, _Pending
from specrec.drafting.offline import EvalConfig, Report, Truth, eval_users, evaluate, is_eval_user, matches, replay
from specrec.drafting.retrieval import pool_for
from specrec.drafting.tree import Scratch, TreeRoot, build_trees, child_state, masked, merge_trees
from specrec.models.llama import Transformer
from specrec.semantic_ids.constraint import ListConstraint, ListState
from specrec.semantic_ids.vocab import EOS, SEP
from specrec.training.drafter import (
    DIVERGENCES,
    DistillLoss,
    TrainSpec,
    distill_data,
    divergence,
    drafter_config,
    drafter_profile,
    top_k_loss,
)
from tests.drafter_artifacts import ensure_tiny_drafters

BUDGETS = [Budget(1, 1, 1), Budget(4, 4, 1), Budget(6, 16, 4), Budget(8, 32, 8), Budget(16, 128, 16)]


@pytest.fixture(scope="module")
def drafters(tiny_artifacts: Artifacts) -> dict[str, Drafter]:
    directory = ensure_tiny_drafters(tiny_artifacts)
    return {name: load_drafter(name, directory) for name in ("model", "retrieval", "hybrid")}


@pytest.fixture(scope="module")
def prompts(tiny_artifacts: Artifacts) -> list[list[int]]:
    return [tiny_artifacts.prompt(u) for u in eval_users(tiny_artifacts, 4)]


def state_after(constraint: ListConstraint, state: ListState, tokens: list[int]) -> ListState:
    for tok in tokens:
        nxt = constraint.advance(state, tok)
        assert nxt is not None, tok
        state = nxt
    return state


def check_tree(tree: DraftTree, constraint: ListConstraint, state: ListState, budget: Budget) -> None:
    """Connected, parents first, within budget, grammar-valid, distinct siblings, priority order."""
    b = budget.validated()
    assert len(tree) <= b.max_nodes
    assert len(tree.tokens) == len(tree.parents) == len(tree.logprobs)
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))
    assert all(d < b.depth for d in tree.depths())
    states: dict[int, ListState] = {-1: state}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
        assert tok in constraint.allowed(states[p]), f"node {i} ({tok}) is not allowed by the grammar"
        states[i] = constraint.advance(states[p], tok)
        if len(constraint.allowed(states[p])) == 1:
            assert tree.logprobs[i] == 0.0  # forced tokens cost nothing
    for kids in tree.children().values():
        assert len(set(kids)) == len(kids)
    scores = tree.scores()
    assert all(a >= b - 1e-6 for a, b in zip(scores, scores[1:], strict=False)), "not in priority order"
    assert all(lp <= 1e-6 for lp in tree.logprobs)


def random_commit(tree: DraftTree, constraint: ListConstraint, state: ListState, rng: np.random.Generator) -> list[int]:
    """A root-down path of the tree (random node, maybe none) and a random allowed bonus token."""
    path = [] if not len(tree) or rng.random() < 0.2 else tree.path_tokens(int(rng.integers(len(tree))))
    st = state_after(constraint, state, path)
    if st.finished:
        return path
    return path + [int(rng.choice(constraint.allowed(st)))]


def assert_same_tree(a: DraftTree, b: DraftTree) -> None:
    assert a.tokens == b.tokens and a.parents == b.parents
    assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)


# -- trees ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model", "retrieval", "hybrid"])
def test_tree_invariants(drafters, prompts, tiny_artifacts, name):
    constraint = tiny_artifacts.constraint()
    for prompt in prompts:
        session = drafters[name].open(prompt, constraint)
        for budget in BUDGETS:
            check_tree(session.draft(budget), constraint, session.state, budget)


def test_empty_budget_gives_empty_tree(drafters, prompts, tiny_artifacts):
    session = drafters["model"].open(prompts[0], tiny_artifacts.constraint())
    assert len(session.draft(Budget(0, 10))) == 0 and len(session.draft(Budget(5, 0))) == 0


def test_forced_tokens_need_no_model_call(tiny_artifacts, prompts):
    """After an item's last RQ code the collision code and SEP are forced: no drafter call at all."""
    constraint = tiny_artifacts.constraint()
    state = constraint.start(prompts[0])
    for _ in range(tiny_artifacts.sids.n_levels - 1):
        state = constraint.advance(state, int(constraint.allowed(state)[0]))
    assert constraint.forced(state) is not None
    root = TreeRoot(0, 0, 0, state, logprobs=None)
    built = build_trees(None, constraint, [root], Budget(2, 8, 4), Scratch({0: 0}, 64))[0]
    forced = [constraint.forced(state)]
    forced.append(constraint.forced(constraint.advance(state, forced[0])))
    assert built.tree.tokens == forced and built.tree.parents == [-1, 0] and built.tree.logprobs == [0.0, 0.0]


def test_one_batched_forward_per_level(drafters, prompts, tiny_artifacts, monkeypatch):
    constraint = tiny_artifacts.constraint()
    session = drafters["model"].open(prompts[1], constraint)
    assert isinstance(session, ModelSession)
    calls = []
    forward = session.model.forward
    monkeypatch.setattr(session.model, "forward", lambda *a: calls.append(a[0].shape) or forward(*a))
    budget = Budget(8, 64, 8)
    tree = session.draft(budget)
    check_tree(tree, constraint, session.state, budget)
    assert 1 <= len(calls) <= budget.depth - 1  # the root's children come from the last commit's forward
    assert all(shape[0] == 1 for shape in calls)


def test_drafter_tree_forward_equals_plain_recompute(drafters, prompts, tiny_artifacts):
    """Every expanded node's log q (tree attention over the cache) = a fresh forward over context + path."""
    constraint = tiny_artifacts.constraint()
    session = drafters["model"].open(prompts[2], constraint)
    session.draft(Budget(6, 32, 4))
    model = session.model
    checked = 0
    for path, logq in session.outputs.items():
        seq = session.context + list(path)
        steps = torch.tensor([[0] * len(session.context) + list(range(1, len(path) + 1))])
        with torch.no_grad():
            logits = model.sequence_logits(torch.tensor([seq]), steps, torch.tensor([len(seq)]))[0, -1]
        allowed = constraint.allowed(state_after(constraint, session.state, list(path)))
        fresh = masked(torch.log_softmax(logits, -1), allowed)
        assert torch.allclose(fresh[allowed], logq[allowed], atol=1e-4), path
        checked += 1
    assert checked > 5


def test_want_probs_are_distributions_over_allowed_tokens(drafters, prompts, tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    for name in ("model", "retrieval", "hybrid"):
        session = drafters[name].open(prompts[0], constraint)
        tree = session.draft(Budget(6, 24, 4), want_probs=True)
        assert tree.probs is not None and tree.probs.shape == (len(tree.expanded), tree.vocab_size)
        states = {-1: session.state}
        for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents, strict=True)):
            states[i] = constraint.advance(states[p], tok)
        for node, row in zip(tree.expanded, tree.probs, strict=True):
            assert node in tree.parents, "only nodes with children carry a distribution"
            assert abs(row.sum() - 1) < 1e-4
            outside = np.ones(tree.vocab_size, dtype=bool)
            outside[constraint.allowed(states[node])] = False
            assert row[outside].sum() == 0
        roundtrip = DraftTree.from_proto(tree.to_proto())
        assert roundtrip.tokens == tree.tokens and np.allclose(roundtrip.probs, tree.probs)


# -- sessions: commit, rollback, draft-ahead ---------------------------------------------------------

@pytest.mark.parametrize("name", ["model", "hybrid", "retrieval"])
def test_rollback_equals_fresh_session(drafters, prompts, tiny_artifacts, name):
    """The tree after a commit equals a fresh session's tree for the same committed prefix."""
    constraint = tiny_artifacts.constraint()
    rng = np.random.default_rng(0)
    budget = Budget(6, 24, 4)
    for prompt in prompts[:2]:
        session = drafters[name].open(prompt, constraint)
        tree = session.draft(budget)
        for _ in range(6):
            if session.finished:
                break
            session.commit(random_commit(tree, constraint, session.state, rng))
            tree = session.draft(budget)
            assert_same_tree(tree, drafters[name].open(session.context, constraint).draft(budget))


@pytest.mark.parametrize("name", ["model", "hybrid", "retrieval"])
def test_draft_ahead_hit_and_miss(drafters, prompts, tiny_artifacts, name):
    """A tree drafted ahead equals the fresh draft after the same commit. The hybrid's calibrations are frozen here:
    the commit teaches them between the guess's drafting and a fresh draft, and its pool's pessimistic reading moves
    with every trial, so a live hybrid may rank the margin of a tree drafted ahead by the calibration of one commit
    before (a tree as valid, ranked by slightly older counts)."""
    constraint = tiny_artifacts.constraint()
    budget = Budget(6, 16, 4)
    if name == "hybrid":
        drafters = {**drafters, "hybrid": HybridDrafter(drafters["model"], drafters["retrieval"])}
        drafters["hybrid"].sources = (FrozenDepthCalibration(), FrozenDepthCalibration(pessimism=POOL_PESSIMISM))
    session = drafters[name].open(prompts[3], constraint)
    tree = session.draft(budget)
    assert session.prepare_ahead()
    guess = session.ahead_guess
    assert guess is not None and is_stop_commit(tree, guess)
    session.commit(guess)  # the guess comes true: the next tree is ready
    hit = session.draft(budget)
    assert session.ahead_hit and session.ahead_miss == ""
    assert_same_tree(hit, drafters[name].open(session.context, constraint).draft(budget))
    assert session.prepare_ahead()
    guess = session.ahead_guess
    st = state_after(constraint, session.state, guess[:-1])
    other = [int(t) for t in constraint.allowed(st) if t != guess[-1]]
    session.commit(guess[:-1] + other[:1] if other else guess[:1])  # a different bonus: a miss
    miss = session.draft(budget)
    assert not session.ahead_hit and session.ahead_miss == "wrong_guess"
    assert_same_tree(miss, drafters[name].open(session.context, constraint).draft(budget))
    # a hit with a different budget is not used, and still right
    session.prepare_ahead()
    session.commit(session.ahead_guess)
    other_budget = Budget(3, 5, 2)
    tree = session.draft(other_budget)
    assert not session.ahead_hit and session.ahead_miss == "budget"
    assert_same_tree(tree, drafters[name].open(session.context, constraint).draft(other_budget))


def is_stop_commit(tree: DraftTree, commit: list[int]) -> bool:
    """commit = a root-down path of the tree, then a bonus token that is none of the path end's children."""
    nodes = tree.match(commit[:-1])
    end = nodes[-1] if nodes else -1
    return len(nodes) == len(commit) - 1 and commit[-1] not in tree.children().get(end, {})


def _threshold_inside(tree: DraftTree) -> float:
    """A min_path_prob that cuts the tree roughly in half, far from any node's score (no rounding flips)."""
    scores = sorted(set(tree.scores()), reverse=True)
    gaps = [(scores[i] - scores[i + 1], i) for i in range(len(scores) - 1)]
    _, i = max(gaps, key=lambda g: (g[0] > 1e-3, -abs(g[1] - len(scores) // 2)))
    return float(np.exp((scores[i] + scores[i + 1]) / 2))


@pytest.mark.parametrize("name", ["model", "hybrid"])
def test_confidence_stop_keeps_only_confident_paths(drafters, prompts, tiny_artifacts, name):
    constraint = tiny_artifacts.constraint()
    session = drafters[name].open(prompts[0], constraint)
    full = session.draft(Budget(8, 32, 4))
    floor = _threshold_inside(full)
    cut = drafters[name].open(prompts[0], constraint).draft(Budget(8, 32, 4, floor))
    assert 0 < len(cut) < len(full)
    assert all(s >= np.log(floor) for s in cut.scores())
    # the builder's confidence stop and cutting a looser tree agree: what a ready tree is served by
    assert_same_tree(cut, full.restricted(Budget(8, 32, 4, floor).validated()))


@pytest.mark.parametrize("name", ["model", "hybrid", "retrieval"])
def test_stricter_budget_and_second_guess_served_from_ready_trees(drafters, prompts, tiny_artifacts, name):
    constraint = tiny_artifacts.constraint()
    budget = Budget(8, 24, 4)
    session = drafters[name].open(prompts[1], constraint)
    session.draft(budget)
    assert session.prepare_ahead(guesses=3)
    guesses = session.ahead_guesses
    assert len(guesses) >= 2 and len({tuple(g) for g in guesses}) == len(guesses)
    session.commit(guesses[1])  # the second likeliest outcome came true
    stricter = Budget(6, 12, 4)
    tree = session.draft(stricter)
    assert session.ahead_hit
    assert_same_tree(tree, drafters[name].open(session.context, constraint).draft(stricter))
    # a stop requested mid-way drafts no more guesses
    assert not session.prepare_ahead(guesses=3, stop=lambda: True)


def _stop_after(calls: int):
    """A stop() that says 'the commit has arrived' from its (calls + 1)-th call on."""
    seen = [0]

    def stop() -> bool:
        seen[0] += 1
        return seen[0] > calls

    return stop


def test_many_guesses_batched_and_stopped_between_levels_still_equal_fresh_drafts(drafters, prompts, tiny_artifacts):
    """Chains drafted ahead for many guessed commits at once, stopped by the commit after 0-5 levels and finished
    on demand, round after round (their cache slots compacted each time): every tree equals a fresh session's."""
    constraint = tiny_artifacts.constraint()
    rng = np.random.default_rng(5)
    budget = Budget(12, 12, 1, 0.02)
    session = drafters["model"].open(prompts[2], constraint)
    tree, hits, partial = session.draft(budget), 0, 0
    for r in range(14):
        if session.finished:
            break
        session.prepare_ahead(guesses=8, stop=_stop_after(r % 6 + 1))
        guesses = session.ahead_guesses
        assert all(is_stop_commit(tree, g) for g in guesses)
        commit = guesses[r % len(guesses)] if guesses and r % 3 else random_commit(tree, constraint, session.state,
                                                                                   rng)
        session.commit(commit)
        tree = session.draft(budget)
        hits += session.ahead_reused
        partial += session.ahead_reused and not session.ahead_hit
        assert_same_tree(tree, drafters["model"].open(session.context, constraint).draft(budget))
    assert hits >= 5 and partial >= 1  # both ready and half-drafted guesses were exercised


def test_draft_ahead_steps_the_grammar_once_per_node_of_the_last_tree(drafters, prompts, tiny_artifacts,
                                                                      monkeypatch):
    """Where verification may stop: every prefix of the last tree needs its grammar state, each from its parent's
    (a chain of 16 once took 136 steps, ~4 ms of the time draft-ahead has before the commit comes)."""
    constraint = tiny_artifacts.constraint()
    session = drafters["model"].open(prompts[1], constraint)
    tree = session.draft(Budget.chain(16))
    steps = [0]
    advance = ListConstraint.advance

    def counted(self, state, token):
        steps[0] += 1
        return advance(self, state, token)

    monkeypatch.setattr(ListConstraint, "advance", counted)
    assert session.prepare_ahead(guesses=1)
    assert steps[0] <= len(tree) + 1


def test_guesses_past_one_wave_are_drafted_in_a_second_wave_and_serve_exact_trees(drafters, prompts, tiny_artifacts):
    """More guesses than AHEAD_WAVE: the likeliest wave is drafted whole first, then the next; a guess of either
    wave that comes true serves at once the tree a fresh session drafts. The ranking learns as it goes."""
    constraint = tiny_artifacts.constraint()
    budget = Budget(8, 8, 1)
    session = drafters["model"].open(prompts[3], constraint)
    session.acceptance = Calibration()
    tree, second_wave_hits = session.draft(budget), 0
    for r in range(8):
        if session.finished:
            break
        session.prepare_ahead(guesses=AHEAD_WAVE + 4)
        guesses = session.ahead_guesses
        assert len(guesses) > AHEAD_WAVE and all(is_stop_commit(tree, g) for g in guesses)
        pick = AHEAD_WAVE + r % 4 if r % 2 == 0 else r % AHEAD_WAVE
        session.commit(guesses[pick])
        tree = session.draft(budget)
        assert session.ahead_hit and session.ahead_miss == ""
        second_wave_hits += pick >= AHEAD_WAVE
        assert_same_tree(tree, drafters["model"].open(session.context, constraint).draft(budget))
    assert second_wave_hits >= 2
    assert session.acceptance.trials.sum() > 0  # every commit taught it which nodes verification kept


def _chain(logprobs: list[float]) -> DraftTree:
    return DraftTree(list(range(4, 4 + len(logprobs))), list(range(-1, len(logprobs) - 1)), logprobs)


class FrozenDepthCalibration(DepthCalibration):
    """A calibration per depth that has learnt and learns no more (so two drafts see the same one)."""

    def record(self, path_logq, node_accepted, depths=None) -> None:
        pass


def deep_nodes_accepted() -> FrozenDepthCalibration:
    """What verification teaches about the bench drafter, in caricature: a path of q is accepted with probability q
    at depth 1 and 10 q (at most 1) deeper down (the drafter's q shrinks along a path faster than acceptance)."""
    cal = FrozenDepthCalibration()
    rng = np.random.default_rng(0)
    logq = np.linspace(-7.9, 0.0, 4000)
    for depth in range(1, DepthCalibration.MAX_DEPTH + 1):
        rate = np.exp(logq) if depth == 1 else np.minimum(1.0, 10 * np.exp(logq))
        DepthCalibration.record(cal, logq, rng.random(len(logq)) < rate, [depth] * len(logq))
    return cal


def test_a_calibrated_tree_spends_its_nodes_where_verification_accepts_them(drafters, prompts, tiny_artifacts):
    """Ranked by acceptance per depth, a tree of n nodes goes deeper than the tree ranked by q (whose depth-1
    alternatives look likelier than the deep nodes of its best path); its scores are log P(accepted), in priority
    order, its q_logprobs the drafter's own; the calibration learns from q, not from the calibrated scores."""
    constraint = tiny_artifacts.constraint()
    budget = Budget(12, 12, 4)
    by_q = drafters["model"].open(prompts[1], constraint)
    calibrated = drafters["model"].open(prompts[1], constraint)
    calibrated.acceptance = deep_nodes_accepted()
    plain_tree, tree = by_q.draft(budget), calibrated.draft(budget)
    check_tree(tree, constraint, calibrated.state, budget)
    assert max(tree.depths()) > max(plain_tree.depths())
    assert tree.q_logprobs is not None and plain_tree.q_logprobs is None
    cal = calibrated.acceptance
    for node, (score, q) in enumerate(zip(tree.scores(), tree.q_scores(), strict=True)):
        if tree.q_logprobs[node] != 0.0:  # a forced token is accepted whenever its parent is: its parent's score
            assert score <= math.log(cal.accepted_at(q, tree.depths()[node] + 1)) + 1e-6  # or its parent's, if lower
    learnt, by_its_q = DepthCalibration(), DepthCalibration()
    commit = tree.path_tokens(len(tree) - 1)[:1] + [0]
    learn_acceptance(learnt, tree, commit)
    learn_acceptance(by_its_q, DraftTree(tree.tokens, tree.parents, tree.q_logprobs), commit)
    assert all(np.array_equal(a.trials, b.trials) for a, b in zip(learnt.by_depth, by_its_q.by_depth, strict=True))
    assert sum(c.trials.sum() for c in learnt.by_depth) > 0


def test_calibrated_trees_drafted_ahead_equal_fresh_drafts(drafters, prompts, tiny_artifacts):
    """With a calibration per depth, a guess drafted ahead (ready or finished on demand) serves the tree a fresh
    session with the same calibration drafts."""
    constraint = tiny_artifacts.constraint()
    cal = deep_nodes_accepted()
    budget = Budget(12, 16, 2, 0.05)
    session = drafters["model"].open(prompts[2], constraint)
    session.acceptance = cal
    tree, reused = session.draft(budget), 0
    for r in range(10):
        if session.finished:
            break
        session.prepare_ahead(guesses=4, stop=_stop_after(r % 4 + 3))  # stopped after 0-3 levels of the trees
        guesses = session.ahead_guesses
        if not guesses:  # the list's last item: nothing left to guess
            break
        session.commit(guesses[r % len(guesses)])
        tree = session.draft(budget)
        reused += session.ahead_reused
        fresh = drafters["model"].open(session.context, constraint)
        fresh.acceptance = cal
        assert_same_tree(tree, fresh.draft(budget))
    assert reused >= 3


def test_stop_points_follow_calibrated_acceptance_not_the_drafters_word():
    """Where verification likely stops: by q alone, P(stop after k nodes) = q(path_k) * (1 - q(next | path_k));
    with a calibration that says the drafter is too modest (everything accepted), the end of the chain comes
    first; with one that says nothing is, the root does."""
    chain = _chain([math.log(0.5)] * 4)  # path q: 0.5, 0.25, 0.125, 0.0625
    by_q = stop_points(chain, lambda path: None)
    assert [len(p.path) for p in by_q][:2] == [0, 1]  # P = 0.5, 0.25, 0.125, 0.0625, 0.0625 (the leaf's)
    assert by_q[0].mass == pytest.approx(0.5)
    modest, bold = Calibration(strength=0.1), Calibration(strength=0.1)
    for _ in range(200):
        modest.record([math.log(q) for q in (0.5, 0.25, 0.125, 0.0625)], [True] * 4)
        bold.record([math.log(q) for q in (0.5, 0.25, 0.125, 0.0625)], [False] * 4)
    assert len(stop_points(chain, lambda path: None, modest)[0].path) == 4
    assert len(stop_points(chain, lambda path: None, bold)[0].path) == 0


def test_guesses_rank_by_where_verification_stops_times_the_drafters_own_q_of_the_bonus(drafters, prompts,
                                                                                       tiny_artifacts):
    """Stop point A (P = 0.3) after a child the drafter gave 0.95, its best other token 0.04; B (P = 0.2) after
    children of 0.3, its best other token 0.5. Renormalised without the rejected children A's bonus would come first
    (0.3 * 0.04 / 0.05 = 0.24 against 0.2 * 0.5 / 0.7 = 0.14); by the drafter's own q B's does (0.012 against 0.1):
    a drafter sure of a child verification rejected says little about the target's token there."""
    constraint = tiny_artifacts.constraint()
    session = drafters["model"].open(prompts[0], constraint)
    a_child, a_bonus, b_child, b_bonus, *rest = constraint.allowed(session.state).tolist()

    def log_q(qs: dict[int, float]) -> torch.Tensor:
        q = torch.zeros(constraint.trie.vocab.size)
        q[rest] = (1.0 - sum(qs.values())) / len(rest)
        for tok, p in qs.items():
            q[tok] = p
        return q.log()

    state = session.state
    a = _Pending(StopPoint([], state, frozenset({a_child}), 0.0, 0.3), [], log_q({a_child: 0.95, a_bonus: 0.04}))
    b = _Pending(StopPoint([], state, frozenset({b_child}), 0.0, 0.2), [], log_q({b_child: 0.3, b_bonus: 0.5}))
    ranked = session._rank_bonuses([a, b], 2)
    assert [(p is b, bonus) for p, bonus, _ in ranked] == [(True, b_bonus), (False, a_bonus)]


def test_a_commit_teaches_only_the_nodes_whose_fate_it_decides():
    tree = DraftTree([5, 6, 7, 8], [-1, 0, 1, 0], [math.log(0.5)] * 4)  # paths [5], [5,6], [5,6,7], [5,8]
    acceptance = Calibration()
    learn_acceptance(acceptance, tree, [5, 6])  # the commit: 5 accepted, then the target's own 6
    # [5] and [5, 6] are prefixes of the commit: accepted; [5, 8] left it: not; [5, 6, 7] is deeper: undecided
    assert acceptance.trials.sum() == 3 and acceptance.hits.sum() == 2


def test_a_calibrated_merge_keeps_the_source_verification_believes():
    """Two sources that score alike: the one whose paths are accepted wins the merged tree's nodes."""
    model = DraftTree([4, 5, 6], [-1, 0, 1], [math.log(0.6)] * 3)
    pool = DraftTree([7, 8, 9], [-1, 0, 1], [math.log(0.9)] * 3)  # more confident by its own word
    trusted, doubted = Calibration(strength=0.1), Calibration(strength=0.1)
    for _ in range(100):
        learn_acceptance(trusted, model, [4, 5, 6, 3])
        learn_acceptance(doubted, pool, [1])
    assert merge_trees([model, pool], 3).tokens == [7, 8, 9]  # by raw q the pool's run wins
    assert merge_trees([model, pool], 3, acceptance=[trusted, doubted]).tokens == [4, 5, 6]


def test_a_depth_calibrated_merge_ranks_a_sources_nodes_by_how_deep_they_are():
    """A pool scores every node of a run alike (its match frequency), however deep: learnt per depth, its deep nodes
    (rarely accepted) lose their places to the model's shallow alternatives; pooled over depths they keep them."""
    model = DraftTree([4, 5, 6, 10], [-1] * 4, [math.log(0.25)] * 4)  # four alternatives for the next token
    pool = DraftTree([7, 8, 9], [-1, 0, 1], [0.0, 0.0, 0.0])  # one run of three, each node "sure" by its score
    pooled, by_depth = (Calibration(strength=0.1), Calibration(strength=0.1)), \
        (DepthCalibration(strength=0.1), DepthCalibration(strength=0.1))
    for _ in range(100):
        for model_cal, pool_cal in (pooled, by_depth):
            learn_acceptance(model_cal, model, [4, 1])  # one of the model's four is right
            learn_acceptance(pool_cal, pool, [7, 1])  # the run's first node is right, its second never
    assert pooled[1].accepted(0.0) == pytest.approx(1 / 3, abs=0.02)  # one in three of the run's nodes accepted
    assert pooled[0].accepted(math.log(0.25)) < 0.3
    assert merge_trees([model, pool], 3, acceptance=pooled).tokens == [7, 8, 9]
    assert by_depth[1].accepted_at(0.0, 1) > 0.95 and by_depth[1].accepted_at(0.0, 2) < 0.05
    assert sorted(merge_trees([model, pool], 3, acceptance=by_depth).tokens) == [4, 5, 7]


def test_a_pool_node_displaces_a_model_node_only_once_its_bin_has_proved_itself():
    """Both sources' nodes accepted half the time: the model's bin on 400 trials, the pool's on 4. Read pessimistically
    (the hybrid's pool), the pool's estimate counts low until its bin holds as many trials as the model's."""
    model = DraftTree([4], [-1], [math.log(0.5)])
    pool = DraftTree([7], [-1], [math.log(0.5)])
    trusted, plain_pool, doubting_pool = (Calibration(strength=0.1), Calibration(strength=0.1),
                                          Calibration(strength=0.1, pessimism=2.0))
    for i in range(400):
        learn_acceptance(trusted, model, [4 if i % 2 else 1, 3])
    for cal in (plain_pool, doubting_pool):
        for i in range(4):
            learn_acceptance(cal, pool, [7 if i % 2 else 1, 3])
    assert plain_pool.accepted(math.log(0.5)) == pytest.approx(trusted.accepted(math.log(0.5)), abs=0.02)
    assert doubting_pool.accepted(math.log(0.5)) < 0.2  # 0.5 less two standard deviations of 4 trials
    assert merge_trees([model, pool], 1, acceptance=[trusted, doubting_pool]).tokens == [4]
    for i in range(396):
        learn_acceptance(doubting_pool, pool, [7 if i % 2 else 1, 3])
    assert doubting_pool.accepted(math.log(0.5)) > 0.44  # with the model's evidence, nearly the mean


def test_the_pool_learns_only_from_paths_the_models_tree_lacks():
    """Where the model drafted the same path, the pool's being right adds nothing to the merged tree."""
    model = DraftTree([5, 6], [-1, 0], [math.log(0.5)] * 2)  # [5], [5, 6]
    pool = DraftTree([5, 6, 9], [-1, 0, -1], [0.0, 0.0, 0.0])  # [5], [5, 6] as the model's, and [9]
    sources = (DepthCalibration(), DepthCalibration())
    learn_sources(sources, [model, pool], [5, 6, 3])
    model_counts = sum(c.trials.sum() for c in sources[0].by_depth)
    pool_counts = [(c.trials.sum(), c.hits.sum()) for c in sources[1].by_depth]
    assert model_counts == 2
    assert sum(t for t, _ in pool_counts) == 1 and sum(h for _, h in pool_counts) == 0  # [9] alone, not accepted
    served_without_9 = DraftTree([5, 6], [-1, 0], [math.log(0.5)] * 2)
    fresh = (DepthCalibration(), DepthCalibration())
    learn_sources(fresh, [model, pool], [5, 6, 3], served=served_without_9)
    assert sum(c.trials.sum() for c in fresh[1].by_depth) == 0  # [9] was not served: nothing to learn about it


def test_a_served_hybrid_ranks_its_model_part_by_what_its_commits_teach(drafters, prompts, tiny_artifacts):
    """The hybrid's inner model session only follows commits (the hybrid validates them), so the calibration its
    nodes are ranked by must be the one the hybrid's commits teach, not one no serving commit ever reaches."""
    hybrid = drafters["hybrid"]
    session = hybrid.open(prompts[0], tiny_artifacts.constraint())
    assert session.model.acceptance is hybrid.sources[0] is hybrid.model.acceptance
    before = sum(c.trials.sum() for c in hybrid.sources[0].by_depth)
    tree = session.draft(Budget(6, 16, 4))
    session.commit(tree.path_tokens(0) + [int(tiny_artifacts.constraint().allowed(
        session.state_after(tree.path_tokens(0)))[0])])
    assert sum(c.trials.sum() for c in hybrid.sources[0].by_depth) > before


def test_the_pool_never_holds_a_held_out_users_history(tiny_artifacts):
    """What benchmarks measure (eval users) must not be in what drafts for them: their training sequences and
    outputs stay out of the retrieval pool."""
    arts = tiny_artifacts
    outputs = [(u, [int(t) for t in arts.prompt(u)]) for u in range(6)]
    pool = pool_for(arts, outputs, held_out=is_eval_user)
    stream = np.concatenate(pool.streams)
    for u in range(6):
        items = arts.split.train[u][-3:]
        tokens = np.asarray([t for i in items for t in (*arts.sids.item_tokens(int(i)), SEP)], dtype=np.int64)
        windows = np.lib.stride_tricks.sliding_window_view(stream, len(tokens))
        found = bool((windows == tokens).all(axis=1).any())
        assert found != is_eval_user(u), f"user {u} (held out: {is_eval_user(u)}): last items in the pool {found}"


def test_bad_commits_and_budgets_are_refused(drafters, prompts, tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    session = drafters["model"].open(prompts[0], constraint)
    tree = session.draft(Budget(4, 8, 2))
    deep = max(range(len(tree)), key=lambda i: tree.depths()[i])
    path = tree.path_tokens(deep)
    wrong = [t for t in constraint.allowed(session.state) if t not in tree.children()[-1]]
    cases = {
        "empty": [],
        "unknown token": [path[0], 10_000],
        "not a path": wrong[:1] + [path[0]] if wrong else [path[0], path[0], path[0]],
        "bad bonus": path + [1],  # BOS is never allowed in the list
    }
    for what, tokens in cases.items():
        with pytest.raises(DraftError):
            session.commit(tokens)
        assert session.last_tree is tree, what  # a refused commit changes nothing
    for budget in (Budget(17, 8), Budget(4, 129), Budget(-1, 8), Budget(4, 8, 99)):
        with pytest.raises(DraftError):
            session.draft(budget)
    with pytest.raises(DraftError):
        drafters["model"].open([1, 2, 3], constraint)  # no REC
    with pytest.raises(DraftError):
        drafters["model"].open(prompts[0][:-1] + [999, 4], constraint)


@pytest.mark.parametrize("name", ["model", "hybrid", "retrieval"])
def test_a_round_without_a_tree_commits_the_forced_chain_then_the_bonus(drafters, prompts, tiny_artifacts, name):
    """The orchestrator's plain (depth-0) rounds: the target checks the tokens the grammar forces and adds its own
    after them, so the drafter is told forced tokens + bonus after an empty tree."""
    constraint = tiny_artifacts.constraint()
    state, item = constraint.start(prompts[0]), []
    while len(item) < tiny_artifacts.sids.n_levels:  # one whole item: SEP is forced next
        item.append(int(constraint.allowed(state)[0]))
        state = constraint.advance(state, item[-1])
    assert constraint.forced(state) == SEP
    after_sep = constraint.advance(state, SEP)
    first_codes = [int(t) for t in constraint.allowed(after_sep)]
    session = drafters[name].open(prompts[0] + item, constraint)
    assert len(session.draft(Budget(0, 0))) == 0
    session.commit([SEP, first_codes[0]])
    budget = Budget(4, 8, 2)
    assert_same_tree(session.draft(budget), drafters[name].open(session.context, constraint).draft(budget))
    # Only forced tokens may stand between the tree's path and the bonus.
    session = drafters[name].open(prompts[0] + item + [SEP], constraint)
    session.draft(Budget(0, 0))
    second = int(constraint.allowed(constraint.advance(after_sep, first_codes[0]))[0])
    assert len(first_codes) > 1, "the first code level is not forced"
    with pytest.raises(DraftError, match="forces"):
        session.commit([first_codes[0], second])


@pytest.mark.parametrize("name", ["model", "hybrid", "retrieval"])
def test_plain_rounds_told_after_a_commit_equal_a_fresh_session(drafters, prompts, tiny_artifacts, name):
    constraint = tiny_artifacts.constraint()
    rng = np.random.default_rng(2)
    budget = Budget(6, 24, 4)
    session = drafters[name].open(prompts[1], constraint)
    tree = session.draft(budget)
    assert session.prepare_ahead()  # a guess that plain rounds after the commit make stale
    commit = random_commit(tree, constraint, session.state, rng)
    state, plain = state_after(constraint, session.state, commit), []
    for _ in range(6):
        plain.append(int(rng.choice(constraint.allowed(state))))
        state = constraint.advance(state, plain[-1])
    session.commit(commit, plain)
    assert_same_tree(session.draft(budget), drafters[name].open(session.context, constraint).draft(budget))
    assert not session.ahead_hit


def test_commit_without_bonus_when_eos_is_accepted(drafters, tiny_artifacts, prompts):
    """With one item to go and its RQ codes written, the rest is forced up to EOS: the tree holds it all
    and the commit has no bonus token."""
    constraint = ListConstraint(tiny_artifacts.trie, n_items=1)
    state = constraint.start(prompts[0])
    codes = []
    for _ in range(tiny_artifacts.sids.n_levels - 1):
        codes.append(int(constraint.allowed(state)[0]))
        state = constraint.advance(state, codes[-1])
    session = drafters["model"].open(prompts[0] + codes, constraint)
    tree = session.draft(Budget(4, 4, 1))
    assert tree.tokens[-1] == EOS and tree.logprobs == [0.0] * len(tree)
    session.commit(tree.tokens)
    assert session.finished and len(session.draft(Budget(4, 4, 1))) == 0
    with pytest.raises(DraftError):
        session.commit([EOS])


# -- model persistence -----------------------------------------------------------------------------

def test_save_and_load_roundtrip(tmp_path, tiny_artifacts):
    torch.manual_seed(0)
    cfg = DrafterConfig(tiny_artifacts.sids.vocab.level_sizes, dim=16, n_layers=1, n_heads=2, intermediate=32,
                        use_step=False)
    model = PadDrafter(cfg)
    model.save(tmp_path / "d")
    loaded = PadDrafter.from_pretrained(tmp_path / "d")
    assert loaded.config == cfg
    tokens = torch.tensor([tiny_artifacts.prompt(0)])
    args = (tokens, torch.zeros_like(tokens), torch.tensor([tokens.shape[1]]))
    with torch.no_grad():
        assert torch.equal(model.sequence_logits(*args), loaded.sequence_logits(*args))
    assert model.n_params() < PadDrafter(DrafterConfig(cfg.level_sizes, 16, 1, 2, 32)).n_params()


# -- offline tau -------------------------------------------------------------------------------------

class _Oracle(Drafter):
    """Drafts the truth itself, as a chain of `depth` tokens."""

    name = "oracle"

    def __init__(self, truth: list[int]):
        self.truth = truth

    def open(self, context, constraint, user_group=""):
        raise NotImplementedError

    def trees_along(self, context, constraint, continuation, budget):
        b = budget.validated()
        out = []
        for t in range(len(continuation)):
            toks = continuation[t: t + min(b.depth, b.max_nodes)]
            out.append(DraftTree(toks, list(range(-1, len(toks) - 1)), [0.0] * len(toks)))
        return out


def test_replay_counts_bonus_and_stops_at_eos():
    truth = Truth([1, 4], list(range(10, 19)) + [EOS], [False] * 10, ["L0"] * 10)
    report = Report("x")
    replay(report, "c", [2] * 10, truth)  # rounds commit 3, 3, 3, 1
    assert report.rounds["c"] == 4 and report.committed["c"] == 10 and report.tau("c") == 2.5
    tree = DraftTree([10, 11, 12, 99], [-1, 0, 1, 0], [0.0] * 4)
    assert matches([tree], truth, [1, 2, 4]) == {1: [1], 2: [2], 4: [3]}


def test_oracle_chain_tau(tiny_artifacts):
    constraint = tiny_artifacts.constraint()
    truth_tokens = [int(t) for t in range(20)]
    truth = Truth([1, 4], truth_tokens, [False] * 20, ["L0"] * 20)
    report = evaluate(_Oracle(truth_tokens), [truth], constraint, EvalConfig(chain_depths=(1, 3), tree_sizes=(8,)))
    assert report.tau("chain 1") == 2.0 and report.tau("chain 3") == 4.0
    assert report.tau("tree 8") == 20 / math.ceil(20 / 9)


# -- distillation losses -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences(kind):
    torch.manual_seed(0)
    allowed = torch.tensor([[True, True, False, True]] * 3)
    lp = torch.log_softmax(torch.randn(3, 4).masked_fill(~allowed, -math.inf), -1)
    lq = torch.log_softmax(torch.randn(3, 4).masked_fill(~allowed, -math.inf), -1)
    assert torch.allclose(divergence(kind, lp, lp, allowed), torch.zeros(3), atol=1e-6)
    d = divergence(kind, lp, lq, allowed)
    assert torch.isfinite(d).all() and (d > 0).all()
    if kind == "tvd":
        assert (d <= 1).all()
    assert (top_k_loss(lp, lq, 2) > 0).all()


def test_distillation_step_trains_step_embeddings_only_with_hass(drafters, tiny_artifacts):
    """One loss evaluation per spec: finite, and the draft-step embedding gets gradient from the unrolled
    steps (HASS) but not from teacher forcing alone."""
    prof = drafter_profile("tiny")
    data = distill_data(tiny_artifacts, prof, progress=False)  # cached by the drafters fixture
    teacher = Transformer.from_pretrained(tiny_artifacts.target_dir)
    for spec, grad_expected in ((TrainSpec(), True), (TrainSpec(hass=False), False)):
        torch.manual_seed(0)
        model = PadDrafter(drafter_config(tiny_artifacts, prof, spec))
        with torch.no_grad():
            model.step_embed.weight.normal_(0, 0.02)  # zero at init, which would hide the gate's gradient
        loss = DistillLoss(model, teacher, data, tiny_artifacts.constraint(), spec, prof)(np.random.default_rng(0))
        assert torch.isfinite(loss)
        loss.backward()
        grad = model.step_embed.weight.grad
        assert (grad is not None and grad[1:].abs().sum() > 0) == grad_expected, spec


def test_child_state_equals_constraint_advance(tiny_artifacts, prompts):
    """Tree building's fast grammar step agrees with ListConstraint.advance along random lists."""
    rng = np.random.default_rng(0)
    constraint = ListConstraint(tiny_artifacts.trie, n_items=4)
    for prompt in prompts:
        state = constraint.start(prompt)
        while not state.finished:
            tok = int(rng.choice(constraint.allowed(state)))
            fast, slow = child_state(constraint, state, tok), constraint.advance(state, tok)
            assert slow is not None
            assert (fast.node, fast.n_done, fast.finished) == (slow.node, slow.n_done, slow.finished)
            assert np.array_equal(fast.excluded, slow.excluded)
            assert np.array_equal(fast.generated, slow.generated)
            state = slow


def test_a_drafter_profile_too_big_for_the_target_is_narrowed_before_any_work(tiny_artifacts):
    """A larger vocabulary grows the drafter's embeddings past 1/10 of a small target: the profile is narrowed to fit
    (checked before distillation, so nothing is thrown away), kept when it fits, refused at once when nothing fits."""
    from specrec.training.drafter import drafter_params, fit_profile

    prof, spec = drafter_profile("tiny"), TrainSpec()
    full = drafter_params(tiny_artifacts, prof, spec)
    assert fit_profile(prof, tiny_artifacts, spec, 10 * full) is prof
    narrowed = fit_profile(prof, tiny_artifacts, spec, 7 * full)  # the old rule gave 18 wide: 2 heads of 9
    assert narrowed.dim < prof.dim and narrowed.dim % (2 * prof.heads) == 0  # rotary needs an even head width
    assert drafter_params(tiny_artifacts, narrowed, spec) * 10 <= 7 * full
    tokens = torch.tensor([[1, 5, 6, 3, 4]])
    logits = PadDrafter(drafter_config(tiny_artifacts, narrowed, spec)).sequence_logits(
        tokens, torch.zeros_like(tokens), torch.tensor([5]))
    assert logits.shape[:2] == (1, 5)  # the narrowed drafter runs (an odd head width failed in its first step)
    with pytest.raises(ValueError, match="fits within 1/10"):
        fit_profile(prof, tiny_artifacts, spec, full // 20)
