"""Speculation policies in simulated worlds: adaptive vs every fixed arm vs heuristic vs off, side by side."""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from specrec.speculation.policy import (
    MAX_DEPTH,
    N_SLOTS,
    SEP_SLOT,
    Budget,
    Policy,
    RoundStats,
    SharedStats,
    make_policy,
)

LAST_CODE_SLOT = SEP_SLOT - 1
DEFAULT_TOP_K = 8  # the drafter's children per node when a budget leaves top_k at 0

# LOCAL_STACK.md, target h512 L8 on 2 CPU threads: seconds for a forward over t tokens (pending root + nodes).
CPU_VERIFY = ((1, 8.7e-3), (9, 15e-3), (17, 19e-3), (33, 26e-3), (65, 28e-3))
CPU_VERIFY_SLOPE = 0.45e-3  # beyond 65 tokens: compute-bound, ~28 ms / 64 tokens


def verify_curve(tokens: float) -> float:
    """Piecewise-linear interpolation of CPU_VERIFY, linear beyond its last point."""
    xs = [x for x, _ in CPU_VERIFY]
    if tokens >= xs[-1]:
        return CPU_VERIFY[-1][1] + CPU_VERIFY_SLOPE * (tokens - xs[-1])
    i = max(1, bisect.bisect_right(xs, tokens))
    (x0, y0), (x1, y1) = CPU_VERIFY[i - 1], CPU_VERIFY[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


@dataclass(frozen=True)
class World:
    """A drafter/target pair with known acceptance and costs.

    Acceptance: at a code slot the target's token is the drafter's top candidate with probability
    a = accept[slot] * drift**depth, its i-th sibling (i >= 1) with (1 - a) * g * (1 - g)**(i - 1), g =
    sibling_gain, whatever the parent. SEP is forced (q = 1, always accepted); the last code level is forced
    with probability forced_last_code. The drafter states q = a**confidence for its top candidate (1: calibrated,
    < 1: over-confident) and shares the rest among siblings in the true proportions.
    Tree: best-first by path q (EAGLE-2): the best max_nodes nodes within depth, top_k children per node, none
    below min_path_prob.
    Costs: drafting = hop + step per unforced level + per node; verification of t tokens with L requests in
    flight = verify_scale * verify_curve(L * t) (Triton batches all L trees into one forward); lognormal noise.
    """

    name: str
    accept: tuple[float, float, float, float]
    sibling_gain: float = 0.5
    drift: float = 1.0
    forced_last_code: float = 0.0
    confidence: float = 1.0
    draft_hop_s: float = 0.3e-3
    draft_step_s: float = 0.9e-3
    draft_node_s: float = 0.01e-3
    verify_scale: float = 1.0
    loads: tuple[int, ...] = (1,)
    noise: float = 0.05
    items: int = 10

    def top1(self, slot: int, depth: int) -> float:
        return 1.0 if slot == SEP_SLOT else self.accept[slot] * self.drift**depth

    def candidates(self, slot: int, depth: int, k: int) -> tuple[list[float], list[float]]:
        """True probabilities and drafter q of the first k candidates at a free level."""
        a = self.top1(slot, depth)
        g = self.sibling_gain
        true = [a] + [(1.0 - a) * g * (1.0 - g) ** (i - 1) for i in range(1, k)]
        q_top = a**self.confidence
        q = [q_top] + [(1.0 - q_top) * p / (1.0 - a) if a < 1 else 0.0 for p in true[1:]]
        return true, q

    def verify_s(self, tokens: int, in_flight: int) -> float:
        return self.verify_scale * verify_curve(in_flight * tokens)


@dataclass(frozen=True)
class Tree:
    parents: tuple[int, ...]
    depths: tuple[int, ...]
    index: tuple[int, ...]  # which candidate of its level each node is (0 = top)
    logq: tuple[float, ...]
    children: dict[tuple[int, int], int]  # (parent node or -1, candidate index) -> node


@lru_cache(maxsize=8192)
def build_tree(world: World, budget: Budget, slots: tuple[int, ...], forced: tuple[bool, ...]) -> Tree:
    """The best-first tree within `budget`: nodes by decreasing path q (parents before children)."""
    k = budget.top_k or DEFAULT_TOP_K
    floor = math.log(budget.min_path_prob) if budget.min_path_prob > 0 else -math.inf
    heap: list[tuple[float, int, int, int]] = []  # (-path logq, depth, parent, candidate index)

    def push_children(parent: int, depth: int, logq: float) -> None:
        if depth >= len(slots):
            return
        if forced[depth]:
            heapq.heappush(heap, (-logq, depth, parent, 0))
            return
        _, q = world.candidates(slots[depth], depth, k)
        for i, qi in enumerate(q):
            if qi > 0:
                heapq.heappush(heap, (-(logq + math.log(qi)), depth, parent, i))

    parents: list[int] = []
    depths: list[int] = []
    index: list[int] = []
    logqs: list[float] = []
    push_children(-1, 0, 0.0)
    while heap and len(parents) < budget.max_nodes:
        neg, depth, parent, i = heapq.heappop(heap)
        if -neg < floor:
            break
        parents.append(parent)
        depths.append(depth)
        index.append(i)
        logqs.append(-neg)
        push_children(len(parents) - 1, depth + 1, -neg)
    children = {(p, i): n for n, (p, i) in enumerate(zip(parents, index, strict=True))}
    return Tree(tuple(parents), tuple(depths), tuple(index), tuple(logqs), children)


def forced_chain_slots(world: World, next_slot: int, rng: random.Random) -> list[int]:
    """Slots the grammar forces from next_slot: SEP always, the last code level with forced_last_code."""
    if next_slot == LAST_CODE_SLOT and rng.random() < world.forced_last_code:
        return [LAST_CODE_SLOT, SEP_SLOT]
    return [SEP_SLOT] if next_slot == SEP_SLOT else []


def _target_pick(world: World, slot: int, depth: int, forced: bool, k: int, rng: random.Random) -> int:
    """Index of the target's token among the drafter's candidates at this level, -1 if none of the first k."""
    if forced:
        return 0
    true, _ = world.candidates(slot, depth, k)
    u = rng.random()
    for i, p in enumerate(true):
        u -= p
        if u < 0:
            return i
    return -1


def play_round(world: World, budget: Budget, next_slot: int, in_flight: int, rng: random.Random) -> RoundStats:
    """One draft -> verify round of `budget` starting at `next_slot`."""
    jitter = math.exp(rng.gauss(0.0, world.noise))
    if budget.depth == 0:  # plain step: the target checks the grammar's forced chain with its one new token
        chain = forced_chain_slots(world, next_slot, rng)
        return RoundStats(budget, len(chain), [True] * len(chain), chain, 0.0,
                          world.verify_s(len(chain) + 1, in_flight) * jitter, len(chain), in_flight)
    slots = tuple((next_slot + d) % N_SLOTS for d in range(budget.depth))
    forced = tuple(s == SEP_SLOT or (s == LAST_CODE_SLOT and rng.random() < world.forced_last_code) for s in slots)
    tree = build_tree(world, budget, slots, forced)
    k = budget.top_k or DEFAULT_TOP_K
    on_path: list[int] = []
    node = -1
    for d in range(len(slots)):
        child = tree.children.get((node, _target_pick(world, slots[d], d, forced[d], k, rng)))
        if child is None:
            break
        on_path.append(child)
        node = child
    depth = max(tree.depths, default=-1) + 1
    accepted = len(on_path)
    n_nodes = len(tree.parents)
    steps = len({d for d in tree.depths if not forced[d]})
    draft = (world.draft_hop_s + world.draft_step_s * steps + world.draft_node_s * n_nodes) * jitter
    verify = world.verify_s(n_nodes + 1, in_flight) * jitter
    path = set(on_path)
    return RoundStats(budget, accepted, [d < accepted for d in range(depth)], list(slots[:depth]), draft, verify,
                      n_nodes, in_flight, path_logq=list(tree.logq),
                      node_accepted=[n in path for n in range(n_nodes)])


class SimClock:
    """Simulated seconds: run() advances it by each round's time, for policies that forget by elapsed time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Result:
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    chosen: Counter[Budget] = field(default_factory=Counter)
    chosen_by_slot: Counter[tuple[int, int]] = field(default_factory=Counter)  # (next_slot, depth) -> rounds

    @property
    def rate(self) -> float:
        """Committed tokens per second of round time."""
        return self.tokens / self.seconds


def run(world: World, policy: Policy, requests: int, seed: int = 0, result: Result | None = None,
        in_flight: int | None = None, clock: SimClock | None = None) -> Result:
    """Decode `requests` lists of world.items items with `policy`; the load per request is drawn from world.loads
    (or fixed by in_flight) with its own generator, so every policy sees the same load sequence."""
    loads, rng = random.Random(seed), random.Random(seed + 1)
    out = result if result is not None else Result()
    total = world.items * N_SLOTS
    for _ in range(requests):
        load = in_flight if in_flight is not None else loads.choice(world.loads)
        req = policy.new_request(0)
        done = 0
        while done < total:
            slot = done % N_SLOTS
            budget = policy.choose(req, slot, load)
            stats = play_round(world, budget, slot, load, rng)
            policy.observe(req, stats)
            committed = min(stats.committed, total - done)  # the list ends: nothing is drafted past EOS
            done += committed
            out.tokens += committed
            out.seconds += stats.round_s
            out.rounds += 1
            out.chosen[budget] += 1
            out.chosen_by_slot[slot, budget.depth] += 1
            if clock is not None:
                clock.now += stats.round_s
    return out


FIXED_SPECS = ("fixed:1:1", "fixed:2:8", "fixed:3:16", "fixed:4:16", "fixed:6:32", "fixed:8:32",
               f"fixed:{MAX_DEPTH}:64", "chain:4", "chain:8", "chain:12")


def fixed_specs() -> list[str]:
    """The fixed budgets every comparison runs: trees of a few sizes and chains."""
    return list(FIXED_SPECS)


CODES_GOOD = (0.55, 0.8, 0.85, 0.95)  # a decent drafter: the first code of an item is the hard one
WORLDS = (
    World("cpu", CODES_GOOD, drift=0.98, forced_last_code=0.5),
    World("gpu-like", (0.8, 0.92, 0.95, 0.98), drift=0.99, forced_last_code=0.5, draft_hop_s=0.2e-3,
          draft_step_s=0.3e-3, verify_scale=0.3),
    World("weak-drafter", (0.1, 0.15, 0.15, 0.3), sibling_gain=0.05, drift=0.95),
    World("over-confident", CODES_GOOD, drift=0.98, forced_last_code=0.5, confidence=0.4),
    World("busy", CODES_GOOD, drift=0.98, forced_last_code=0.5, loads=(64,)),
    World("mixed-load", CODES_GOOD, drift=0.98, forced_last_code=0.5, loads=(1, 1, 2, 4, 8, 16, 32, 64)),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300, help="lists of 10 items decoded per policy and world")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    specs = ["adaptive", "heuristic", "off", *fixed_specs()]
    rates: dict[str, dict[str, float]] = {s: {} for s in specs}
    depth0: dict[str, float] = {}
    favourite: dict[str, str] = {}
    started = time.perf_counter()
    for world in WORLDS:
        for spec in specs:
            clock = SimClock()
            policy = make_policy(spec, shared=SharedStats(clock=clock))
            res = run(world, policy, args.requests, args.seed, clock=clock)
            rates[spec][world.name] = res.rate
            if spec == "adaptive":
                depth0[world.name] = res.chosen[Budget(0, 0)] / res.rounds
                top = res.chosen.most_common(1)[0][0]
                favourite[world.name] = f"{top.depth}:{top.max_nodes}:{top.min_path_prob:.2g}"[:13]
    names = [w.name for w in WORLDS]
    print(f"committed tokens/s of round time, {args.requests} lists x 10 items per policy and world, "
          f"seed {args.seed}")
    print(f"{'policy':<16}" + "".join(f"{n:>14}" for n in names))
    for spec in specs:
        print(f"{spec:<16}" + "".join(f"{rates[spec][n]:>14.1f}" for n in names))
    fixed = fixed_specs()
    best = {n: max(fixed + ["off"], key=lambda s, n=n: rates[s][n]) for n in names}
    print(f"{'best fixed':<16}" + "".join(f"{best[n]:>14}" for n in names))
    print(f"{'adaptive/best':<16}" + "".join(f"{rates['adaptive'][n] / rates[best[n]][n]:>14.3f}" for n in names))
    print(f"{'adaptive/off':<16}" + "".join(f"{rates['adaptive'][n] / rates['off'][n]:>14.3f}" for n in names))
    print(f"{'adaptive depth0':<16}" + "".join(f"{depth0[n]:>14.2f}" for n in names))
    print(f"{'adaptive top':<16}" + "".join(f"{favourite[n]:>14}" for n in names))
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
