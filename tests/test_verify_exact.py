"""The stochastic acceptance rule, exactly: every outcome of its random draws enumerated with its probability, the
output distribution compared with the target's own sampling (no Monte Carlo, so no test that passes by luck).

Top-k children (what our drafters send) must give exactly the target's distribution over the committed tokens
whatever draft probabilities come along; children sampled i.i.d. from q must too, under the q rule; and the q rule on
top-k children (what a client following the old contract got) is shown to be biased, so the tests can tell.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from specrec.decoding.select import constrained_probs
from specrec.verify.rules import NO_BONUS, AcceptParams, accept, children_of

VOCAB = 7


class ScriptedDraws:
    """Draws that follow a script of choices (the index of the option taken at each draw, 0 past its end) and
    record how many options each draw had: a depth-first walk over scripts visits every outcome once."""

    def __init__(self, script: list[int]):
        self.script, self.chosen, self.options, self.prob = script, [], [], 1.0

    def _choose(self, options: list[tuple[Any, float]]) -> Any:
        options = [(v, p) for v, p in options if p > 0]
        i = self.script[len(self.chosen)] if len(self.chosen) < len(self.script) else 0
        self.chosen.append(i)
        self.options.append(len(options))
        value, p = options[i]
        self.prob *= p
        return value

    def bernoulli(self, prob: float) -> bool:
        prob = min(max(prob, 0.0), 1.0)
        return self._choose([(True, prob), (False, 1.0 - prob)])

    def categorical(self, probs: torch.Tensor) -> int:
        total = float(probs.sum())
        return self._choose([(i, float(probs[i]) / total) for i in range(len(probs))])


def exact_outcomes(run: Callable[[ScriptedDraws], tuple[int, ...]]) -> dict[tuple[int, ...], float]:
    out: dict[tuple[int, ...], float] = defaultdict(float)
    script: list[int] = []
    while True:
        draws = ScriptedDraws(script)
        out[run(draws)] += draws.prob
        j = max((k for k in range(len(draws.chosen)) if draws.chosen[k] + 1 < draws.options[k]), default=None)
        if j is None:
            return dict(out)
        script = draws.chosen[:j] + [draws.chosen[j] + 1]


def target_outcomes(tokens: list[int], parents: list[int], logits: torch.Tensor, allowed: list, temperature: float
                    ) -> dict[tuple[int, ...], float]:
    """The target sampling on its own, stopped at its first token that is not a child in the tree (or at the end)."""
    kids = children_of(parents)
    out: dict[tuple[int, ...], float] = defaultdict(float)

    def walk(row: int, prefix: tuple[int, ...], prob: float) -> None:
        if allowed[row] is None or len(allowed[row]) == 0:
            out[prefix] += prob
            return
        p = constrained_probs(logits[row], allowed[row], temperature)
        child = {tokens[c]: c for c in kids[row]}
        for tok in range(VOCAB):
            if float(p[tok]) > 0:
                if tok in child:
                    walk(child[tok] + 1, prefix + (tok,), prob * float(p[tok]))
                else:
                    out[prefix + (tok,)] += prob * float(p[tok])

    walk(0, (), 1.0)
    return dict(out)


def committed(tokens: list[int], result: tuple[list[int], int]) -> tuple[int, ...]:
    path, bonus = result
    return tuple(tokens[n] for n in path) + (() if bonus == NO_BONUS else (bonus,))


def total_variation(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def top_k_tree(rng: np.random.Generator, q: torch.Tensor, depth: int, width: int) -> tuple[list[int], list[int]]:
    """Deterministic top-k children by q at every node, down to `depth` (the drafters' way), one branch kept deeper."""
    tokens, parents, frontier = [], [], [-1]
    for _ in range(depth):
        nxt = []
        for parent in frontier:
            row = q[parent + 1]
            for tok in torch.topk(row, width).indices.tolist():
                tokens.append(tok)
                parents.append(parent)
                nxt.append(len(tokens) - 1)
        frontier = nxt[:2]  # two nodes of each level grow on: some leaves end early, some paths go deep
    return tokens, parents


def random_rows(rng: np.random.Generator, n: int, flat: bool = False) -> torch.Tensor:
    scale = 0.3 if flat else 2.0
    return torch.from_numpy(rng.normal(0, scale, (n, VOCAB))).float()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_top_k_children_give_exactly_the_targets_distribution_whatever_probs_come_along(seed, temperature):
    rng = np.random.default_rng(seed)
    q_logits = random_rows(rng, 1 + 2 + 4 * 2 + 4 * 2 + 8)  # enough rows for the tree below
    q = torch.softmax(q_logits.double(), dim=-1)
    tokens, parents = top_k_tree(rng, q, depth=3, width=2 + seed % 2)
    n = len(tokens)
    logits = random_rows(rng, n + 1, flat=seed % 2 == 1)
    allowed = [np.arange(VOCAB)] * (n + 1)
    allowed[n // 2 + 1] = np.array([1, 3, 4, 5])  # a grammar that allows only some tokens at one node
    want = target_outcomes(tokens, parents, logits, allowed, temperature)
    params = AcceptParams(mode="stochastic", temperature=temperature)
    for probs in (None, q[: n + 1].float()):  # the drafter's q sent along changes nothing for top-k children
        got = exact_outcomes(lambda d, probs=probs: committed(tokens, accept(tokens, parents, logits, allowed, params,
                                                                             d, probs)))
        assert total_variation(got, want) < 1e-9, (probs is not None, total_variation(got, want))
    assert max(len(k) for k in want) >= 4  # depth 3 plus a bonus: the joint of the first tokens is checked


def test_the_q_rule_on_top_k_children_is_biased_and_detected():
    """What a client following the old contract got (DRAFT_PROBS with top-k trees switched the rule): not the
    target's distribution. Shown here so that the exact test above is known to catch it."""
    rng = np.random.default_rng(11)
    q = torch.softmax(random_rows(rng, 20).double(), dim=-1)
    tokens, parents = top_k_tree(rng, q, depth=3, width=3)
    n = len(tokens)
    logits, allowed = random_rows(rng, n + 1), [np.arange(VOCAB)] * (n + 1)
    want = target_outcomes(tokens, parents, logits, allowed, 1.0)
    misuse = AcceptParams(mode="stochastic", draft_children="sampled")
    got = exact_outcomes(lambda d: committed(tokens, accept(tokens, parents, logits, allowed, misuse, d,
                                                            q[: n + 1].float())))
    assert total_variation(got, want) > 0.02


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("flat", [False, True])
def test_children_sampled_from_q_give_exactly_the_targets_distribution(k, flat):
    """k siblings drawn i.i.d. from q (duplicates kept), the q rule: the drafter's draws and the rule's enumerated
    together, the first token is distributed exactly as the target's."""
    rng = np.random.default_rng(k + 10 * flat)
    q = torch.softmax(random_rows(rng, 1, flat=flat)[0].double(), dim=-1)
    logits = random_rows(rng, k + 1, flat=flat)
    want = constrained_probs(logits[0], np.arange(VOCAB), 1.0)
    params = AcceptParams(mode="stochastic", draft_children="sampled")

    def run(draws: ScriptedDraws) -> tuple[int, ...]:
        tokens = [draws.categorical(q) for _ in range(k)]
        allowed = [np.arange(VOCAB)] + [np.array([], dtype=np.int64)] * k  # each child ends the list: depth 1
        probs = torch.zeros((k + 1, VOCAB))
        probs[0] = q.float()
        return committed(tokens, accept(tokens, [-1] * k, logits, allowed, params, draws, probs))

    got = exact_outcomes(run)
    assert max(abs(got.get((t,), 0.0) - float(want[t])) for t in range(VOCAB)) < 1e-6


def test_sampled_children_without_their_q_are_refused():
    logits, allowed = torch.zeros((2, VOCAB)), [np.arange(VOCAB)] * 2
    with pytest.raises(ValueError, match="DRAFT_PROBS"):
        accept([3], [-1], logits, allowed, AcceptParams(mode="stochastic", draft_children="sampled"))
    with pytest.raises(ValueError, match="draft_children"):
        accept([3], [-1], logits, allowed, AcceptParams(mode="stochastic", draft_children="beam"))
