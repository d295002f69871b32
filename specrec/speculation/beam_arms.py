"""Which way to run a beam search, chosen from what each way has cost: plain, or a drafted tree of a few sizes.

Whether a tree pays depends on the hardware: where a forward's cost hardly grows with its tokens (a GPU) a tree
that settles several beam levels in one forward wins; where it grows linearly (this project's CPU benchmark) the
prompt's prefill dominates and a tree costs about what it saves, or more for wide beams and under load. So the
orchestrator measures instead of assuming: per beam width and load bucket, the latency each arm has shown lately
(an exponential moving average), the cheapest arm taken, and every other arm retried once in `explore` requests,
so an arm that became cheaper (the load went away, the drafter got faster) is noticed. Plain is always an arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specrec.decoding.beam import default_tree_nodes
from specrec.speculation.policy import load_bucket
from specrec.tree_shape import MAX_TREE_NODES

PLAIN = 0  # arm: no tree
EXPLORE = 16  # one request in this many retries the arm tried longest ago
SMOOTHING = 0.2  # weight of the newest latency in an arm's average


@dataclass
class _Arms:
    latency: dict[int, float] = field(default_factory=dict)  # arm -> average seconds
    last_tried: dict[int, int] = field(default_factory=dict)  # arm -> request count when last run
    requests: int = 0


class BeamArms:
    """Arms per width: plain, a small tree (about one beam's worth of nodes per level) and the default tree."""

    def __init__(self, explore: int = EXPLORE):
        self.explore = explore
        self._by_key: dict[tuple[int, int], _Arms] = {}

    @staticmethod
    def arms(width: int) -> tuple[int, ...]:
        return tuple(dict.fromkeys((PLAIN, min(MAX_TREE_NODES, width + 16), default_tree_nodes(width))))

    def choose(self, width: int, in_flight: int) -> int:
        """PLAIN or the tree size to run this request with."""
        state = self._by_key.setdefault((width, load_bucket(in_flight)), _Arms())
        state.requests += 1
        arms = self.arms(width)
        untried = [a for a in arms if a not in state.latency]
        if untried:
            return untried[0]
        if state.requests % self.explore == 0:
            return min(arms, key=lambda a: state.last_tried.get(a, 0))
        return min(arms, key=lambda a: state.latency[a])

    def observe(self, width: int, in_flight: int, arm: int, seconds: float) -> None:
        state = self._by_key.setdefault((width, load_bucket(in_flight)), _Arms())
        old = state.latency.get(arm)
        state.latency[arm] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds
        state.last_tried[arm] = state.requests
