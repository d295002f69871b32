"""Speculation policies in simulated worlds: adaptive vs every fixed arm vs heuristic vs off, side by side."""

from __future__ import annotations

import argparse
import bisect
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from specrec.speculation.policy import (
    N_SLOTS,
    SEP_SLOT,
    Budget,
    Policy,
    RoundStats,
    default_arms,
    make_policy,
)

LAST_CODE_SLOT = SEP_SLOT - 1

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

    Acceptance: the drafter's top candidate at a code slot is the target's token with probability
    accept[slot] * drift**depth; each extra sibling at a level catches `sibling_gain` of the remaining miss.
    SEP is forced (free, always accepted); the last code level is forced with probability forced_last_code.
    Tree: EAGLE-2-like, a top path whose levels get the extra nodes where they raise expected accepted
    length most; once a sibling (not the top candidate) is accepted, deeper levels are a chain under it.
    Costs: drafting = hop + step per unforced level + per node; verification of t tokens with L requests in
    flight = verify_scale * verify_curve(L * t) (Triton batches all L trees into one forward); lognormal noise.
    """

    name: str
    accept: tuple[float, float, float, float]
    sibling_gain: float = 0.5
    drift: float = 1.0
    forced_last_code: float = 0.0
    draft_hop_s: float = 0.3e-3
    draft_step_s: float = 0.9e-3
    draft_node_s: float = 0.01e-3
    verify_scale: float = 1.0
    loads: tuple[int, ...] = (1,)
    noise: float = 0.05
    items: int = 10

    def top1(self, slot: int, depth: int) -> float:
        return 1.0 if slot == SEP_SLOT else self.accept[slot] * self.drift**depth

    def hit(self, slot: int, depth: int, width: int) -> float:
        """P(the target's token is among `width` candidates at this level)."""
        return 1.0 - (1.0 - self.top1(slot, depth)) * (1.0 - self.sibling_gain) ** (width - 1)

    def verify_s(self, tokens: int, in_flight: int) -> float:
        return self.verify_scale * verify_curve(in_flight * tokens)


@lru_cache(maxsize=4096)
def tree_widths(world: World, max_nodes: int, slots: tuple[int, ...], forced: tuple[bool, ...]) -> tuple[int, ...]:
    """Candidates per level: a chain, then each spare node where it most raises E[accepted] (forced levels: 1)."""
    widths = [1] * len(slots)
    free = [d for d, f in enumerate(forced) if not f]

    def expected(ws: list[int]) -> float:
        total, survive = 0.0, 1.0
        for d, (s, f) in enumerate(zip(slots, forced, strict=True)):
            survive *= 1.0 if f else world.hit(s, d, ws[d])
            total += survive
        return total

    for _ in range(max_nodes - len(slots) if free else 0):
        gains = []
        for d in free:
            widths[d] += 1
            gains.append((expected(widths), -d))
            widths[d] -= 1
        widths[-max(gains)[1]] += 1
    return tuple(widths)


def forced_chain_slots(world: World, next_slot: int, rng: random.Random) -> list[int]:
    """Slots the grammar forces from next_slot: SEP always, the last code level with forced_last_code."""
    if next_slot == LAST_CODE_SLOT and rng.random() < world.forced_last_code:
        return [LAST_CODE_SLOT, SEP_SLOT]
    return [SEP_SLOT] if next_slot == SEP_SLOT else []


def play_round(world: World, budget: Budget, next_slot: int, in_flight: int, rng: random.Random) -> RoundStats:
    """One draft -> verify round of `budget` starting at `next_slot`."""
    jitter = math.exp(rng.gauss(0.0, world.noise))
    if budget.depth == 0:  # plain step: the target checks the grammar's forced chain with its one new token
        chain = forced_chain_slots(world, next_slot, rng)
        return RoundStats(budget, len(chain), [True] * len(chain), chain, 0.0,
                          world.verify_s(len(chain) + 1, in_flight) * jitter, len(chain), in_flight)
    slots = tuple((next_slot + d) % N_SLOTS for d in range(budget.depth))
    forced = tuple(s == SEP_SLOT or (s == LAST_CODE_SLOT and rng.random() < world.forced_last_code) for s in slots)
    widths = tree_widths(world, budget.max_nodes, slots, forced)
    path: list[bool] = []
    on_top = True  # still on the top path, where the extra candidates hang
    for d, (s, f) in enumerate(zip(slots, forced, strict=True)):
        u = rng.random()
        ok = f or u < world.hit(s, d, widths[d] if on_top else 1)
        on_top = on_top and (f or u < world.top1(s, d))
        path.append(ok)
        if not ok:
            break
    accepted = sum(path)
    path += [False] * (budget.depth - len(path))
    n_nodes = sum(widths)
    steps = sum(not f for f in forced)
    draft = (world.draft_hop_s + world.draft_step_s * steps + world.draft_node_s * n_nodes) * jitter
    verify = world.verify_s(n_nodes + 1, in_flight) * jitter
    return RoundStats(budget, accepted, path, list(slots), draft, verify, n_nodes, in_flight)


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
        in_flight: int | None = None) -> Result:
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
    return out


def fixed_specs(arms: tuple[Budget, ...] | None = None) -> list[str]:
    return [f"fixed:{a.depth}:{a.max_nodes}" for a in (arms or default_arms()) if a.depth > 0]


CODES_GOOD = (0.55, 0.8, 0.85, 0.95)  # a decent drafter: the first code of an item is the hard one
WORLDS = (
    World("cpu", CODES_GOOD, drift=0.98, forced_last_code=0.5),
    World("gpu-like", (0.8, 0.92, 0.95, 0.98), drift=0.99, forced_last_code=0.5, draft_hop_s=0.2e-3,
          draft_step_s=0.3e-3, verify_scale=0.3),
    World("weak-drafter", (0.1, 0.15, 0.15, 0.3), sibling_gain=0.05, drift=0.95),
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
            policy = make_policy(spec)
            res = run(world, policy, args.requests, args.seed)
            rates[spec][world.name] = res.rate
            if spec == "adaptive":
                depth0[world.name] = res.chosen[Budget(0, 0)] / res.rounds
                top = res.chosen.most_common(1)[0][0]
                favourite[world.name] = f"{top.depth}:{top.max_nodes}"
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
