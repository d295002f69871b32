"""Speculation policies that pick each round's draft depth and tree size (fixed, heuristic, adaptive)."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from specrec.tree_shape import MAX_TREE_DEPTH, MAX_TREE_NODES

N_SLOTS = 5  # an item is 4 code tokens then SEP; slot = a token's place inside its item
SEP_SLOT = 4  # the grammar always forces SEP: free to draft, always accepted
MAX_DEPTH = MAX_TREE_DEPTH
MAX_NODES = MAX_TREE_NODES
MIN_SECONDS = 1e-4  # floor on a predicted round time, so a bad early fit cannot promise infinite rates
HF_START_DEPTH = 5  # transformers' num_assistant_tokens when "heuristic" was its default schedule (4.x)


@dataclass(frozen=True)
class Budget:
    """How big the next draft tree may be. depth 0 = no speculation: one plain target step."""

    depth: int
    max_nodes: int  # 0 when depth == 0
    top_k: int = 0  # frontier nodes expanded per level and children per node; 1 = a chain, 0 = the drafter's default
    min_path_prob: float = 0.0  # confidence stop: the drafter drops candidates whose path probability is below this

    def __post_init__(self) -> None:
        if not 0 <= self.depth <= MAX_DEPTH:
            raise ValueError(f"depth must be in 0..{MAX_DEPTH}, got {self.depth}")
        if self.depth == 0 and self.max_nodes != 0:
            raise ValueError(f"max_nodes must be 0 when depth is 0, got {self.max_nodes}")
        if self.depth > 0 and not self.depth <= self.max_nodes <= MAX_NODES:
            raise ValueError(f"max_nodes must be in {self.depth}..{MAX_NODES} for depth {self.depth}, "
                             f"got {self.max_nodes}")


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
    arm: int | None = None  # adaptive: index of the arm picked by choose(), until observe()


class Policy(Protocol):
    name: str

    def new_request(self, next_slot: int = 0) -> RequestState: ...

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget: ...

    def observe(self, req: RequestState, stats: RoundStats) -> None: ...


# ----------------------------------------------------------------------------------------------
# Arms and learnt models (shared by all requests of a process)
# ----------------------------------------------------------------------------------------------

DEFAULT_DEPTHS = (1, 2, 3, 4, 6, 8)
DEFAULT_TREE_NODES = (8, 16, 32)


def default_arms(depths: Sequence[int] = DEFAULT_DEPTHS,
                 nodes: Sequence[int] = DEFAULT_TREE_NODES) -> tuple[Budget, ...]:
    """Depth 0, then for each depth a chain and every tree size that can hold it."""
    arms = [NO_SPECULATION]
    for d in depths:
        for n in (d, *nodes):
            if n >= d and Budget(d, n) not in arms:
                arms.append(Budget(d, n))
    return tuple(arms)


N_WIDTHS = 5  # width classes: ~1, 2, 4, 8, 16+ candidates per level


def width_class(depth: int, nodes: int) -> int:
    """Bucket of candidates per level (nodes / depth) on a log2 scale; 0 = chain."""
    return min(N_WIDTHS - 1, max(0, round(math.log2(nodes / depth))))


def _count(hits: np.ndarray, trials: np.ndarray, cell: tuple[int, int, int], ok: bool, cap: float) -> None:
    trials[cell] += 1.0
    hits[cell] += ok
    if trials[cell] > cap:  # a sliding window of ~cap observations, so estimates follow drift
        hits[cell] *= cap / trials[cell]
        trials[cell] = cap


class AcceptanceModel:
    """Conditional acceptance a = P(depth d accepted | depth d-1 accepted), keyed by the slot s at depth d.

    Beta-style counts with hierarchical shrinkage (each level lends `strength` pseudo-counts to the next):
    slot prior (SEP near 1: the grammar forces it) -> slot, pooled -> (width class w, s) -> (w, d, s) ->
    (arm, d, s). Given the arm, d and s fix the whole slot sequence, so by the chain rule
    P(reach k) = prod_{j<=k} a[arm, j, s_j] is exact for an arm with enough data, whatever the tree shape;
    arms with little data borrow from trees of the same width.
    """

    def __init__(self, arm_widths: Sequence[int], max_depth: int = MAX_DEPTH, strength: float = 2.0,
                 cap: float = 400.0):
        self.arm_widths = np.asarray(arm_widths, dtype=int)
        self.hits = np.zeros((N_WIDTHS, max_depth, N_SLOTS))  # every observed round, by width class
        self.trials = np.zeros_like(self.hits)
        self.arm_hits = np.zeros((len(arm_widths), max_depth, N_SLOTS))  # rounds that ran an arm
        self.arm_trials = np.zeros_like(self.arm_hits)
        self.prior = np.full(N_SLOTS, 0.5)
        self.prior[SEP_SLOT] = 0.99
        self.strength = strength
        self.cap = cap
        self._table: np.ndarray | None = None
        self._by_slot: np.ndarray | None = None

    def record(self, width: int, arm: int | None, accepted_per_depth: Sequence[bool], slots: Sequence[int]) -> None:
        for d, (ok, s) in enumerate(zip(accepted_per_depth, slots, strict=False)):
            if d >= self.trials.shape[1]:
                break
            _count(self.hits, self.trials, (width, d, s), bool(ok), self.cap)
            if arm is not None:
                _count(self.arm_hits, self.arm_trials, (arm, d, s), bool(ok), self.cap)
            if not ok:
                break  # deeper positions were never put to the test
        self._table = None

    def table(self) -> np.ndarray:
        """a[arm, d, s], shape [arms, max_depth, N_SLOTS]."""
        if self._table is None:
            k = self.strength
            slot = (self.hits.sum((0, 1)) + k * self.prior) / (self.trials.sum((0, 1)) + k)  # [S]
            by_slot = (self.hits.sum(1) + k * slot) / (self.trials.sum(1) + k)  # [W, S]
            # More candidates per level never lower acceptance: keep the width-level estimates monotone in w.
            self._by_slot = np.maximum.accumulate(by_slot, axis=0)
            by_width = np.maximum.accumulate((self.hits + k * self._by_slot[:, None, :]) / (self.trials + k), axis=0)
            self._table = (self.arm_hits + k * by_width[self.arm_widths]) / (self.arm_trials + k)
        return self._table

    def per_slot(self, width: int = 0) -> np.ndarray:
        """Acceptance per slot pooled over depths for one width class (0 = chains), shape [N_SLOTS]."""
        self.table()
        assert self._by_slot is not None
        return self._by_slot[width].copy()


class LinearCost:
    """Seconds ~ features @ theta: least squares with exponential forgetting and a ridge pull toward a prior."""

    def __init__(self, prior: Sequence[float], scale: Sequence[float], forget: float = 0.995):
        self.prior = np.asarray(prior, dtype=float)
        # One pseudo-observation per coefficient at a typical feature magnitude.
        self._ridge = np.diag(np.square(np.asarray(scale, dtype=float)))
        self._xtx = np.zeros((len(prior), len(prior)))
        self._xty = np.zeros(len(prior))
        self.forget = forget
        self._theta: list[float] | None = self.prior.tolist()

    def update(self, features: Sequence[float], seconds: float) -> None:
        x = np.asarray(features, dtype=float)
        self._xtx = self.forget * self._xtx + np.outer(x, x)
        self._xty = self.forget * self._xty + x * seconds
        self._theta = None  # solved when next needed: policies that never predict never pay for it

    @property
    def theta(self) -> list[float]:
        if self._theta is None:
            self._theta = _nonnegative_solve(self._xtx + self._ridge, self._xty + self._ridge @ self.prior).tolist()
        return self._theta


def _nonnegative_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin of the quadratic (a, b) with every coefficient >= 0, by clamping the most negative and re-solving.

    Every cost feature adds time, so a negative coefficient is an artefact of correlated features (arms that
    grow depth and nodes together): unclamped, it made bigger trees look cheaper to draft than smaller ones.
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


# Drafting `steps` unforced levels into a tree of `nodes` nodes: draft_s ~ d0 + d1*steps + d2*nodes + d3*load*steps.
def _draft_features(steps: Any, nodes: Any, load: float) -> tuple[Any, ...]:
    return (1.0, steps, nodes, load * steps)


def _dot(theta: Sequence[float], features: tuple[Any, ...]) -> Any:
    """theta @ features where features may be per-arm arrays (broadcast)."""
    return sum(th * f for th, f in zip(theta, features, strict=True))


# Priors from LOCAL_STACK.md (2-core CPU, target h512 L8): a 1-token step ~8.7 ms, ~0.6 ms per extra verified
# token up to 32 nodes; a draft step + stream hop ~1.2 ms. Only a starting point: a few rounds of data outweigh it.
VERIFY_PRIOR = (8.0e-3, 0.7e-3, 0.0, 0.0)
VERIFY_SCALE = (1.0, 8.0, 4.0, 32.0)
DRAFT_PRIOR = (0.3e-3, 0.9e-3, 0.02e-3, 0.0)
DRAFT_SCALE = (1.0, 3.0, 16.0, 12.0)


class ArmStats:
    """Discounted per-(next slot, arm) counts, and what each arm's rounds cost against the cost model.

    Counts are kept per next slot, not only per arm: an arm explored only where it starts mid-item says
    nothing about the slots it never drafts (e.g. an item's first code, which the bonus token may always
    cover), so each slot keeps its own exploration. Discounting forgets old rounds, so an arm left unplayed
    regains its bonus and its estimates are refreshed.
    """

    def __init__(self, n_arms: int, discount: float, shrink: float = 2.0):
        self.counts = np.zeros((N_SLOTS, n_arms))
        # Rounds chosen but not yet observed count as played ("virtual visits"), so requests choosing at
        # the same time spread over untried arms instead of all exploring the same one. Discounted like the
        # counts, so a request that never reports back is forgotten.
        self.pending = np.zeros((N_SLOTS, n_arms))
        self.discount = discount
        self.shrink = shrink
        # Per arm: rounds, observed seconds, and the summed features of those rounds, so the time correction
        # compares them with the *current* cost model (a ratio frozen at record time would keep the model's
        # lag, e.g. from before it learnt a load change, and an arm that then looks slow is never replayed).
        self.time_counts = np.zeros(n_arms)
        self.seconds = np.zeros(n_arms)
        self.draft_features = np.zeros((n_arms, len(DRAFT_PRIOR)))
        self.verify_features = np.zeros((n_arms, len(VERIFY_PRIOR)))

    def add(self, arm: int, next_slot: int | None, seconds: float | None = None,
            draft_features: Sequence[float] = (), verify_features: Sequence[float] = ()) -> None:
        for a in (self.counts, self.pending, self.time_counts, self.seconds, self.draft_features,
                  self.verify_features):
            a *= self.discount
        if next_slot is not None:
            self.counts[next_slot, arm] += 1.0
        if seconds is not None:
            self.time_counts[arm] += 1.0
            self.seconds[arm] += seconds
            if draft_features:
                self.draft_features[arm] += draft_features
            self.verify_features[arm] += verify_features

    def time_correction(self, draft_theta: Sequence[float], verify_theta: Sequence[float]) -> np.ndarray:
        """Observed / predicted seconds over each arm's rounds, shrunk toward 1 while they are few."""
        predicted = self.draft_features @ np.asarray(draft_theta) + self.verify_features @ np.asarray(verify_theta)
        ratio = np.divide(self.seconds, predicted, out=np.ones_like(predicted), where=predicted > 0)
        return (self.time_counts * ratio + self.shrink) / (self.time_counts + self.shrink)

    def tried(self) -> np.ndarray:
        return (self.counts + self.pending).sum(axis=0) > 0

    def start(self, next_slot: int, arm: int) -> None:
        self.pending[next_slot, arm] += 1.0

    def finish(self, next_slot: int, arm: int) -> None:
        self.pending[next_slot, arm] = max(0.0, self.pending[next_slot, arm] - 1.0)

    def bonus(self, next_slot: int, c: float, cost: np.ndarray) -> np.ndarray:
        """UCB bonus c * sqrt(ln(1 + N_slot) / n_slot,arm * cost); arms never tried anywhere = inf.

        Per-arm counts (BanditSpec's bonus used the total count, equal for every arm). `cost` = the best
        arm's round time / this arm's, at most 1: an exploratory round wastes time in proportion to its
        length, so this scaling makes exploring a slow arm cost about as much as exploring a fast one.
        """
        n = self.counts[next_slot] + self.pending[next_slot]
        bonus = c * np.sqrt(math.log1p(n.sum()) / (n + 0.5) * cost)  # +0.5: finite for a slot not yet seen
        return np.where(self.tried(), bonus, np.inf)


class SharedStats:
    """What all requests learn together: acceptance, drafting and verification cost, per-arm bandit stats.

    One per process (or per target model); every policy built on it records into it. Methods take a lock,
    so concurrent requests on one event loop (or a few threads) are safe.
    """

    def __init__(self, arms: Sequence[Budget] | None = None, *, discount: float = 0.999,
                 max_in_flight: int | None = None, overload_fraction: float = 0.5):
        self.arms = tuple(arms) if arms is not None else default_arms()
        self.max_in_flight = max_in_flight
        self.overload_fraction = overload_fraction
        if len(set(self.arms)) != len(self.arms) or not self.arms:
            raise ValueError("arms must be non-empty and distinct")
        self.lock = threading.RLock()
        self._index = {a: i for i, a in enumerate(self.arms)}
        self.depths = np.array([a.depth for a in self.arms])
        self.nodes = np.array([a.max_nodes for a in self.arms])
        self._levels = np.arange(max(1, self.depths.max()))
        self._drafted = self._levels[None, :] < self.depths[:, None]  # [arms, levels]
        self.acceptance = AcceptanceModel([width_class(a.depth, a.max_nodes) if a.depth else 0 for a in self.arms])
        self.draft_cost = LinearCost(DRAFT_PRIOR, DRAFT_SCALE)
        self.verify_cost = LinearCost(VERIFY_PRIOR, VERIFY_SCALE)
        self.bandit = ArmStats(len(self.arms), discount)
        # Tokens a depth-0 round commits, per next slot: 1 plus the chain the grammar forces from there (on
        # ML-100k the collision code and SEP: 3 tokens from slot 3). Taken as 1, plain rounds looked up to 3x
        # worse than they are exactly where they are best.
        self.plain_committed = np.ones(N_SLOTS)
        self._plain_rounds = np.zeros(N_SLOTS)
        self.rounds = 0

    def record(self, stats: RoundStats, next_slot: int | None = None) -> None:
        """Learn acceptance, costs and arm statistics from one finished round, whatever policy chose it.

        next_slot: the slot the round started at, if known (a depth-0 round's stats do not say).
        """
        budget, load = stats.budget, max(stats.in_flight, 1) - 1
        arm = self.arm_index(budget)
        steps = sum(s != SEP_SLOT for s in stats.slots)
        with self.lock:
            self.rounds += 1
            # A speculative budget that drafted nothing (the list ended) says nothing about its arm.
            if arm is not None and (budget.depth == 0 or stats.accepted_per_depth):
                slot = next_slot if next_slot is not None else _first(stats.slots)
                if stats.round_s > 0:
                    # Features at the arm's own size, as predict() sees it, not the tree actually built.
                    # A plain round verifies its forced chain: as many tokens as it commits.
                    draft = _draft_features(steps, budget.max_nodes, load) if budget.depth else ()
                    verify = _verify_features((budget.max_nodes if budget.depth else stats.n_nodes) + 1, load)
                    self.bandit.add(arm, slot, stats.round_s, draft, verify)
                else:
                    self.bandit.add(arm, slot)
            if stats.verify_s > 0:
                self.verify_cost.update(_verify_features(stats.n_nodes + 1, load), stats.verify_s)
            if budget.depth == 0 and next_slot is not None:
                self._plain_rounds[next_slot] = min(self._plain_rounds[next_slot] + 1, self.acceptance.cap)
                self.plain_committed[next_slot] += (
                    (stats.committed - self.plain_committed[next_slot]) / self._plain_rounds[next_slot])
            if budget.depth == 0 or not stats.accepted_per_depth:
                return
            width = width_class(budget.depth, budget.max_nodes)
            self.acceptance.record(width, arm, stats.accepted_per_depth, stats.slots)
            if stats.draft_s > 0:
                self.draft_cost.update(_draft_features(steps, stats.n_nodes, load), stats.draft_s)

    def _seconds(self, steps: np.ndarray, next_slot: int, load: int) -> np.ndarray:
        """Predicted round seconds (draft + verify) of every arm, shape [arms]."""
        draft = np.maximum(_dot(self.draft_cost.theta, _draft_features(steps, self.nodes, load)), 0.0)
        tokens = np.where(self.depths == 0, self.plain_committed[next_slot], self.nodes + 1)
        verify = np.maximum(_dot(self.verify_cost.theta, _verify_features(tokens, load)), MIN_SECONDS)
        return np.where(self.depths > 0, draft, 0.0) + verify

    def predict(self, next_slot: int, in_flight: int) -> tuple[np.ndarray, np.ndarray]:
        """Expected committed tokens and round seconds of every arm, each shape [arms]."""
        with self.lock:
            slots = (next_slot + self._levels) % N_SLOTS  # slot at each depth
            a = self.acceptance.table()[np.arange(len(self.arms))[:, None], self._levels[None, :], slots[None, :]]
            a = np.where(self._drafted, a, 0.0)
            # E[committed] = 1 + sum_k prod_{j<=k} a_j: depth k is committed iff depths 1..k all pass; +1 bonus.
            committed = 1.0 + np.cumprod(a, axis=1).sum(axis=1)
            committed = np.where(self.depths == 0, self.plain_committed[next_slot], committed)
            steps = (self._drafted & (slots != SEP_SLOT)[None, :]).sum(axis=1)  # forced SEP needs no draft step
            seconds = self._seconds(steps, next_slot, max(in_flight, 1) - 1)
            return committed, seconds * self.bandit.time_correction(self.draft_cost.theta, self.verify_cost.theta)

    def node_cap(self, in_flight: int) -> int:
        """Most tree nodes a round may draft at this load: MAX_NODES up to overload_fraction of the in-flight cap,
        then shrinking linearly to 0 (no speculation) at the cap.

        Near the cap the target's batches are full of other requests' work: speculation is turned down before
        the server starts refusing requests, whatever the cost model has learnt so far.
        """
        if not self.max_in_flight:
            return MAX_NODES
        soft = self.overload_fraction * self.max_in_flight
        if in_flight <= soft:
            return MAX_NODES
        return int(MAX_NODES * max(0.0, self.max_in_flight - in_flight) / max(1.0, self.max_in_flight - soft))

    def arm_index(self, budget: Budget) -> int | None:
        return self._index.get(budget)


def _first(slots: Sequence[int]) -> int | None:
    return slots[0] if slots else None


# ----------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------


class FixedPolicy:
    """The same budget every round; Budget(0, 0) is "off" (plain decoding on the target)."""

    def __init__(self, depth: int, nodes: int, *, shared: SharedStats | None = None):
        self.budget = Budget(depth, nodes)
        self.name = "off" if depth == 0 else f"fixed:{depth}:{nodes}"
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
        return Budget(req.depth, req.depth)

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
    """UCB over (depth, nodes) arms whose means come from a model of this round's context.

    score(arm) = min(rate / best_rate + c * sqrt(ln(1 + N_slot) / n_slot,arm * best_s / arm_s),
                     (depth + 1) / arm_s / best_rate)
    rate = E[committed] / E[round seconds] for the next slot and current load: E[committed] from the
    per-arm, per-depth, per-slot acceptance estimates (AcceptanceModel), seconds from the load-aware linear
    cost fits times the arm's own observed/predicted time ratio. Dividing by the best arm's rate keeps the
    means in [0, 1] whatever the hardware or load, so the bonus is on the same scale; counts are per next
    slot and arm, discounted, so an arm nobody plays drifts back into exploration. The second term caps
    optimism at what the arm could do if every draft token were accepted. Depth 0 is an arm like any other.
    Arms never tried go first (once each per SharedStats).
    """

    name = "adaptive"

    def __init__(self, shared: SharedStats | None = None, *, exploration: float = 0.1):
        self.shared = shared if shared is not None else SharedStats()
        self.exploration = exploration

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        shared = self.shared
        with shared.lock:
            committed, seconds = shared.predict(next_slot, in_flight)
            rate = committed / seconds
            best = int(np.argmax(rate))
            cost = np.minimum(1.0, seconds[best] / seconds)
            score = rate / rate[best] + shared.bandit.bonus(next_slot, self.exploration, cost)
            # No optimism beyond the possible: an arm cannot commit more than depth + 1 tokens a round (a plain
            # round: its forced chain + 1, which it commits for sure).
            most = np.where(shared.depths == 0, committed, shared.depths + 1)
            ceiling = most / seconds / rate[best]
            score = np.where(shared.bandit.tried(), np.minimum(score, ceiling), score)
            score = np.where(shared.nodes <= shared.node_cap(in_flight), score, -np.inf)  # depth 0 always fits
            req.arm = int(np.argmax(score))
            shared.bandit.start(next_slot, req.arm)
        req.next_slot = next_slot
        return shared.arms[req.arm]

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1
        with self.shared.lock:
            if req.arm is not None:
                self.shared.bandit.finish(req.next_slot, req.arm)
            self.shared.record(stats, req.next_slot)
        req.arm = None


# ----------------------------------------------------------------------------------------------
# Construction from a client's spec string
# ----------------------------------------------------------------------------------------------

SPEC_HELP = "'adaptive' (default), 'heuristic[:START]', 'off' or 'fixed:DEPTH:NODES' (e.g. 'fixed:3:16')"


def make_policy(spec: str = "adaptive", **kw: object) -> Policy:
    """A policy from its spec; kw go to the constructor, e.g. shared=SharedStats() (every spec takes it).

    Pass one process-wide SharedStats to every policy so requests learn together (a fixed or heuristic
    request's rounds teach the adaptive ones too); without it an adaptive policy learns on its own.
    """
    name, *args = spec.strip().lower().split(":") if spec.strip() else ["adaptive"]
    try:
        ints = [int(a) for a in args]
    except ValueError:
        raise ValueError(f"bad speculation policy {spec!r}: arguments must be integers; use {SPEC_HELP}") from None
    try:
        if name == "adaptive" and not ints:
            return AdaptivePolicy(**kw)  # type: ignore[arg-type]
        if name == "off" and not ints:
            return FixedPolicy(0, 0, **kw)  # type: ignore[arg-type]
        if name == "heuristic" and len(ints) <= 1:
            return HeuristicPolicy(*ints, **kw)  # type: ignore[arg-type]
        if name == "fixed" and len(ints) == 2:
            return FixedPolicy(*ints, **kw)  # type: ignore[arg-type]
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

    def __init__(self, default_spec: str = "adaptive", *, max_in_flight: int | None = None, max_contexts: int = 32):
        self.default_spec = default_spec
        self.max_in_flight = max_in_flight
        self.max_contexts = max_contexts
        self._stats: OrderedDict[tuple[str, str], SharedStats] = OrderedDict()
        self._policies: dict[tuple[str, str, str], Policy] = {}

    def stats(self, drafter: str, mode: str) -> SharedStats:
        key = (drafter, mode)
        if key not in self._stats:
            self._stats[key] = SharedStats(max_in_flight=self.max_in_flight)
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
