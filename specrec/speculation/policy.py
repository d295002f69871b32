"""Speculation policies that pick each round's draft budget (fixed, chain, heuristic, adaptive).

The adaptive policy sizes each round from calibrated drafter confidence (EAGLE-2 / SpecDec++ style):

- Calibration: f(q) = P(a tree node is on the target's committed path | the drafter's path probability q),
  learnt online from every tree round's per-node `path_logq` / `node_accepted`, binned by log q, Beta-prior
  counts, made monotone non-decreasing in q.
- Cost: linear fits of draft and verify seconds with load terms (a load-only term, so queueing under load
  never lands in the intercept); fallback rounds (the drafter failed) teach neither fit, their lost time is
  kept apart, per load.
- Rule: a node of calibrated acceptance p costs c_node seconds (marginal verify seconds per token + marginal
  draft seconds per node at this load); it pays iff p / c_node > R, R the round's goodput (committed tokens /
  round seconds). R and the threshold are found together by Dinkelbach's iteration over the log-q bins; the
  budget is a chain (ADAPTIVE_TOP_K) of depth MAX_DEPTH, a node cap, min_path_prob = the threshold. Depth 0
  when plain decoding's predicted rate is higher.
- Recovery: everything learnt decays with elapsed time (half-life in seconds, injectable clock), not per update,
  and a policy that has not speculated for `probe_s` seconds tries its best speculative budget once: state
  learnt under load can never lock a quiet period into plain decoding.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from specrec.calibration import LOWER_EDGES, N_BINS, Calibration, logq_bin
from specrec.drafting.base import Budget  # the one budget: what a policy plans is what a drafter drafts
from specrec.tree_shape import MAX_TREE_DEPTH, MAX_TREE_NODES

N_SLOTS = 5  # an item is 4 code tokens then SEP; slot = a token's place inside its item
SEP_SLOT = 4  # the grammar always forces SEP: free to draft, always accepted
MAX_DEPTH = MAX_TREE_DEPTH
MAX_NODES = MAX_TREE_NODES
MIN_SECONDS = 1e-4  # floor on a predicted round time, so a bad early fit cannot promise infinite rates
HF_START_DEPTH = 5  # transformers' num_assistant_tokens when "heuristic" was its default schedule (4.x)
# The adaptive policy drafts chains: on the bench profile (2-core CPU) a chain of 16 ran 1.95x plain on mean latency
# where a 32-node tree of width 8 ran 1.46x with more tokens per round (9.56 vs 9.00); the tree left 30 ms of
# drafting per round on the critical path, the chain 17 ms (bench/results/speedup-2026-12-05b.md).
ADAPTIVE_TOP_K = 1


NO_SPECULATION = Budget(0, 0)


@dataclass
class RoundStats:
    """What the orchestrator reports after each round."""

    budget: Budget  # what the round ran: NO_SPECULATION if it fell back to a plain target step
    accepted: int  # draft tokens accepted, excluding the bonus token
    accepted_per_depth: list[bool]  # per drafted depth: did the accepted path reach it (a True prefix)
    slots: list[int]  # item slot of the token at each drafted depth along the accepted-or-best path
    draft_s: float  # drafting incl. transport
    verify_s: float  # verification incl. transport
    n_nodes: int  # nodes actually in the tree
    in_flight: int  # requests in flight when the round started, this one included
    path_logq: Sequence[float] = ()  # per tree node: the drafter's cumulative log q of its path (empty: no tree)
    node_accepted: Sequence[bool] = ()  # per tree node: the target's committed path goes through it
    ready: bool = False  # the drafter had this tree ready when asked (drafted while the target verified)
    lost_s: float = 0.0  # time lost on a drafter that failed this round (a fallback round: budget NO_SPECULATION)

    @property
    def committed(self) -> int:
        return self.accepted + 1  # + the target's bonus/correction token

    @property
    def round_s(self) -> float:
        return self.draft_s + self.verify_s


@dataclass
class RequestState:
    """Per-request policy state, made by Policy.new_request."""

    next_slot: int = 0  # slot of the first token the latest round drafts
    rounds: int = 0
    depth: int = 0  # heuristic: draft length of the next round


class Policy(Protocol):
    name: str

    def new_request(self, next_slot: int = 0) -> RequestState: ...

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget: ...

    def observe(self, req: RequestState, stats: RoundStats) -> None: ...


# ----------------------------------------------------------------------------------------------
# Learnt models (shared by all requests of a process); every one forgets by elapsed time
# ----------------------------------------------------------------------------------------------

THRESHOLDS = np.exp(LOWER_EDGES)  # the min_path_prob values the adaptive policy asks for
THRESHOLDS[0] = 0.0  # the lowest bin holds everything below it too: no stop at all


class NodeDensity:
    """Expected tree nodes per round in each log-q bin, per next slot, from the adaptive policy's own trees.

    A bin counts only rounds in which it was open: above the round's min_path_prob, and above the lowest kept
    node when the node cap cut the tree (the bins below were censored, not empty).
    """

    def __init__(self, prior_nodes: float = 2.0, prior_rounds: float = 1.0):
        self.nodes = np.full((N_SLOTS, N_BINS + 1), prior_nodes * prior_rounds)
        self.nodes[:, N_BINS] = 0.5 * prior_rounds  # few forced-from-the-root nodes until seen
        self.rounds = np.full((N_SLOTS, N_BINS + 1), prior_rounds)
        self._prior = (self.nodes.copy(), self.rounds.copy())

    def record(self, slot: int, budget: Budget, path_logq: Sequence[float]) -> None:
        floor = math.log(budget.min_path_prob) if budget.min_path_prob > 0 else -math.inf
        open_bins = LOWER_EDGES >= floor - 1e-9
        if path_logq and len(path_logq) >= budget.max_nodes:
            open_bins &= LOWER_EDGES > min(path_logq)
        counts = np.bincount(logq_bin(path_logq), minlength=N_BINS + 1) if path_logq else np.zeros(N_BINS + 1)
        self.nodes[slot] += np.where(open_bins, counts, 0.0)
        self.rounds[slot] += open_bins

    def scale(self, factor: float) -> None:
        # Decay toward the prior, not toward zero: an unobserved bin must not look empty (nor full).
        prior_nodes, prior_rounds = self._prior
        self.nodes = prior_nodes + factor * (self.nodes - prior_nodes)
        self.rounds = prior_rounds + factor * (self.rounds - prior_rounds)

    def per_round(self, slot: int) -> np.ndarray:
        return self.nodes[slot] / self.rounds[slot]


class LinearCost:
    """Seconds ~ features @ theta: least squares with forgetting and a ridge pull toward a prior."""

    def __init__(self, prior: Sequence[float], scale: Sequence[float]):
        self.prior = np.asarray(prior, dtype=float)
        # One pseudo-observation per coefficient at a typical feature magnitude.
        self._ridge = np.diag(np.square(np.asarray(scale, dtype=float)))
        self._xtx = np.zeros((len(prior), len(prior)))
        self._xty = np.zeros(len(prior))
        self._theta: list[float] | None = self.prior.tolist()

    def update(self, features: Sequence[float], seconds: float) -> None:
        x = np.asarray(features, dtype=float)
        self._xtx += np.outer(x, x)
        self._xty += x * seconds
        self._theta = None  # solved when next needed: policies that never predict never pay for it

    def scale(self, factor: float) -> None:
        self._xtx *= factor
        self._xty *= factor
        self._theta = None

    @property
    def theta(self) -> list[float]:
        if self._theta is None:
            self._theta = _nonnegative_solve(self._xtx + self._ridge, self._xty + self._ridge @ self.prior).tolist()
        return self._theta


def _nonnegative_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin of the quadratic (a, b) with every coefficient >= 0, by clamping the most negative and re-solving.

    Every cost feature adds time, so a negative coefficient is an artefact of correlated features: unclamped,
    it made bigger trees look cheaper to draft than smaller ones.
    """
    free = np.ones(len(b), dtype=bool)
    theta = np.zeros(len(b))
    while free.any():
        theta[:] = 0.0
        theta[free] = np.linalg.solve(a[np.ix_(free, free)], b[free])
        if (theta >= 0).all():
            break
        free[int(np.argmin(theta))] = False
    return np.maximum(theta, 0.0)


# Verification of t tokens (pending root + tree nodes) with `load` other requests in flight:
#   verify_s ~ v0 + v1*t + load*(v2 + v3*t)
# Under load other requests' nodes share the batch and the cores, so the per-token cost grows with load:
# the term that makes depth 0 win when the target is busy.
def _verify_features(tokens: Any, load: float) -> tuple[Any, ...]:
    return (1.0, tokens, load, load * tokens)


# Drafting a tree of `nodes` nodes: draft_s ~ d0 + d1*nodes + load*(d2 + d3*nodes). The load-only term takes
# the queueing a busy draft service adds to every call, which would otherwise inflate the intercept and so the
# cost of speculating once the load is gone.
def _draft_features(nodes: Any, load: float) -> tuple[Any, ...]:
    return (1.0, nodes, load, load * nodes)


def _dot(theta: Sequence[float], features: tuple[Any, ...]) -> Any:
    """theta @ features where features may be arrays (broadcast)."""
    return sum(th * f for th, f in zip(theta, features, strict=True))


# Priors from the bench profile (27M target on a 2-core CPU behind Triton): verifying t tokens ~17.5 ms +
# 0.56 ms per token at load 0; a drafter step ~1.2 ms, one per node of a chain (the adaptive shape).
# Only a starting point: a few rounds of data outweigh it.
VERIFY_PRIOR = (17.5e-3, 0.56e-3, 0.0, 0.0)
VERIFY_SCALE = (1.0, 8.0, 4.0, 32.0)
DRAFT_PRIOR = (0.5e-3, 1.2e-3, 0.0, 0.0)
DRAFT_SCALE = (1.0, 16.0, 4.0, 64.0)
N_LOAD_BUCKETS = 8


def load_bucket(in_flight: int) -> int:
    """log2 buckets of the requests in flight: 1, 2-3, 4-7, ..., 128+."""
    return min(N_LOAD_BUCKETS - 1, max(in_flight, 1).bit_length() - 1)


class Failures:
    """Per load bucket: how often asking for a tree fell back to a plain round, and the seconds it lost.

    Kept apart from the cost fits (a 200 ms timeout is not what drafting costs) but charged to speculation at
    the load where it happens: draft timeouts come with load and must not outlive it.
    """

    def __init__(self, prior_attempts: float = 2.0):
        self.attempts = np.zeros(N_LOAD_BUCKETS)
        self.lost = np.zeros(N_LOAD_BUCKETS)
        self.prior_attempts = prior_attempts

    def record(self, in_flight: int, lost_s: float) -> None:
        b = load_bucket(in_flight)
        self.attempts[b] += 1.0
        self.lost[b] += lost_s

    def scale(self, factor: float) -> None:
        self.attempts *= factor
        self.lost *= factor

    def lost_per_attempt(self, in_flight: int) -> float:
        b = load_bucket(in_flight)
        return float(self.lost[b] / (self.attempts[b] + self.prior_attempts))


class SharedStats:
    """What all requests learn together: calibration, tree shapes, drafting and verification cost, failures.

    One per (drafter, verification mode); every policy built on it records into it. Methods take a lock, so
    concurrent requests on one event loop (or a few threads) are safe. Everything learnt decays by elapsed time
    on `clock` with half-life `half_life_s`, so the estimates follow the present whatever the round rate.
    """

    def __init__(self, *, max_in_flight: int | None = None, overload_fraction: float = 0.5,
                 half_life_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.max_in_flight = max_in_flight
        self.overload_fraction = overload_fraction
        self.half_life_s = half_life_s
        self.clock = clock
        self.lock = threading.RLock()
        self.calibration = Calibration()
        self.density = NodeDensity()
        self.draft_cost = LinearCost(DRAFT_PRIOR, DRAFT_SCALE)
        self.verify_cost = LinearCost(VERIFY_PRIOR, VERIFY_SCALE)
        self.failures = Failures()
        # Tokens a depth-0 round commits, per next slot: 1 plus the chain the grammar forces from there (on
        # ML-100k the collision code and SEP: 3 tokens from slot 3). Taken as 1, plain rounds look up to 3x
        # worse than they are exactly where they are best.
        self._plain_tokens = np.zeros(N_SLOTS)
        self._plain_rounds = np.zeros(N_SLOTS)
        self.rounds = 0
        self._aged_at = clock()
        self.last_speculated = self._aged_at  # clock time of the latest round that asked for a tree

    @property
    def plain_committed(self) -> np.ndarray:
        """Mean tokens a plain round commits, per next slot (1 where none was seen)."""
        seen = self._plain_rounds > 0
        return np.where(seen, self._plain_tokens / np.where(seen, self._plain_rounds, 1.0), 1.0)

    def _age(self) -> None:
        now = self.clock()
        elapsed = now - self._aged_at
        if elapsed <= 0:
            return
        self._aged_at = now
        factor = 0.5 ** (elapsed / self.half_life_s)
        for model in (self.calibration, self.density, self.draft_cost, self.verify_cost, self.failures):
            model.scale(factor)
        self._plain_tokens *= factor
        self._plain_rounds *= factor

    def record(self, stats: RoundStats, next_slot: int | None = None) -> None:
        """Learn from one finished round, whatever policy chose it.

        next_slot: the slot the round started at, if known (a depth-0 round's stats do not say).
        """
        budget, load = stats.budget, max(stats.in_flight, 1) - 1
        fallback = budget.depth == 0 and stats.lost_s > 0
        slot = next_slot if next_slot is not None else (stats.slots[0] if stats.slots else None)
        with self.lock:
            self._age()
            self.rounds += 1
            if budget.depth > 0 or fallback:
                self.failures.record(stats.in_flight, stats.lost_s)
                self.last_speculated = self._aged_at
            # A fallback's lost time is in lost_s, never in verify_s: its verification is a plain round's.
            if stats.verify_s > 0:
                self.verify_cost.update(_verify_features(stats.n_nodes + 1, load), stats.verify_s)
            if budget.depth > 0 and stats.draft_s > 0:
                self.draft_cost.update(_draft_features(stats.n_nodes, load), stats.draft_s)
            if budget.depth == 0 and slot is not None:
                self._plain_tokens[slot] += stats.committed
                self._plain_rounds[slot] += 1.0
            if budget.depth > 0 and len(stats.path_logq) == len(stats.node_accepted):
                if stats.path_logq:
                    self.calibration.record(stats.path_logq, stats.node_accepted)
                # Only the adaptive policy's own shape (full depth, its width) tells what its trees hold;
                # a tree sent without log q (n_nodes > 0, path_logq empty) tells nothing, unlike an empty one.
                known = bool(stats.path_logq) or stats.n_nodes == 0
                if known and slot is not None and budget.depth == MAX_DEPTH and budget.top_k == ADAPTIVE_TOP_K:
                    self.density.record(slot, budget, stats.path_logq)

    # -- predictions -------------------------------------------------------------------------------

    def node_seconds(self, in_flight: int) -> float:
        """Marginal seconds of one more tree node at this load: verifying it plus drafting it."""
        load = max(in_flight, 1) - 1
        v, d = self.verify_cost.theta, self.draft_cost.theta
        return v[1] + load * v[3] + d[1] + load * d[3]

    def plain_rate(self, next_slot: int, in_flight: int) -> float:
        """Predicted tokens per second of a plain round."""
        load = max(in_flight, 1) - 1
        tokens = float(self.plain_committed[next_slot])
        seconds = max(_dot(self.verify_cost.theta, _verify_features(tokens, load)), MIN_SECONDS)
        return tokens / seconds

    def tree_outcomes(self, next_slot: int, in_flight: int, max_nodes: int) -> tuple[np.ndarray, np.ndarray]:
        """Expected committed tokens and round seconds of a full-depth tree at each threshold in THRESHOLDS.

        A threshold at bin b keeps the nodes of bins b and above, the likeliest first up to max_nodes (the
        drafter keeps the best max_nodes by path score).
        """
        load = max(in_flight, 1) - 1
        per_bin = self.density.per_round(next_slot)[::-1]  # likeliest bin first
        f = self.calibration.table()[::-1]
        kept = np.minimum(np.cumsum(per_bin), max_nodes)
        taken = np.diff(kept, prepend=0.0)  # nodes of each bin that fit under the cap
        committed = 1.0 + np.cumsum(taken * f)
        draft = _dot(self.draft_cost.theta, _draft_features(kept, load))
        verify = _dot(self.verify_cost.theta, _verify_features(kept + 1, load))
        seconds = np.maximum(draft + verify, MIN_SECONDS) + self.failures.lost_per_attempt(in_flight)
        return committed[::-1], seconds[::-1]

    def node_cap(self, in_flight: int) -> int:
        """Most tree nodes a round may draft at this load: MAX_NODES up to overload_fraction of the in-flight cap,
        then shrinking linearly to 0 (no speculation) at the cap.

        Near the cap the target's batches are full of other requests' work: speculation is turned down before
        the server starts refusing requests, whatever the cost model has learnt so far. It depends on the load
        now only, so it never outlives a busy period.
        """
        if not self.max_in_flight:
            return MAX_NODES
        soft = self.overload_fraction * self.max_in_flight
        if in_flight <= soft:
            return MAX_NODES
        return int(MAX_NODES * max(0.0, self.max_in_flight - in_flight) / max(1.0, self.max_in_flight - soft))


@dataclass(frozen=True)
class Plan:
    """The adaptive policy's reasoning for one round (what choose() acted on)."""

    threshold: float  # min_path_prob of the best tree
    max_nodes: int
    tree_rate: float  # its predicted tokens per second
    plain_rate: float
    goodput: float  # R of the marginal rule: the rate the chosen round is expected to reach


def plan_round(shared: SharedStats, next_slot: int, in_flight: int, max_nodes: int, shift: int = 0) -> Plan:
    """The best full-depth tree and the plain rate, by Dinkelbach's iteration for max committed / seconds.

    Each step keeps the threshold maximising committed - R * seconds given the goodput R of the previous step.
    Without the node cap this is the marginal rule, keep a node iff f(q) / c_node > R, so the threshold is the
    smallest q with f(q) >= R * c_node; R starts at plain decoding's rate and rises to the best tree's.
    """
    plain = shared.plain_rate(next_slot, in_flight)
    committed, seconds = shared.tree_outcomes(next_slot, in_flight, max_nodes)
    rate, best = plain, int(np.argmax(committed / seconds))
    for _ in range(8):
        k = int(np.argmax(committed - rate * seconds))
        new_rate = float(committed[k] / seconds[k])
        if new_rate <= rate + 1e-12:
            break
        rate, best = new_rate, k
    # An exploratory neighbour threshold: trees of one size only would leave the cost fits no variation to
    # tell a per-node cost from a fixed one, and the bins just below the threshold without data.
    best = min(max(best + shift, 0), N_BINS)
    tree_rate = float(committed[best] / seconds[best])
    return Plan(float(THRESHOLDS[best]), max_nodes, tree_rate, plain, max(tree_rate, plain))


# ----------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------


def _planned(budget: Budget) -> Budget:
    """A budget a policy may plan with (ValueError naming the field otherwise): depth 0 = no speculation and no
    nodes; else at least one node per level, within the tree limits every hop agrees on."""
    if not 0 <= budget.depth <= MAX_DEPTH:
        raise ValueError(f"depth must be in 0..{MAX_DEPTH}, got {budget.depth}")
    if budget.depth == 0 and budget.max_nodes != 0:
        raise ValueError(f"max_nodes must be 0 when depth is 0, got {budget.max_nodes}")
    if budget.depth > 0 and not budget.depth <= budget.max_nodes <= MAX_NODES:
        raise ValueError(f"max_nodes must be in {budget.depth}..{MAX_NODES} for depth {budget.depth}, "
                         f"got {budget.max_nodes}")
    if not 0.0 <= budget.min_path_prob <= 1.0:
        raise ValueError(f"min_path_prob must be in 0..1, got {budget.min_path_prob}")
    return budget


class FixedPolicy:
    """The same budget every round; Budget(0, 0) is "off" (plain decoding on the target)."""

    def __init__(self, depth: int, nodes: int, *, top_k: int = 0, min_path_prob: float = 0.0,
                 name: str | None = None, shared: SharedStats | None = None):
        self.budget = _planned(Budget(depth, nodes, top_k, min_path_prob))
        self.name = name or ("off" if depth == 0 else f"fixed:{depth}:{nodes}")
        self.shared = shared

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        req.next_slot = next_slot
        return self.budget

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1
        if self.shared is not None:
            self.shared.record(stats, req.next_slot)


class HeuristicPolicy:
    """Hugging Face assisted generation's "heuristic" schedule, per request (their "heuristic_transient"):
    draft a chain of `start` tokens; +2 after a fully accepted draft, -1 otherwise (min 1)."""

    name = "heuristic"

    def __init__(self, start: int = HF_START_DEPTH, *, max_depth: int = MAX_DEPTH,
                 shared: SharedStats | None = None):
        if not 1 <= start <= max_depth <= MAX_DEPTH:
            raise ValueError(f"heuristic start must be in 1..{max_depth}, got {start}")
        self.start = start
        self.max_depth = max_depth
        self.shared = shared

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot, depth=self.start)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        req.next_slot = next_slot
        return Budget(req.depth, req.depth, top_k=1)  # a chain, as HF drafts

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1
        drafted = len(stats.accepted_per_depth)  # HF compares with the candidates actually drafted
        if drafted and stats.accepted >= drafted:
            req.depth = min(req.depth + 2, self.max_depth)
        elif drafted:
            req.depth = max(1, req.depth - 1)
        if self.shared is not None:
            self.shared.record(stats, req.next_slot)


class AdaptivePolicy:
    """Per round: a full-depth chain (ADAPTIVE_TOP_K) cut by calibrated confidence, or plain decoding if faster.

    Budget(MAX_DEPTH, cap, top_k=ADAPTIVE_TOP_K, min_path_prob=threshold) with the threshold from plan_round (the
    marginal rule over the calibrated acceptance and the load-aware costs), cap = max_nodes within the in-flight
    node cap; depth 0 when plain decoding's predicted rate is at least the chain's. When no round of this
    SharedStats has asked for a tree for probe_s seconds, the best chain is tried anyway: a cost model wrong
    against speculation would otherwise never see the data that corrects it.
    """

    name = "adaptive"

    def __init__(self, shared: SharedStats | None = None, *, max_nodes: int = MAX_DEPTH, probe_s: float = 1.0,
                 explore: float = 0.1, seed: int = 0):
        if not 1 <= max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes must be in 1..{MAX_NODES}, got {max_nodes}")
        self.shared = shared if shared is not None else SharedStats()
        self.max_nodes = max_nodes
        self.probe_s = probe_s
        self.explore = explore
        self._rng = random.Random(seed)
        self.last_plan: Plan | None = None

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        req.next_slot = next_slot
        shared = self.shared
        cap = min(self.max_nodes, shared.node_cap(in_flight))
        if cap < 1:
            return NO_SPECULATION
        with shared.lock:
            shift = self._rng.choice((-1, 1)) if self._rng.random() < self.explore else 0
            plan = self.last_plan = plan_round(shared, next_slot, in_flight, cap, shift)
            now = shared.clock()
            probe = now - shared.last_speculated >= self.probe_s
            if plan.tree_rate <= plan.plain_rate and not probe:
                return NO_SPECULATION
            shared.last_speculated = now  # one probe per probe_s, not one per request choosing meanwhile
        return Budget(min(MAX_DEPTH, cap), cap, top_k=ADAPTIVE_TOP_K, min_path_prob=plan.threshold)

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1
        self.shared.record(stats, req.next_slot)


# ----------------------------------------------------------------------------------------------
# Construction from a client's spec string
# ----------------------------------------------------------------------------------------------

SPEC_HELP = ("'adaptive' (default), 'heuristic[:START]', 'off', 'chain:DEPTH', 'fixed:DEPTH:NODES' "
             "or 'fixed:DEPTH:NODES:MINPROB' (e.g. 'fixed:3:16', 'fixed:16:64:0.05')")


def _parse_args(spec: str, args: list[str]) -> tuple[list[int], float | None]:
    """Integer arguments, and a trailing probability for fixed:D:N:P."""
    prob = None
    if len(args) == 3:
        try:
            prob = float(args[2])
        except ValueError:
            raise ValueError(f"bad speculation policy {spec!r}: MINPROB must be a number; use {SPEC_HELP}") from None
        args = args[:2]
    try:
        return [int(a) for a in args], prob
    except ValueError:
        raise ValueError(f"bad speculation policy {spec!r}: arguments must be integers; use {SPEC_HELP}") from None


def make_policy(spec: str = "adaptive", **kw: Any) -> Policy:
    """A policy from its spec; kw go to the constructor, e.g. shared=SharedStats() (every spec takes it).

    Pass one SharedStats to every policy of a drafter so requests learn together (a fixed or heuristic
    request's rounds teach the adaptive ones too); without it an adaptive policy learns on its own.
    """
    name, *args = spec.strip().lower().split(":") if spec.strip() else ["adaptive"]
    ints, prob = _parse_args(spec, args)
    try:
        if name == "adaptive" and not args:
            return AdaptivePolicy(**kw)
        if name == "off" and not args:
            return FixedPolicy(0, 0, **kw)
        if name == "heuristic" and len(ints) <= 1 and prob is None:
            return HeuristicPolicy(*ints, **kw)
        if name == "chain" and len(ints) == 1 and prob is None:
            if not 1 <= ints[0] <= MAX_DEPTH:
                raise ValueError(f"chain depth must be in 1..{MAX_DEPTH}, got {ints[0]}")
            return FixedPolicy(ints[0], ints[0], top_k=1, name=f"chain:{ints[0]}", **kw)
        if name == "fixed" and len(ints) == 2:
            if prob is None:
                return FixedPolicy(*ints, **kw)
            return FixedPolicy(*ints, min_path_prob=prob, name=f"fixed:{ints[0]}:{ints[1]}:{prob:g}", **kw)
    except ValueError as e:
        raise ValueError(f"bad speculation policy {spec!r}: {e}") from None
    raise ValueError(f"unknown speculation policy {spec!r}; use {SPEC_HELP}")


class PolicyRegistry:
    """One policy per (spec, drafter, mode); the policies of one (drafter, mode) learn together in one SharedStats.

    Acceptance and drafting cost belong to a drafter and a verification mode, not to the process: learning a
    model drafter's trees from a retrieval drafter's rounds (or greedy from stochastic ones) made the adaptive
    policy under-speculate. Least recently used contexts are forgotten past `max_contexts`, since drafter
    names (variants) come from clients.
    """

    def __init__(self, default_spec: str = "adaptive", *, max_in_flight: int | None = None, max_contexts: int = 32,
                 clock: Callable[[], float] = time.monotonic):
        self.default_spec = default_spec
        self.max_in_flight = max_in_flight
        self.max_contexts = max_contexts
        self.clock = clock
        self._stats: OrderedDict[tuple[str, str], SharedStats] = OrderedDict()
        self._policies: dict[tuple[str, str, str], Policy] = {}

    def stats(self, drafter: str, mode: str) -> SharedStats:
        key = (drafter, mode)
        if key not in self._stats:
            self._stats[key] = SharedStats(max_in_flight=self.max_in_flight, clock=self.clock)
            if len(self._stats) > self.max_contexts:
                old, _ = self._stats.popitem(last=False)
                self._policies = {k: p for k, p in self._policies.items() if k[1:] != old}
        self._stats.move_to_end(key)
        return self._stats[key]

    def get(self, spec: str, drafter: str, mode: str) -> Policy:
        """The policy for a request; ValueError for a bad spec."""
        spec = spec or self.default_spec
        key = (spec, drafter, mode)
        shared = self.stats(drafter, mode)
        if key not in self._policies:
            self._policies[key] = make_policy(spec, shared=shared)
        return self._policies[key]
