"""Speculation policies against a seeded simulator with known per-slot acceptance and costs (no models).

The simulator (worlds, EAGLE-like trees, CPU cost curve, load) lives in bench/controller_sim.py, so the
benchmark prints numbers from the same worlds these tests check.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.controller_sim import Result, SimClock, World, fixed_specs, play_round, run
from specrec.speculation.policy import (
    ADAPTIVE_TOP_K,
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
    RequestState,
    RoundStats,
    SharedStats,
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
    assert (make_policy("chain:8").name, make_policy("fixed:16:64:0.05").name) == ("chain:8", "fixed:16:64:0.05")


@pytest.mark.parametrize("spec,kind,budget", [
    ("adaptive", AdaptivePolicy, None),
    ("", AdaptivePolicy, None),  # an unset field in a client request means the default
    ("heuristic", HeuristicPolicy, Budget(5, 5, top_k=1)),  # chains, as HF assisted generation drafts
    ("heuristic:2", HeuristicPolicy, Budget(2, 2, top_k=1)),
    ("off", FixedPolicy, NO_SPECULATION),
    ("fixed:3:16", FixedPolicy, Budget(3, 16)),
    (" Fixed:4:4 ", FixedPolicy, Budget(4, 4)),
    ("chain:12", FixedPolicy, Budget(12, 12, top_k=1)),
    ("fixed:16:64:0.05", FixedPolicy, Budget(16, 64, min_path_prob=0.05)),
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
    ("chain:0", "depth"), ("chain:4:4", "unknown"), ("fixed:4:8:x", "MINPROB"), ("fixed:4:8:1.5", "min_path_prob"),
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
        assert budget.max_nodes == budget.depth and budget.top_k == 1  # chains only
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


# --- adaptive: the simulator ------------------------------------------------------------------

RICH_REQUESTS = 60


def sim_policy(**kw: float) -> tuple[AdaptivePolicy, SimClock]:
    """An adaptive policy whose time is the simulator's (forgetting and probes by simulated seconds)."""
    clock = SimClock()
    return AdaptivePolicy(SharedStats(clock=clock), **kw), clock  # type: ignore[arg-type]


def test_adaptive_is_close_to_the_best_fixed_budget_in_hindsight_when_speculation_pays():
    policy, clock = sim_policy()
    res = run(RICH, policy, RICH_REQUESTS, seed=1, clock=clock)
    fixed = {spec: rate_of(RICH, spec, RICH_REQUESTS, seed=1) for spec in ("off", *fixed_specs())}
    best = max(fixed, key=fixed.__getitem__)
    assert res.rate >= 0.95 * fixed[best], (res.rate, best, fixed[best])  # warm-up and exploration included
    # ... with deep trees: every speculative round may reach MAX_DEPTH, cut by confidence.
    favourite, count = res.chosen.most_common(1)[0]
    assert favourite.depth == MAX_DEPTH and favourite.min_path_prob > 0, res.chosen
    assert count >= 0.5 * res.rounds


def test_adaptive_hardly_loses_to_plain_decoding_with_a_weak_drafter():
    policy, clock = sim_policy()
    run(WEAK, policy, 20, seed=3, clock=clock)
    res = run(WEAK, policy, 30, seed=4, clock=clock)
    assert res.rate >= 0.95 * rate_of(WEAK, "off", 30, seed=4)


def test_adaptive_stops_speculating_when_the_target_gets_busy():
    policy, clock = sim_policy()
    quiet = run(CPU, policy, 30, seed=5, in_flight=1, clock=clock)
    assert depth0_share(quiet) < 0.1  # speculation pays on an idle target ...
    busy = run(CPU, policy, 30, seed=6, in_flight=BUSY_LOAD, clock=clock)
    assert depth0_share(busy) > 0.8  # ... not once every verified node is multiplied by the load
    assert busy.rate >= 0.9 * rate_of(CPU, "off", 30, seed=6, in_flight=BUSY_LOAD)


def test_interleaved_requests_share_one_policy_safely():
    # As on one event loop: 8 requests in flight, each choose() answered by its own observe() later.
    policy, clock = sim_policy()
    rng = random.Random(9)
    tokens, seconds = 0, 0.0
    reqs = [(policy.new_request(0), [0]) for _ in range(8)]  # (state, [tokens done])
    for _ in range(100):
        rounds = [(req, done, done[0] % 5, policy.choose(req, done[0] % 5, 8)) for req, done in reqs]
        for req, done, slot, budget in reversed(rounds):
            st = play_round(RICH, budget, slot, 8, rng)
            assert st.budget == budget
            policy.observe(req, st)
            done[0] += st.committed
            tokens, seconds = tokens + st.committed, seconds + st.round_s
            clock.now += st.round_s / 8
    best_fixed = max(rate_of(RICH, spec, 30, seed=9, in_flight=8) for spec in ("off", *fixed_specs()))
    assert tokens / seconds >= 0.9 * best_fixed


def test_a_weak_drafters_rounds_do_not_talk_the_adaptive_policy_of_a_good_drafter_out_of_speculating():
    # One orchestrator serves requests with different drafters: a retrieval drafter's rounds must not enter
    # the model drafter's calibration and cost estimates, nor cost its adaptive policy speed.
    # A model drafter: good drafts, each level a model step. A retrieval drafter: poorer drafts, next to free.
    model_world = World("model", (0.55, 0.8, 0.85, 0.95), forced_last_code=0.5, draft_step_s=2e-3)
    retrieval_world = World("retrieval", (0.2, 0.4, 0.5, 0.7), forced_last_code=0.5, sibling_gain=0.2,
                            draft_hop_s=0.1e-3, draft_step_s=0.02e-3, confidence=0.3)
    policies = PolicyRegistry()
    retrieval, adaptive = policies.get("fixed:8:32", "retrieval", "greedy"), policies.get("adaptive", "model", "greedy")
    alone = make_policy("adaptive")
    res, res_alone, played = Result(), Result(), Result()
    for i in range(40):  # requests of both drafters take turns, as in a mixed workload
        run(retrieval_world, retrieval, 1, seed=100 + i)
        run(model_world, adaptive, 1, seed=200 + i, result=res if i >= 20 else played)
        run(model_world, alone, 1, seed=200 + i, result=res_alone if i >= 20 else None)
    # The model drafter's statistics hold its own rounds only.
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
    assert forced.plain_rate(3, 1) > 2.5 * forced.plain_rate(0, 1)


def test_cost_fits_never_make_bigger_trees_cheaper_to_draft():
    # Correlated features and a noisy small tree that measured slow: least squares alone gives nodes a negative
    # cost, so 32-node trees would look cheaper to draft than 16-node ones.
    cost = LinearCost(DRAFT_PRIOR, DRAFT_SCALE)
    for _ in range(50):
        cost.update((1.0, 32, 2.0, 64.0), 9e-3)
        cost.update((1.0, 64, 4.0, 256.0), 19e-3)
        cost.update((1.0, 16, 2.0, 32.0), 10e-3)
    assert min(cost.theta) >= 0.0, cost.theta
    predict = lambda nodes: sum(t * f for t, f in zip(cost.theta, (1.0, nodes, 2.0, 2.0 * nodes), strict=True))  # noqa: E731
    assert predict(16) <= predict(32) <= predict(64)


def test_adaptive_turns_speculation_down_near_the_in_flight_cap():
    shared = SharedStats(max_in_flight=64)
    policy = AdaptivePolicy(shared)
    req = policy.new_request(0)
    assert policy.choose(req, 0, 1).depth > 0
    half_way = policy.choose(req, 0, 48)  # between the soft mark (32) and the cap: at most 64 nodes
    assert 0 < half_way.max_nodes <= 64
    assert policy.choose(req, 0, 64) == NO_SPECULATION  # at the cap: plain decoding, before any refusal
    assert policy.choose(req, 0, 1).depth > 0  # ... and only there: the cap holds no state


# --- adaptive: recovery, calibration, cost (synthetic rounds, fake clock) -----------------------


ADAPTIVE_SHAPE = Budget(MAX_DEPTH, MAX_DEPTH, ADAPTIVE_TOP_K)  # what the adaptive policy asks for, with no stop


def tree_round(budget: Budget, in_flight: int, logq: list[float], accepted: list[bool], draft_s: float,
               verify_s: float, slot: int = 0) -> RoundStats:
    """A tree round as the loop reports it: per-node path log q and acceptance, the accepted chain's depths."""
    depth = sum(accepted)
    drafted = max(depth, min(len(logq), MAX_DEPTH))
    return RoundStats(budget, depth, [d < depth for d in range(drafted)], [(slot + d) % 5 for d in range(drafted)],
                      draft_s, verify_s, len(logq), in_flight, path_logq=logq, node_accepted=accepted)


def drafter_tree(rng: random.Random, n: int = 32, truth=lambda q: q) -> tuple[list[float], list[bool]]:
    """n nodes whose path probabilities spread over [e^-4, 1], each accepted with probability truth(q)."""
    logq = sorted((rng.uniform(-4.0, 0.0) for _ in range(n)), reverse=True)
    return logq, [rng.random() < truth(math.exp(lq)) for lq in logq]


def verify_s(tokens: int, load: int, per_token_load: float = 0.5) -> float:
    """The bench profile's verification (17.5 ms + 0.56 ms per token at load 0), per token dearer with load."""
    return 17.5e-3 + 0.56e-3 * tokens * (1.0 + per_token_load * load)


def learn(shared: SharedStats, clock: SimClock, rounds: int, loads=(1,), truth=lambda q: q, seed: int = 0,
          per_token_load: float = 0.5) -> None:
    """Tree rounds (the adaptive shape, no stop) and plain rounds at the given loads; time passes as they run."""
    rng = random.Random(seed)
    for i in range(rounds):
        in_flight = loads[i % len(loads)]
        logq, ok = drafter_tree(rng, n=rng.randint(4, MAX_DEPTH), truth=truth)  # chains end where the drafter does
        st = tree_round(ADAPTIVE_SHAPE, in_flight, logq, ok, 1e-3 + 1.2e-3 * len(logq),
                        verify_s(len(logq) + 1, in_flight - 1, per_token_load))
        shared.record(st, 0)
        plain_s = verify_s(1, in_flight - 1, per_token_load)
        shared.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, plain_s, 0, in_flight), 0)
        clock.now += 0.05


def test_the_adaptive_policys_own_rounds_teach_its_tree_density():
    # The density is recorded only for the adaptive shape; if choose() and record() disagree on it, the policy
    # plans from its prior forever.
    shared = SharedStats()
    budget = AdaptivePolicy(shared, probe_s=0.0, explore=0.0).choose(RequestState(), 0, 1)
    assert budget.depth == MAX_DEPTH
    before = shared.density.per_round(0).copy()
    shared.record(tree_round(budget, 1, [-0.01 * d for d in range(MAX_DEPTH)], [True] * MAX_DEPTH, 5e-3, 30e-3), 0)
    assert not np.allclose(shared.density.per_round(0), before)


def test_busy_then_quiet_speculates_deep_again_within_seconds():
    # The bench's failure: after a concurrency-64 phase (slow trees, drafts timing out, depth 0 winning), the
    # following concurrency-1 phase ran plain decoding. Learnt state must follow the present.
    clock = SimClock()
    shared = SharedStats(clock=clock)
    policy = AdaptivePolicy(shared, explore=0.0)
    req = policy.new_request(0)
    rng = random.Random(1)
    busy: list[Budget] = []
    for i in range(1500):
        budget = policy.choose(req, 0, BUSY_LOAD)
        busy.append(budget)
        if budget.depth and i % 2:  # the drafter times out: a fallback round, 200 ms lost
            st = RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.03, 0, BUSY_LOAD, lost_s=0.2)
        elif budget.depth:  # a tree arrives late and verifying it with 63 other requests' work is slow
            logq, ok = drafter_tree(rng)
            st = tree_round(budget, BUSY_LOAD, logq, ok, 0.08, 0.6)
        else:
            st = RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.03, 0, BUSY_LOAD)
        policy.observe(req, st)
        clock.now += st.round_s + st.lost_s
    assert sum(b.depth == 0 for b in busy[-500:]) >= 0.9 * 500, "speculation should lose under this load"
    assert any(b.depth for b in busy[-500:]), "yet it is probed now and then"
    # Quiet: drafts fast and well accepted.
    started, chosen = clock.now, []
    for _ in range(200):
        budget = policy.choose(req, 0, 1)
        chosen.append((clock.now - started, budget))
        if budget.depth:
            logq, ok = drafter_tree(rng, truth=lambda q: min(1.0, 1.3 * q))
            st = tree_round(budget, 1, logq, ok, 5e-3, verify_s(len(logq) + 1, 0))
        else:
            st = RoundStats(NO_SPECULATION, 0, [], [], 0.0, verify_s(1, 0), 0, 1)
        policy.observe(req, st)
        clock.now += st.round_s
    first = next(t for t, b in chosen if b.depth >= 8)
    assert first <= 2.0, first
    late = [b for _, b in chosen[-100:]]
    assert sum(b.depth >= 8 for b in late) >= 95, late


def test_calibration_learns_an_over_confident_drafter_and_raises_the_threshold():
    thresholds, f_half = {}, {}
    for name, truth in (("calibrated", lambda q: q), ("over-confident", lambda q: q**2.5)):
        clock = SimClock()
        shared = SharedStats(clock=clock)
        learn(shared, clock, 300, truth=truth)
        f_half[name] = shared.calibration(0.5)
        thresholds[name] = AdaptivePolicy(shared, explore=0.0).choose(RequestState(), 0, 1).min_path_prob
    assert 0.3 <= f_half["calibrated"] <= 0.5  # its bin, q in [0.26, 0.51]
    assert f_half["over-confident"] < 0.5 * f_half["calibrated"]
    assert thresholds["over-confident"] > thresholds["calibrated"] > 0, thresholds
    table = shared.calibration.table()
    assert (np.diff(table) >= 0).all()  # monotone in q


def test_the_threshold_rises_with_load_and_plain_decoding_wins_when_verification_is_dear():
    clock = SimClock()
    shared = SharedStats(clock=clock)
    # A drafter sure of nothing (f <= ~0.6) and verification ~1.1 ms per token dearer per request in flight.
    learn(shared, clock, 400, loads=(1, 2, 3, 5, 9, 17), truth=lambda q: 0.6 * q, per_token_load=2.0)
    policy = AdaptivePolicy(shared, explore=0.0)
    chosen = {load: policy.choose(policy.new_request(0), 0, load) for load in (1, 5, 9, 64)}
    assert chosen[1].depth == chosen[9].depth == MAX_DEPTH
    probs = [chosen[load].min_path_prob for load in (1, 5, 9)]
    assert 0 < probs[0] < probs[2] and probs == sorted(probs), chosen
    assert shared.node_seconds(9) > 3 * shared.node_seconds(1)
    assert chosen[64] == NO_SPECULATION, chosen  # ~70 ms per verified token: only plain decoding pays


def test_fallback_rounds_teach_no_draft_cost_and_their_lost_time_stays_with_their_load():
    clock = SimClock()
    fell_back, plain = SharedStats(clock=clock), SharedStats(clock=clock)
    for _ in range(50):
        fell_back.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.03, 0, BUSY_LOAD, lost_s=0.2), 0)
        plain.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.03, 0, BUSY_LOAD), 0)
        clock.now += 0.01
    assert fell_back.draft_cost.theta == pytest.approx(list(DRAFT_PRIOR))
    assert fell_back.verify_cost.theta == pytest.approx(plain.verify_cost.theta)  # lost_s is not verification
    assert fell_back.plain_committed[0] == plain.plain_committed[0] == 1.0
    assert fell_back.failures.lost_per_attempt(BUSY_LOAD) > 0.15
    assert fell_back.failures.lost_per_attempt(1) == 0.0  # timeouts under load say nothing of a quiet drafter
    busy_s = fell_back.tree_outcomes(0, BUSY_LOAD, 64)[1], plain.tree_outcomes(0, BUSY_LOAD, 64)[1]
    quiet_s = fell_back.tree_outcomes(0, 1, 64)[1], plain.tree_outcomes(0, 1, 64)[1]
    assert (busy_s[0] > busy_s[1] + 0.15).all()
    assert quiet_s[0] == pytest.approx(quiet_s[1])


def test_forgetting_is_by_elapsed_time_not_by_updates():
    clock = SimClock()
    shared = SharedStats(clock=clock, half_life_s=30.0)
    for _ in range(2000):  # a long past: many rounds at 60 ms
        shared.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.06, 0, 1), 0)
        clock.now += 0.001
    clock.now += 600.0  # twenty half-lives later, a few rounds at 20 ms outweigh it
    for _ in range(20):
        shared.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.02, 0, 1), 0)
    v = shared.verify_cost.theta
    assert v[0] + v[1] == pytest.approx(0.02, rel=0.1)
    # ... while rounds in quick succession forget nothing: 2000 updates within 2 s still count.
    past = SharedStats(clock=clock)
    for i in range(2000):
        past.record(RoundStats(NO_SPECULATION, 0, [], [], 0.0, 0.06 if i < 1000 else 0.02, 0, 1), 0)
    v = past.verify_cost.theta
    assert v[0] + v[1] == pytest.approx(0.04, rel=0.1)
