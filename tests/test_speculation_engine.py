"""The speculation loop in process (specrec.speculation.engine over the local adapters): every policy, drafter and
shape commits exactly what plain greedy decoding commits; ready trees and failing drafters never change output."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from specrec.artifacts import Artifacts
from specrec.decoding import decode
from specrec.drafting.base import Drafter, load_drafter
from specrec.drafting.offline import eval_users
from specrec.drafting.random_tree import random_tree
from specrec.models.llama import Transformer
from specrec.speculation.engine import Proposal
from specrec.speculation.local import LocalProposer, speculate
from specrec.speculation.policy import Budget, RequestState, RoundStats, make_policy
from specrec.verify.engine import TargetVerifier
from tests.drafter_artifacts import ensure_tiny_drafters

POLICIES = ["off", "fixed:4:16", "fixed:16:64", "chain:8", "heuristic", "adaptive"]


@pytest.fixture(scope="module")
def drafters(tiny_artifacts: Artifacts) -> dict[str, Drafter]:
    directory = ensure_tiny_drafters(tiny_artifacts)
    return {name: load_drafter(name, directory) for name in ("model", "retrieval", "hybrid")}


@pytest.fixture(scope="module")
def target(tiny_artifacts: Artifacts) -> TargetVerifier:
    return TargetVerifier(tiny_artifacts.directory, max_sequences=4)


@pytest.fixture(scope="module")
def cases(tiny_artifacts: Artifacts, tiny_target: Transformer) -> list[tuple[list[int], list[int]]]:
    """(prompt, plain greedy continuation) of held-out users: the reference every run must equal."""
    prompts = [tiny_artifacts.prompt(u) for u in eval_users(tiny_artifacts, 3)]
    return [(p, d.tokens) for p, d in zip(prompts, decode(tiny_target, tiny_artifacts.constraint(), prompts),
                                          strict=True)]


class ConfidentTrees:
    """Deep trees cut by a confidence stop: what the adaptive policy asks for, fixed here."""

    name = "confident"

    def __init__(self, min_path_prob: float):
        self.budget = Budget(16, 48, 4, min_path_prob)

    def new_request(self, next_slot: int = 0) -> RequestState:
        return RequestState(next_slot=next_slot)

    def choose(self, req: RequestState, next_slot: int, in_flight: int) -> Budget:
        return self.budget

    def observe(self, req: RequestState, stats: RoundStats) -> None:
        req.rounds += 1


@pytest.mark.parametrize("spec", POLICIES)
@pytest.mark.parametrize("drafter", ["model", "retrieval", "hybrid"])
def test_every_policy_commits_plain_greedy_output(tiny_artifacts, drafters, target, cases, spec, drafter):
    policy = make_policy(spec)
    for prompt, reference in cases:
        out, stats = speculate(prompt, tiny_artifacts.constraint(), policy, target, drafters[drafter])
        assert out == reference
        assert stats.committed == len(reference) and stats.fallback_rounds == 0
    assert target.live_sequences == 0


@pytest.mark.parametrize("floor", [0.05, 0.5])
def test_confidence_stopped_trees_are_lossless_and_the_first_rides_on_start(tiny_artifacts, drafters, target, cases,
                                                                             floor):
    for prompt, reference in cases:
        out, stats = speculate(prompt, tiny_artifacts.constraint(), ConfidentTrees(floor), target, drafters["model"])
        assert out == reference
        # START carried a tree: no round went without one, unless the drafter was unsure of every root child
        assert stats.tree_rounds >= stats.rounds - 2 if floor < 0.1 else stats.tree_rounds >= 1


def test_ready_trees_never_change_output_and_are_used(tiny_artifacts, drafters, target, cases):
    ready = tree_rounds = 0
    for prompt, reference in cases:
        out, stats = speculate(prompt, tiny_artifacts.constraint(), make_policy("fixed:8:24"), target,
                               drafters["model"], ahead_guesses=12)  # two waves, ranked as they learn
        assert out == reference
        # the first tree rides on START, before any verification it could hide behind: counted apart, never ready
        assert stats.start_trees == 1
        assert stats.ready_trees <= stats.tree_rounds - stats.start_trees
        ready, tree_rounds = ready + stats.ready_trees, tree_rounds + stats.tree_rounds
    assert ready > 0


class Flaky(LocalProposer):
    """Random trees (mostly rejected), then the drafter dies for good after `rounds` proposals."""

    def __init__(self, drafter: Drafter, tiny_artifacts: Artifacts, rounds: int):
        super().__init__(drafter, tiny_artifacts.constraint())
        self.left, self.rng = rounds, np.random.default_rng(0)
        self.alive = True

    @property
    def available(self) -> bool:
        return self.alive

    async def propose(self, committed: Sequence[int], news: list[list[int]], budget: Budget) -> Proposal | None:
        self.left -= 1
        if self.left < 0:
            self.alive = False
            return None
        state = self.constraint.start(list(committed))
        tokens, parents = random_tree(self.constraint, state, self.rng, budget.max_nodes)
        return Proposal(tokens, parents)


def test_bad_and_failing_drafters_cost_speed_not_output(tiny_artifacts, drafters, target, cases):
    for prompt, reference in cases:
        flaky = Flaky(drafters["model"], tiny_artifacts, 4)
        out, stats = speculate(prompt, tiny_artifacts.constraint(), make_policy("fixed:4:16"), target, None,
                               proposer=flaky)
        assert out == reference
        assert stats.fallback_rounds == 1 and stats.tree_rounds <= 4  # dropped once, then plain rounds
