"""Speculation policies against a seeded simulator with known per-slot acceptance and costs (no models).

The simulator (worlds, EAGLE-like trees, CPU cost curve, load) lives in bench/controller_sim.py, so the
benchmark prints numbers from the same worlds these tests check.
"""

from __future__ import annotations

import random

import pytest

from bench.controller_sim import Result, World, fixed_specs, play_round, run
from specrec.speculation.policy import (
    DRAFT_PRIOR,
    DRAFT_SCALE,
    MAX_DEPTH,
    NO_SPECULATION,
    SEP_SLOT,
    AdaptivePolicy,
    Budget,
    FixedPolicy,
    HeuristicPolicy,
    LinearCost,
    PolicyRegistry,
    RoundStats,
    SharedStats,
    default_arms,
    make_policy,
)

# High acceptance, cheap drafting, a GPU-like target (a tree costs about one step): deep/bushy trees pay.
RICH = World("rich", (0.8, 0.92, 0.95, 0.98), drift=0.99, forced_last_code=0.5, draft_hop_s=0.2e-3,
             draft_step_s=0.3e-3, verify_scale=0.3)
# A weak drafter whose extra candidates barely help: only the forced SEP is worth drafting.
WEAK = World("weak", (0.05, 0.1, 0.1, 0.15), sibling_gain=0.05, drift=0.95)
# A decent drafter on the 2-core CPU; BUSY_LOAD requests batched per forward make every verified node expensive.
CPU = World("cpu", (0.55, 0.8, 0.85, 0.95), drift=0.98, forced_last_code=0.5)
BUSY_LOAD = 64


def rate_of(world: World, spec: str, requests: int, **kw: int) -> float:
    return run(world, make_policy(spec), requests, **kw).rate


def depth0_share(res: Result) -> float:
    return res.chosen[NO_SPECULATION] / res.rounds


def stats(budget: Budget, accepted: int, drafted: int | None = None, next_slot: int = 0) -> RoundStats:
    drafted = budget.depth if drafted is None else drafted
    path = [d < accepted for d in range(drafted)]
    slots = [(next_slot + d) % 5 for d in range(drafted)]
    return RoundStats(budget, accepted, path, slots, 1e-3, 9e-3, budget.max_nodes, 1)


# --- fixed, off, make_policy ------------------------------------------------------------------


def test_fixed_and_off_return_their_budget_whatever_happens():
    fixed, off = make_policy("fixed:3:16"), make_policy("off")
    for policy, budget in ((fixed, Budget(3, 16)), (off, NO_SPECULATION)):
        req = policy.new_request(0)
        for slot, load in ((0, 1), (4, 64), (2, 8)):
            assert policy.choose(req, slot, load) == budget
            policy.observe(req, stats(budget, 0))
    assert (fixed.name, off.name) == ("fixed:3:16", "off")


@pytest.mark.parametrize("spec,kind,budget", [
    ("adaptive", AdaptivePolicy, None),
    ("", AdaptivePolicy, None),  # an unset field in a client request means the default
    ("heuristic", HeuristicPolicy, Budget(5, 5)),
    ("heuristic:2", HeuristicPolicy, Budget(2, 2)),
    ("off", FixedPolicy, NO_SPECULATION),
    ("fixed:3:16", FixedPolicy, Budget(3, 16)),
    (" Fixed:4:4 ", FixedPolicy, Budget(4, 4)),
])
def test_make_policy_parses_specs(spec: str, kind: type, budget: Budget | None):
    policy = make_policy(spec)
    assert isinstance(policy, kind)
    if budget is not None:
        assert policy.choose(policy.new_request(0), 0, 1) == budget


@pytest.mark.parametrize("spec,says", [
    ("turbo", "unknown"), ("fixed:3", "unknown"), ("off:1", "unknown"), ("adaptive:2", "unknown"),
    ("fixed:a:b", "integers"), ("fixed:3:2", "max_nodes"), ("fixed:0:5", "max_nodes"),
    (f"fixed:{MAX_DEPTH + 1}:64", "depth"), ("fixed:4:1000", "max_nodes"), ("heuristic:0", "start"),
])
def test_make_policy_rejects_bad_specs_naming_them(spec: str, says: str):
    with pytest.raises(ValueError, match=says) as err:
        make_policy(spec)
    assert repr(spec) in str(err.value)


# --- heuristic --------------------------------------------------------------------------------


def test_heuristic_grows_by_two_after_full_acceptance_and_shrinks_by_one_to_at_least_one():
    policy = make_policy("heuristic")
    req = policy.new_request(0)
    seen = []
    for accepted_all in (True, True, False, False, False, False, False, False, False, False, True):
        budget = policy.choose(req, 0, 1)
        assert budget.max_nodes == budget.depth  # chains only
        seen.append(budget.depth)
        policy.observe(req, stats(budget, budget.depth if accepted_all else budget.depth - 1))
    seen.append(policy.choose(req, 0, 1).depth)
    assert seen == [5, 7, 9, 8, 7, 6, 5, 4, 3, 2, 1, 3]
    # A draft cut short (e.g. at the end of the list) counts as full if all of it was accepted, as in HF.
    policy.observe(req, stats(Budget(3, 3), 2, drafted=2))
    assert policy.choose(req, 0, 1).depth == 5


def test_heuristic_stops_growing_at_the_drafter_limit():
    policy = HeuristicPolicy(start=MAX_DEPTH - 1)
    req = policy.new_request(0)
    for _ in range(3):
        budget = policy.choose(req, 0, 1)
        policy.observe(req, stats(budget, budget.depth))
    assert policy.choose(req, 0, 1).depth == MAX_DEPTH


# --- adaptive ---------------------------------------------------------------------------------

RICH_REQUESTS = 150


@pytest.fixture(scope="module")
def rich_adaptive() -> tuple[AdaptivePolicy, Result]:
    policy = AdaptivePolicy()
    return policy, run(RICH, policy, RICH_REQUESTS, seed=1)


def test_adaptive_matches_the_best_fixed_arm_in_hindsight_when_speculation_pays(rich_adaptive):
    policy, res = rich_adaptive
    fixed = {spec: rate_of(RICH, spec, RICH_REQUESTS, seed=1) for spec in ("off", *fixed_specs())}
    best = max(fixed, key=fixed.__getitem__)
    assert res.rate >= 0.95 * fixed[best], (res.rate, best, fixed[best])  # warm-up and exploration included
    # ... by settling on deep or bushy trees.
    late = run(RICH, policy, 40, seed=2)
    favourite, count = late.chosen.most_common(1)[0]
    assert favourite.depth >= 4 or favourite.max_nodes >= 16, late.chosen
    assert count >= 0.3 * late.rounds, late.chosen


def test_adaptive_tries_every_arm(rich_adaptive):
    assert set(default_arms()) <= set(rich_adaptive[1].chosen)


def test_adaptive_stops_speculating_when_acceptance_is_low():
    policy = make_policy("adaptive")
    run(WEAK, policy, 30, seed=3)  # learn (and try every arm once)
    res = run(WEAK, policy, 30, seed=4)
    assert depth0_share(res) > 0.6
    for slot in range(3):  # first code levels: not worth drafting (slot 3 is a near tie: SEP follows it)
        rounds = sum(n for (s, _), n in res.chosen_by_slot.items() if s == slot)
        assert res.chosen_by_slot[slot, 0] >= 0.8 * rounds, (slot, res.chosen_by_slot)
    # Keeping every arm's estimate fresh costs a little where nothing pays: within 3% of never speculating.
    assert res.rate >= 0.97 * rate_of(WEAK, "off", 30, seed=4)


def test_adaptive_stops_speculating_when_the_target_gets_busy():
    policy = make_policy("adaptive")
    quiet = run(CPU, policy, 40, seed=5, in_flight=1)
    assert depth0_share(quiet) < 0.1  # speculation pays on an idle target ...
    busy = run(CPU, policy, 40, seed=6, in_flight=BUSY_LOAD)
    assert depth0_share(busy) > 0.8  # ... not once every verified node is multiplied by the load
    assert busy.rate >= 0.95 * rate_of(CPU, "off", 40, seed=6, in_flight=BUSY_LOAD)


def test_adaptive_learns_per_slot_acceptance():
    truth = (0.6, 0.85, 0.7, 0.9)
    world = World("chains", truth, forced_last_code=0.0)
    shared = SharedStats(arms=[NO_SPECULATION, *(Budget(d, d) for d in (1, 2, 3, 4))])
    run(world, make_policy("adaptive", shared=shared), 100, seed=7)
    estimate = shared.acceptance.per_slot(width=0)  # chains
    assert estimate[:4] == pytest.approx(truth, abs=0.05)
    assert estimate[4] > 0.97  # SEP: forced, always accepted


def test_what_fixed_policy_requests_observe_teaches_the_adaptive_one():
    shared = SharedStats()
    run(WEAK, make_policy("fixed:2:2", shared=shared), 40, seed=8)
    rate_at = {slot: shared.predict(slot, 1) for slot in range(5)}
    best = {slot: shared.arms[int((c / t).argmax())] for slot, (c, t) in rate_at.items()}
    assert best[0] == best[1] == NO_SPECULATION  # hopeless first code levels: do not draft
    assert best[4].depth > 0  # forced SEP next: a free token


def test_interleaved_requests_share_one_policy_safely():
    # As on one event loop: 8 requests in flight, each choose() answered by its own observe() later.
    policy = make_policy("adaptive")
    rng = random.Random(9)
    tokens, seconds = 0, 0.0
    reqs = [(policy.new_request(0), [0]) for _ in range(8)]  # (state, [tokens done])
    for _ in range(150):
        rounds = [(req, done, done[0] % 5, policy.choose(req, done[0] % 5, 8)) for req, done in reqs]
        for req, done, slot, budget in reversed(rounds):
            st = play_round(RICH, budget, slot, 8, rng)
            assert st.budget == budget
            policy.observe(req, st)
            done[0] += st.committed
            tokens, seconds = tokens + st.committed, seconds + st.round_s
    best_fixed = max(rate_of(RICH, spec, 40, seed=9, in_flight=8) for spec in ("off", *fixed_specs()))
    assert tokens / seconds >= 0.9 * best_fixed


def test_cost_fits_never_make_bigger_trees_cheaper_to_draft():
    # Arms that grow depth and nodes together, and a noisy small tree that measured slow: least squares alone
    # gives nodes a negative cost, so 32-node trees would look cheaper to draft than 16-node ones.
    cost = LinearCost(DRAFT_PRIOR, DRAFT_SCALE)
    for _ in range(50):
        cost.update((1.0, 3, 32, 0.0), 9e-3)
        cost.update((1.0, 6, 64, 0.0), 19e-3)
        cost.update((1.0, 3, 16, 0.0), 10e-3)
    assert min(cost.theta) >= 0.0, cost.theta
    predict = lambda nodes: sum(t * f for t, f in zip(cost.theta, (1.0, 3, nodes, 0.0), strict=True))  # noqa: E731
    assert predict(16) <= predict(32) <= predict(64)


def test_adaptive_turns_speculation_down_near_the_in_flight_cap():
    shared = SharedStats(max_in_flight=64)
    policy = make_policy("adaptive", shared=shared)
    run(RICH, policy, 60, seed=10)  # speculation pays on this world: it learns to draft big trees
    req = policy.new_request(0)
    assert policy.choose(req, 0, 1).depth > 0
    policy.observe(req, stats(shared.arms[req.arm], 0))
    half_way = policy.choose(req, 0, 48)  # between the soft mark (32) and the cap: at most 64 nodes
    assert half_way.max_nodes <= 64
    policy.observe(req, stats(half_way, 0))
    assert policy.choose(req, 0, 64) == NO_SPECULATION  # at the cap: plain decoding, before any refusal


def test_adaptive_counts_the_forced_tokens_a_plain_round_commits():
    # A plain round from the last code level commits that code (forced here) + SEP + the next item's first code;
    # where the last code is free, a plain round from SEP commits SEP + the next first code.
    forced, free = SharedStats(), SharedStats()
    run(World("forced", (0.6, 0.8, 0.8, 0.9), forced_last_code=1.0), make_policy("off", shared=forced), 20, seed=11)
    run(World("free", (0.6, 0.8, 0.8, 0.9), forced_last_code=0.0), make_policy("off", shared=free), 20, seed=11)
    assert forced.plain_committed[3] == pytest.approx(3.0)
    assert free.plain_committed[3] == pytest.approx(1.0)
    assert free.plain_committed[SEP_SLOT] == pytest.approx(2.0)
    assert forced.plain_committed[0] == free.plain_committed[0] == pytest.approx(1.0)
    committed, _ = forced.predict(3, 1)
    assert committed[forced.arm_index(NO_SPECULATION)] == pytest.approx(3.0)


def test_a_weak_drafters_rounds_do_not_talk_the_adaptive_policy_of_a_good_drafter_out_of_speculating():
    # One orchestrator serves requests with different drafters: a retrieval drafter's rounds must not enter
    # the model drafter's acceptance and cost estimates, nor cost its adaptive policy speed.
    # A model drafter: good drafts, each level a model step. A retrieval drafter: poorer drafts, next to free.
    model_world = World("model", (0.55, 0.8, 0.85, 0.95), forced_last_code=0.5, draft_step_s=2e-3)
    retrieval_world = World("retrieval", (0.2, 0.4, 0.5, 0.7), forced_last_code=0.5, sibling_gain=0.2,
                            draft_hop_s=0.1e-3, draft_step_s=0.02e-3)
    policies = PolicyRegistry()
    retrieval, adaptive = policies.get("fixed:8:32", "retrieval", "greedy"), policies.get("adaptive", "model", "greedy")
    alone = make_policy("adaptive")
    res, res_alone, played = Result(), Result(), Result()
    for i in range(80):  # requests of both drafters take turns, as in a mixed workload
        run(retrieval_world, retrieval, 1, seed=100 + i)
        run(model_world, adaptive, 1, seed=200 + i, result=res if i >= 40 else played)
        run(model_world, alone, 1, seed=200 + i, result=res_alone if i >= 40 else None)
    # The model drafter's statistics hold its own rounds only (in this simulator the mixing cost little speed,
    # so the rate check alone would not notice it).
    assert adaptive.shared.rounds == res.rounds + played.rounds  # type: ignore[attr-defined]
    assert res.rate >= 0.97 * res_alone.rate, (res.rate, res_alone.rate)
    # ... while policies of one drafter and mode do learn together.
    assert policies.get("off", "model", "greedy").shared is adaptive.shared  # type: ignore[attr-defined]
    assert policies.stats("model", "stochastic") is not adaptive.shared  # type: ignore[attr-defined]


def test_the_policy_registry_forgets_the_least_recently_used_drafter_past_its_cap():
    policies = PolicyRegistry(max_contexts=2)
    kept = policies.get("adaptive", "model", "greedy")
    policies.get("adaptive", "model:drafter-a", "greedy")
    policies.get("adaptive", "model", "greedy")  # used again: now the most recent
    policies.get("adaptive", "model:drafter-b", "greedy")
    assert policies.get("adaptive", "model", "greedy") is kept
    assert len(policies._stats) == 2
